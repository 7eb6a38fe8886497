#!/usr/bin/env python3
"""Secrets stay secret (issue 18): cfqt at --loglevel debug never shows the tunnel secret.

Starts cfqt-edge and cfqt (loopback only, port 0 everywhere; the built-in hello-world origin)
with cfqt's --quick-service pointed at a small proxy in this script that forwards to the
emulator's quick-tunnel API and keeps the answer: that is where the secret comes from, as for
cfqt itself. cfqt then registers its connections, serves a request, loses a connection (the
admin API closes it) and registers again, and stops gracefully on SIGTERM. Every byte cfqt wrote
to stderr and to --logfile, and the bodies of /metrics, /quicktunnel, /ready and /healthcheck
(fetched while it ran), are searched for the secret: raw bytes, base64 (standard and URL-safe,
padded and not) and hex (lower and upper case). None may appear. The test checks that its
search finds the secret where it is (the API answer), so it can fail.

Usage: secrets_e2e.py --bin BUILD/bin [--protocol http2]     (exit 0 = passed)
"""

import base64
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from e2e_support import (DEADLINE_S, PROCS, SANITIZER, Edge, argument_parser, check,
                         prepare_run, stop, unused_port)
from e2e_support import wait_until as poll_until


class ApiProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to the emulator's API; keeps the answers' bodies."""

    daemon_threads = True

    def __init__(self, upstream):
        self.upstream = upstream
        self.answers = []
        super().__init__(("127.0.0.1", 0), ProxyHandler)


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.forward("POST")

    def do_GET(self):
        self.forward("GET")

    def forward(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        host, port = self.server.upstream.rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "connection", "content-length")}
        c.request(method, self.path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        self.server.answers.append(data)
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("connection", "content-length", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def secret_forms(secret):
    """Every text form the secret could leak in, as bytes."""
    b64 = base64.b64encode(secret)
    url = base64.urlsafe_b64encode(secret)
    return {
        "raw": secret,
        "base64": b64,
        "base64 unpadded": b64.rstrip(b"="),
        "base64url": url,
        "base64url unpadded": url.rstrip(b"="),
        "hex": secret.hex().encode(),
        "HEX": secret.hex().upper().encode(),
    }


def leaks(forms, where, data):
    return ["%s in %s" % (name, where) for name, needle in forms.items() if needle in data]


class RawStderr:
    """A process's stderr as bytes (nothing decoded, so raw secret bytes would show)."""

    def __init__(self, stream):
        self.data = bytearray()
        self.closed = False
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self.run, args=(stream,), daemon=True)
        self.thread.start()

    def run(self, stream):
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            with self.lock:
                if not chunk:
                    self.closed = True
                    self.lock.notify_all()
                    return
                self.data += chunk
                self.lock.notify_all()

    def text(self):
        with self.lock:
            return self.data.decode(errors="replace")

    def wait_for(self, pattern, start=0, timeout=DEADLINE_S):
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.lock:
            while not rx.search(self.data.decode(errors="replace")[start:]):
                left = end - time.monotonic()
                if left <= 0 or self.closed:
                    raise AssertionError("cfqt's log never showed %r; tail:\n%s" %
                                         (pattern, self.data.decode(errors="replace")[-3000:]))
                self.lock.wait(left)


