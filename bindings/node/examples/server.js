// A Node http.Server served through a quick tunnel, in-process: server.listen() is never called.
//   node bindings/node/examples/server.js      # prints the public URL; Ctrl-C
const http = require('http');
const { startTunnel } = require('cfqt');

const server = http.createServer((req, res) => {
  if (req.method === 'POST') {
    let total = 0;
    req.on('data', (chunk) => { total += chunk.length; });   // the upload streams in
    req.on('end', () => res.end(`received ${total} bytes\n`));
    return;
  }
  res.setHeader('Content-Type', 'text/plain');
  res.end(`Hello from Node, served in-process by cfqt: ${req.url}\n`);
});

async function main() {
  // Tests point this at the offline edge emulator (cfqt-edge); unset: trycloudflare.com.
  const options = JSON.parse(process.env.CFQT_OPTIONS || '{}');
  const tunnel = await startTunnel(options);
  tunnel.listen(server);
  await tunnel.waitReady();
  console.log(tunnel.url);
  const stop = async () => process.exit(await tunnel.close());   // graceful
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}

main().catch((e) => { console.error(e.message); process.exit(1); });
