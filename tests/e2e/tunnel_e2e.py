#!/usr/bin/env python3
"""End-to-end tests of cfqt over cfqt-edge (loopback only).

Drives the real binaries as subprocesses: cfqt-edge (reads its JSON ready line), cfqt (reads the
URL from its first stdout line, follows its stderr log), and a Python origin in this process.
Public requests go through the emulator's front door with the tunnel's Host header. Waits are on
observable events (log lines, origin events, admin API state) and always bounded.

Usage: tunnel_e2e.py --bin BUILD/bin [--protocol quic|http2] [-k NAME]   (exit 0 = all passed)

--protocol (default quic) is the transport of every cfqt the script starts (issue 14): the
suite runs once per transport (ctest e2e-tunnel and e2e-tunnel-http2). Tests that are QUIC by
nature skip themselves on HTTP/2 with the reason; the others check what the transport changes
(the edge's connection records, metrics, how a silent edge is detected).
"""

import base64
import concurrent.futures
import hashlib
import http.client
import http.server
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import urllib.parse

from e2e_support import (DEADLINE_S, Edge, Fail, LogFollower, Skip, argument_parser, check,
                         check_no_sanitizer_report, finish_suite, prepare_run, readline, run_tests,
                         set_up, start_process, stop, unused_port, wait_until, ws_accept,
                         ws_frame_head, ws_mask, ws_read_frame)


PROTOCOL = "quic"   # --protocol: the transport of every cfqt started here (Cfqt adds it)


def quic_only(why):
    """Skip the calling test when this run is not over QUIC."""
    if PROTOCOL != "quic":
        raise Skip("QUIC only (%s); this run uses --protocol %s" % (why, PROTOCOL))


# ---------------------------------------------------------------------------------------------
# Origin

class OriginState:
    def __init__(self):
        self.sse_read = [threading.Event() for _ in range(64)]
        self.sse_sent = []
        self.slow_started = threading.Event()
        self.slow_release = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0


BLOBS = {}


def blob(n):
    b = BLOBS.get(n)
    if b is None:
        b = random.Random(n).randbytes(n)
        BLOBS[n] = b
    return b


def read_chunked(rfile):
    out = bytearray()
    while True:
        line = rfile.readline()
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()


def ws_frame(opcode, data, mask):
    if not mask:
        return ws_frame_head(opcode, len(data)) + data
    key = os.urandom(4)
    return ws_frame_head(opcode, len(data), key) + ws_mask(data, key)


