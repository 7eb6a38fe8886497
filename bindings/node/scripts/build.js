// Builds the addon with node-gyp against the headers of the Node that runs this script (never
// downloading them: --nodedir points at the installed ones, e.g. /usr/include/node from Debian's
// libnode-dev or a Node package that ships them), then copies libcfqt.so next to the addon, where
// its rpath ($ORIGIN) finds it. CFQT_LIBRARY_DIR / CFQT_INCLUDE_DIR override where libcfqt and
// its headers are taken from (default: the repository's build/lib and include/).
'use strict';
const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

const here = path.resolve(__dirname, '..');
const prefix = path.resolve(path.dirname(process.execPath), '..');
const candidates = [process.env.CFQT_NODEDIR, prefix, '/usr'].filter(Boolean);
const nodedir = candidates.find((d) => fs.existsSync(path.join(d, 'include', 'node', 'node_api.h')));
if (!nodedir) {
  console.error(`cfqt: Node's headers not found (looked for include/node/node_api.h under ` +
                `${candidates.join(', ')}); install Debian's libnode-dev or set CFQT_NODEDIR`);
  process.exit(1);
}
const libDir = process.env.CFQT_LIBRARY_DIR || path.resolve(here, '../../build/lib');
const library = path.join(libDir, 'libcfqt.so');
if (!fs.existsSync(library)) {
  console.error(`cfqt: ${library} not found; run \`make build\` in the repository first, or set ` +
                'CFQT_LIBRARY_DIR to the directory holding libcfqt.so');
  process.exit(1);
}
let gyp;
try {
  gyp = require.resolve('node-gyp/bin/node-gyp.js', { paths: [here] });
} catch (e) {
  gyp = path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules',
                  'node-gyp', 'bin', 'node-gyp.js');
}
execFileSync(process.execPath, [gyp, 'rebuild', `--nodedir=${nodedir}`],
             { cwd: here, stdio: 'inherit', env: { ...process.env, CFQT_LIBRARY_DIR: libDir } });
const real = fs.realpathSync(library);
fs.copyFileSync(real, path.join(here, 'build', 'Release', 'libcfqt.so.0'));
