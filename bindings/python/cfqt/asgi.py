"""In-process ASGI serving: ``await cfqt.serve_asgi(app)`` (``http`` and ``websocket`` scopes)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable, Dict
from urllib.parse import unquote

from . import Request, Tunnel

ASGIApp = Callable[[Dict[str, Any], Callable[[], Awaitable[dict]],
                    Callable[[dict], Awaitable[None]]], Awaitable[None]]

_CANCEL_POLL = 0.2   # seconds between checks for a visitor that left while the app waits


def scope_for(request: Request) -> dict:
    """The ASGI HTTP connection scope (spec 2.3) of an in-process request."""
    path, _, query = request.path.partition("?")
    scheme = request.url.split("://", 1)[0] if "://" in request.url else "https"
    client = request.header("Cf-Connecting-Ip", "127.0.0.1")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": scheme,
        "path": unquote(path),
        "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in request.headers],
        "client": (client, 0),
        "server": (request.host or "localhost", 443 if scheme == "https" else 80),
    }


async def run_asgi(app: ASGIApp, request: Request) -> None:
    """Runs ``app`` for one request on the running event loop; blocking calls go to threads."""
    loop = asyncio.get_running_loop()
    blocking = functools.partial(loop.run_in_executor, None)
    body_done = False
    finished = asyncio.Event()
    state = {"started": False, "ended": False}

    async def receive() -> dict:
        nonlocal body_done
        if not body_done:
            chunk = await blocking(request.read, 65536)
            if chunk:
                return {"type": "http.request", "body": chunk, "more_body": True}
            body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # After the body: wait until the response ends or the visitor leaves.
        while not finished.is_set() and not request.cancelled:
            try:
                await asyncio.wait_for(finished.wait(), _CANCEL_POLL)
            except asyncio.TimeoutError:
                pass
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = [(k.decode("latin-1"), v.decode("latin-1"))
                       for k, v in message.get("headers", [])]
            request.respond(int(message["status"]), headers)
            state["started"] = True
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                await blocking(request.write, body)
            if not message.get("more_body", False):
                request.end()
                state["ended"] = True
                finished.set()

    try:
        await app(scope_for(request), receive, send)
        if state["started"] and not state["ended"]:
            request.end()
    finally:
        finished.set()


class _Frames:
    """RFC 6455 framing over the request's raw two-way byte stream (after the 101)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.buffer = b""

    def _need(self, n: int) -> bool:
        while len(self.buffer) < n:
            chunk = self.request.read(65536)
            if not chunk:
                return False
            self.buffer += chunk
        return True

    def read_frame(self):
        """(fin, opcode, payload), or None at the end of the stream. Blocking."""
        if not self._need(2):
            return None
        b0, b1 = self.buffer[0], self.buffer[1]
        length, at = b1 & 0x7F, 2
        if length == 126:
            if not self._need(4):
                return None
            length, at = int.from_bytes(self.buffer[2:4], "big"), 4
        elif length == 127:
            if not self._need(10):
                return None
            length, at = int.from_bytes(self.buffer[2:10], "big"), 10
        if length > 16 << 20:
            raise ValueError("cfqt: WebSocket frame over 16 MiB")
        mask = b""
        if b1 & 0x80:
            if not self._need(at + 4):
                return None
            mask, at = self.buffer[at:at + 4], at + 4
        if not self._need(at + length):
            return None
        payload, self.buffer = self.buffer[at:at + length], self.buffer[at + length:]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload

    @staticmethod
    def frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, n])
        elif n < 1 << 16:
            head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
        return head + payload


def websocket_scope_for(request: Request) -> dict:
    """The ASGI WebSocket connection scope of an in-process upgrade request."""
    scope = scope_for(request)
    scope["type"] = "websocket"
    scope["scheme"] = "wss" if scope["scheme"] == "https" else "ws"
    del scope["method"]
    protocols = request.header("Sec-WebSocket-Protocol")
    scope["subprotocols"] = [p.strip() for p in protocols.split(",") if p.strip()]
    return scope


async def run_asgi_websocket(app: ASGIApp, request: Request) -> None:
    """Runs ``app`` for one WebSocket session; frames are read and written off the loop."""
    loop = asyncio.get_running_loop()
    blocking = functools.partial(loop.run_in_executor, None)
    frames = _Frames(request)
    state = {"connected": False, "accepted": False, "closed": False}
    message_parts: list = []

    async def receive() -> dict:
        if not state["connected"]:
            state["connected"] = True
            return {"type": "websocket.connect"}
        while True:
            frame = await blocking(frames.read_frame) if not state["closed"] else None
            if frame is None:
                state["closed"] = True
                return {"type": "websocket.disconnect", "code": 1006}
            fin, opcode, payload = frame
            if opcode == 0x8:   # close: answer it, the session is over
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if not state["closed"]:
                    state["closed"] = True
                    await blocking(request.write, _Frames.frame(0x8, payload[:2]))
                    request.end()
                return {"type": "websocket.disconnect", "code": code}
            if opcode == 0x9:   # ping
                await blocking(request.write, _Frames.frame(0xA, payload))
                continue
            if opcode == 0xA:
                continue
            message_parts.append((opcode, payload))
            if not fin:
                continue
            first = message_parts[0][0]
            data = b"".join(p for _, p in message_parts)
            message_parts.clear()
            if first == 0x1:
                return {"type": "websocket.receive", "text": data.decode("utf-8")}
            return {"type": "websocket.receive", "bytes": data}

    async def send(message: dict) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            headers = [(k.decode("latin-1"), v.decode("latin-1"))
                       for k, v in message.get("headers", [])]
            if message.get("subprotocol"):
                headers.append(("Sec-WebSocket-Protocol", message["subprotocol"]))
            request.accept_websocket(headers)
            state["accepted"] = True
        elif kind == "websocket.send":
            if message.get("text") is not None:
                data = _Frames.frame(0x1, message["text"].encode("utf-8"))
            else:
                data = _Frames.frame(0x2, message.get("bytes") or b"")
            await blocking(request.write, data)
        elif kind == "websocket.close":
            if not state["accepted"]:
                request.respond(403, [("Content-Type", "text/plain")], b"WebSocket refused\n")
                state["closed"] = True
                return
            if not state["closed"]:
                state["closed"] = True
                code = int(message.get("code", 1000)).to_bytes(2, "big")
                await blocking(request.write, _Frames.frame(0x8, code))
                request.end()

    await app(websocket_scope_for(request), receive, send)
    if state["accepted"] and not state["closed"]:
        request.end()
    elif not state["accepted"] and not request.answered:
        request.respond(403, [("Content-Type", "text/plain")], b"WebSocket refused\n")


def asgi_handler(app: ASGIApp, loop: asyncio.AbstractEventLoop) -> Callable[[Request], None]:
    """A ``Tunnel(handler=...)`` running ``app`` on ``loop`` (the handler thread waits)."""

    def handle(request: Request) -> None:
        run = run_asgi_websocket if request.is_websocket else run_asgi
        future = asyncio.run_coroutine_threadsafe(run(app, request), loop)
        future.result()

    return handle


async def serve_asgi(app: ASGIApp, **options: Any) -> Tunnel:
    """Starts a tunnel serving the ASGI ``app`` in-process (no local port) and returns it.

    The app runs on the calling event loop; ``options`` are ``Tunnel``'s. The start (waiting for
    the URL) runs in a thread, so the loop keeps going. ``close()`` the result when done (from a
    thread, e.g. ``await loop.run_in_executor(None, t.close)``, as it waits for the drain).
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        None, functools.partial(Tunnel, handler=asgi_handler(app, loop), **options))
