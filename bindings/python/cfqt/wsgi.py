"""In-process WSGI serving: ``cfqt.serve_wsgi(app)``."""

from __future__ import annotations

import io
import sys
from typing import Any, Callable, Iterable, List, Optional, Tuple
from urllib.parse import unquote

from . import CfqtError, Request, Tunnel


class _Input(io.RawIOBase):
    """wsgi.input: the request body, read from the tunnel as the app asks for it."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._eof:
            return 0
        data = self._request.read(len(buffer))
        if not data:
            self._eof = True
        buffer[:len(data)] = data
        return len(data)


def environ_for(request: Request) -> dict:
    """The WSGI environ (PEP 3333) of an in-process request."""
    path, _, query = request.path.partition("?")
    scheme = request.url.split("://", 1)[0] if "://" in request.url else "https"
    environ = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(path, encoding="latin-1"),
        "QUERY_STRING": query,
        "SERVER_NAME": request.host or "localhost",
        "SERVER_PORT": "443" if scheme == "https" else "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": request.header("Cf-Connecting-Ip", "127.0.0.1"),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BufferedReader(_Input(request), 65536),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in request.headers:
        key = name.upper().replace("-", "_")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            environ[key] = value
            continue
        key = "HTTP_" + key
        environ[key] = environ[key] + "," + value if key in environ else value
    if "HTTP_HOST" not in environ and request.host:
        environ["HTTP_HOST"] = request.host
    return environ


def wsgi_handler(app: Callable[..., Iterable[bytes]]) -> Callable[[Request], None]:
    """A ``Tunnel(handler=...)`` that runs ``app`` (on the tunnel's handler thread)."""

    def handle(request: Request) -> None:
        state: dict = {"head": None, "sent": False}

        def send_head() -> None:
            if not state["sent"]:
                status, headers = state["head"]
                request.respond(int(status.split(" ", 1)[0]), headers)
                state["sent"] = True

        def start_response(status: str, headers: List[Tuple[str, str]],
                           exc_info: Optional[Any] = None) -> Callable[[bytes], None]:
            if exc_info is not None and state["sent"]:
                raise exc_info[1].with_traceback(exc_info[2])
            state["head"] = (status, headers)

            def write(data: bytes) -> None:
                send_head()
                request.write(data)
            return write

        result = app(environ_for(request), start_response)
        try:
            for chunk in result:
                if chunk:
                    send_head()
                    request.write(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if state["head"] is None:
            raise CfqtError("cfqt: the WSGI app returned without calling start_response")
        send_head()
        request.end()

    return handle


def serve_wsgi(app: Callable[..., Iterable[bytes]], **options: Any) -> Tunnel:
    """Starts a tunnel serving the WSGI ``app`` in-process (no local port) and returns it.

    ``options`` are ``Tunnel``'s (quick_service, edges, grace_period, ...). Each request runs
    the app on one of the tunnel's handler threads (``wsgi.multithread`` is true). Use the
    result as a context manager, or ``close()`` it.
    """
    return Tunnel(handler=wsgi_handler(app), **options)
