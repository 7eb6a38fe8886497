#!/usr/bin/env python3
"""Honest readiness end-to-end tests (issue 16): `cfqt --wait-ready` against cfqt-edge playing
the public Internet (its authoritative DNS over DNS-over-TLS, its HTTPS front door, --dns-delay
and --route-delay), loopback only, port 0 everywhere.

- delays: the URL line comes only after the DNS delay and the route delay (timestamps asserted),
  the first request a client then makes succeeds, and the origin never saw the probe;
- timeouts: DNS never appears -> exit 1 naming the DNS stage; the edge answers 530 forever ->
  exit 1 naming the routing stage; the public certificate does not name the hostname -> a clear
  error at once;
- no poisoned cache (root only, else skipped loudly): in a private network + mount namespace,
  dnsmasq with query logging is the system resolver of cfqt; it must have answered cfqt's own
  system lookup (the API host name) and logged zero queries for the tunnel hostname.

Usage: ready_e2e.py --bin BUILD/bin [-k NAME] [--inner-no-poisoned-cache WORKDIR]
(exit 0 = passed)
"""

import http.client
import http.server
import os
import re
import shutil
import signal
import struct
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from e2e_support import (DEADLINE_S, PROCS, Edge, Fail, Skip, argument_parser, check, finish_suite,
                         kill, prepare_run, run_tests, start_process, stop, wait_until)

PROBE_HEADER = "cfqt-ready-probe"


class Origin:
    """A loopback HTTP origin that records every request's path and headers."""

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = b"hello from the origin\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Env:
    def __init__(self, bindir, workdir):
        self.bindir = bindir
        self.workdir = workdir


def edge(env, name, *extra):
    workdir = os.path.join(env.workdir, name)
    os.makedirs(workdir, exist_ok=True)
    return Edge(env.bindir, workdir, extra_args=["--dns-listen", "127.0.0.1:0",
                                                 "--dot-listen", "127.0.0.1:0",
                                                 "--public-tls-listen", "127.0.0.1:0"] +
                list(extra))


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def cfqt(env, e, origin_port, timeout, *extra):
    """cfqt --wait-ready=timeout pointed at the emulator's DoT resolver and HTTPS front door.
    Returns (process, log, monotonic start time)."""
    cmd = [os.path.join(env.bindir, "cfqt"), "--url", "http://127.0.0.1:%d" % origin_port,
           "--wait-ready=" + timeout,
           "--ready-resolver", e.ready["dot"] + "#localhost", "--ready-ca", e.ready["ca"],
           "--ready-port", str(port_of(e.ready["public_tls"])),
           "--metrics", "127.0.0.1:0", "--ha-stagger", "100ms", "--backoff-base", "100ms",
           "--grace-period", "1s"] + e.client_args() + list(extra)
    started = time.monotonic()
    proc, log = start_process(cmd)
    return proc, log, started


def read_url(proc, timeout):
    """(the first stdout line, monotonic time it arrived), or (None, None) if stdout ended."""
    import select
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    check(r, "cfqt printed nothing on stdout within", timeout, "s")
    line = proc.stdout.readline().decode().strip()
    return (line or None), time.monotonic()


def dns_query(address, name, qtype, tcp=False):
    """(rcode, [A/AAAA addresses]) from the emulator's DNS over UDP or TCP."""
    host, port = address.rsplit(":", 1)
    q = struct.pack(">HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    q += struct.pack(">HH", qtype, 1)
    if tcp:
        with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as s:
            s.sendall(struct.pack(">H", len(q)) + q)
            n = struct.unpack(">H", s.recv(2, socket.MSG_WAITALL))[0]
            m = s.recv(n, socket.MSG_WAITALL)
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(DEADLINE_S)
            s.sendto(q, (host, int(port)))
            m = s.recv(4096)
    check(m[:2] == b"\x51\x51" and m[2] & 0x80, "not an answer", m)
    answers = struct.unpack(">H", m[6:8])[0]
    pos = len(q)
    found = []
    for _ in range(answers):
        check(m[pos] & 0xC0 == 0xC0, "uncompressed answer name")
        rtype, _, _, rdlen = struct.unpack(">HHIH", m[pos + 2:pos + 12])
        data = m[pos + 12:pos + 12 + rdlen]
        if rtype == 1:
            found.append(socket.inet_ntop(socket.AF_INET, data))
        elif rtype == 28:
            found.append(socket.inet_ntop(socket.AF_INET6, data))
        pos += 12 + rdlen
    return m[3] & 0x0F, found


def https_get(e, hostname, path="/"):
    """GET https://hostname/path at the emulator's HTTPS front door, verified with its CA."""
    context = ssl.create_default_context(cafile=e.ready["ca"])
    with socket.create_connection(("127.0.0.1", port_of(e.ready["public_tls"])),
                                  timeout=DEADLINE_S) as raw:
        with context.wrap_socket(raw, server_hostname=hostname) as s:
            s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" %
                       (path, hostname)).encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length: *(\d+)", head)
                if sep and m and len(body) >= int(m.group(1)):
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def finish(proc, expect_exit=None, timeout=DEADLINE_S):
    if expect_exit is None:
        stop(proc)
        return proc.returncode
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise Fail("cfqt did not exit within %ss" % timeout)
    return proc.returncode


