'use strict';
// cfqt's Node package against cfqt-edge (CFQT_BIN_DIR): an origin tunnel, and a Node
// http.Server served in-process (no socket of its own, server.listening === false).
const test = require('node:test');
const assert = require('node:assert');
const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const { startTunnel } = require('..');

const MiB = 1 << 20;

async function startEdge() {
  const bin = process.env.CFQT_BIN_DIR;
  assert.ok(bin, 'CFQT_BIN_DIR must point at the build\'s bin/ (with cfqt-edge)');
  const state = fs.mkdtempSync(path.join(os.tmpdir(), 'cfqt-node-test-'));
  const child = spawn(path.join(bin, 'cfqt-edge'),
                      ['--state-dir', state, '--edge-listen', '127.0.0.1:0', '--loglevel', 'error'],
                      { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise((resolve, reject) => {
    readline.createInterface({ input: child.stdout }).once('line', resolve);
    child.once('exit', (code) => reject(new Error(`cfqt-edge exited (${code})`)));
  });
  const ready = JSON.parse(line);
  const [host, port] = [ready.public.slice(0, ready.public.lastIndexOf(':')),
                        Number(ready.public.slice(ready.public.lastIndexOf(':') + 1))];
  return {
    child, ready, host, port,
    options(extra = {}) {
      return { quickService: `http://${ready.api}`, edges: ready.edges.slice(0, 1),
               edgeCaFile: ready.ca, haConnections: 1, gracePeriodMs: 2000, backoffBaseMs: 20,
               logLevel: 'error', ...extra };
    },
    async stop() {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      assert.strictEqual(await exited, 0);
    },
  };
}

function visit(edge, hostname, method, urlPath, body, onResponse) {
  // One request through the front door as a visitor of https://<hostname>.
  return new Promise((resolve, reject) => {
    const request = http.request({ host: edge.host, port: edge.port, method, path: urlPath,
                                   headers: { Host: hostname } }, (response) => {
      if (onResponse) {
        onResponse(response, resolve);
        return;
      }
      const chunks = [];
      response.on('data', (c) => chunks.push(c));
      response.on('end', () => resolve({ status: response.statusCode, headers: response.headers,
                                         body: Buffer.concat(chunks) }));
      response.on('error', reject);
    });
    request.on('error', reject);
    request.end(body);
  });
}

function listeningSocketsOfThisProcess() {
  const ours = new Set();
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    try {
      const target = fs.readlinkSync(`/proc/self/fd/${fd}`);
      if (target.startsWith('socket:[')) ours.add(target.slice(8, -1));
    } catch (e) { /* closed meanwhile */ }
  }
  const found = [];
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const line of fs.readFileSync(table, 'latin1').split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      if (fields[3] === '0A' && ours.has(fields[9])) found.push(fields[9]);
    }
  }
  return found;
}

function childrenOfThisProcess() {
  const children = [];
  for (const task of fs.readdirSync('/proc/self/task')) {
    const text = fs.readFileSync(`/proc/self/task/${task}/children`, 'latin1').trim();
    if (text) children.push(...text.split(/\s+/).map(Number));
  }
  return children;
}