def make_handler(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return read_chunked(self.rfile)
            n = int(self.headers.get("Content-Length", "0"))
            return self.rfile.read(n) if n else b""

        def reply(self, code, data, ctype="application/octet-stream", extra=None):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def chunk(self, data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def handle_any(self):
            with state.lock:
                state.requests += 1
            u = urllib.parse.urlparse(self.path)
            q = urllib.parse.parse_qs(u.query)
            if u.path == "/blob":
                data = blob(int(q["n"][0]))
                return self.reply(200, data, extra={"X-Sha256": hashlib.sha256(data).hexdigest()})
            if u.path == "/sha":
                data = self.body()
                info = {"method": self.command, "len": len(data),
                        "sha": hashlib.sha256(data).hexdigest(),
                        "chunked": self.headers.get("Transfer-Encoding", "") == "chunked",
                        "host": self.headers.get("Host", "")}
                return self.reply(200, json.dumps(info).encode(), "application/json")
            if u.path == "/chunked":
                self.body()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(int(q["n"][0])):
                    self.chunk(b"chunk-%d;" % i)
                self.wfile.write(b"0\r\n\r\n")
                return
            if u.path == "/sse":
                n = int(q["n"][0])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for k in range(n):
                    state.sse_sent.append(k)
                    self.chunk(b"data: event-%d\n\n" % k)
                    if k + 1 < n and not state.sse_read[k].wait(DEADLINE_S):
                        break
                self.wfile.write(b"0\r\n\r\n")
                return
            if u.path == "/ws":
                key = self.headers.get("Sec-WebSocket-Key")
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", ws_accept(key))
                self.end_headers()
                self.wfile.flush()
                while True:
                    op, data = ws_read_frame(self.rfile.read)
                    if op is None or op == 8:
                        if op == 8:
                            self.wfile.write(ws_frame(8, data, False))
                            self.wfile.flush()
                        break
                    self.wfile.write(ws_frame(op, data, False))
                    self.wfile.flush()
                self.close_connection = True
                return
            if u.path == "/status":
                return self.reply(int(q["code"][0]), b"status", "text/plain")
            if u.path == "/slow":
                state.slow_started.set()
                state.slow_release.wait(DEADLINE_S)
                return self.reply(200, b"slow-done", "text/plain")
            if self.command == "DELETE":
                return self.reply(200, b"deleted " + u.path.encode(), "text/plain")
            data = self.body()
            return self.reply(200, ("%s %s %d" % (self.command, u.path, len(data))).encode(),
                              "text/plain")

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any

    return Handler


class UnixOrigin:
    """The same handler on a unix socket (for --unix-socket)."""

    def __init__(self, path):
        self.state = OriginState()
        cls = type("U", (socketserver.ThreadingMixIn, socketserver.UnixStreamServer),
                   {"daemon_threads": True, "handle_error": lambda self, r, a: None})
        self.server = cls(path, make_handler(self.state))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Origin:
    def __init__(self):
        self.state = OriginState()
        server = socketserver.ThreadingMixIn
        cls = type("S", (socketserver.ThreadingMixIn, http.server.HTTPServer),
                   {"daemon_threads": True, "request_queue_size": 512,
                    "handle_error": lambda self, request, address: None})
        self.server = cls(("127.0.0.1", 0), make_handler(self.state))
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


# ---------------------------------------------------------------------------------------------
# Processes

class Cfqt:
    def __init__(self, bindir, edge, args, expect_url=True, log_sink=None, env=None):
        # The one place the transport is chosen: --protocol of the run unless args pick one.
        protocol = [] if "--protocol" in args else ["--protocol", PROTOCOL]
        cmd = [os.path.join(bindir, "cfqt")] + args + protocol + edge.client_args() + [
            "--metrics", "127.0.0.1:0",
            "--backoff-base", "20ms", "--ha-stagger", "10ms",
            "--quic-idle-timeout", "1s", "--quic-keepalive-period", "200ms",
            "--rpc-timeout", "5s", "--api-retry-delay", "50ms", "--loglevel", "debug"]
        self.cmd = cmd
        self.proc, self.log = start_process(cmd, env=dict(os.environ, **(env or {})),
                                            sink=log_sink)
        self.url = None
        self.host = None
        if expect_url:
            self.url = readline(self.proc.stdout)
            self.host = urllib.parse.urlparse(self.url).hostname
            line = self.log.wait_for(r"Starting metrics server on ")
            self.metrics = re.search(r"on ([0-9.]+:[0-9]+)/metrics", line).group(1)

    def metrics_get(self, path):
        host, port = self.metrics.rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
        c.request("GET", path)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def wait_exit(self, timeout=DEADLINE_S):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Fail("cfqt did not exit in time; log:\n" + self.log.text()[-3000:])

    def stop(self):
        stop(self.proc)


def parse_metrics(text):
    """Prometheus text format -> {(name, ((label, value), ...)): float}, plus {name: type}."""
    samples, types = {}, {}
    for line in text.splitlines():
        m = re.fullmatch(r"# TYPE (\S+) (\S+)", line)
        if m:
            types[m.group(1)] = m.group(2)
            continue
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        check(m, "bad metrics line", line)
        labels = tuple((k, re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), v))
                       for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples, types


def front(edge, host, method, path, body=None, headers=None, timeout=60):
    c = http.client.HTTPConnection(*edge.public, timeout=timeout)
    hdrs = {"Host": host}
    hdrs.update(headers or {})
    chunked = hdrs.get("Transfer-Encoding", "").lower() == "chunked"
    c.request(method, path, body=body, headers=hdrs, encode_chunked=chunked)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.headers, data


# ---------------------------------------------------------------------------------------------
# Tests

class Env:
    def __init__(self, bindir):
        self.bindir = bindir
        self.workdir = tempfile.mkdtemp(prefix="cfqt-e2e-")
        self.origin = Origin()
        self.edge = Edge(bindir, self.workdir)
        self.main = Cfqt(bindir, self.edge, ["tunnel", "--url", "http://127.0.0.1:%d" %
                                             self.origin.port, "--no-autoupdate",
                                             "--ha-connections", "2"])
        self.main.log.wait_for(r"Registered tunnel connection connIndex=0")
        self.main.log.wait_for(r"Registered tunnel connection connIndex=1")

    def close(self):
        self.main.stop()
        self.edge.stop()
        self.origin.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def test_cloudflared_form_and_metrics(env):
    m = env.main
    check(m.url == "https://" + m.host and m.host.endswith(".trycloudflare.localhost"), m.url)
    status, data = m.metrics_get("/quicktunnel")
    check(status == 200 and data == ('{"hostname":"%s"}' % m.host).encode(), status, data)
    status, data = m.metrics_get("/ready")
    j = json.loads(data)
    check(status == 200 and j["status"] == 200 and j["readyConnections"] == 2 and
          re.fullmatch(r"[0-9a-f-]{36}", j["connectorId"]) and list(j) ==
          ["status", "readyConnections", "connectorId"], status, data)
    status, data = m.metrics_get("/healthcheck")
    check(status == 200 and data == b"OK\n", status, data)
    check_metrics(env, j["readyConnections"])
    # Registration details the edge saw (§4.2, §4.4).
    conns = env.edge.connections(m.host)
    check(len(conns) == 2 and sorted(c["connIndex"] for c in conns) == [0, 1], conns)
    c0 = [c for c in conns if c["connIndex"] == 0][0]
    check(c0["version"] == "2026.8.2" and c0["arch"].startswith("linux_"), c0)
    check(sorted(c0["features"]) == sorted(["allow_remote_config", "serialized_headers",
                                            "support_datagram_v2", "support_quic_eof",
                                            "management_logs"]), c0["features"])
    check(c0["clientId"] == j["connectorId"], c0["clientId"], j["connectorId"])
    cfg = json.loads(c0["configuration"])
    check(cfg["ingress"][0]["service"] == "http://127.0.0.1:%d" % env.origin.port and
          cfg["__configuration_flags"]["protocol"] == PROTOCOL and
          cfg["__configuration_flags"]["no-autoupdate"] == "true", cfg)
    check(all(c["protocol"] == PROTOCOL for c in conns), "transport the edge saw", conns)
    c1 = [c for c in conns if c["connIndex"] == 1][0]
    check(c1["configuration"] is None, "configuration pushed on index 1", c1)
    check(c1["clientId"] == c0["clientId"], "one connector id per process", c0, c1)
    # The cloudflared banner with the URL on stderr (tools grep it there).
    banner = m.log.wait_for(r"Your quick Tunnel has been created!")
    check("INF" in banner, banner)
    lines = m.log.lines
    i = next(k for k, l in enumerate(lines) if "Your quick Tunnel has been created!" in l)
    check(re.search(r"\|\s+%s\s+\|" % re.escape(m.url), lines[i + 1]), lines[i:i + 2])
    check(re.search(r"DBG Registering tunnel connection connIndex=0", m.log.text()),
          "no debug registration line")
    check(m.log.count(r" INF Initial protocol %s\b" % PROTOCOL) == 1,
          "want one 'Initial protocol %s' line" % PROTOCOL, m.log.matching(r"Initial protocol"))


def check_metrics(env, ready):
    m = env.main
    host, port = m.metrics.rsplit(":", 1)

    def scrape():
        c = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
        c.request("GET", "/metrics")
        r = c.getresponse()
        data = r.read()
        c.close()
        check(r.status == 200 and r.getheader("Content-Type") ==
              "text/plain; version=0.0.4; charset=utf-8", r.status, r.getheaders())
        return parse_metrics(data.decode())

    before, types = scrape()

    def val(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    for name, kind in [("cloudflared_tunnel_ha_connections", "gauge"),
                       ("cloudflared_tunnel_total_requests", "counter"),
                       ("cloudflared_tunnel_concurrent_requests_per_tunnel", "gauge"),
                       ("cloudflared_tunnel_request_errors", "counter"),
                       ("cloudflared_tunnel_server_locations", "gauge"),
                       ("cloudflared_tunnel_tunnel_register_success", "counter"),
                       ("cloudflared_tunnel_user_hostnames_counts", "counter"),
                       ("build_info", "gauge")] + (
                           [("quic_client_smoothed_rtt", "gauge"),
                            ("quic_client_sent_bytes", "counter")] if PROTOCOL == "quic" else []):
        check(types.get(name) == kind, name, types.get(name))
    # Through the front door: 3 answered 200 and 2 answered 404 by the origin.
    for path, want in [("/a", 200), ("/status?code=404", 404), ("/b", 200),
                       ("/status?code=404", 404), ("/c", 200)]:
        status, _, _ = front(env.edge, m.host, "GET", path)
        check(status == want, path, status)
    deadline = time.time() + DEADLINE_S
    while True:
        after, _ = scrape()
        if val(after, "cloudflared_tunnel_concurrent_requests_per_tunnel") == 0:
            break
        check(time.time() < deadline, "concurrent requests never went back to 0")
        time.sleep(0.02)
    delta = lambda name, **l: val(after, name, **l) - val(before, name, **l)
    check(delta("cloudflared_tunnel_total_requests") == 5, before, after)
    check(delta("cloudflared_tunnel_response_by_code", status_code="200") == 3, after)
    check(delta("cloudflared_tunnel_response_by_code", status_code="404") == 2, after)
    check(delta("cloudflared_tunnel_request_errors") == 0, after)
    check(val(after, "cloudflared_tunnel_ha_connections") == ready == 2, after)
    check(val(after, "cloudflared_tunnel_tunnel_register_success",
              rpcName="registerConnection") >= 2, after)
    check(val(after, "cloudflared_tunnel_user_hostnames_counts",
              userHostname="https://" + m.host) == 1, after)
    builds = [k for k in after if k[0] == "build_info"]
    check(len(builds) == 1 and dict(builds[0][1])["version"] == "2026.8.2" and
          after[builds[0]] == 1, builds)
    for idx in ("0", "1"):
        locs = [k for k, v in after.items() if k[0] == "cloudflared_tunnel_server_locations" and
                dict(k[1])["connection_id"] == idx and v == 1]
        check(len(locs) == 1 and dict(locs[0][1])["edge_location"], idx, locs)
        if PROTOCOL != "quic":
            continue   # quic_client_* describe QUIC connections: not read over HTTP/2
        for name in ("quic_client_smoothed_rtt", "quic_client_min_rtt",
                     "quic_client_latest_rtt"):
            check((name, (("conn_index", idx),)) in after, name, idx, after)
        check(val(after, "quic_client_smoothed_rtt", conn_index=idx) > 0, after)
        check(val(after, "quic_client_sent_bytes", conn_index=idx) > 0, after)
        check(val(after, "quic_client_receive_bytes", conn_index=idx) > 0, after)
    check(not any(k[0].startswith("quic_client_smoothed_rtt") and dict(k[1])["conn_index"]
                  not in ("0", "1") for k in after), after)


def test_methods(env):
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH"]:
        body = b"x" * 10 if method in ("POST", "PUT", "PATCH") else None
        status, _, data = front(env.edge, env.main.host, method, "/thing", body)
        check(status == 200, method, status, data)
        if method == "DELETE":
            check(data == b"deleted /thing", data)
        else:
            check(data == ("%s /thing %d" % (method, len(body or b""))).encode(), method, data)


def test_bodies(env):
    for n in [0, 1, 1000, 65536, 1 << 20, 4 << 20, 8 << 20, 64 << 20]:
        status, headers, data = front(env.edge, env.main.host, "GET", "/blob?n=%d" % n)
        check(status == 200 and len(data) == n and
              hashlib.sha256(data).hexdigest() == headers["X-Sha256"], "download", n, status,
              len(data))
        up = blob(n)
        for method in ["POST", "PUT"]:
            status, _, data = front(env.edge, env.main.host, method, "/sha", up)
            info = json.loads(data)
            check(status == 200 and info["len"] == n and
                  info["sha"] == hashlib.sha256(up).hexdigest(), "upload", method, n, info)


def test_chunked(env):
    # Response chunked from the origin.
    status, _, data = front(env.edge, env.main.host, "GET", "/chunked?n=50")
    check(status == 200 and data == b"".join(b"chunk-%d;" % i for i in range(50)), data[:100])
    # Request chunked from the eyeball.
    parts = [os.urandom(1000 + i) for i in range(20)]
    status, _, data = front(env.edge, env.main.host, "POST", "/sha", iter(parts),
                            {"Transfer-Encoding": "chunked"})
    info = json.loads(data)
    whole = b"".join(parts)
    check(status == 200 and info["len"] == len(whole) and
          info["sha"] == hashlib.sha256(whole).hexdigest(), info)
    # 4 MiB up without Content-Length (chunked from the eyeball, streamed through the tunnel).
    big = blob(4 << 20)
    parts = [big[i:i + 65536] for i in range(0, len(big), 65536)]
    status, _, data = front(env.edge, env.main.host, "POST", "/sha", iter(parts),
                            {"Transfer-Encoding": "chunked"})
    info = json.loads(data)
    check(status == 200 and info["len"] == len(big) and
          info["sha"] == hashlib.sha256(big).hexdigest(), "4 MiB chunked upload", status, info)


def test_sse(env):
    st = env.origin.state
    st.sse_sent.clear()
    for e in st.sse_read:
        e.clear()
    n = 10
    c = http.client.HTTPConnection(*env.edge.public, timeout=DEADLINE_S)
    c.request("GET", "/sse?n=%d" % n, headers={"Host": env.main.host,
                                                 "Accept": "text/event-stream"})
    r = c.getresponse()
    check(r.status == 200, r.status)
    buf = b""
    for k in range(n):
        want = b"data: event-%d\n\n" % k
        while want not in buf:
            chunk = r.read1(65536)
            check(chunk, "SSE stream ended before event", k)
            buf += chunk
        # The origin has not sent k+1 yet: it waits for us.
        check(len(st.sse_sent) == k + 1, "origin ran ahead", k, st.sse_sent)
        st.sse_read[k].set()
    c.close()


def test_websocket(env):
    s = socket.create_connection(env.edge.public, timeout=DEADLINE_S)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" %
               (env.main.host, key)).encode())
    f = s.makefile("rb")
    status = f.readline()
    check(b" 101 " in status, status)
    while f.readline() not in (b"\r\n", b""):
        pass
    for i in range(1000):
        msg = ("message %d " % i).encode() * (1 + i % 7)
        s.sendall(ws_frame(1 if i % 2 else 2, msg, True))
        op, data = ws_read_frame(f.read)
        check(data == msg, "echo mismatch at", i, op, data)
    s.sendall(ws_frame(8, b"\x03\xe8", True))
    op, _ = ws_read_frame(f.read)
    check(op == 8, "no close frame", op)
    s.close()