# ---------------------------------------------------------------------------------------------

def test_url_only_after_dns_and_route_delays(env):
    url_after_delays(env, 1.5, 1.0)


def test_url_waits_for_the_route_after_dns(env):
    url_after_delays(env, 0.3, 1.5)


def url_after_delays(env, dns_delay, route_delay):
    """cfqt-edge with --dns-delay/--route-delay (seconds): the URL line comes only after both,
    each stage logged; then the first request succeeds and the origin never saw a probe."""
    origin = Origin()
    e = edge(env, "delays-%s-%s" % (dns_delay, route_delay), "--dns-delay",
             "%dms" % (dns_delay * 1000), "--route-delay", "%dms" % (route_delay * 1000))
    both = max(dns_delay, route_delay)
    try:
        proc, log, started = cfqt(env, e, origin.port, "20s")
        # The first registration starts both delays; note when it was logged.
        log.wait_for(r"INF Registered tunnel connection")
        registered_at = time.monotonic()
        url, url_at = read_url(proc, DEADLINE_S)
        check(url and url.startswith("https://") and url.endswith(".trycloudflare.localhost"),
              "URL line:", url)
        hostname = url[len("https://"):]
        waited = url_at - registered_at
        print("    URL after %.2f s (registration to URL line); DNS delay %.1f s, route delay "
              "%.1f s" % (waited, dns_delay, route_delay), flush=True)
        # cfqt started before it registered: a strict lower bound. The registration line is
        # seen a little late (log pipe, thread wake-up), hence the slack on the closer bound.
        check(url_at - started >= both, "URL printed %.2f s after start, before the delays "
              "(%.1f s)" % (url_at - started, both))
        check(waited >= both - 0.25, "URL printed %.2f s after registration, before the "
              "delays (%.1f s)" % (waited, both))
        check(waited <= (dns_delay + route_delay) * 3, "URL took %.2f s" % waited)
        dns = log.wait_for(r"INF DNS for %s visible after [0-9.]+ s" % re.escape(hostname))
        routes = log.wait_for(r"INF edge routes %s to this tunnel after" % re.escape(hostname))
        check(log.lines.index(dns) < log.lines.index(routes), "stages logged out of order")
        # The banner came with the URL, not before.
        banner = log.wait_for(r"Your quick Tunnel has been created")
        check(log.lines.index(banner) > log.lines.index(routes), "banner before the URL served")
        # Plain DNS (UDP and TCP) gives the same answer: A and AAAA of the HTTPS front door.
        for tcp in (False, True):
            check(dns_query(e.ready["dns"], hostname, 1, tcp) == (0, ["127.0.0.1"]),
                  "A over", "TCP" if tcp else "UDP", dns_query(e.ready["dns"], hostname, 1, tcp))
            rcode, v6 = dns_query(e.ready["dns"], hostname, 28, tcp)
            check(rcode == 0 and v6 in ([], ["::1"]), "AAAA:", rcode, v6)
        check(dns_query(e.ready["dns"], "nope.trycloudflare.localhost", 1)[0] == 3, "no NXDOMAIN")
        # The first request a client makes now succeeds, through the HTTPS front door.
        status, body = https_get(e, hostname, "/first")
        check(status == 200 and body == b"hello from the origin\n", "first request:", status,
              body[:200])
        # The origin saw that request only: the probes were answered by the tunnel itself.
        check([p for p, _ in origin.requests] == ["/first"], "origin saw", origin.requests)
        check(not any(PROBE_HEADER in h for _, h in origin.requests), "a probe reached the origin")
        # ... nor are they counted as requests in the tunnel's metrics.
        metrics = re.search(r"Starting metrics server on ([0-9.:]+)/metrics",
                            log.wait_for(r"Starting metrics server on")).group(1)
        host, port = metrics.rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        check(re.search(r"(?m)^cloudflared_tunnel_total_requests 1$", text),
              "requests counted:", re.findall(r"(?m)^cloudflared_tunnel_total_requests .*$", text))
        finish(proc)
        check(proc.returncode == 0, "cfqt exited with", proc.returncode)
    finally:
        origin.close()
        e.stop()


