"""Cloudflare quick tunnels from Python, in-process.

cfqt opens a quick tunnel (``https://<words>.trycloudflare.com``) by speaking cloudflared's edge
protocol itself, through libcfqt; there is no cloudflared binary to download or spawn.

Expose a local server::

    import cfqt
    with cfqt.Tunnel(url="http://localhost:8000") as t:
        print(t.url)
        t.wait_ready()

Or serve a WSGI/ASGI app in-process, with no local port at all::

    with cfqt.serve_wsgi(app) as t:        # Flask, Django, ...
        print(t.url)

    t = await cfqt.serve_asgi(app)          # Starlette, FastAPI, ...
"""

from __future__ import annotations

import atexit
import ctypes
import threading
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from . import _native
from ._native import lib

__all__ = [
    "CfqtError", "NotServingError", "RequestCancelled", "Request", "Tunnel", "serve_wsgi",
    "serve_asgi", "LOG_LEVELS", "log_to_python",
]

Headers = List[Tuple[str, str]]


class CfqtError(Exception):
    """A failure reported by libcfqt; the message is the library's."""


class RequestCancelled(CfqtError):
    """The request can no longer be answered: the visitor went away or the tunnel stopped."""


class NotServingError(CfqtError, TimeoutError):
    """``wait_serving`` gave up; ``stage`` names what did not succeed in time: "tunnel" (no edge
    connection yet), "dns" (the hostname does not resolve via the public resolvers yet) or
    "routing" (it resolves, but the edge does not route it to this tunnel yet)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


_STAGES = {1: "tunnel", 2: "dns", 3: "routing"}

LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
"""The levels a log callback receives (cfqt's, in order)."""


def log_to_python(level: str, message: str, fields: List[Tuple[str, str]]) -> None:
    """A ready ``log`` callback for :class:`Tunnel`: cfqt's lines go to the standard ``logging``
    module's logger ``"cfqt"`` (fields appended as ``key=value``, values quoted as needed)."""
    import logging
    numeric = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
               "error": logging.ERROR, "fatal": logging.CRITICAL}[level]
    logger = logging.getLogger("cfqt")
    if logger.isEnabledFor(numeric):
        text = " ".join([message] + [f"{k}={v!r}" if (" " in v or not v.isprintable())
                                     else f"{k}={v}" for k, v in fields])
        logger.log(numeric, "%s", text)


def _check(code: int) -> None:
    if code == 0:
        return
    message = _native.last_error()
    if code == -1:
        raise RequestCancelled(message)
    raise CfqtError(message)