def test_concurrent(env):
    def one(i):
        n = 1000 + i
        status, headers, data = front(env.edge, env.main.host, "GET", "/blob?n=%d" % n,
                                      timeout=DEADLINE_S * 3)
        return status == 200 and hashlib.sha256(data).hexdigest() == headers["X-Sha256"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(one, range(200)))
    check(all(results), "failed:", results.count(False))


def process_cpu_s(pid):
    # utime + stime of the whole process (every thread), from /proc/PID/stat.
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_poll(env):
    # --busy-poll (issue 15): the loops poll after each packet instead of sleeping. Requests,
    # bodies, a WebSocket and concurrency work as without it, on connection workers and on one
    # loop; once idle the process sleeps (CPU ~0), and SIGTERM still shuts down gracefully.
    for args in [["--ha-connections", "2"], ["--ha-connections", "1", "--threads", "1"]]:
        t = Cfqt(env.bindir, env.edge, ["--url", "http://127.0.0.1:%d" % env.origin.port,
                                        "--busy-poll", "200us", "--grace-period", "5s"] + args)
        try:
            t.log.wait_for(r"Registered tunnel connection connIndex=0")
            for method in ["GET", "POST"]:
                body = b"x" * 10 if method == "POST" else None
                status, _, data = front(env.edge, t.host, method, "/thing", body)
                check(status == 200 and data == ("%s /thing %d" % (
                    method, len(body or b""))).encode(), args, method, status, data)
            up = blob(1 << 20)
            status, _, data = front(env.edge, t.host, "POST", "/sha", up)
            check(status == 200 and json.loads(data)["sha"] == hashlib.sha256(up).hexdigest(),
                  args, status)
            s = socket.create_connection(env.edge.public, timeout=DEADLINE_S)
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall(("GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n" % (t.host, key)).encode())
            f = s.makefile("rb")
            check(b" 101 " in f.readline(), args, "no WebSocket upgrade")
            while f.readline() not in (b"\r\n", b""):
                pass
            for i in range(100):
                msg = ("message %d " % i).encode()
                s.sendall(ws_frame(2, msg, True))
                op, data = ws_read_frame(f.read)
                check(data == msg, args, "echo mismatch at", i, op, data)
            s.sendall(ws_frame(8, b"\x03\xe8", True))
            op, _ = ws_read_frame(f.read)
            check(op == 8, args, "no close frame", op)
            s.close()

            def one(i):
                status, headers, data = front(env.edge, t.host, "GET", "/blob?n=%d" % (1000 + i),
                                              timeout=DEADLINE_S * 3)
                return status == 200 and hashlib.sha256(data).hexdigest() == headers["X-Sha256"]

            with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
                results = list(pool.map(one, range(50)))
            check(all(results), args, "failed:", results.count(False))
            # Idle (keep-alive PINGs every 200 ms kick 200 us of polling each): a loop that kept
            # spinning would burn ~1 CPU second per second here.
            before = process_cpu_s(t.proc.pid)
            time.sleep(1.0)
            burnt = process_cpu_s(t.proc.pid) - before
            check(burnt < 0.15, args, "CPU while idle with --busy-poll", burnt)
            t.proc.send_signal(signal.SIGTERM)
            code = t.wait_exit()
            check(code == 0, args, "exit code after graceful shutdown", code)
        finally:
            t.stop()


