#!/usr/bin/env python3
# Test origin for src/origin/origin-test.c++. HTTP/1.1 with keep-alive, one thread per
# connection. Listens on 127.0.0.1:0 (or --unix PATH, or --unix-tls PATH CERT KEY: HTTPS on a
# unix socket, or --ipv6) and prints "PORT <n>" (or "READY") on stdout once listening.
#
# Bodies use a fixed pattern: byte i of a body is (i % 251). Endpoints:
#   GET  /bytes?n=N[&chunked=1][&chunk=S]  N pattern bytes (Content-Length, or chunked in S-byte chunks)
#   ANY  /upload                  reads the body (Content-Length or chunked), answers JSON
#                                 {"method","length","pattern_ok","headers":{...},"path"}
#   POST /echo                    echoes the body back, chunked, as it is read (streaming)
#   GET  /headers                 JSON of the request line and headers
#   GET  /sse?id=X&count=N        text/event-stream; event k+1 is written only after
#                                 GET /ack?id=X&k=K was received for K=k (event k reached the test)
#   GET  /ack?id=X&k=K
#   GET  /continue                sends an unsolicited "100 Continue" before the real response
#   GET  /die?n=N                 announces Content-Length 2N, sends N bytes, then closes
#   POST /no-read                 never reads the body; answers after /release?id=X
#   GET  /release?id=X
#   GET  /stats                   {"connections": <accepted so far>}
#   GET  /status?code=C           empty response with status C (204, 304 ...)
#   GET  /ws                      WebSocket echo (fragmented messages reassembled, ping → pong)
import base64
import hashlib
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler

PERIOD = 251
PATTERN = bytes(i % PERIOD for i in range(PERIOD)) * 1100  # > 256 KiB
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

lock = threading.Lock()
connections = 0
events = {}  # (id, k) -> threading.Event


def event_for(key):
    with lock:
        if key not in events:
            events[key] = threading.Event()
        return events[key]


