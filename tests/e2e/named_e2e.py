#!/usr/bin/env python3
"""Named tunnels end to end (issue 19): cfqt `tunnel run` against cfqt-edge's named tunnels.

Loopback only, ports 0, every wait bounded. One cfqt-edge (two edge addresses, QUIC idle timeout
1 s so that a dead replica's connections leave the rotation soon) serves every case; each case
starts its own cfqt processes. The origins are small threaded HTTP servers in this process that
answer with their own name.

Cases (`-k NAME` runs the cases whose name contains NAME):
  ingress_routing   --credentials-file + --config: two hostnames and a path rule to three origins,
                    http_status:404 for anything else; `ingress validate` and `ingress rule`
  ingress_unix_tls  unix+tls: services: an HTTPS origin on a unix socket (certificate from a CA
                    made with openssl in the temp dir, trusted through originRequest caPool),
                    verified against the visitor's hostname or originServerName; a name the
                    certificate does not carry gets 502; an originRequest key cfqt does not
                    apply (http2Origin) is warned about at start
  remote_config[_http2|_workers]  (QUIC, HTTP/2, two connections on two worker threads) a remotely managed tunnel (TUNNEL_TOKEN): 503 before any configuration; push
                    v1, requests follow it; push v2 while a slow request is in flight (it finishes
                    on v1's origin, new ones use v2's); an invalid v3 is refused and v2 keeps
                    serving; v1 again is ignored; cloudflared_orchestration_config_version; an
                    originRequest key cfqt does not apply (noHappyEyeballs) is warned about
  replicas          3 cfqt processes run one named tunnel; a bounded load (8 visitors with
                    keep-alive) through the front door; the edge shows 3 connectors serving.
                    (a) SIGTERM one mid-load: zero failed requests, it exits 0. (b) kill -9 one
                    mid-load: every failure is on the killed replica's connections (from the
                    edge's per-connection "failed" count) and none starts after the edge saw its
                    connections closed. (c) a new replica takes traffic soon after registering
                    (bound 5 s). (d) the edge goes silent on a replica's connections: no
                    failure starts after the edge's idle timeout closed them. The counts and
                    times are printed.

Usage: named_e2e.py --bin BUILD/bin [-k NAME]     (exit 0 = all passed)
"""

import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time

from e2e_support import (DEADLINE_S, Edge, Fail, argument_parser, check, finish_suite, kill,
                         prepare_run, run_tests, set_up, start_process, stop, wait_until)


# ---------------------------------------------------------------------------------------------
# Origins

class Origin:
    """An HTTP/1.1 origin answering "<name> <path>"; GET /slow waits until release() (bounded)."""

    def __init__(self, name):
        self.name = name
        self.slow_started = threading.Event()
        self.slow_release = threading.Event()
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.path.startswith("/slow"):
                    origin.slow_started.set()
                    origin.slow_release.wait(DEADLINE_S)
                body = ("%s %s" % (origin.name, self.path)).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass   # a killed replica resets its origin connections: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.slow_release.set()
        self.server.shutdown()