def test_origin_down(env):
    t = Cfqt(env.bindir, env.edge, ["--url", "http://127.0.0.1:%d" % unused_port(),
                                    "--ha-connections", "1", "--proxy-connect-timeout", "2s"])
    try:
        t.log.wait_for(r"Registered tunnel connection connIndex=0")
        for _ in range(3):
            status, _, data = front(t.edge if hasattr(t, "edge") else env.edge, t.host, "GET", "/")
            check(status == 502, "expected the edge's 502 page", status, data[:200])
        check(t.proc.poll() is None, "cfqt died")
        status, _ = t.metrics_get("/ready")
        check(status == 200, "tunnel not ready after origin errors", status)
        # Each unreachable-origin answer is one request error, none is a response code.
        deadline = time.time() + DEADLINE_S
        while True:
            _, data = t.metrics_get("/metrics")
            samples, _ = parse_metrics(data.decode())
            if samples.get(("cloudflared_tunnel_concurrent_requests_per_tunnel", ())) == 0:
                break
            check(time.time() < deadline, "concurrent requests never went back to 0")
            time.sleep(0.02)
        check(samples.get(("cloudflared_tunnel_request_errors", ())) == 3 and
              samples.get(("cloudflared_tunnel_total_requests", ())) == 3 and
              not any(k[0] == "cloudflared_tunnel_response_by_code" for k in samples), samples)
    finally:
        t.stop()


def test_edge_closes_connection_0(env):
    m = env.main
    conns = env.edge.connections(m.host)
    c0 = [c for c in conns if c["connIndex"] == 0][0]
    before = m.log.count(r"Registered tunnel connection connIndex=0")
    start = m.log.mark()
    env.edge.admin("POST", "/connections/%d/close?code=0&reason=e2e-close" % c0["id"])
    # Requests keep flowing (on connection 1, and on 0 once it is back).
    for i in range(20):
        status, _, data = front(env.edge, m.host, "GET", "/blob?n=100")
        check(status == 200 and data == blob(100), "request failed during the reconnect", i,
              status)
    # QUIC: CONNECTION_CLOSE's reason phrase; HTTP/2: the GOAWAY's debug data (the emulator
    # sends the reason there).
    closed = m.log.wait_for(r"Edge closed the connection connIndex=0 ", start=start)
    check(re.search(r" code=0x0 reason=\"?e2e-close\"?$", closed),
          "the edge's close reason is not in", closed)
    m.log.wait_for(r"Retrying connection in up to .*connIndex=0")
    m.log.wait_for(r"Registered tunnel connection connIndex=0", count=before + 1)
    conns = env.edge.connections(m.host)
    check(sorted(c["connIndex"] for c in conns) == [0, 1], conns)
    status, _, _ = front(env.edge, m.host, "GET", "/blob?n=10")
    check(status == 200, status)


def test_edge_goes_silent(env):
    m = env.main
    c1 = [c for c in env.edge.connections(m.host) if c["connIndex"] == 1][0]
    before = m.log.count(r"Registered tunnel connection connIndex=1")
    env.edge.admin("POST", "/connections/%d/silence" % c1["id"])
    # QUIC finds a silent edge by its idle timeout, HTTP/2 by its unanswered PINGs.
    m.log.wait_for(r"Connection terminated connIndex=1 .*" +
                   (r"idle timeout" if PROTOCOL == "quic" else r"HTTP/2 PING unanswered"))
    m.log.wait_for(r"Registered tunnel connection connIndex=1", count=before + 1)
    status, _, _ = front(env.edge, m.host, "GET", "/blob?n=10")
    check(status == 200, status)


def test_registration_rejected_for_good(env):
    env.edge.admin("POST", "/registrations/reject-next?cause=bad%20secret&shouldRetry=false"
                   "&count=1000")
    try:
        t = Cfqt(env.bindir, env.edge, ["--url", "http://127.0.0.1:%d" % env.origin.port,
                                        "--ha-connections", "1"])
        code = t.wait_exit()
        check(code != 0, "cfqt exited 0 after a permanent registration error")
        t.log.wait_for(r"said not to retry.*bad secret")
        t.log.wait_for(r"no more connections active and exiting")
    finally:
        env.edge.admin("POST", "/registrations/reject-next?count=0")


def test_ready_retry_and_graceful_shutdown(env):
    # Registrations are refused (retryable) until we clear it: /ready stays 503.
    env.edge.admin("POST", "/registrations/reject-next?cause=try%20later&shouldRetry=true"
                   "&count=1000")
    t = Cfqt(env.bindir, env.edge, ["--url", "http://127.0.0.1:%d" % env.origin.port,
                                    "--ha-connections", "1", "--grace-period", "10s"])
    try:
        t.log.wait_for(r"Register tunnel error from server side .*try later", count=2)
        t.log.wait_for(r"Retrying connection in up to")
        status, data = t.metrics_get("/ready")
        check(status == 503 and json.loads(data)["readyConnections"] == 0, status, data)
        env.edge.admin("POST", "/registrations/reject-next?count=0")
        t.log.wait_for(r"Registered tunnel connection connIndex=0")
        status, data = t.metrics_get("/ready")
        check(status == 200 and json.loads(data)["readyConnections"] == 1, status, data)
        conns = env.edge.connections(t.host)
        check(conns and conns[0]["numPreviousAttempts"] >= 2, conns)

        # A request in flight when SIGTERM arrives completes; the edge sees unregister.
        st = env.origin.state
        st.slow_started.clear()
        st.slow_release.clear()
        result = {}

        def slow():
            result["r"] = front(env.edge, t.host, "GET", "/slow")

        th = threading.Thread(target=slow)
        th.start()
        check(st.slow_started.wait(DEADLINE_S), "slow request never reached the origin")
        t.proc.send_signal(signal.SIGTERM)
        t.log.wait_for(r"Initiating graceful shutdown due to signal terminated")
        t.log.wait_for(r"Unregistered tunnel connection connIndex=0")
        check(env.edge.connections(t.host, "unregistered"), "emulator did not see unregister")
        status, data = t.metrics_get("/ready")
        check(status == 503, "/ready during shutdown", status, data)
        check(t.proc.poll() is None, "cfqt exited before the in-flight request finished")
        st.slow_release.set()
        th.join(DEADLINE_S)
        check(result.get("r") and result["r"][0] == 200 and result["r"][2] == b"slow-done",
              result)
        code = t.wait_exit()
        check(code == 0, "exit code after graceful shutdown", code)
        t.log.wait_for(r"Tunnel server stopped")
    finally:
        env.edge.admin("POST", "/registrations/reject-next?count=0")
        t.stop()


def test_duplicate_rotates_and_ha_limit(env):
    env.edge.admin("POST", "/registrations/reject-next?cause=EDUPCONN&shouldRetry=true&count=1")
    t = Cfqt(env.bindir, env.edge, ["--url", "http://127.0.0.1:%d" % env.origin.port,
                                    "--ha-connections", "4"])
    try:
        t.log.wait_for(r"You requested 4 HA connections but I can give you at most 2\.")
        first = t.log.wait_for(r"Dialing edge connIndex=0")
        t.log.wait_for(r"already connected to this server, trying another address")
        t.log.wait_for(r"Switching to another edge address connIndex=0")
        reg = t.log.wait_for(r"Registered tunnel connection connIndex=0")
        ip0 = re.search(r"ip=([0-9.]+)", first).group(1)
        ip1 = re.search(r"ip=([0-9.]+)", reg).group(1)
        check(ip0 != ip1, "EDUPCONN did not rotate the address", ip0, ip1)
        t.log.wait_for(r"Registered tunnel connection connIndex=1")
        check(t.log.count(r"You requested 4 HA connections") == 1, "said more than once")
        check(t.log.count(r"connIndex=[23]") == 0, "indices beyond the address count started")
    finally:
        env.edge.admin("POST", "/registrations/reject-next?count=0")
        t.stop()


