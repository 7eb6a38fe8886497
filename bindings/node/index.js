'use strict';
// cfqt for Node: Cloudflare quick tunnels in-process, through libcfqt (N-API addon).
//
//   const { startTunnel } = require('cfqt');
//   const t = await startTunnel({ url: 'http://localhost:3000' });
//   console.log(t.url);
//   await t.close();
//
// Or serve a Node http.Server's requests in-process, with no port (server.listen() is never
// called): const t = await startTunnel(); t.listen(server);
//
// Nothing here blocks Node's event loop: the library runs on its own threads; blocking calls
// (start, waitReady, close, reading a body, writing a response under back-pressure) run off the
// main thread and settle promises/callbacks on it.

const http = require('http');
const { Duplex } = require('stream');

const native = require('./build/Release/cfqt.node');

const EVENT_REQUEST = 0;
const EVENT_READ = 1;
const EVENT_WRITE = 2;

const DROPPED_REQUEST_HEADERS = new Set(['host', 'connection', 'keep-alive', 'proxy-connection',
                                         'expect', 'upgrade']);
const DROPPED_RESPONSE_HEADERS = new Set(['connection', 'keep-alive', 'proxy-connection',
                                          'transfer-encoding']);

class Dispatcher {
  // Routes the addon's events: new requests to the attached server, read/write results to their
  // callbacks.
  constructor() {
    this.server = null;
    this.pending = new Map();
    this.nextId = 1;
  }

  expect(callback) {
    const id = this.nextId++;
    if (this.nextId > 0xffffffff) this.nextId = 1;
    this.pending.set(id, callback);
    return id;
  }

  dispatch(event) {
    if (event.kind === EVENT_REQUEST) {
      if (this.server === null) {
        native.respond(event.req, 503, ['Content-Type', 'text/plain']);
        native.end(event.req);
        native.release(event.req);
        return;
      }
      const socket = new TunnelSocket(this, event);
      this.server.emit('connection', socket);
      socket.start();
      return;
    }
    const callback = this.pending.get(event.id);
    if (callback !== undefined) {
      this.pending.delete(event.id);
      callback(event);
    }
  }
}

class TunnelSocket extends Duplex {
  // What http.Server sees as the connection of one in-process request: the request is written
  // into it as HTTP/1.1 (Node's own parser reads it), and the response Node writes is handed to
  // the tunnel (head, then de-chunked body; after a 101, raw bytes both ways).
  constructor(dispatcher, event) {
    super({ allowHalfOpen: true });
    this.dispatcher = dispatcher;
    this.req = event.req;
    this.event = event;
    const headers = event.headers;
    let length = 0;
    let chunked = false;
    let client = '127.0.0.1';
    for (let i = 0; i < headers.length; i += 2) {
      const name = headers[i].toLowerCase();
      if (name === 'content-length') length = Number(headers[i + 1]) || 0;
      if (name === 'transfer-encoding' && /chunked/i.test(headers[i + 1])) chunked = true;
      if (name === 'cf-connecting-ip') client = headers[i + 1];
    }
    this.websocket = event.websocket;
    this.chunkedIn = chunked && !this.websocket;
    this.bodyDone = !this.websocket && !chunked && length === 0;
    this.reading = false;
    this.upgraded = false;
    this.started = false;
    this.released = false;
    this.responded = false;
    this.ended = false;
    // Response parsing.
    this.state = 'head';
    this.pendingBytes = Buffer.alloc(0);
    this.chunkLeft = 0;
    this.needCrlf = false;
    this.chunkedOut = false;
    // What Node and frameworks read from a socket.
    this.remoteAddress = client;
    this.remotePort = 0;
    this.remoteFamily = client.includes(':') ? 'IPv6' : 'IPv4';
    this.encrypted = event.url.startsWith('https:');
    this.connecting = false;
  }

  setTimeout() { return this; }
  setNoDelay() { return this; }
  setKeepAlive() { return this; }
  ref() { return this; }
  unref() { return this; }
  address() { return { address: '127.0.0.1', family: 'IPv4', port: 0 }; }