class UnixTlsOrigin:
    """An HTTPS/1.1 origin on a unix socket answering "<name> <path>", with `cert`/`key`."""

    def __init__(self, name, path, cert, key):
        origin = self
        self.name = name
        self.path = path
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                body = ("%s %s" % (origin.name, self.path)).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def address_string(self):
                return "unix"

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

            def get_request(self):
                # The handshake runs in the connection's thread, on its first read.
                sock, addr = self.socket.accept()
                return context.wrap_socket(sock, server_side=True,
                                           do_handshake_on_connect=False), addr

            def handle_error(self, request, client_address):
                pass   # a client refusing the certificate aborts the handshake: expected here

        self.server = Server(path, Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def make_certificates(workdir, hostnames):
    """(ca.pem, server.pem, server-key.pem) made with openssl: a CA and a server certificate
    for `hostnames`, all in `workdir`."""
    ca_key, ca = os.path.join(workdir, "ca-key.pem"), os.path.join(workdir, "ca.pem")
    key, csr = os.path.join(workdir, "server-key.pem"), os.path.join(workdir, "server.csr")
    cert, ext = os.path.join(workdir, "server.pem"), os.path.join(workdir, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=%s\n" % ",".join("DNS:" + h for h in hostnames))
    steps = [
        ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=cfqt e2e origin CA"],
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", key, "-out", csr, "-subj", "/CN=%s" % hostnames[0]],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ]
    for step in steps:
        r = subprocess.run(["openssl"] + step, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=DEADLINE_S)
        check(r.returncode == 0, "openssl", step[0], "failed:", r.stdout.decode(errors="replace"))
    return ca, cert, key


# ---------------------------------------------------------------------------------------------
# Environment

class Env:
    def __init__(self, bindir):
        self.bindir = bindir
        self.workdir = tempfile.mkdtemp(prefix="cfqt-named-e2e-")
        self.edge = Edge(bindir, self.workdir, extra_args=["--idle-timeout", "1s"])
        self.origins = [Origin("origin-%d" % i) for i in range(3)]

    def close(self):
        for o in self.origins:
            o.close()
        self.edge.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def admin_post(self, path, body):
        host, port = self.edge.ready["admin"].rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
        data = json.dumps(body).encode()
        c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        text = r.read()
        c.close()
        check(r.status == 200, "admin POST", path, "->", r.status, text)
        return json.loads(text)

    def named_tunnel(self, name, remotely_managed=False, routes=()):
        t = self.admin_post("/named-tunnels", {"name": name, "remotelyManaged": remotely_managed})
        for h in routes:
            self.admin_post("/named-tunnels/%s/routes" % t["id"], {"hostname": h})
        return t

    def tunnel_state(self, tunnel_id):
        for t in self.edge.admin("GET", "/tunnels")["tunnels"]:
            if t["id"] == tunnel_id:
                return t
        raise Fail("tunnel %s not listed" % tunnel_id)

    def cfqt(self, args, env=None):
        cmd = [os.path.join(self.bindir, "cfqt")] + args + [
            "--cacert", self.edge.ready["ca"], "--metrics", "127.0.0.1:0",
            "--ha-stagger", "50ms", "--backoff-base", "100ms", "--grace-period", "5s",
            "--quic-idle-timeout", "2s", "--quic-keepalive-period", "300ms"]
        for e in self.edge.ready["edges"]:
            cmd += ["--edge", e]
        return start_process(cmd, env=env)

    def get(self, host, path, conn=None):
        """(status, body) of GET path with Host: host through the front door."""
        own = conn is None
        if own:
            conn = http.client.HTTPConnection(*self.edge.public, timeout=DEADLINE_S)
        try:
            conn.request("GET", path, headers={"Host": host})
            r = conn.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            if own:
                conn.close()


def connector_id(log):
    line = log.wait_for(r"Generated Connector ID: ")
    return re.search(r"Generated Connector ID: ([0-9a-f-]{36})", line).group(1)


def metrics_address(log):
    line = log.wait_for(r"Starting metrics server on ")
    return re.search(r"Starting metrics server on (\S+)/metrics", line).group(1)


def write_file(env, name, text):
    path = os.path.join(env.workdir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------------
# Cases

def check_routes(env, cases):
    # Each (host, path, status, body) through the front door; body None: not checked.
    for host, path, status, body in cases:
        got = env.get(host, path)
        check(got[0] == status and (body is None or got[1] == body), host, path, "->", got)
        print("    %s%s -> %d %s" % (host, path, got[0], got[1] if body else ""))


def test_ingress_routing(env):
    t = env.named_tunnel("routing", routes=["a.example.localhost", "b.example.localhost",
                                            "c.example.localhost"])
    creds = write_file(env, "creds.json", json.dumps(t["credentials"]))
    o0, o1, o2 = env.origins
    config = write_file(env, "routing.yml", """tunnel: %s
credentials-file: %s
protocol: http2
loglevel: debug
ingress:
  - hostname: a.example.localhost
    path: ^/api/
    service: %s
  - hostname: a.example.localhost
    service: %s
  - hostname: "*.example.localhost"
    path: ^/b
    service: %s
  - service: http_status:404
""" % (t["id"], creds, o2.url, o0.url, o1.url))

    # The config tools first (cloudflared's output shape).
    out = os.popen("%s tunnel --config %s ingress validate" % (
        os.path.join(env.bindir, "cfqt"), config)).read()
    check(out == "Validating rules from %s\nOK\n" % config, repr(out))
    out = os.popen("%s tunnel --config %s ingress rule https://a.example.localhost/api/x" % (
        os.path.join(env.bindir, "cfqt"), config)).read()
    check(out == "Using rules from %s\nMatched rule #0\n\thostname: a.example.localhost\n"
          "\tpath: ^/api/\n\tservice: %s\n" % (config, o2.url), repr(out))

    proc, log = env.cfqt(["tunnel", "--config", config, "run"])
    log.wait_for(r"Registered tunnel connection", count=2)
    check(log.count(r"Initial protocol http2") == 1, "the file's protocol: http2 was not applied")
    check(log.count(r" DBG ") > 0, "the file's loglevel: debug was not applied")
    cases = [("a.example.localhost", "/", 200, "origin-0 /"),
             ("a.example.localhost", "/api/v1", 200, "origin-2 /api/v1"),
             ("b.example.localhost", "/b/x", 200, "origin-1 /b/x"),
             ("b.example.localhost", "/other", 404, None),
             ("c.example.localhost", "/", 404, None),
             ("%s.%s" % (t["id"], env.edge.ready["zone"]), "/api/v1", 404, None)]
    check_routes(env, cases)
    stop(proc)
    check(proc.returncode == 0, "cfqt exited", proc.returncode)


def test_ingress_unix_tls(env):
    hosts = ["secure.example.localhost", "named.example.localhost", "wrong.example.localhost"]
    t = env.named_tunnel("unix-tls", routes=hosts)
    creds = write_file(env, "creds-tls.json", json.dumps(t["credentials"]))
    certdir = os.path.join(env.workdir, "tls")
    os.mkdir(certdir)
    ca, cert, key = make_certificates(certdir, ["secure.example.localhost", "origin.internal"])
    sock = os.path.join(certdir, "origin.sock")
    origin = UnixTlsOrigin("tls-origin", sock, cert, key)
    try:
        config = write_file(env, "unix-tls.yml", """tunnel: %s
credentials-file: %s
originRequest:
  caPool: %s
  http2Origin: true
ingress:
  - hostname: secure.example.localhost
    service: unix+tls:%s
  - hostname: named.example.localhost
    service: unix+tls:%s
    originRequest:
      originServerName: origin.internal
  - hostname: wrong.example.localhost
    service: unix+tls:%s
  - service: http_status:404
""" % (t["id"], creds, ca, sock, sock, sock))
        out = os.popen("%s tunnel --config %s ingress validate" % (
            os.path.join(env.bindir, "cfqt"), config)).read()
        check(out == "Validating rules from %s\nOK\n" % config, repr(out))

        proc, log = env.cfqt(["tunnel", "--config", config, "run"])
        log.wait_for(r"Registered tunnel connection", count=2)
        warning = log.wait_for(r"An originRequest key is not supported by cfqt and is ignored")
        check("key=http2Origin" in warning and "line=5" in warning, warning)
        cases = [("secure.example.localhost", "/a", 200, "tls-origin /a"),   # the visitor's name
                 ("named.example.localhost", "/b", 200, "tls-origin /b"),    # originServerName
                 ("wrong.example.localhost", "/c", 502, None),               # not in the cert
                 ("secure.example.localhost", "/d?x=1", 200, "tls-origin /d?x=1")]
        check_routes(env, cases)
        stop(proc)
        check(proc.returncode == 0, "cfqt exited", proc.returncode)
    finally:
        origin.close()


def test_remote_config(env):
    remote_config_case(env, [])


def test_remote_config_http2(env):
    # The same over HTTP/2: the edge's update-configuration request instead of the RPC stream.
    remote_config_case(env, ["--protocol", "http2"])


def test_remote_config_workers(env):
    # Two connections, each on its own worker thread (--threads auto): every worker's router
    # follows the configuration, whichever connection the edge pushed it to.
    remote_config_case(env, [], ha=2)


def remote_config_case(env, extra, ha=1):
    t = env.named_tunnel("remote", remotely_managed=True)
    host = "%s.%s" % (t["id"], env.edge.ready["zone"])
    o0, o1, o2 = env.origins
    child_env = dict(os.environ, TUNNEL_TOKEN=t["token"])
    proc, log = env.cfqt(["tunnel", "run", "--ha-connections", str(ha)] + extra, env=child_env)
    log.wait_for(r"Registered tunnel connection", count=ha)
    metrics = metrics_address(log)
    check(env.get(host, "/")[0] == 503, "before any configuration the tunnel answers 503")
    check(log.count(r"updateLocalConfiguration|local configuration pushed") == 0,
          "a remotely managed tunnel must not push its local configuration")

    def push(version, config):
        answer = env.admin_post("/named-tunnels/%s/configuration" % t["id"],
                                {"version": version, "config": config})
        check(len(answer["connections"]) == ha, answer)
        results = [c["result"] for c in answer["connections"]]
        check(all(r == results[0] for r in results), "every connection answers alike", answer)
        return results[0]

    r = push(1, {"ingress": [{"service": o0.url, "originRequest": {"noHappyEyeballs": True}}]})
    check(r == {"latestAppliedVersion": 1, "err": ""}, r)
    for i in range(2 * ha):   # the front door takes turns between the connections
        check(env.get(host, "/x") == (200, "origin-0 /x"), "v1 routes to origin-0")
    warning = log.wait_for(r"An originRequest key is not supported by cfqt and is ignored")
    check("key=noHappyEyeballs" in warning and "remote configuration" in warning, warning)

    # A slow request on v1's origin stays there while v2 is applied.
    o0.slow_started.clear()
    o0.slow_release.clear()
    slow = {}
    th = threading.Thread(target=lambda: slow.update(r=env.get(host, "/slow")))
    th.start()
    check(o0.slow_started.wait(DEADLINE_S), "the slow request reached origin-0")
    r = push(2, {"ingress": [{"hostname": "nothing.example", "service": o2.url},
                             {"service": o1.url}]})
    check(r == {"latestAppliedVersion": 2, "err": ""}, r)
    for i in range(2 * ha):
        check(env.get(host, "/y") == (200, "origin-1 /y"), "v2 routes to origin-1")
    o0.slow_release.set()
    th.join(DEADLINE_S)
    check(slow.get("r") == (200, "origin-0 /slow"), "the in-flight request finished on v1",
          slow)

    r = push(3, {"ingress": [{"hostname": "a.example", "service": o2.url}]})
    check(r["latestAppliedVersion"] == 2 and "The last ingress rule must match all URLs" in
          r["err"], "an invalid v3 is refused", r)
    check(env.get(host, "/z") == (200, "origin-1 /z"), "v2 keeps serving after a refused v3")
    r = push(1, {"ingress": [{"service": o2.url}]})
    check(r == {"latestAppliedVersion": 2, "err": ""}, "v1 again is ignored", r)
    check(env.get(host, "/w") == (200, "origin-1 /w"), "still v2")

    # A connector that joins later gets the current configuration from the edge.
    proc2, log2 = env.cfqt(["tunnel", "run", "--ha-connections", "1"] + extra, env=child_env)
    log2.wait_for(r"Updated to new configuration version=2")
    answers = [env.get(host, "/j%d" % i) for i in range(6)]
    check(all(a[0] == 200 and a[1].startswith("origin-1 ") for a in answers),
          "both connectors serve v2", answers)
    stop(proc2)
    check(proc2.returncode == 0, "second cfqt exited", proc2.returncode)

    h, p = metrics.rsplit(":", 1)
    c = http.client.HTTPConnection(h, int(p), timeout=DEADLINE_S)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    check("\ncloudflared_orchestration_config_version 2\n" in text, "config version metric")
    stop(proc)
    check(proc.returncode == 0, "cfqt exited", proc.returncode)


class Load:
    """Visitors looping GETs through the front door with keep-alive; each result is recorded
    as (start, end, ok, status)."""

    def __init__(self, env, host, visitors=8):
        self.env, self.host = env, host
        self.results = []
        self.lock = threading.Lock()
        self.running = True
        self.threads = [threading.Thread(target=self.visit, daemon=True) for _ in range(visitors)]
        for th in self.threads:
            th.start()

    def visit(self):
        conn = None
        while self.running:
            if conn is None:
                conn = http.client.HTTPConnection(*self.env.edge.public, timeout=DEADLINE_S)
            start = time.monotonic()
            try:
                status, body = self.env.get(self.host, "/load", conn)
                ok = status == 200 and body == "origin-0 /load"
            except Exception:
                status, ok = 0, False
                conn.close()
                conn = None
            with self.lock:
                self.results.append((start, time.monotonic(), ok, status))

    def failures(self, since=0.0, until=float("inf")):
        with self.lock:
            return [r for r in self.results if not r[2] and since <= r[0] < until]

    def count(self, since=0.0, until=float("inf")):
        with self.lock:
            return len([r for r in self.results if since <= r[0] < until])

    def stop(self):
        self.running = False
        for th in self.threads:
            th.join(DEADLINE_S)


def test_replicas(env):
    t = env.named_tunnel("replicas")
    host = "%s.%s" % (t["id"], env.edge.ready["zone"])
    url = env.origins[0].url
    replicas = []
    for i in range(3):
        proc, log = env.cfqt(["tunnel", "run", "--token", t["token"], "--url", url])
        replicas.append((proc, log, connector_id(log)))
    for proc, log, cid in replicas:
        log.wait_for(r"Registered tunnel connection", count=2)

    def connector(cid):
        for c in env.tunnel_state(t["id"])["connectors"]:
            if c["id"] == cid:
                return c
        return None

    def connections_of(cid):
        return [c for c in env.tunnel_state(t["id"])["connections"] if c["clientId"] == cid]

    wait_until("3 connectors with 2 live connections each",
               lambda: all(len((connector(cid) or {}).get("liveConnections", [])) == 2
                           for _, _, cid in replicas))
    load = Load(env, host)
    try:
        wait_until("load through every connector",
                   lambda: all(sum(c["requests"] for c in connections_of(cid)) > 0
                               for _, _, cid in replicas))
        print("    3 connectors serving: requests per connector %s" % [
            sum(c["requests"] for c in connections_of(cid)) for _, _, cid in replicas])

        # (a) SIGTERM one replica mid-load: zero failed requests.
        time.sleep(0.5)   # load running (not a synchronisation: the load is already flowing)
        a_start = time.monotonic()
        proc_a, log_a, cid_a = replicas[0]
        proc_a.send_signal(signal.SIGTERM)
        proc_a.wait(DEADLINE_S)
        a_end = time.monotonic() + 0.5
        wait_until("load after the SIGTERM", lambda: load.count(a_end) > 20)
        a_fail = load.failures(a_start - 0.5, a_end)
        print("    (a) SIGTERM: %d requests in the window, %d failed, exit %s, edge failed=%d" % (
            load.count(a_start - 0.5, a_end), len(a_fail), proc_a.returncode,
            sum(c["failed"] for c in connections_of(cid_a))))
        check(proc_a.returncode == 0, "SIGTERM'd replica exited", proc_a.returncode)
        check(not a_fail, "requests failed around the SIGTERM:", a_fail[:5])
        check(sum(c["failed"] for c in connections_of(cid_a)) == 0, "edge counted failures")

        # (b) kill -9 one replica mid-load: failures only on its connections, none started
        # after the edge saw them closed.
        proc_b, log_b, cid_b = replicas[1]
        failed_before = {cid: sum(c["failed"] for c in connections_of(cid))
                         for _, _, cid in replicas}
        b_start = time.monotonic()
        proc_b.kill()
        proc_b.wait(DEADLINE_S)
        wait_until("the edge closing the killed replica's connections",
                   lambda: all(c["state"] == "closed" for c in connections_of(cid_b)),
                   interval=0.01)
        b_closed = time.monotonic()
        wait_until("load after the kill", lambda: load.count(b_closed + 0.5) > 20)
        b_fail = load.failures(b_start, b_closed)
        late = load.failures(b_closed + 0.05)   # 50 ms: a request started as the poll answered
        edge_failed = {cid: sum(c["failed"] for c in connections_of(cid)) - failed_before[cid]
                       for _, _, cid in replicas}
        print("    (b) kill -9: edge saw its connections closed after %.2fs; visitors saw %d "
              "failures before that, %d after; edge-counted failures per connector: killed=%d, "
              "others=%d" % (b_closed - b_start, len(b_fail), len(late), edge_failed[cid_b],
                             edge_failed[replicas[2][2]]))
        check(not late, "requests failed after the edge saw the connections closed:", late[:5])
        check(edge_failed[replicas[2][2]] == 0, "failures on a live replica")

        # (c) a new replica takes traffic soon after registering.
        proc_c, log_c = env.cfqt(["tunnel", "run", "--token", t["token"], "--url", url])
        cid_c = connector_id(log_c)
        log_c.wait_for(r"Registered tunnel connection")
        registered = time.monotonic()
        wait_until("traffic on the new replica",
                   lambda: sum(c["requests"] for c in connections_of(cid_c)) > 0,
                   timeout=5, interval=0.005)
        took = time.monotonic() - registered
        print("    (c) new replica: first request %.3fs after its first registration "
              "(bound 5s)" % took)
        replicas.append((proc_c, log_c, cid_c))

        # (d) the edge goes silent on one replica's connections (a black hole): failures only
        # until the edge's idle timeout closed them; the replica reconnects and serves again.
        proc_d, log_d, cid_d = replicas[2]
        silenced = [c["id"] for c in connections_of(cid_d) if c["state"] == "registered"]
        d_start = time.monotonic()
        for cid in silenced:
            env.edge.admin("POST", "/connections/%d/silence" % cid)
        wait_until("the edge closing the silenced connections",
                   lambda: all(c["state"] == "closed" for c in connections_of(cid_d)
                               if c["id"] in silenced), interval=0.01)
        d_closed = time.monotonic()
        wait_until("load after the silence", lambda: load.count(d_closed + 0.5) > 20)
        print("    (d) silence: the edge closed the silenced connections after %.2fs; visitors "
              "saw %d failures before that, %d after" % (
                  d_closed - d_start, len(load.failures(d_start, d_closed)),
                  len(load.failures(d_closed + 0.05))))
        check(not load.failures(d_closed + 0.05), "requests failed after the idle timeout")
    finally:
        load.stop()
    everything = load.failures()
    print("    load: %d requests, %d failed in total (statuses %s)" % (
        load.count(), len(everything), sorted(set(r[3] for r in everything))))
    # Every failure was in flight on the killed (or silenced) replica: none ended before the
    # fault, none started after the edge saw the connections closed.
    check(all((r[1] >= b_start and r[0] < b_closed + 0.05) or
              (r[1] >= d_start and r[0] < d_closed + 0.05) for r in everything),
          "a failure outside the kill -9 and silence windows:", everything[:5])
    for proc, _, _ in replicas:
        if proc.poll() is None:
            stop(proc)
            check(proc.returncode == 0, "replica exited", proc.returncode)


TESTS = [test_ingress_routing, test_ingress_unix_tls, test_remote_config, test_remote_config_http2,
         test_remote_config_workers, test_replicas]


def main():
    ap = argument_parser()
    ap.add_argument("-k", default=None)
    args = ap.parse_args()
    prepare_run("case timed out")
    started = time.monotonic()
    env = set_up(Env, os.path.abspath(args.bin))
    finish_suite(lambda: run_tests(TESTS, env, args.k, alarm_s=90,
                                   name=lambda t: t.__name__[len("test_"):], per_case=True),
                 env.close, exits=[("cfqt-edge", env.edge, (0,))],
                 summary=lambda failed: "%d failed (%.1fs)" % (failed,
                                                              time.monotonic() - started))


if __name__ == "__main__":
    main()