test('origin tunnel: startTunnel({ url }), waitReady, status, metrics, close', async () => {
  const edge = await startEdge();
  const origin = http.createServer((req, res) => res.end(`origin saw ${req.url}`));
  await new Promise((resolve) => origin.listen(0, '127.0.0.1', resolve));
  try {
    const t = await startTunnel(edge.options({ url: `http://127.0.0.1:${origin.address().port}` }));
    assert.match(t.url, /^https:\/\//);
    await t.waitReady(20000);
    assert.strictEqual(t.status().readyConnections, 1);
    const r = await visit(edge, t.hostname, 'GET', '/via-origin');
    assert.strictEqual(r.status, 200);
    assert.strictEqual(r.body.toString(), 'origin saw /via-origin');
    assert.match(t.metrics(), /cloudflared_tunnel_total_requests 1/);
    assert.strictEqual(await t.close(), 0);
    assert.strictEqual(t.status().running, false);
  } finally {
    await new Promise((resolve) => origin.close(resolve));
    await edge.stop();
  }
});

test('errors carry the library message', async () => {
  await assert.rejects(startTunnel({ url: 'http://localhost:1', protocol: 'udp' }),
                       /protocol must be quic, http2 or auto/);
});

test('t.listen(httpServer): in-process requests, streaming, upload, no socket', async () => {
  const edge = await startEdge();
  try {
    const server = http.createServer((req, res) => {
      if (req.url === '/') {
        res.setHeader('Content-Type', 'text/plain');
        res.end(`hello from node ${req.method} ${req.headers.host}`);
      } else if (req.url === '/stream') {
        res.writeHead(200, { 'Content-Type': 'application/octet-stream' });
        let sent = 0;
        const pump = () => {
          while (sent < 8 * MiB) {
            sent += 64 * 1024;
            if (!res.write(Buffer.alloc(64 * 1024, 97 + (sent / 65536) % 26))) {
              res.once('drain', pump);
              return;
            }
          }
          res.end();
        };
        pump();
      } else if (req.url === '/upload') {
        const hash = crypto.createHash('sha256');
        let total = 0;
        req.on('data', (c) => { hash.update(c); total += c.length; });
        req.on('end', () => res.end(`${total} ${hash.digest('hex')}`));
      } else if (req.url === '/sse') {
        res.writeHead(200, { 'Content-Type': 'text/event-stream' });
        res.write('data: one\n\n');
        setTimeout(() => res.end('data: two\n\n'), 50);
      } else {
        res.statusCode = 404;
        res.end('not found');
      }
    });
    const t = await startTunnel(edge.options());
    t.listen(server);
    await t.waitReady(20000);

    const hello = await visit(edge, t.hostname, 'GET', '/');
    assert.strictEqual(hello.status, 200);
    assert.strictEqual(hello.body.toString(), `hello from node GET ${t.hostname}`);

    const streamed = await visit(edge, t.hostname, 'GET', '/stream');
    assert.strictEqual(streamed.status, 200);
    assert.strictEqual(streamed.body.length, 8 * MiB);

    const upload = crypto.randomBytes(4 * MiB);
    const uploaded = await visit(edge, t.hostname, 'POST', '/upload', upload);
    assert.strictEqual(uploaded.body.toString(),
                       `${upload.length} ${crypto.createHash('sha256').update(upload).digest('hex')}`);

    const sse = await visit(edge, t.hostname, 'GET', '/sse');
    assert.strictEqual(sse.body.toString(), 'data: one\n\ndata: two\n\n');

    assert.strictEqual((await visit(edge, t.hostname, 'GET', '/missing')).status, 404);

    assert.strictEqual(server.listening, false);
    assert.deepStrictEqual(listeningSocketsOfThisProcess(), []);
    assert.deepStrictEqual(childrenOfThisProcess(), [edge.child.pid]);
    assert.strictEqual(await t.close(), 0);
  } finally {
    await edge.stop();
  }
});

test('WebSocket: the server\'s upgrade event gets a two-way byte stream', async () => {
  const edge = await startEdge();
  try {
    const server = http.createServer();
    server.on('upgrade', (req, socket) => {
      const accept = crypto.createHash('sha1')
          .update(req.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11')
          .digest('base64');
      socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n' +
                   `Connection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
      socket.on('data', (frame) => socket.write(frame));   // echo the frames as they come
    });
    const t = await startTunnel(edge.options());
    t.listen(server);
    await t.waitReady(20000);
    const key = crypto.randomBytes(16).toString('base64');
    const echoed = await new Promise((resolve, reject) => {
      const request = http.request({
        host: edge.host, port: edge.port, path: '/ws',
        headers: { Host: t.hostname, Connection: 'Upgrade', Upgrade: 'websocket',
                   'Sec-WebSocket-Key': key, 'Sec-WebSocket-Version': '13' },
      });
      request.on('upgrade', (response, socket) => {
        const payload = Buffer.from('hello through the tunnel');
        const mask = crypto.randomBytes(4);
        const masked = Buffer.from(payload.map((b, i) => b ^ mask[i % 4]));
        socket.write(Buffer.concat([Buffer.from([0x81, 0x80 | payload.length]), mask, masked]));
        let received = Buffer.alloc(0);
        socket.on('data', (d) => {
          // The echo is our own (masked) frame: a raw byte stream end to end, frames untouched.
          received = Buffer.concat([received, d]);
          const length = received.length >= 2 ? received[1] & 0x7f : 0;
          const masked = received.length >= 2 && (received[1] & 0x80) !== 0;
          const start = masked ? 6 : 2;
          if (received.length >= 2 && received.length >= start + length) {
            const body = Buffer.from(received.subarray(start, start + length));
            if (masked) for (let i = 0; i < body.length; i++) body[i] ^= received[2 + (i % 4)];
            resolve(body.toString());
            socket.destroy();
          }
        });
      });
      request.on('response', (r) => reject(new Error(`no upgrade: ${r.statusCode}`)));
      request.on('error', reject);
      request.end();
    });
    assert.strictEqual(echoed, 'hello through the tunnel');
    assert.strictEqual(await t.close(), 0);
  } finally {
    await edge.stop();
  }
});

test('a visitor leaving mid-response closes the response', async () => {
  const edge = await startEdge();
  try {
    let closedEarly;
    const closed = new Promise((resolve) => { closedEarly = resolve; });
    const server = http.createServer((req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/octet-stream' });
      const pump = () => {
        while (!res.destroyed && res.write(Buffer.alloc(64 * 1024, 122))) { /* fill */ }
        if (!res.destroyed) res.once('drain', pump);
      };
      res.on('close', () => closedEarly(res.writableFinished));
      pump();
    });
    const t = await startTunnel(edge.options());
    t.listen(server);
    await t.waitReady(20000);
    await visit(edge, t.hostname, 'GET', '/endless', undefined, (response, resolve) => {
      let got = 0;
      response.on('data', (c) => {
        got += c.length;
        if (got > MiB) {
          response.destroy();
          resolve();
        }
      });
    });
    assert.strictEqual(await closed, false, 'the response finished instead of being cut off');
    assert.strictEqual(await t.close(), 0);
  } finally {
    await edge.stop();
  }
});

test('the README example (examples/server.js) serves in-process', async () => {
  const edge = await startEdge();
  // require('cfqt') from the example resolves to this package.
  const modules = fs.mkdtempSync(path.join(os.tmpdir(), 'cfqt-node-modules-'));
  fs.symlinkSync(path.resolve(__dirname, '..'), path.join(modules, 'cfqt'));
  const child = spawn(process.execPath, [path.join(__dirname, '..', 'examples', 'server.js')], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, NODE_PATH: modules, CFQT_OPTIONS: JSON.stringify(edge.options()) },
  });
  try {
    const url = await new Promise((resolve, reject) => {
      readline.createInterface({ input: child.stdout }).once('line', resolve);
      child.once('exit', (code) => reject(new Error(`example exited (${code})`)));
    });
    assert.match(url, /^https:\/\//);
    const hostname = url.replace('https://', '');
    const hello = await visit(edge, hostname, 'GET', '/hi');
    assert.strictEqual(hello.body.toString(), 'Hello from Node, served in-process by cfqt: /hi\n');
    const counted = await visit(edge, hostname, 'POST', '/count', Buffer.alloc(100000));
    assert.strictEqual(counted.body.toString(), 'received 100000 bytes\n');
    const exited = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGTERM');
    assert.strictEqual(await exited, 0);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
    fs.rmSync(modules, { recursive: true, force: true });
    await edge.stop();
  }
});