  start() {
    const e = this.event;
    const lines = [`${e.method} ${e.path} HTTP/1.1`, `Host: ${e.host}`];
    for (let i = 0; i < e.headers.length; i += 2) {
      const name = e.headers[i].toLowerCase();
      if (DROPPED_REQUEST_HEADERS.has(name)) continue;
      lines.push(`${e.headers[i]}: ${e.headers[i + 1]}`);
    }
    if (this.websocket) {
      lines.push('Connection: Upgrade', 'Upgrade: websocket');
    } else {
      lines.push('Connection: close');
    }
    this.started = true;
    this.push(Buffer.from(lines.join('\r\n') + '\r\n\r\n', 'latin1'));
    if (!this.websocket) this._read();
  }

  _read() {
    if (!this.started || this.bodyDone || this.reading || this.released) return;
    if (this.websocket && !this.upgraded) return;
    this.reading = true;
    const id = this.dispatcher.expect((event) => this.bodyRead(event));
    if (!native.read(this.req, id)) {
      this.dispatcher.pending.delete(id);
      this.reading = false;
    }
  }

  bodyRead(event) {
    this.reading = false;
    if (event.result === -1) {
      this.destroy();   // the visitor left: a close, as a real socket's peer going away
      return;
    }
    if (event.result < 0) {
      this.destroy(new Error(event.error || 'cfqt: reading the request failed'));
      return;
    }
    if (event.result === 0) {
      this.bodyDone = true;
      if (this.chunkedIn) this.push('0\r\n\r\n');
      if (this.websocket) this.push(null);
      return;
    }
    let more;
    if (this.chunkedIn) {
      this.push(`${event.data.length.toString(16)}\r\n`);
      this.push(event.data);
      more = this.push('\r\n');
    } else {
      more = this.push(event.data);
    }
    if (more) this._read();
  }

  _write(chunk, encoding, callback) {
    if (this.state === 'raw' || this.state === 'identity') {
      this.send(chunk, callback);
      return;
    }
    if (this.state === 'done') {
      callback();
      return;
    }
    this.pendingBytes = this.pendingBytes.length ? Buffer.concat([this.pendingBytes, chunk])
                                                 : chunk;
    this.consume(callback);
  }

  consume(callback) {
    while (this.state === 'head') {
      const end = this.pendingBytes.indexOf('\r\n\r\n');
      if (end < 0) {
        callback();
        return;
      }
      const head = this.pendingBytes.subarray(0, end).toString('latin1').split('\r\n');
      this.pendingBytes = this.pendingBytes.subarray(end + 4);
      const status = Number(head[0].split(' ')[1]);
      if (status >= 100 && status < 200 && status !== 101) continue;   // interim
      const flat = [];
      for (const line of head.slice(1)) {
        const colon = line.indexOf(':');
        if (colon <= 0) continue;
        const name = line.slice(0, colon).trim();
        const value = line.slice(colon + 1).trim();
        const lower = name.toLowerCase();
        if (lower === 'transfer-encoding' && /chunked/i.test(value)) this.chunkedOut = true;
        if (status !== 101 && DROPPED_RESPONSE_HEADERS.has(lower)) continue;
        flat.push(name, value);
      }
      const error = native.respond(this.req, status, flat);
      if (error !== undefined) {
        callback(new Error(error));
        return;
      }
      this.responded = true;
      if (status === 101) {
        this.state = 'raw';
        this.upgraded = true;
        this._read();
      } else {
        this.state = this.chunkedOut ? 'chunked' : 'identity';
      }
    }
    const rest = this.pendingBytes;
    this.pendingBytes = Buffer.alloc(0);
    if (this.state !== 'chunked') {
      this.send(rest, callback);
      return;
    }
    this.pendingBytes = rest;
    const pieces = this.dechunk();
    this.send(pieces.length === 1 ? pieces[0] : Buffer.concat(pieces), (error) => {
      if (!error && this.state === 'done') this.finishResponse();
      callback(error);
    });
  }

  dechunk() {
    const out = [];
    let b = this.pendingBytes;
    while (b.length > 0 && this.state === 'chunked') {
      if (this.chunkLeft > 0) {
        const n = Math.min(this.chunkLeft, b.length);
        out.push(b.subarray(0, n));
        b = b.subarray(n);
        this.chunkLeft -= n;
        if (this.chunkLeft === 0) this.needCrlf = true;
        continue;
      }
      if (this.needCrlf) {
        if (b.length < 2) break;
        b = b.subarray(2);
        this.needCrlf = false;
        continue;
      }
      const nl = b.indexOf('\r\n');
      if (nl < 0) break;
      const size = parseInt(b.subarray(0, nl).toString('latin1').split(';')[0].trim(), 16);
      b = b.subarray(nl + 2);
      if (!(size > 0)) {
        this.state = 'done';   // trailers, if any, are dropped
        break;
      }
      this.chunkLeft = size;
    }
    this.pendingBytes = b;
    return out;
  }

