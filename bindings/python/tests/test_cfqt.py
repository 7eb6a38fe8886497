"""cfqt's Python package against cfqt-edge: origin tunnels, the in-process handler, and real
WSGI (Flask) and ASGI (Starlette) apps served with no local port."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest

import cfqt
from conftest import children_of_this_process, listening_sockets_of_this_process

MiB = 1 << 20


def assert_in_process(edge) -> None:
    assert listening_sockets_of_this_process() == [], "this process listens on a TCP socket"
    assert children_of_this_process() == [edge_pid(edge)], "a child other than cfqt-edge"


def edge_pid(edge) -> int:
    # conftest's cfqt-edge is this process's only child.
    return children_of_this_process()[0]


def test_origin_tunnel_url_ready_status_metrics(edge):
    with cfqt.Tunnel(hello_world=True, **edge.options()) as t:
        assert t.url.startswith("https://")
        t.wait_ready(timeout=20)
        assert t.running and t.ready_connections == 1
        status, _, _ = edge.request(t.hostname, "GET", "/_health")
        assert status == 200
        assert "cloudflared_tunnel_total_requests 1" in t.metrics()
        assert t.status()["ready_connections"] == 1
        t.wait_serving(timeout=20)
        assert t.stop() == 0
        assert not t.running


def test_https_origin_trusted_through_origin_ca_pool(edge):
    """An https origin whose certificate only origin_ca_pool vouches for."""
    import http.server
    import os
    import ssl

    testdata = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                            "src", "origin", "testdata")

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b"over tls"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # noqa: ANN002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(testdata, "tls-server.pem"),
                            os.path.join(testdata, "tls-server-key.pem"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "https://127.0.0.1:%d" % server.server_address[1]
        with pytest.raises(cfqt.CfqtError, match="originCaPool"):
            cfqt.Tunnel(url, origin_ca_pool="/nonexistent/ca.pem", **edge.options())
        with cfqt.Tunnel(url, origin_ca_pool=os.path.join(testdata, "tls-ca.pem"),
                         origin_server_name="localhost", **edge.options()) as t:
            t.wait_ready(timeout=20)
            status, _, body = edge.request(t.hostname, "GET", "/")
            assert (status, body) == (200, b"over tls")
    finally:
        server.shutdown()


def test_wait_serving_names_the_stage_and_logs_go_to_the_callback(edge):
    lines = []
    options = edge.options(log_level="info")
    options["ready_resolvers"] = ["127.0.0.1:1#localhost"]   # nothing answers DNS there
    with cfqt.Tunnel(hello_world=True, log=lambda *line: lines.append(line), **options) as t:
        t.wait_ready(timeout=20)
        with pytest.raises(cfqt.NotServingError) as caught:
            t.wait_serving(timeout=0.5)
        assert caught.value.stage == "dns" and "DNS" in str(caught.value)
        assert isinstance(caught.value, TimeoutError)
    registered = [l for l in lines if l[1] == "Registered tunnel connection"]
    assert registered and registered[0][0] == "info", lines
    assert ("connIndex", "0") in registered[0][2]


def test_errors_carry_the_library_message():
    with pytest.raises(cfqt.CfqtError, match="nothing to expose"):
        cfqt.Tunnel()
    with pytest.raises(cfqt.CfqtError, match="protocol must be quic, http2 or auto"):
        cfqt.Tunnel(url="http://localhost:1", protocol="udp")


def test_handler_request_and_errors(edge):
    answered_twice = []
    second_answer_tried = threading.Event()

    def handler(request: cfqt.Request) -> None:
        if request.path == "/boom":
            raise RuntimeError("secret detail")
        if request.path == "/twice":
            request.respond(200, [("Content-Type", "text/plain")], b"first")
            try:
                request.respond(200)
            except cfqt.CfqtError as e:
                answered_twice.append(str(e))
            second_answer_tried.set()
            return
        body = request.read_all()
        request.respond(200, [("X-Method", request.method)],
                        request.path.encode() + b" " + body + b" " +
                        request.header("x-probe").encode())

    with cfqt.Tunnel(handler=handler, **edge.options()) as t:
        t.wait_ready(timeout=20)
        status, headers, body = edge.request(t.hostname, "POST", "/echo?q=1", b"payload",
                                             {"X-Probe": "p"})
        assert (status, body) == (200, b"/echo?q=1 payload p")
        assert headers["X-Method"] == "POST"
        status, _, body = edge.request(t.hostname, "GET", "/boom")
        assert status == 502 and b"secret" not in body
        status, _, body = edge.request(t.hostname, "GET", "/twice")
        assert (status, body) == (200, b"first")
        # The visitor may have the first answer before the handler tried the second one.
        assert second_answer_tried.wait(timeout=20)
        assert answered_twice and "already answered" in answered_twice[0]
        assert_in_process(edge)


def flask_app():
    flask = pytest.importorskip("flask")
    app = flask.Flask("cfqt-test")

    @app.route("/")
    def index():
        return "hello from flask via " + flask.request.host

    @app.route("/stream")
    def stream():
        def generate():
            for i in range(64):
                yield bytes([65 + i % 26]) * (64 * 1024)
        return flask.Response(generate(), mimetype="application/octet-stream")

    @app.route("/upload", methods=["POST"])
    def upload():
        digest = hashlib.sha256()
        total = 0
        while True:
            chunk = flask.request.stream.read(65536)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
        return f"{total} {digest.hexdigest()}"

    return app


def test_wsgi_flask_streamed_response_and_upload(edge):
    app = flask_app()
    with cfqt.serve_wsgi(app, **edge.options()) as t:
        t.wait_ready(timeout=20)
        status, _, body = edge.request(t.hostname, "GET", "/")
        assert status == 200 and body == ("hello from flask via " + t.hostname).encode()

        response = edge.stream(t.hostname, "/stream")
        assert response.status == 200
        total = 0
        while True:
            chunk = response.read(65536)
            if not chunk:
                break
            total += len(chunk)
        assert total == 4 * MiB

        upload = bytes(range(256)) * (8 * 4096)   # 8 MiB
        status, _, body = edge.request(t.hostname, "POST", "/upload", upload)
        assert status == 200
        assert body.decode() == f"{len(upload)} {hashlib.sha256(upload).hexdigest()}"
        assert_in_process(edge)


def starlette_app():
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def index(request):
        return PlainTextResponse("hello from starlette " + request.url.path)

    async def stream(request):
        async def generate():
            for i in range(32):
                yield bytes([97 + i % 26]) * (64 * 1024)
        return StreamingResponse(generate(), media_type="application/octet-stream")

    async def upload(request):
        digest = hashlib.sha256()
        total = 0
        async for chunk in request.stream():
            digest.update(chunk)
            total += len(chunk)
        return PlainTextResponse(f"{total} {digest.hexdigest()}")

    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    async def echo(websocket):
        await websocket.accept()
        while True:
            try:
                text = await websocket.receive_text()
            except WebSocketDisconnect:
                return
            await websocket.send_text("echo: " + text)

    return Starlette(routes=[Route("/", index), Route("/stream", stream),
                             Route("/upload", upload, methods=["POST"]),
                             WebSocketRoute("/ws", echo)])


def websocket_echo(edge, hostname: str, messages) -> list:
    """A minimal WebSocket visitor through the front door: handshake, masked text frames,
    the server's replies, then a close handshake."""
    import base64
    import os
    import socket

    def read_exact(sock, n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    def send_frame(sock, opcode, payload):
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def read_frame(sock):
        b0, b1 = read_exact(sock, 2)
        assert not b1 & 0x80, "the server masked its frame"
        return b0 & 0x0F, read_exact(sock, b1 & 0x7F)

    with socket.create_connection((edge.public_host, edge.public_port), timeout=30) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {hostname}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += read_exact(sock, 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        replies = []
        for text in messages:
            send_frame(sock, 0x1, text.encode())
            opcode, payload = read_frame(sock)
            assert opcode == 0x1
            replies.append(payload.decode())
        send_frame(sock, 0x8, (1000).to_bytes(2, "big"))
        opcode, payload = read_frame(sock)
        assert opcode == 0x8
        return replies


def test_asgi_starlette_streamed_response_and_upload(edge):
    app = starlette_app()

    async def main():
        loop = asyncio.get_running_loop()
        t = await cfqt.serve_asgi(app, **edge.options())
        try:
            await loop.run_in_executor(None, t.wait_ready, 20)
            status, _, body = await loop.run_in_executor(
                None, edge.request, t.hostname, "GET", "/", None, None)
            assert (status, body) == (200, b"hello from starlette /")

            def read_stream():
                response = edge.stream(t.hostname, "/stream")
                assert response.status == 200
                return len(response.read())
            assert await loop.run_in_executor(None, read_stream) == 2 * MiB

            upload = b"x" * (4 * MiB)
            status, _, body = await loop.run_in_executor(
                None, edge.request, t.hostname, "POST", "/upload", upload, None)
            assert status == 200
            assert body.decode() == f"{len(upload)} {hashlib.sha256(upload).hexdigest()}"

            replies = await loop.run_in_executor(None, websocket_echo, edge, t.hostname,
                                                 ["hello", "in-process"])
            assert replies == ["echo: hello", "echo: in-process"]
            assert_in_process(edge)
        finally:
            await loop.run_in_executor(None, t.close)

    asyncio.run(main())


def test_handler_sees_the_visitor_leave(edge):
    outcome = {}
    done = threading.Event()

    def handler(request: cfqt.Request) -> None:
        request.respond(200, [("Content-Type", "application/octet-stream")])
        try:
            for _ in range(100000):
                request.write(b"z" * 65536)
        except cfqt.RequestCancelled as e:
            outcome["error"] = str(e)
        outcome["cancelled"] = request.cancelled
        done.set()

    with cfqt.Tunnel(handler=handler, **edge.options()) as t:
        t.wait_ready(timeout=20)
        response = edge.stream(t.hostname, "/endless")
        assert response.status == 200
        response.read(MiB)
        response.close()
        assert done.wait(20), "the handler never saw the visitor leave"
        assert outcome["cancelled"] and "cancelled" in outcome["error"]


def test_readme_example_flask_app(edge):
    # The README's example, run as its own process against cfqt-edge.
    import json
    import os
    import signal
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "flask_app.py")
    env = dict(os.environ, CFQT_OPTIONS=json.dumps(edge.options()))
    process = subprocess.Popen([sys.executable, example], stdout=subprocess.PIPE, env=env)
    try:
        url = process.stdout.readline().decode().strip()
        assert url.startswith("https://"), url
        hostname = url.split("://", 1)[1]
        status, _, body = edge.request(hostname, "GET", "/")
        assert (status, body) == (200, b"Hello from Flask, served in-process by cfqt\n")
        status, _, body = edge.request(hostname, "POST", "/count", b"x" * 100000)
        assert (status, body) == (200, b"received 100000 bytes\n")
        status, _, body = edge.request(hostname, "GET", "/numbers")
        assert status == 200 and body.endswith(b"99999\n")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