def test_grace_period_expires(env):
    st = env.origin.state
    st.slow_started.clear()
    st.slow_release.clear()
    t = Cfqt(env.bindir, env.edge, ["--url", "http://127.0.0.1:%d" % env.origin.port,
                                    "--ha-connections", "1", "--grace-period", "300ms"])
    try:
        t.log.wait_for(r"Registered tunnel connection connIndex=0")
        result = {}

        def slow():
            try:
                result["r"] = front(env.edge, t.host, "GET", "/slow", timeout=DEADLINE_S)
            except Exception as e:
                result["e"] = e

        th = threading.Thread(target=slow)
        th.start()
        check(st.slow_started.wait(DEADLINE_S), "slow request never reached the origin")
        t.proc.send_signal(signal.SIGTERM)
        code = t.wait_exit()
        check(code == 0, "exit code", code)
        t.log.wait_for(r"Grace period expired")
        st.slow_release.set()
        th.join(DEADLINE_S)
        check("e" in result or result["r"][0] != 200, "request outlived the grace period", result)
    finally:
        st.slow_release.set()
        t.stop()


def test_second_signal_exits_at_once(env):
    st = env.origin.state
    st.slow_started.clear()
    st.slow_release.clear()
    t = Cfqt(env.bindir, env.edge, ["--url", "http://127.0.0.1:%d" % env.origin.port,
                                    "--ha-connections", "1", "--grace-period", "60s"])
    try:
        t.log.wait_for(r"Registered tunnel connection connIndex=0")
        def slow():
            try:
                front(env.edge, t.host, "GET", "/slow", timeout=DEADLINE_S)
            except Exception:
                pass   # cut by the immediate exit

        th = threading.Thread(target=slow)
        th.start()
        check(st.slow_started.wait(DEADLINE_S), "slow request never reached the origin")
        t.proc.send_signal(signal.SIGINT)
        t.log.wait_for(r"Initiating graceful shutdown due to signal interrupt")
        t.log.wait_for(r"Unregistered tunnel connection")
        check(t.proc.poll() is None, "exited before the second signal")
        t.proc.send_signal(signal.SIGINT)
        code = t.wait_exit(timeout=5)
        check(code != 0, "second signal exit code", code)
        t.log.wait_for(r"exiting immediately")
    finally:
        st.slow_release.set()
        t.stop()