class Request:
    """One request served in-process (see ``Tunnel(handler=...)``).

    Thread-safe. Blocking calls (``read``, ``write``) release the GIL. Answer with ``respond()``,
    then ``write()`` the body and ``end()`` it; ``close()`` (or leaving a ``with`` block) releases
    the request: unanswered → the visitor gets a 502, answered → the body ends.
    """

    def __init__(self, handle: int) -> None:
        self._handle: Optional[int] = handle
        self._lock = threading.Lock()
        h = handle
        self.method: str = lib.cfqt_request_method(h).decode("latin-1")
        self.url: str = lib.cfqt_request_url(h).decode("latin-1")
        self.path: str = lib.cfqt_request_path(h).decode("latin-1")
        self.host: str = lib.cfqt_request_host(h).decode("latin-1")
        self.headers: Headers = [
            (lib.cfqt_request_header_name(h, i).decode("latin-1"),
             lib.cfqt_request_header_value(h, i).decode("latin-1"))
            for i in range(lib.cfqt_request_header_count(h))
        ]
        self.is_websocket: bool = lib.cfqt_request_is_websocket(h) == 1
        self.answered = False

    def header(self, name: str, default: str = "") -> str:
        """The first value of header ``name`` (any case)."""
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return default

    def _h(self) -> int:
        if self._handle is None:
            raise CfqtError("cfqt: the request was closed")
        return self._handle

    def read(self, size: int = 65536) -> bytes:
        """Up to ``size`` bytes of the body, blocking until some arrive; b"" at its end."""
        buffer = ctypes.create_string_buffer(size)
        n = lib.cfqt_request_read(self._h(), buffer, size)
        if n < 0:
            _check(int(n))
        return buffer.raw[:n]

    def read_all(self, limit: int = 64 << 20) -> bytes:
        """The whole body; CfqtError if it is longer than ``limit``."""
        parts = []
        total = 0
        while True:
            chunk = self.read()
            if not chunk:
                return b"".join(parts)
            total += len(chunk)
            if total > limit:
                raise CfqtError(f"cfqt: the request body is longer than {limit} bytes")
            parts.append(chunk)

    def respond(self, status: int, headers: Sequence[Tuple[str, str]] = (),
                body: Optional[bytes] = None) -> None:
        """The response head; with ``body``, also the whole body and its end."""
        flat = []
        for name, value in headers:
            flat.append(str(name).encode("latin-1"))
            flat.append(str(value).encode("latin-1"))
        array = (ctypes.c_char_p * max(len(flat), 1))(*flat)
        if body is None:
            _check(lib.cfqt_request_respond(self._h(), int(status), array, len(flat) // 2))
        else:
            body = bytes(body)
            _check(lib.cfqt_request_respond_body(self._h(), int(status), array, len(flat) // 2,
                                                 body, len(body)))
        self.answered = True

    def accept_websocket(self, headers: Sequence[Tuple[str, str]] = ()) -> None:
        """Answers a WebSocket upgrade (101 with the Sec-WebSocket-Accept for its key, and
        ``headers``); then read()/write() are the session's raw two-way bytes (frames)."""
        if headers:
            import base64
            import hashlib
            key = self.header("Sec-WebSocket-Key")
            accept = base64.b64encode(hashlib.sha1(
                (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
            self.respond(101, [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                               ("Sec-WebSocket-Accept", accept)] + list(headers))
            return
        _check(lib.cfqt_request_accept_websocket(self._h()))
        self.answered = True

    def write(self, data: bytes) -> None:
        """Body bytes; blocks while 64 KiB still wait to go out (back-pressure)."""
        if data:
            data = bytes(data)
            _check(lib.cfqt_request_write(self._h(), data, len(data)))

    def end(self) -> None:
        """The body is complete."""
        _check(lib.cfqt_request_end(self._h()))

    def fail(self, message: str) -> None:
        """The handler failed: 502 before respond(), a reset stream after. Logged only."""
        lib.cfqt_request_fail(self._h(), message.encode("utf-8", "replace"))

    @property
    def cancelled(self) -> bool:
        """True once the visitor went away or the tunnel stopped."""
        return self._handle is not None and lib.cfqt_request_cancelled(self._handle) == 1

    def close(self) -> None:
        """Releases the request (idempotent)."""
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            lib.cfqt_request_free(handle)

    def __enter__(self) -> "Request":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


_live: "set[Tunnel]" = set()   # running tunnels, closed at exit (never collected while running)


@atexit.register
def _stop_all() -> None:
    # No handler may run into a finalising interpreter.
    for tunnel in list(_live):
        tunnel.close()


class Tunnel:
    """A quick tunnel running in this process (on libcfqt's own threads).

    Exactly one of ``url`` (an origin: ``http://host:port``, ``unix:/path``, ...), ``handler``
    (a callable taking a ``Request``, called on one of the tunnel's handler threads, which may
    block; the request is released when it returns: unanswered → 502, answered → the body ends;
    an exception it raises → 502, or a reset stream after the head) or ``hello_world=True``. Starts at once and waits up to ``url_timeout`` seconds for the public
    URL (CfqtError if none came). ``close()`` (or leaving the ``with`` block) shuts it down
    gracefully: unregister, let requests finish within ``grace_period``, close.
    ``release_idle_code=True`` does what ``cfqt --release-idle-code`` does, for this whole
    process: when the tunnel idles, the page-table entries of its code are dropped (lower RSS).
    """

    def __init__(self, url: Optional[str] = None, *,
                 handler: Optional[Callable[[Request], None]] = None,
                 hello_world: bool = False,
                 unix_socket: Optional[str] = None,
                 quick_service: Optional[str] = None,
                 edges: Optional[Iterable[str]] = None,
                 edge_ca_file: Optional[str] = None,
                 origin_ca_pool: Optional[str] = None,
                 origin_server_name: Optional[str] = None,
                 ha_connections: int = 2,
                 grace_period: float = 30.0,
                 backoff_base: float = 1.0,
                 protocol: Optional[str] = None,
                 log_level: str = "info",
                 metrics: bool = False,
                 metrics_address: Optional[str] = None,
                 handler_threads: int = 64,
                 log: Optional[Callable[[str, str, List[Tuple[str, str]]], None]] = None,
                 wait_ready: bool = False,
                 ready_timeout: float = 60.0,
                 ready_resolvers: Optional[Iterable[str]] = None,
                 ready_port: Optional[int] = None,
                 ready_ca_file: Optional[str] = None,
                 url_timeout: float = 30.0,
                 release_idle_code: bool = False) -> None:
        self._handle: Optional[int] = None
        self._handler = handler
        options = _native.Options()
        lib.cfqt_options_init(ctypes.byref(options))
        self._keep: list = []   # bytes the options point at

        def s(value: Optional[str]) -> Optional[bytes]:
            if value is None:
                return None
            b = value.encode("utf-8")
            self._keep.append(b)
            return b

        options.url = s(url)
        options.hello_world = 1 if hello_world else 0
        options.unix_socket = s(unix_socket)
        options.quick_service = s(quick_service)
        edge_list = [e.encode("utf-8") for e in (edges or [])]
        if edge_list:
            array = (ctypes.c_char_p * len(edge_list))(*edge_list)
            self._keep.append(array)
            options.edges = array
            options.edge_count = len(edge_list)
        options.edge_ca_file = s(edge_ca_file)
        options.origin_ca_pool = s(origin_ca_pool)
        options.origin_server_name = s(origin_server_name)
        options.ha_connections = int(ha_connections)
        options.grace_period_ms = int(grace_period * 1000)
        options.backoff_base_ms = int(backoff_base * 1000)
        options.protocol = s(protocol)
        options.log_level = s(log_level)
        options.metrics = 1 if metrics else 0
        options.metrics_address = s(metrics_address)
        if log is not None:
            def forward(_data, level, message, fields, count):
                # On a tunnel thread, one line at a time; a failing callback loses its line.
                try:
                    log(LOG_LEVELS[level] if 0 <= level < len(LOG_LEVELS) else "error",
                        message.decode("utf-8", "replace"),
                        [(fields[i].key.decode("utf-8", "replace"),
                          (fields[i].value or b"").decode("utf-8", "replace"))
                         for i in range(count)])
                except Exception:  # noqa: BLE001
                    pass
            self._log_callback = _native.LOG(forward)
            options.log_callback = self._log_callback
        options.wait_ready = 1 if wait_ready else 0
        options.ready_timeout_ms = int(ready_timeout * 1000)
        resolver_list = [r.encode("utf-8") for r in (ready_resolvers or [])]
        if resolver_list:
            resolvers = (ctypes.c_char_p * len(resolver_list))(*resolver_list)
            self._keep.append(resolvers)
            options.ready_resolvers = resolvers
            options.ready_resolver_count = len(resolver_list)
        if ready_port is not None:
            options.ready_port = int(ready_port)
        options.ready_ca_file = s(ready_ca_file)
        options.release_idle_code = 1 if release_idle_code else 0
        if handler is not None:
            self._callback = _native.HANDLER(self._dispatch)
            options.handler = self._callback
            options.handler_threads = int(handler_threads)
        error = ctypes.create_string_buffer(512)
        handle = lib.cfqt_tunnel_start(ctypes.byref(options), error, len(error))
        if not handle:
            raise CfqtError(error.value.decode("utf-8", "replace"))
        self._handle = handle
        _live.add(self)
        self._url = self._wait_url(url_timeout)

    def _dispatch(self, _data: Optional[int], handle: int) -> None:
        # On a libcfqt handler thread (ctypes took the GIL for us).
        request = Request(handle)
        try:
            self._handler(request)  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 -- every failure is the request's
            request.fail(f"{type(e).__name__}: {e}")
        finally:
            request.close()

    def _h(self) -> int:
        if self._handle is None:
            raise CfqtError("cfqt: the tunnel was closed")
        return self._handle

    def _wait_url(self, timeout: float) -> str:
        buffer = ctypes.create_string_buffer(1024)
        code = lib.cfqt_tunnel_wait_url(self._h(), int(timeout * 1000), buffer, len(buffer))
        if code != 0:
            self.close()
            raise CfqtError("cfqt: no quick tunnel was issued within %.1fs (see the logs)"
                            % timeout)
        return buffer.value.decode("utf-8")

    @property
    def url(self) -> str:
        """The public URL, ``https://<words>.trycloudflare.com``."""
        return self._url

    @property
    def hostname(self) -> str:
        """The public hostname (the URL without its scheme)."""
        return self._url.split("://", 1)[-1].rstrip("/")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Returns once an edge connection is registered (as ``/ready``); TimeoutError if not."""
        if lib.cfqt_tunnel_wait_ready(self._h(), int(timeout * 1000)) != 1:
            raise TimeoutError(f"cfqt: no edge connection registered within {timeout}s")

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Returns once the public URL serves, as ``cfqt --wait-ready``: the hostname resolves
        via public resolvers asked directly over DNS-over-TLS (``ready_resolvers``; never the
        system resolver, whose cache an early NXDOMAIN would poison), then an HTTPS request comes
        back through the edge to this tunnel. Raises :class:`NotServingError` naming the stage
        that did not succeed in time."""
        error = ctypes.create_string_buffer(1024)
        stage = lib.cfqt_tunnel_wait_serving(self._h(), int(timeout * 1000), error, len(error))
        if stage != 0:
            raise NotServingError(_STAGES.get(stage, "tunnel"),
                                  error.value.decode("utf-8", "replace"))

    @property
    def ready_connections(self) -> int:
        """Edge connections registered right now."""
        return lib.cfqt_tunnel_ready_connections(self._h()) if self._handle else 0

    @property
    def running(self) -> bool:
        """False once the tunnel ended (closed, or refused by the edge for good)."""
        return self._handle is not None and lib.cfqt_tunnel_running(self._handle) == 1

    def status(self) -> dict:
        """``{"url", "hostname", "running", "ready_connections"}``."""
        return {"url": self.url, "hostname": self.hostname, "running": self.running,
                "ready_connections": self.ready_connections}

    def metrics(self) -> str:
        """The ``/metrics`` page (Prometheus text, cloudflared's series names)."""
        if self._handle is None:
            return ""
        size = lib.cfqt_tunnel_metrics(self._handle, None, 0)
        while True:
            buffer = ctypes.create_string_buffer(size + 4096)
            needed = lib.cfqt_tunnel_metrics(self._handle, buffer, len(buffer))
            if needed <= len(buffer):
                return buffer.value.decode("utf-8", "replace")
            size = needed

    def stop(self) -> int:
        """Graceful shutdown; returns the exit status (0 = clean). Idempotent."""
        if self._handle is None:
            return 0
        return lib.cfqt_tunnel_stop(self._handle)

    def close(self) -> None:
        """Stops (as stop()) and frees the tunnel. Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            lib.cfqt_tunnel_free(handle)
        _live.discard(self)

    def __enter__(self) -> "Tunnel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


from .wsgi import serve_wsgi  # noqa: E402
from .asgi import serve_asgi  # noqa: E402