def pattern(offset, n):
    out = bytearray()
    while n > 0:
        start = offset % PERIOD
        take = min(n, len(PATTERN) - start)
        out += PATTERN[start:start + take]
        offset += take
        n -= take
    return bytes(out)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        global connections
        with lock:
            connections += 1
        super().setup()

    def log_message(self, fmt, *args):
        pass

    def address_string(self):
        return "test"

    # -- helpers -------------------------------------------------------------------------------

    def body_chunks(self):
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionError("EOF in chunked body")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                data = self.rfile.read(size)
                self.rfile.readline()
                yield data
        else:
            n = int(self.headers.get("Content-Length", "0") or "0")
            while n > 0:
                data = self.rfile.read(min(n, 65536))
                if not data:
                    raise ConnectionError("EOF in body")
                n -= len(data)
                yield data

    def send_json(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Multi", "a")
        self.send_header("X-Multi", "b")
        self.end_headers()
        self.wfile.write(data)

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
        self.wfile.flush()

    # -- dispatch ------------------------------------------------------------------------------

    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        name = "do_" + url.path.strip("/").replace("-", "_")
        handler = getattr(self, name, None)
        if handler is None:
            self.send_json({"error": "no such path", "path": self.path}, 404)
            return
        handler(q)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = handle_any

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "12345")
        self.end_headers()

    def do_bytes(self, q):
        n = int(q.get("n", "0"))
        chunked = q.get("chunked") == "1"
        chunk = int(q.get("chunk", "65536"))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(n))
        self.end_headers()
        off = 0
        while off < n:
            take = min(chunk, n - off)
            data = pattern(off, take)
            if chunked:
                self.wfile.write(b"%x\r\n" % take + data + b"\r\n")
            else:
                self.wfile.write(data)
            off += take
        if chunked:
            self.wfile.write(b"0\r\nX-Trailer: dropped\r\n\r\n")
        self.wfile.flush()

    def do_upload(self, q):
        length = 0
        ok = True
        for data in self.body_chunks():
            if ok and data != pattern(length, len(data)):
                ok = False
            length += len(data)
        self.send_json({"method": self.command, "length": length, "pattern_ok": ok,
                        "path": self.path, "headers": dict(self.headers.items()),
                        "header_list": self.headers.items()})

    do_headers = do_upload

    def do_echo(self, q):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for data in self.body_chunks():
            self.write_chunk(data)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_sse(self, q):
        ident = q.get("id", "x")
        count = int(q.get("count", "5"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for k in range(count):
            self.write_chunk(b"data: event %d\n\n" % k)
            if not event_for((ident, k)).wait(20):
                self.close_connection = True
                return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_ack(self, q):
        event_for((q.get("id", "x"), int(q["k"]))).set()
        self.send_json({"ok": True})

    def do_release(self, q):
        event_for((q.get("id", "x"), "release")).set()
        self.send_json({"ok": True})

    def do_no_read(self, q):
        event_for((q.get("id", "x"), "release")).wait(30)
        self.close_connection = True
        self.send_json({"ok": True})
        # Lingering close: closing with unread data would send a RST that can destroy the
        # response before the proxy read it.
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_WR)
        while self.connection.recv(65536):
            pass

    def do_continue(self, q):
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.wfile.flush()
        self.send_json({"after": "continue"})

    def do_die(self, q):
        n = int(q.get("n", "1000"))
        self.send_response(200)
        self.send_header("Content-Length", str(2 * n))
        self.end_headers()
        self.wfile.write(pattern(0, n))
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def do_close_after_response(self, q):
        # Keep-alive response, then the connection is closed shortly after without reading the
        # next request: a pooled connection that goes stale under the client's feet.
        self.send_json({"ok": True})
        self.wfile.flush()
        threading.Event().wait(float(q.get("delay", "0.2")))
        self.close_connection = True

    def do_close_now(self, q):
        self.close_connection = True

    def do_stats(self, q):
        with lock:
            n = connections
        self.send_json({"connections": n})

    def do_status(self, q):
        code = int(q.get("code", "204"))
        self.send_response(code)
        self.send_header("X-Status", str(code))
        if code not in (204, 304):
            self.send_header("Content-Length", "0")
        self.end_headers()

    def do_ws(self, q):
        key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self.send_json({"error": "not an upgrade"}, 400)
            return
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("X-Origin-Saw-Key", key)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        message = bytearray()
        opcode = None
        while True:
            header = self.rfile.read(2)
            if len(header) < 2:
                return
            fin = header[0] & 0x80
            op = header[0] & 0x0F
            masked = header[1] & 0x80
            length = header[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if masked else b"\0\0\0\0"
            payload = bytearray(self.rfile.read(length))
            for i in range(len(payload)):
                payload[i] ^= mask[i % 4]
            if op == 0x8:
                self.send_frame(0x8, bytes(payload[:2]))
                return
            if op == 0x9:
                self.send_frame(0xA, bytes(payload))
                continue
            if op == 0xA:
                continue
            if op != 0:
                opcode = op
                message = bytearray()
            message += payload
            if fin:
                self.send_frame(opcode, bytes(message))

    def send_frame(self, op, payload):
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | op, n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | op, 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | op, 127, n)
        self.wfile.write(head + payload)
        self.wfile.flush()


class TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class Tcp6Server(TcpServer):
    address_family = socket.AF_INET6


class UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class UnixTlsServer(UnixServer):
    # The TLS handshake runs in the connection's thread (on its first read), not in accept().
    def __init__(self, path, handler, context):
        self.context = context
        super().__init__(path, handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True,
                                        do_handshake_on_connect=False), addr


def main():
    args = sys.argv[1:]
    if args[:1] == ["--unix-tls"]:
        import ssl
        path = args[1]
        if os.path.exists(path):
            os.unlink(path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args[2], args[3])
        server = UnixTlsServer(path, Handler, context)
        print("READY", flush=True)
    elif args[:1] == ["--unix"]:
        path = args[1]
        if os.path.exists(path):
            os.unlink(path)
        server = UnixServer(path, Handler)
        print("READY", flush=True)
    elif args[:1] == ["--ipv6"]:
        server = Tcp6Server(("::1", 0), Handler)
        print("PORT", server.server_address[1], flush=True)
    else:
        server = TcpServer(("127.0.0.1", 0), Handler)
        print("PORT", server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