def test_local_mode(env):
    logfile = os.path.join(env.workdir, "local.log")
    p = subprocess.Popen([os.path.join(env.bindir, "cfqt"), "--local", "--hello-world",
                          "--metrics", "127.0.0.1:0", "--grace-period", "1s",
                          "--logfile", logfile],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = LogFollower(p.stderr)
    try:
        url = readline(p.stdout)
        u = urllib.parse.urlparse(url)
        check(u.scheme == "http" and u.hostname.endswith(".trycloudflare.localhost") and
              u.path == "/", url)
        # Printed once a connection is registered: reachable right away.
        c = http.client.HTTPConnection("127.0.0.1", u.port, timeout=DEADLINE_S)
        c.request("GET", "/", headers={"Host": u.hostname})
        r = c.getresponse()
        body = r.read()
        check(r.status == 200 and b"<html" in body.lower(), r.status, body[:200])
        p.send_signal(signal.SIGTERM)
        check(p.wait(DEADLINE_S) == 0, "exit code")
        with open(logfile) as f:
            text = f.read()
        check("Registered tunnel connection connIndex=0" in text and
              "Tunnel server stopped" in text, "log file incomplete", text[-500:])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_local_edge_is_a_child_process(env):
    # --local runs bin/cfqt-edge as a child (issue 15): it dies with cfqt even when cfqt is
    # killed outright, and a missing cfqt-edge is a clear error.
    p = subprocess.Popen([os.path.join(env.bindir, "cfqt"), "--local", "--hello-world",
                          "--metrics", "127.0.0.1:0", "--ha-connections", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = LogFollower(p.stderr)
    try:
        readline(p.stdout)
        started = log.wait_for(r"Local edge emulator started .*pid=(\d+)")
        child = int(re.search(r"pid=(\d+)", started).group(1))
        with open("/proc/%d/cmdline" % child, "rb") as f:
            argv0 = f.read().split(b"\0")[0]
        check(os.path.basename(argv0) == b"cfqt-edge", argv0)
        with open("/proc/%d/stat" % child) as f:
            check(int(f.read().rsplit(")", 1)[1].split()[1]) == p.pid, "not cfqt's child")
        p.kill()
        p.wait(DEADLINE_S)
        wait_until("cfqt-edge to exit after cfqt was killed",
                   lambda: not os.path.exists("/proc/%d/cmdline" % child) or
                   open("/proc/%d/stat" % child).read().rsplit(")", 1)[1].split()[0] == "Z")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    missing = subprocess.run([os.path.join(env.bindir, "cfqt"), "--local", "--hello-world",
                              "--metrics", "127.0.0.1:0"],
                             env=dict(os.environ, CFQT_EDGE=os.path.join(env.workdir, "nope")),
                             capture_output=True, text=True, timeout=DEADLINE_S)
    check(missing.returncode == 1 and "set CFQT_EDGE" in missing.stderr and
          missing.stdout == "", missing.returncode, missing.stderr)


def test_dial_overlaps_the_api_request(env):
    # Issue 15: discovery, the dial and the handshake run while the quick-tunnel request is out;
    # only registration waits for its answer. A failed request is still reported alone (exit 1,
    # the same line) and ends the connections dialled meanwhile.
    api_host, api_port = env.edge.ready["api"].rsplit(":", 1)
    state = {"fail": False, "requests": 0}

    class SlowApi(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state["requests"] += 1
            time.sleep(0.3)
            if state["fail"]:
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            c = http.client.HTTPConnection(api_host, int(api_port), timeout=DEADLINE_S)
            c.request("POST", self.path, body, {k: v for k, v in self.headers.items()
                                                if k.lower() not in ("host", "connection")})
            r = c.getresponse()
            data = r.read()
            c.close()
            self.send_response(r.status)
            self.send_header("Content-Type", r.getheader("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cmd = [os.path.join(env.bindir, "cfqt"), "--url", "http://127.0.0.1:1",
           "--protocol", PROTOCOL, "--quick-service", "http://127.0.0.1:%d" % server.server_port,
           "--edge-ca", env.edge.ready["ca"], "--edge", env.edge.ready["edges"][0],
           "--ha-connections", "1", "--metrics", "127.0.0.1:0", "--api-retry-delay", "10ms",
           "--loglevel", "debug"]
    try:
        proc, log = start_process(cmd)
        try:
            log.wait_for(r"Registered tunnel connection connIndex=0")
            text = log.text()
            dialed = text.find("Dialing edge")
            check(0 <= dialed < text.find("Your quick Tunnel has been created"),
                  "the dial did not start before the API answered", text[-3000:])
        finally:
            stop(proc)
        # Two connections: with more than one CPU, each on its own worker thread, whose
        # registration must wait for the API's answer too (the credentials cross threads).
        two = [a if a != "1" else "2" for a in cmd]
        two += ["--edge", env.edge.ready["edges"][1]]
        proc, log = start_process(two)
        try:
            log.wait_for(r"Registered tunnel connection connIndex=0")
            log.wait_for(r"Registered tunnel connection connIndex=1")
            check(" ERR " not in log.text(), "an error with two connections", log.text()[-3000:])
        finally:
            stop(proc)
        state["fail"] = True
        proc, log = start_process(cmd)
        try:
            code = proc.wait(DEADLINE_S)
            text = log.text()
            check(code == 1, "exit code", code)
            failed = text.find("ERR Couldn't start tunnel: failed to request quick Tunnel")
            check(0 <= text.find("Dialing edge") < failed, "no dial during the request",
                  text[-3000:])
            check(text.count(" ERR ") == 1, "more than the API's error reported", text[-3000:])
        finally:
            stop(proc)
    finally:
        server.shutdown()
        server.server_close()


def test_unix_socket_keylog_client_flags(env):
    # --unix-socket origin, --client-version, --edge-ip-version, SSLKEYLOGFILE.
    sock = os.path.join(env.workdir, "origin.sock")
    keylog = os.path.join(env.workdir, "keys.log")
    uo = UnixOrigin(sock)
    t = Cfqt(env.bindir, env.edge, ["--unix-socket", sock, "--ha-connections", "1",
                                    "--client-version", "2023.7.3", "--edge-ip-version", "4"],
             env={"SSLKEYLOGFILE": keylog})
    try:
        t.log.wait_for(r"Registered tunnel connection connIndex=0")
        status, _, data = front(env.edge, t.host, "POST", "/x", b"abc")
        check(status == 200 and data == b"POST /x 3", status, data)
        check(uo.state.requests == 1, uo.state.requests)
        c = env.edge.connections(t.host)[0]
        check(c["version"] == "2023.7.3", c)
        cfg = json.loads(c["configuration"])
        check(cfg["ingress"][0]["service"] == "unix:" + sock and
              cfg["__configuration_flags"]["edge-ip-version"] == "4", cfg)
        warned = t.log.wait_for(r"SSLKEYLOGFILE is set")
        if PROTOCOL == "http2":
            # kj-tls (HTTP/2's TLS) writes no key log: cfqt says so instead of promising it.
            check("not those of HTTP/2 connections" in warned, warned)
            check(not os.path.exists(keylog), "a key log appeared over HTTP/2", keylog)
            return
        with open(keylog) as f:
            keys = f.read()
        check("CLIENT_TRAFFIC_SECRET_0 " in keys and "SERVER_HANDSHAKE_TRAFFIC_SECRET " in keys,
              keys[:300])
    finally:
        t.stop()
        uo.close()


def test_c_api_example(env):
    quic_only("the C example (tests/api-example) does not set cfqt_options.protocol: it uses QUIC")
    # tests/api-example/quick-tunnel.c: a program using only include/cfqt/cfqt.h.
    cmd = [env.c_example] + env.edge.client_args()
    # bufsize=0: readline selects on the descriptor, so nothing may sit in a buffer.
    p = subprocess.Popen(cmd + ["http://127.0.0.1:%d" % env.origin.port], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    log = LogFollower(p.stderr)
    try:
        url = readline(p.stdout)
        check(url.startswith("https://"), url, log.text())
        ready = readline(p.stdout)
        check(ready.startswith("ready "), ready)
        host = urllib.parse.urlparse(url).hostname
        status, _, data = front(env.edge, host, "GET", "/blob?n=5000")
        check(status == 200 and data == blob(5000), status)
        p.stdin.close()
        check(readline(p.stdout) == "stopped 0", "graceful stop")
        check(p.wait(DEADLINE_S) == 0, "exit code")
        ids = [c["id"] for c in env.edge.connections(host, None)]
        check(ids, "emulator lists no connection of the example")
        for i in ids:
            env.edge.log.wait_for(r"tunnel connection unregistered id=%d " % i)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_make_run_demo(env):
    # `make run` = build, then scripts/run-demo: URL first, then a curl line that works at once.
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts",
                          "run-demo")
    p = subprocess.Popen([script, "--metrics", "127.0.0.1:0", "--grace-period", "1s"],
                         env=dict(os.environ, CFQT_BIN=os.path.join(env.bindir, "cfqt")),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         bufsize=0)   # several lines are read with readline (select)
    log = LogFollower(p.stderr)
    try:
        try:
            url = readline(p.stdout)
        except Fail as e:
            raise Fail(str(e), "; run-demo log:\n" + log.text()[-3000:])
        check(re.fullmatch(r"http://[a-z-]+\.trycloudflare\.localhost:[0-9]+/", url), url)
        curl = readline(p.stdout)
        check(curl == "curl -s " + url, curl)
        if shutil.which("curl"):
            out = subprocess.run(curl.split(), capture_output=True, timeout=DEADLINE_S)
            body = out.stdout
        else:
            u = urllib.parse.urlparse(url)
            c = http.client.HTTPConnection("127.0.0.1", u.port, timeout=DEADLINE_S)
            c.request("GET", "/", headers={"Host": u.netloc})
            body = c.getresponse().read()
        check(b"cfqt hello world" in body, body[:300])
        p.send_signal(signal.SIGTERM)   # the script forwards it; cfqt shuts down gracefully
        check(p.wait(DEADLINE_S) == 0, "run-demo exit code", log.text()[-2000:])
        log.wait_closed()   # the reader thread may not have taken the last lines yet
        check(re.search(r"Tunnel server stopped", log.text()), "no graceful stop",
              log.text()[-2000:])
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_protocol_h2mux_refused(env):
    p = subprocess.run([os.path.join(env.bindir, "cfqt"), "tunnel", "--url", "http://x:1",
                        "--protocol", "h2mux"], capture_output=True, timeout=DEADLINE_S)
    check_no_sanitizer_report(p.stderr.decode(errors="replace"))
    check(p.returncode == 2 and b"not supported" in p.stderr, p.returncode, p.stderr)
    check(p.stdout == b"", p.stdout)


# ---------------------------------------------------------------------------------------------
# Bad configuration (issue 13): every bad file, address or timeout flag exits 2 at once with a
# one-line reason, before the quick tunnel is requested.

BAD_CONFIG_BOUND_S = 5   # "at once": a refusal must come well within this


class QuickServiceTrap:
    """A loopback listener given as --quick-service: shows whether cfqt requested a tunnel.

    Nothing accepts until connected() is asked, so a connection cfqt made before it exited is
    still in the backlog then: the answer does not depend on timing."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]

    def connected(self, timeout=0):
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        conn, _ = self.sock.accept()
        conn.close()
        return True

    def close(self):
        self.sock.close()


def clean_env():
    """os.environ without the cloudflared variables cfqt reads (a developer's TUNNEL_* must not
    change what these tests see)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("TUNNEL_") and k not in ("NO_TLS_VERIFY", "NO_AUTOUPDATE")}


def test_bad_configuration_exits_2_at_once(env):
    missing = os.path.join(env.workdir, "no-such-ca.pem")
    not_pem = os.path.join(env.workdir, "not-a-ca.pem")
    with open(not_pem, "w") as f:
        f.write("this is not a certificate\n")
    broken_pem = os.path.join(env.workdir, "broken-ca.pem")
    with open(broken_pem, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all !!!\n-----END CERTIFICATE-----\n")
    no_dir_log = os.path.join(env.workdir, "no-such-dir", "cfqt.log")
    cases = [
        # (arguments, extra environment, the reason line, a regular expression)
        (["--edge-ca", missing], {},
         r"^cfqt: --edge-ca %s: cannot open it: No such file or directory; " % re.escape(missing)),
        (["--cacert", missing], {}, r"^cfqt: --edge-ca .*: cannot open it"),
        (["--edge-ca", not_pem], {},
         r"^cfqt: --edge-ca %s: holds no PEM certificate" % re.escape(not_pem)),
        (["--edge-ca", broken_pem], {},
         r"^cfqt: --edge-ca %s: its certificates do not parse \(GnuTLS: " %
         re.escape(broken_pem)),
        (["--origin-ca-pool", not_pem], {}, r"^cfqt: --origin-ca-pool .*: holds no PEM"),
        (["--edge", "nonsense"], {}, r'^cfqt: --edge "nonsense" is not host:port \(e\.g\. '),
        (["--edge", "1.2.3.4:99999"], {},
         r'^cfqt: --edge "1\.2\.3\.4:99999": the port must be a number from 1 to 65535'),
        ([], {"TUNNEL_EDGE": "1.2.3.4:7844,nonsense"},
         r'^cfqt: TUNNEL_EDGE \(--edge\) "nonsense" is not host:port'),
        (["--metrics", "nonsense"], {}, r'^cfqt: --metrics "nonsense" is not host:port'),
        (["--metrics", "127.0.0.1:70000"], {},
         r'^cfqt: --metrics "127\.0\.0\.1:70000": the port must be a number from 0 to 65535'),
        (["--dns-server", "dns.example:53"], {}, r'^cfqt: --dns-server "dns\.example:53" is not'),
        (["--logfile", no_dir_log], {},
         r"^cfqt: --logfile %s: its directory .* does not exist" % re.escape(no_dir_log)),
        (["--rpc-timeout", "0"], {}, r"^cfqt: --rpc-timeout must be greater than 0"),
        (["--quic-idle-timeout", "1s", "--quic-keepalive-period", "1s"], {},
         r"^cfqt: --quic-keepalive-period 1s must be below --quic-idle-timeout 1s, "),
        (["--url", "ftp://127.0.0.1:1"], {}, r'^cfqt: invalid origin: origin URL "ftp://'),
    ]
    trap = QuickServiceTrap()
    try:
        for args, extra, pattern in cases:
            origin = [] if "--url" in args else ["--hello-world"]
            cmd = [os.path.join(env.bindir, "cfqt")] + origin + [
                "--quick-service", trap.url, "--api-retry-delay", "10ms"] + args
            start = time.monotonic()
            try:
                p = subprocess.run(cmd, capture_output=True, env=dict(clean_env(), **extra),
                                   timeout=BAD_CONFIG_BOUND_S)
            except subprocess.TimeoutExpired as e:
                raise Fail("not refused within %ds: %s; stderr:\n%s" % (
                    BAD_CONFIG_BOUND_S, " ".join(args), (e.stderr or b"").decode()[-2000:]))
            elapsed = time.monotonic() - start
            err = p.stderr.decode(errors="replace")
            check_no_sanitizer_report(err)
            lines = err.splitlines()
            what = "%s %s: exit %s after %.2fs, stderr:\n%s" % (
                " ".join(args), extra, p.returncode, elapsed, err[-2000:])
            check(p.returncode == 2, what)
            # One reason line, then the pointer to --help: no log line, so nothing started.
            check(len(lines) == 2 and lines[1] == "Run `cfqt --help` for usage.", what)
            check(re.search(pattern, lines[0]), "want", repr(pattern), "in", what)
            check(p.stdout == b"", what, p.stdout)
            check(not trap.connected(), "a tunnel was requested despite", what)
    finally:
        trap.close()


def test_idle_timeout_alone_lowers_keepalive_with_warning(env):
    # Only --quic-idle-timeout at the default 1s keep-alive: adjusted, said so, and cfqt goes on
    # to request the tunnel (which the trap then proves).
    trap = QuickServiceTrap()
    p = subprocess.Popen([os.path.join(env.bindir, "cfqt"), "--hello-world",
                          "--quick-service", trap.url, "--metrics", "127.0.0.1:0",
                          "--api-retry-delay", "10ms", "--quic-idle-timeout", "1s"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    log = LogFollower(p.stderr)
    try:
        line = log.wait_for(r" WRN QUIC keep-alive period lowered")
        check(re.search(r"lowered from 1s \(the default\) to 500ms, half of --quic-idle-timeout "
                        r"1s: .* quicIdleTimeout=1s quicKeepAlivePeriod=500ms$", line), line)
        check(trap.connected(timeout=DEADLINE_S), "cfqt never requested the tunnel; log:\n" +
              log.text()[-2000:])
        check(p.poll() is None, "cfqt exited:", p.returncode, log.text()[-2000:])
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        trap.close()


# --protocol auto with the edge's UDP blocked (issue 14): QUIC gets no handshake within the
# default --fallback-after (2s), so each connection falls back to HTTP/2 over TCP. The bound is
# generous: 2s of QUIC attempt plus the TCP + TLS dial and registration.
AUTO_FALLBACK_BOUND_S = 10
FALLBACK_WRN = (r" WRN UDP to (\S+) got no answer in 2s; using HTTP/2 over TCP\. "
                r"Open outbound UDP ([0-9]+) for QUIC\.")


def udp_blocked_edge(env, prefix):
    """A cfqt-edge of its own whose UDP side drops everything (--no-udp), for the auto tests;
    they pick their own transport, so they run in the quic suite only."""
    if PROTOCOL != "quic":
        raise Skip("picks its own transport (--protocol auto): runs in the quic suite only")
    workdir = tempfile.mkdtemp(prefix=prefix, dir=env.workdir)
    return Edge(env.bindir, workdir, extra_args=["--no-udp"])


def test_auto_falls_back_when_udp_blocked(env):
    edge = udp_blocked_edge(env, "auto-")
    t = None
    try:
        check(edge.ready["udpBlocked"] is True and edge.ready["tcpEdges"] == edge.ready["edges"]
              and len(edge.ready["edges"]) == 2, edge.ready)
        check(edge.admin("GET", "/udp") == {"udpBlocked": True}, "admin GET /udp")
        started = time.monotonic()
        t = Cfqt(env.bindir, edge, ["--url", "http://127.0.0.1:%d" % env.origin.port,
                                    "--protocol", "auto", "--ha-connections", "2"])
        for idx in (0, 1):
            left = AUTO_FALLBACK_BOUND_S - (time.monotonic() - started)
            check(left > 0, "connIndex=%d not registered within %ds" % (idx, AUTO_FALLBACK_BOUND_S))
            t.log.wait_for(r"Registered tunnel connection connIndex=%d" % idx, timeout=left)
        elapsed = time.monotonic() - started
        print("    both connections registered over HTTP/2 %.2fs after start" % elapsed)
        status, headers, data = front(edge, t.host, "GET", "/blob?n=100000")
        check(status == 200 and data == blob(100000), "GET through the front door", status,
              len(data))
        conns = edge.connections(t.host)
        check(sorted(c["connIndex"] for c in conns) == [0, 1] and
              all(c["protocol"] == "http2" for c in conns),
              "the edge's records: want connIndex 0 and 1 over http2", conns)
        # auto starts with QUIC, as cloudflared does.
        check(t.log.count(r" INF Initial protocol quic\b") == 1,
              t.log.matching(r"Initial protocol"))
        # The WRN line: once per connection, i.e. once per edge address (one address each);
        # the fallback is remembered, so later dials go straight to HTTP/2.
        time.sleep(1)
        lines = t.log.matching(FALLBACK_WRN)
        addrs = []
        for line in lines:
            m = re.search(FALLBACK_WRN, line)
            check(m.group(1).rsplit(":", 1)[1] == m.group(2), "port of the advice", line)
            addrs.append(m.group(1))
        check(sorted(addrs) == sorted(edge.ready["edges"]),
              "want the fallback WRN exactly once per edge address", edge.ready["edges"], lines)
        check(t.log.count(r"got no answer") == 2, t.log.matching(r"got no answer"))
    finally:
        if t:
            t.stop()
        edge.stop()


def test_auto_moves_back_to_quic(env):
    # UDP blocked at start: both connections fall back to HTTP/2. Once UDP works again, QUIC is
    # probed every --quic-retry-interval and the connections move back one at a time (unregister,
    # drain, reconnect over QUIC) while the other carries the traffic: no request fails.
    edge = udp_blocked_edge(env, "auto-back-")
    t = None
    stop = threading.Event()
    results = {"ok": 0, "failed": []}

    def load():
        while not stop.is_set():
            try:
                status, _, data = front(edge, t.host, "GET", "/blob?n=2000")
                if status == 200 and data == blob(2000):
                    results["ok"] += 1
                else:
                    results["failed"].append(status)
            except Exception as e:   # a cut connection counts as a failure
                results["failed"].append(repr(e))

    try:
        t = Cfqt(env.bindir, edge, ["--url", "http://127.0.0.1:%d" % env.origin.port,
                                    "--protocol", "auto", "--ha-connections", "2",
                                    "--fallback-after", "300ms", "--quic-retry-interval", "500ms"])
        for idx in (0, 1):
            t.log.wait_for(r"Registered tunnel connection connIndex=%d .*protocol=http2" % idx)
        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        edge.admin("POST", "/udp/unblock")
        deadline = time.monotonic() + DEADLINE_S
        while True:
            conns = edge.connections(t.host)
            if sorted((c["connIndex"], c["protocol"]) for c in conns) == [(0, "quic"), (1, "quic")]:
                break
            check(time.monotonic() < deadline, "connections did not move back to QUIC", conns)
            time.sleep(0.05)
        stop.set()
        loader.join(DEADLINE_S)
        moves = t.log.matching(r"QUIC works again to ")
        print("    moved back: %d lines; %d requests during the move, %d failed" %
              (len(moves), results["ok"], len(results["failed"])))
        check(len(moves) == 2, "want one move per connection", moves)
        check(results["ok"] > 0, "no request ran during the move")
        check(not results["failed"], "requests failed during the move", results["failed"][:5])
        for idx in (0, 1):
            t.log.wait_for(r"Registered tunnel connection connIndex=%d .*protocol=quic" % idx)
    finally:
        stop.set()
        if t:
            t.stop()
        edge.stop()


DYING_WRN = (r" WRN QUIC connections to (\S+) ended 3 times within 1m0s; using HTTP/2 over TCP\. "
             r"UDP ([0-9]+) to the edge seems filtered or unreliable on this network; QUIC is "
             r"tried again in 2s\.")


def test_auto_falls_back_when_quic_keeps_dying(env):
    # --protocol auto, UDP open: the QUIC connection registers, then dies three times in a row
    # (the edge closes it, goes silent, closes it): the third death within --quic-failure-window
    # moves the connection to HTTP/2 with one WRN line; QUIC is tried again after
    # --quic-retry-interval and the connection moves back.
    if PROTOCOL != "quic":
        raise Skip("picks its own transport (--protocol auto): runs in the quic suite only")
    t = Cfqt(env.bindir, env.edge, ["--url", "http://127.0.0.1:%d" % env.origin.port,
                                    "--protocol", "auto", "--ha-connections", "1",
                                    "--quic-failure-limit", "3", "--quic-failure-window", "60s",
                                    "--quic-retry-interval", "2s"])
    registered = r"Registered tunnel connection connIndex=0 "
    try:
        t.log.wait_for(registered + r".*protocol=quic")
        for n, fault in enumerate(["close?code=0&reason=e2e-dying", "silence",
                                   "close?code=0&reason=e2e-dying"]):
            conns = [c for c in env.edge.connections(t.host) if c["protocol"] == "quic"]
            check(conns, "no QUIC connection to fault", env.edge.connections(t.host))
            victim = max(conns, key=lambda c: c["id"])
            check(t.log.count(DYING_WRN) == 0, "fell back after %d deaths" % n,
                  t.log.matching(DYING_WRN))
            env.edge.admin("POST", "/connections/%d/%s" % (victim["id"], fault))
            t.log.wait_for(registered, count=n + 2)
        line = t.log.wait_for(registered, count=4)
        check(re.search(r"protocol=http2", line), "the 4th registration is not over HTTP/2", line)
        lines = t.log.matching(DYING_WRN)
        check(len(lines) == 1, "want the WRN line once", lines)
        print("    " + lines[0])
        m = re.search(DYING_WRN, lines[0])
        check(m.group(1) in env.edge.ready["edges"] and m.group(1).endswith(":" + m.group(2)),
              lines[0])
        status, _, data = front(env.edge, t.host, "GET", "/blob?n=1000")
        check(status == 200 and data == blob(1000), "GET over HTTP/2", status)
        # QUIC works (the edge killed it, not the network): after the retry interval it is
        # tried again and the connection moves back.
        t.log.wait_for(r"QUIC works again to ")
        t.log.wait_for(registered + r".*protocol=quic", count=4)
        check(t.log.count(DYING_WRN) == 1, t.log.matching(DYING_WRN))
    finally:
        t.stop()


TESTS = [
    test_cloudflared_form_and_metrics,
    test_methods,
    test_bodies,
    test_chunked,
    test_sse,
    test_websocket,
    test_concurrent,
    test_busy_poll,
    test_origin_down,
    test_edge_closes_connection_0,
    test_edge_goes_silent,
    test_registration_rejected_for_good,
    test_ready_retry_and_graceful_shutdown,
    test_duplicate_rotates_and_ha_limit,
    test_grace_period_expires,
    test_second_signal_exits_at_once,
    test_local_mode,
    test_local_edge_is_a_child_process,
    test_dial_overlaps_the_api_request,
    test_unix_socket_keylog_client_flags,
    test_c_api_example,
    test_make_run_demo,
    test_protocol_h2mux_refused,
    test_bad_configuration_exits_2_at_once,
    test_idle_timeout_alone_lowers_keepalive_with_warning,
    test_auto_falls_back_when_udp_blocked,
    test_auto_moves_back_to_quic,
    test_auto_falls_back_when_quic_keeps_dying,
]


def main():
    ap = argument_parser()
    ap.add_argument("-k", default=None)
    ap.add_argument("--protocol", choices=["quic", "http2"], default="quic",
                    help="transport of every cfqt started (default quic)")
    ap.add_argument("--c-example", default=None,
                    help="the C API example to run (default: BIN/cfqt-c-example)")
    args = ap.parse_args()
    global PROTOCOL
    PROTOCOL = args.protocol
    print("transport: --protocol %s" % PROTOCOL, flush=True)
    prepare_run("test run timed out")
    env = set_up(Env, os.path.abspath(args.bin))
    env.c_example = args.c_example or os.path.join(env.bindir, "cfqt-c-example")
    finish_suite(lambda: run_tests(TESTS, env, args.k, alarm_s=180), env.close,
                 exits=[("main cfqt", env.main, (0, None)), ("cfqt-edge", env.edge, (0,))],
                 tails=[("cfqt (main)", env.main.log, 4000), ("cfqt-edge", env.edge.log, 3000)])


if __name__ == "__main__":
    main()