def never_serves_exits_naming(env, name, delay_flag, words):
    # The edge never gets past one stage: no URL, exit 1 within the ready timeout (1.5 s) plus
    # margin, and one ERR line naming that stage; the origin is never asked.
    origin = Origin()
    e = edge(env, name, delay_flag, "1h")
    try:
        proc, log, started = cfqt(env, e, origin.port, "1500ms")
        url, _ = read_url(proc, DEADLINE_S)
        check(url is None, "a URL was printed:", url)
        code = finish(proc, expect_exit=1)
        took = time.monotonic() - started
        check(code == 1, "exit code", code)
        check(took < 1.5 * 3 + 2, "exit after %.1f s" % took)
        line = log.wait_for(r"ERR The URL does not serve")
        check(all(w in line for w in words), "error line:", line)
        check(not log.matching(r"Your quick Tunnel has been created"), "banner printed")
        check(origin.requests == [], "origin saw", origin.requests)
    finally:
        origin.close()
        e.stop()


def test_dns_never_exits_naming_dns(env):
    never_serves_exits_naming(env, "dns-never", "--dns-delay", ["DNS stage", "NXDOMAIN"])


def test_530_forever_exits_naming_routing(env):
    never_serves_exits_naming(env, "route-never", "--route-delay", ["routing stage", "HTTP 530"])


def test_answer_without_token_is_not_yet(env):
    """An HTTPS server with a valid certificate for the hostname answers 200, but it is not this
    tunnel (another tunnel, a captive portal, a stale route): not serving."""
    origin = Origin()
    e = edge(env, "no-token")
    state = os.path.join(env.workdir, "no-token", "edge-state")
    impostor = Origin()   # plain HTTP handler; wrapped in TLS with the zone's certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(state, "public.pem"), os.path.join(state, "public-key.pem"))
    impostor.server.socket = context.wrap_socket(impostor.server.socket, server_side=True)
    try:
        proc, log, started = cfqt(env, e, origin.port, "1500ms", "--ready-port",
                                  str(impostor.port))
        url, _ = read_url(proc, DEADLINE_S)
        check(url is None, "a URL was printed:", url)
        check(finish(proc, expect_exit=1) == 1, "exit code", proc.returncode)
        line = log.wait_for(r"ERR The URL does not serve")
        check("routing stage" in line and "HTTP 200 without this tunnel's token" in line,
              "error line:", line)
        check(impostor.requests and all(PROBE_HEADER in h for _, h in impostor.requests),
              "the impostor saw", impostor.requests)
        check(origin.requests == [], "origin saw", origin.requests)
    finally:
        origin.close()
        impostor.close()
        e.stop()


def test_tls_name_mismatch_is_a_clear_error(env):
    origin = Origin()
    state = os.path.join(env.workdir, "tls-mismatch", "edge-state")
    # The emulator's edge certificate (quic.cftunnel.com, ...) does not name *.<zone>.
    e = edge(env, "tls-mismatch", "--public-tls-cert", os.path.join(state, "server.pem"),
             "--public-tls-key", os.path.join(state, "server-key.pem"))
    try:
        proc, log, started = cfqt(env, e, origin.port, "20s")
        url, _ = read_url(proc, DEADLINE_S)
        check(url is None, "a URL was printed:", url)
        code = finish(proc, expect_exit=1)
        took = time.monotonic() - started
        check(code == 1, "exit code", code)
        check(took < 10, "gave up only after %.1f s (the timeout is 20 s)" % took)
        line = log.wait_for(r"ERR The URL does not serve")
        check("certificate verification" in line and "--ready-ca" in line, "error line:", line)
    finally:
        origin.close()
        e.stop()


def test_no_poisoned_cache(env):
    if os.geteuid() != 0:
        raise Skip("NOT RUN: needs root for a network + mount namespace with dnsmasq as the "
                   "system resolver")
    if shutil.which("dnsmasq") is None or shutil.which("unshare") is None:
        raise Skip("NOT RUN: dnsmasq or unshare missing (make setup-test installs them)")
    workdir = os.path.join(env.workdir, "netns")
    os.makedirs(workdir)
    cmd = ["unshare", "--net", "--mount", "--", sys.executable, os.path.abspath(__file__),
           "--bin", env.bindir, "--inner-no-poisoned-cache", workdir]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=90)
    out = result.stdout.decode(errors="replace")
    for l in out.splitlines():
        print("    | " + l, flush=True)
    check(result.returncode == 0, "the namespace run failed (exit %d)" % result.returncode)


