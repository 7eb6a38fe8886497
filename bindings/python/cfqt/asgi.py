"""In-process ASGI serving: ``await cfqt.serve_asgi(app)``."""

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


def asgi_handler(app: ASGIApp, loop: asyncio.AbstractEventLoop) -> Callable[[Request], None]:
    """A ``Tunnel(handler=...)`` running ``app`` on ``loop`` (the handler thread waits)."""

    def handle(request: Request) -> None:
        if request.is_websocket:
            request.respond(501, [("Content-Type", "text/plain")],
                            b"WebSocket is not supported by cfqt.serve_asgi yet\n")
            return
        future = asyncio.run_coroutine_threadsafe(run_asgi(app, request), loop)
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
