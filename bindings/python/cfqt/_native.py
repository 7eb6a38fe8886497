"""ctypes declarations of libcfqt's C API (include/cfqt/cfqt.h).

The library is the one bundled in this package (cfqt/libcfqt.so), unless the environment
variable CFQT_LIBRARY names another one. Every call releases the GIL (ctypes.CDLL), so blocking
calls (waiting for the URL, reading a request body) never hold up other Python threads.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class LogField(ctypes.Structure):
    """struct cfqt_log_field."""

    _fields_ = [("key", ctypes.c_char_p), ("value", ctypes.c_char_p)]


LOG = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.POINTER(LogField), ctypes.c_size_t)


class Options(ctypes.Structure):
    """struct cfqt_options (field order as in cfqt.h)."""

    _fields_ = [
        ("url", ctypes.c_char_p),
        ("hello_world", ctypes.c_int),
        ("quick_service", ctypes.c_char_p),
        ("edges", ctypes.POINTER(ctypes.c_char_p)),
        ("edge_count", ctypes.c_size_t),
        ("edge_ca_file", ctypes.c_char_p),
        ("ha_connections", ctypes.c_int),
        ("grace_period_ms", ctypes.c_int),
        ("metrics", ctypes.c_int),
        ("metrics_address", ctypes.c_char_p),
        ("log_level", ctypes.c_char_p),
        ("unix_socket", ctypes.c_char_p),
        ("backoff_base_ms", ctypes.c_int),
        ("protocol", ctypes.c_char_p),
        ("log_callback", LOG),
        ("log_user_data", ctypes.c_void_p),
        ("wait_ready", ctypes.c_int),
        ("ready_timeout_ms", ctypes.c_int),
        ("ready_resolvers", ctypes.POINTER(ctypes.c_char_p)),
        ("ready_resolver_count", ctypes.c_size_t),
        ("ready_port", ctypes.c_int),
        ("ready_ca_file", ctypes.c_char_p),
        ("handler", HANDLER),
        ("handler_data", ctypes.c_void_p),
        ("handler_threads", ctypes.c_int),
        # Named tunnels (not exposed by this package yet; the layout must still match).
        ("token", ctypes.c_char_p),
        ("credentials_json", ctypes.c_char_p),
        ("credentials_file", ctypes.c_char_p),
        ("ingress", ctypes.c_void_p),
        ("ingress_count", ctypes.c_size_t),
        ("origin_ca_pool", ctypes.c_char_p),
        ("origin_server_name", ctypes.c_char_p),
        ("fallback_after_ms", ctypes.c_int),
        ("quic_retry_interval_ms", ctypes.c_int),
        ("quic_failure_limit", ctypes.c_int),
        ("quic_failure_window_ms", ctypes.c_int),
        ("threads", ctypes.c_int),
        ("busy_poll_us", ctypes.c_int),
        ("release_idle_code", ctypes.c_int),
    ]


def _library_path() -> str:
    given = os.environ.get("CFQT_LIBRARY")
    if given:
        return given
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "libcfqt.so")


def _load() -> ctypes.CDLL:
    path = _library_path()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise ImportError(
            f"cfqt: cannot load libcfqt ({path}): {e}; reinstall the package or set "
            "CFQT_LIBRARY to a libcfqt.so") from e
    c = ctypes
    p = c.c_void_p
    sigs = {
        "cfqt_options_init": (None, [c.POINTER(Options)]),
        "cfqt_options_size": (c.c_size_t, []),
        "cfqt_tunnel_start": (p, [c.POINTER(Options), c.c_char_p, c.c_size_t]),
        "cfqt_tunnel_wait_url": (c.c_int, [p, c.c_int, c.c_char_p, c.c_size_t]),
        "cfqt_tunnel_wait_ready": (c.c_int, [p, c.c_int]),
        "cfqt_tunnel_wait_serving": (c.c_int, [p, c.c_int, c.c_char_p, c.c_size_t]),
        "cfqt_tunnel_ready_connections": (c.c_int, [p]),
        "cfqt_tunnel_stop": (c.c_int, [p]),
        "cfqt_tunnel_free": (None, [p]),
        "cfqt_tunnel_running": (c.c_int, [p]),
        "cfqt_tunnel_metrics": (c.c_size_t, [p, c.c_char_p, c.c_size_t]),
        "cfqt_last_error": (c.c_char_p, []),
        "cfqt_request_method": (c.c_char_p, [p]),
        "cfqt_request_url": (c.c_char_p, [p]),
        "cfqt_request_path": (c.c_char_p, [p]),
        "cfqt_request_host": (c.c_char_p, [p]),
        "cfqt_request_header_count": (c.c_size_t, [p]),
        "cfqt_request_header_name": (c.c_char_p, [p, c.c_size_t]),
        "cfqt_request_header_value": (c.c_char_p, [p, c.c_size_t]),
        "cfqt_request_is_websocket": (c.c_int, [p]),
        "cfqt_request_read": (c.c_longlong, [p, c.c_void_p, c.c_size_t]),
        "cfqt_request_respond": (c.c_int, [p, c.c_int, c.POINTER(c.c_char_p), c.c_size_t]),
        "cfqt_request_respond_body": (c.c_int, [p, c.c_int, c.POINTER(c.c_char_p), c.c_size_t,
                                              c.c_char_p, c.c_size_t]),
        "cfqt_request_accept_websocket": (c.c_int, [p]),
        "cfqt_request_write": (c.c_int, [p, c.c_char_p, c.c_size_t]),
        "cfqt_request_end": (c.c_int, [p]),
        "cfqt_request_fail": (None, [p, c.c_char_p]),
        "cfqt_request_cancelled": (c.c_int, [p]),
        "cfqt_request_free": (None, [p]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    if lib.cfqt_options_size() != ctypes.sizeof(Options):
        raise ImportError(
            f"cfqt: {path} has a struct cfqt_options of {lib.cfqt_options_size()} bytes, this "
            f"package expects {ctypes.sizeof(Options)}: the package and libcfqt do not match")
    return lib


lib = _load()


def last_error() -> str:
    """The message of the last failed cfqt_request_* call on this thread."""
    text: Optional[bytes] = lib.cfqt_last_error()
    return text.decode("utf-8", "replace") if text else "unknown error"