  send(bytes, callback) {
    if (bytes.length === 0) {
      callback();
      return;
    }
    const id = this.dispatcher.expect((event) => {
      if (event.result === -1) {
        callback();
        this.destroy();   // the visitor left: a close, as a real socket's peer going away
        return;
      }
      callback(event.result < 0 ? new Error(event.error || 'cfqt: write failed') : undefined);
    });
    if (!native.write(this.req, bytes, id)) {
      this.dispatcher.pending.delete(id);
      callback(new Error('cfqt: the request was released'));
    }
  }

  finishResponse() {
    if (this.ended || !this.responded) return;
    this.ended = true;
    native.end(this.req);
  }

  _final(callback) {
    // Node ended the connection: the response is complete.
    this.finishResponse();
    this.release();
    this.push(null);
    callback();
  }

  _destroy(error, callback) {
    if (error && this.responded && !this.ended) native.fail(this.req, String(error.message));
    this.release();
    callback(error);
  }

  release() {
    if (this.released) return;
    this.released = true;
    native.release(this.req);
  }
}

class Tunnel {
  constructor(options, dispatcher, url) {
    this._options = options;
    this._dispatcher = dispatcher;
    this._url = url;
    this._closing = null;
  }

  /** The public URL, https://<words>.trycloudflare.com. */
  get url() { return this._url; }

  /** The public hostname. */
  get hostname() { return this._url.replace(/^[a-z]+:\/\//, '').replace(/\/$/, ''); }

  /** Resolves once an edge connection is registered; rejects after `timeoutMs`. */
  async waitReady(timeoutMs = 30000) {
    const ready = await native.waitReady(this._options.__handle, timeoutMs);
    if (!ready) throw new Error(`cfqt: no edge connection registered within ${timeoutMs} ms`);
  }

  /** { url, hostname, running, readyConnections } right now. */
  status() {
    return { url: this.url, hostname: this.hostname, ...native.status(this._options.__handle) };
  }

  /** The /metrics page (Prometheus text, cloudflared's series names). */
  metrics() { return native.metrics(this._options.__handle); }

  /**
   * Serves `server`'s request (and upgrade) events in-process: the tunnel's requests go to it
   * without any socket; server.listen() is never needed. A function is wrapped in
   * http.createServer(). Returns the server.
   */
  listen(server) {
    if (this._options.url || this._options.helloWorld) {
      throw new Error('cfqt: listen() needs a tunnel started without url or helloWorld');
    }
    if (typeof server === 'function') server = http.createServer(server);
    this._dispatcher.server = server;
    return server;
  }

  /** Graceful shutdown (unregister, drain within gracePeriodMs); resolves with the exit code. */
  close() {
    if (this._closing === null) this._closing = native.close(this._options.__handle);
    return this._closing;
  }
}

/**
 * Starts a quick tunnel and resolves once its URL is issued. With `url` (or `helloWorld`) it
 * exposes that origin; without, serve requests in-process with `tunnel.listen(server)`.
 */
async function startTunnel(options = {}) {
  const nativeOptions = {
    url: options.url,
    helloWorld: options.helloWorld === true,
    quickService: options.quickService,
    edges: options.edges,
    edgeCaFile: options.edgeCaFile,
    originCaPool: options.originCaPool,
    originServerName: options.originServerName,
    protocol: options.protocol,
    logLevel: options.logLevel,
    metrics: options.metrics === true,
    metricsAddress: options.metricsAddress,
    haConnections: options.haConnections,
    gracePeriodMs: options.gracePeriodMs,
    backoffBaseMs: options.backoffBaseMs,
    handlerThreads: options.handlerThreads,
    urlTimeoutMs: options.urlTimeoutMs,
  };
  const inProcess = !options.url && !options.helloWorld;
  const dispatcher = new Dispatcher();
  if (options.server) dispatcher.server = options.server;
  const url = await native.start(nativeOptions,
                                 inProcess ? (event) => dispatcher.dispatch(event) : undefined);
  return new Tunnel(nativeOptions, dispatcher, url);
}

module.exports = { startTunnel, Tunnel };