def inner_no_poisoned_cache(bindir, workdir):
    """Runs inside `unshare --net --mount`: loopback up, /etc/resolv.conf -> dnsmasq on
    127.0.0.1:53, which forwards the emulator's zone to the emulator's DNS (so a system lookup
    of the tunnel hostname would reach it and be cached) and answers api.ready.test itself."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = os.path.join(workdir, "resolv.conf")
    with open(resolv, "w") as f:
        f.write("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
    subprocess.run(["mount", "--bind", resolv, "/etc/resolv.conf"], check=True)
    env = Env(bindir, workdir)
    origin = Origin()
    e = edge(env, "edge", "--dns-delay", "500ms", "--route-delay", "300ms")
    querylog = os.path.join(workdir, "dnsmasq.log")
    dnsmasq = None
    proc = None
    try:
        dnsmasq, _ = start_process(
            ["dnsmasq", "--keep-in-foreground", "--no-daemon", "--user=root",
             "--listen-address=127.0.0.1", "--bind-interfaces", "--port=53", "--no-resolv",
             "--no-hosts", "--log-queries", "--log-facility=" + querylog, "--cache-size=1000",
             "--address=/api.ready.test/127.0.0.1",
             "--server=/trycloudflare.localhost/127.0.0.1#%d" % port_of(e.ready["dns"])])
        deadline = time.monotonic() + DEADLINE_S
        while not (os.path.exists(querylog) and "started" in open(querylog).read()):
            check(time.monotonic() < deadline and dnsmasq.poll() is None, "dnsmasq did not start")
            time.sleep(0.02)
        args = ["--quick-service", "http://api.ready.test:%d" % port_of(e.ready["api"]),
                "--edge-ca", e.ready["ca"]]
        for x in e.ready["edges"]:
            args += ["--edge", x]
        cmd = [os.path.join(bindir, "cfqt"), "--url", "http://127.0.0.1:%d" % origin.port,
               "--wait-ready=20s", "--ready-resolver", e.ready["dot"] + "#localhost",
               "--ready-ca", e.ready["ca"], "--ready-port", str(port_of(e.ready["public_tls"])),
               "--metrics", "127.0.0.1:0", "--ha-stagger", "100ms", "--grace-period", "1s"] + args
        proc, log = start_process(cmd)
        url, _ = read_url(proc, DEADLINE_S)
        check(url and url.startswith("https://"), "no URL:", url, "\n" + log.text()[-3000:])
        hostname = url[len("https://"):]
        text = open(querylog).read()
        # dnsmasq is cfqt's system resolver: it answered cfqt's lookup of the API host.
        check(re.search(r"query\[A+\] api\.ready\.test from 127\.0\.0\.1", text),
              "dnsmasq never saw cfqt's lookup of api.ready.test:\n" + text[-2000:])
        # ... and was never asked for the tunnel hostname while cfqt waited.
        check(hostname not in text, "the system resolver was asked for", hostname, ":\n" +
              "\n".join(l for l in text.splitlines() if hostname in l))
        print("dnsmasq answered %d queries for api.ready.test, 0 for %s" %
              (len(re.findall(r"query\[A+\] api\.ready\.test", text)), hostname), flush=True)
        # The check could fail: a system lookup of the hostname does show up in that log.
        socket.getaddrinfo(hostname, 443)
        wait_until("dnsmasq logging a lookup of " + hostname,
                   lambda: hostname in open(querylog).read())
        stop(proc)
        check(proc.returncode == 0, "cfqt exited with", proc.returncode)
    finally:
        if proc is not None:
            stop(proc)
        if dnsmasq is not None:
            stop(dnsmasq)
        origin.close()
        e.stop()


TESTS = [test_url_only_after_dns_and_route_delays, test_url_waits_for_the_route_after_dns,
         test_dns_never_exits_naming_dns,
         test_530_forever_exits_naming_routing, test_answer_without_token_is_not_yet,
         test_tls_name_mismatch_is_a_clear_error,
         test_no_poisoned_cache]


def main():
    ap = argument_parser()
    ap.add_argument("-k", default="", help="run only the tests whose name contains this")
    ap.add_argument("--inner-no-poisoned-cache", metavar="WORKDIR",
                    help="internal: the namespace half of test_no_poisoned_cache")
    args = ap.parse_args()
    prepare_run("test timed out")
    bindir = os.path.abspath(args.bin)
    if args.inner_no_poisoned_cache:
        signal.alarm(80)
        try:
            inner_no_poisoned_cache(bindir, args.inner_no_poisoned_cache)
            code = 0
        except Exception as e:
            print("inner run failed: %s" % e, flush=True)
            code = 1
        finally:
            kill(PROCS)
        sys.exit(code)
    workdir = tempfile.mkdtemp(prefix="cfqt-ready-")

    def close():
        kill(PROCS)
        shutil.rmtree(workdir, ignore_errors=True)

    # Each case starts its own edge and cfqt: only sanitizer reports are left to check.
    finish_suite(lambda: run_tests(TESTS, Env(bindir, workdir), args.k, 120, per_case=True),
                 close, summary=lambda failed: "%s: %d failed" % ("FAIL" if failed else "PASS",
                                                                   failed))


if __name__ == "__main__":
    main()