def get(addr, path, host=None):
    h, p = addr.rsplit(":", 1) if isinstance(addr, str) else (addr[0], addr[1])
    c = http.client.HTTPConnection(h, int(p), timeout=DEADLINE_S)
    c.request("GET", path, headers={"Host": host} if host else {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def wait_until(what, fn, timeout=DEADLINE_S):
    # While cfqt and the edge come up, their pages may refuse or answer half: "not yet".
    return poll_until(what, fn, timeout, interval=0.05,
                                  ignore=(OSError, http.client.HTTPException, ValueError))


def run(bindir, workdir, protocol):
    edge = Edge(bindir, workdir, extra_args=["--admin-listen", "127.0.0.1:0"])
    proxy = ApiProxy(edge.ready["api"])
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    metrics = "127.0.0.1:%d" % unused_port()
    logfile = os.path.join(workdir, "cfqt.log")
    cmd = [os.path.join(bindir, "cfqt"), "--hello-world", "--loglevel", "debug",
           "--logfile", logfile, "--metrics", metrics, "--ha-connections", "2",
           "--protocol", protocol, "--backoff-base", "100ms", "--grace-period", "2s",
           "--quick-service", "http://%s:%d" % proxy.server_address,
           "--edge-ca", edge.ready["ca"]]
    for e in edge.ready["edges"]:
        cmd += ["--edge", e]
    cfqt = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    PROCS.append(cfqt)
    stderr = RawStderr(cfqt.stderr)
    stdout = RawStderr(cfqt.stdout)
    bodies = {}
    try:
        wait_until("cfqt /ready", lambda: get(metrics, "/ready")[0] == 200)
        hostname = json.loads(get(metrics, "/quicktunnel")[1])["hostname"]
        wait_until("2 registered connections", lambda: len(edge.connections(hostname)) == 2)

        check(proxy.answers, "the API proxy saw no answer")
        answer = json.loads(proxy.answers[0])
        secret = base64.b64decode(answer["result"]["secret"])
        check(len(secret) >= 16, "short secret", answer)
        forms = secret_forms(secret)
        # The search can fail: it finds the secret where it is.
        check(leaks(forms, "API answer", proxy.answers[0]), "the search misses the API answer")

        # A request through the tunnel, with its debug logs.
        status, _ = get(edge.public, "/", hostname)
        check(status == 200, "request through the tunnel:", status)

        # A reconnect: the admin API closes one connection; a new one registers.
        before = {c["id"] for c in edge.connections(hostname)}
        edge.admin("POST", "/connections/%d/close?code=0&reason=secrets-test" % min(before))
        wait_until("a new connection after the close", lambda: (
            len(edge.connections(hostname)) == 2 and
            {c["id"] for c in edge.connections(hostname)} - before))
        status, _ = get(edge.public, "/", hostname)
        check(status == 200, "request after the reconnect:", status)

        for path in ("/metrics", "/quicktunnel", "/ready", "/healthcheck"):
            status, data = get(metrics, path)
            check(status == 200, path, status)
            bodies[path] = data
    finally:
        stop(cfqt)
        stderr.thread.join(DEADLINE_S)
        stdout.thread.join(DEADLINE_S)
        edge.stop()
        proxy.shutdown()

    check(cfqt.returncode == 0, "cfqt exited with", cfqt.returncode, "after SIGTERM")
    text = stderr.text()
    check(not SANITIZER.search(text), "sanitizer report:\n" + text[-6000:])
    # The log went through every stage at debug level.
    for pattern in (r" DBG ", r"Registered tunnel connection", r"Unregister|unregister|[Gg]raceful"):
        check(re.search(pattern, text), "cfqt's log lacks", pattern, "\n" + text[-3000:])
    with open(logfile, "rb") as f:
        logged = f.read()
    check(logged, "--logfile is empty")
    found = (leaks(forms, "stderr", bytes(stderr.data)) + leaks(forms, "stdout", bytes(stdout.data)) +
             leaks(forms, "--logfile", logged))
    for path, data in bodies.items():
        found += leaks(forms, path, data)
    check(not found, "the tunnel secret leaked:", ", ".join(found))
    print("searched %d bytes of stderr, %d of --logfile, %s: no secret" %
          (len(stderr.data), len(logged), ", ".join("%s %d B" % (p, len(d))
                                                   for p, d in bodies.items())), flush=True)


def main():
    ap = argument_parser()
    ap.add_argument("--protocol", default="auto", help="cfqt's --protocol (default: auto)")
    args = ap.parse_args()
    prepare_run("test run timed out")
    signal.alarm(120)   # whole-run bound, on top of the per-wait deadlines
    workdir = tempfile.mkdtemp(prefix="cfqt-secrets-")
    try:
        run(os.path.abspath(args.bin), workdir, args.protocol)
        print("[ PASS ] the tunnel secret appears in no log line, log file or metrics page",
              flush=True)
        code = 0
    except Exception as e:
        print("[ FAIL ] secrets: %s" % e, flush=True)
        code = 1
    finally:
        signal.alarm(0)
        for p in PROCS:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
