#!/usr/bin/env python3
"""Logs for people (issue 16, item 5): cfqt's failure paths, as a user sees them on stderr.

Starts cfqt-edge, then one cfqt per case (loopback only, port 0 everywhere) and drives the
failure paths: the quick-tunnel API unreachable, the origin refusing connections, the edge
closing a connection (with control bytes in its reason), a registration rejected for good, and
an API answer whose hostname holds control bytes. For every case it checks that each line at
INF and above is one sentence plus key=value fields: a timestamped line (no bare `stack:` line),
no KJ expression dump (` = `), no source location (`src=`), no raw control byte. With
`--log-format-output json` every line must parse as a JSON object with level, time, message and
the same fields. The hostname with control bytes must be refused (exit 1) without being echoed.

Usage: logs_e2e.py --bin BUILD/bin [-k NAME]     (exit 0 = passed)
"""

import http.client
import json
import os
import re
import shutil
import signal
import tempfile
import urllib.parse

from e2e_support import (DEADLINE_S, Edge, argument_parser, check, finish_suite, prepare_run,
                         readline, run_tests, set_up, start_process, stop, unused_port)

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DBG|INF|WRN|ERR|FTL) \S")


class Env:
    def __init__(self, bindir, workdir):
        self.bindir = bindir
        self.edge = Edge(bindir, workdir, listen=["127.0.0.1:0"])

    def cfqt(self, url=None, extra=(), service=None):
        cmd = [os.path.join(self.bindir, "cfqt"), "tunnel", "--no-autoupdate",
               "--protocol", "quic", "--ha-connections", "1"]
        cmd += ["--url", url] if url else ["--hello-world"]
        args = self.edge.client_args()
        if service:
            args[1] = service
        cmd += args + ["--metrics", "127.0.0.1:0", "--backoff-base", "20ms",
                       "--ha-stagger", "10ms", "--api-retry-delay", "20ms",
                       "--grace-period", "1s", "--loglevel", "info"] + list(extra)
        return start_process(cmd)


def check_lines_for_people(log):
    """Every line: a console line; at INF and above: no expression dump, no source location,
    no raw control byte. Returns the lines."""
    lines = log.snapshot()[0]
    check(lines, "cfqt wrote no log line")
    for l in lines:
        m = LINE.match(l)
        check(m, "not a log line (a bare continuation such as `stack:`?):", repr(l))
        check(not any(ord(c) < 0x20 or ord(c) == 0x7f for c in l), "raw control byte:", repr(l))
        if m.group(1) == "DBG":
            continue
        check(" = " not in l, "expression dump at", m.group(1) + ":", l)
        check("src=" not in l, "source location at", m.group(1) + ":", l)
        check(not re.search(r"stack: [0-9a-f]{8}", l), "stack trace at", m.group(1) + ":", l)
    return lines


def finish(proc, code=None):
    """Waits for a cfqt that ends by itself (code), or stops it."""
    if code is None:
        stop(proc)
        return
    try:
        proc.wait(DEADLINE_S)
    except Exception:
        proc.kill()
        proc.wait()
    check(proc.returncode == code, "cfqt exited with", proc.returncode, "want", code)


def get(env, host, path="/"):
    h, p = env.edge.public
    c = http.client.HTTPConnection(h, p, timeout=DEADLINE_S)
    c.request("GET", path, headers={"Host": host})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def test_api_unreachable(env):
    proc, log = env.cfqt(service="http://127.0.0.1:%d" % unused_port())
    line = log.wait_for(r" WRN Quick tunnel request failed; retrying attempt=1 ")
    check(re.search(r' error="[^"]*[Cc]onnection refused', line), line)
    log.wait_for(r" ERR Couldn't start tunnel: failed to request quick Tunnel error=")
    finish(proc, 1)
    check_lines_for_people(log)


def test_origin_refused(env):
    port = unused_port()
    proc, log = env.cfqt(url="http://127.0.0.1:%d" % port)
    host = urllib.parse.urlparse(readline(proc.stdout, "cfqt")).hostname
    log.wait_for(r"Registered tunnel connection connIndex=0 ")
    check(get(env, host, "/x?y=1") == 502, "want a 502 from a refused origin")
    line = log.wait_for(r" WRN Request failed ")
    check(re.search(r' error="[^"]*connection refused"', line), line)
    check(re.search(r' dest="?http[^ ]*/x\?y=1"? ', line), line)
    check(line.endswith(" originService=http://127.0.0.1:%d" % port), line)
    finish(proc)
    check_lines_for_people(log)


def test_edge_close(env):
    proc, log = env.cfqt()
    host = urllib.parse.urlparse(readline(proc.stdout, "cfqt")).hostname
    log.wait_for(r"Registered tunnel connection connIndex=0 ")
    conn = env.edge.connections(host)[0]["id"]
    reason = urllib.parse.quote("bye \x1b[31mred\x07 \"quoted\"")
    env.edge.admin("POST", "/connections/%d/close?code=0&reason=%s" % (conn, reason))
    line = log.wait_for(r"Edge closed the connection connIndex=0 ")
    check(line.endswith(r' reason="bye \x1b[31mred\x07 \"quoted\""'), line)
    log.wait_for(r"Registered tunnel connection connIndex=0 ", count=2)
    finish(proc)
    check_lines_for_people(log)


def test_registration_rejected(env):
    cause = urllib.parse.quote("Unauthorized: go away\nstack: 0x1234")
    env.edge.admin("POST", "/registrations/reject-next?shouldRetry=false&cause=" + cause)
    proc, log = env.cfqt()
    line = log.wait_for(r" ERR Register tunnel error from server side")
    check('reason="Unauthorized: go away\\nstack: 0x1234"' in line, line)
    log.wait_for(r"no more connections active and exiting")
    finish(proc, 1)
    check_lines_for_people(log)


def test_hostname_with_control_bytes_is_refused(env):
    bad = "evil\x1b]0;pwned\x07.trycloudflare.localhost"
    env.edge.admin("POST", "/tunnels/next-hostname?hostname=" + urllib.parse.quote(bad))
    proc, log = env.cfqt()
    log.wait_for(r"result\.hostname is not a DNS name")
    finish(proc, 1)
    out = proc.stdout.read()
    check(out == b"", "cfqt printed on stdout:", out)
    text = log.text()
    check("pwned" not in text and "\x1b" not in text, "the bad hostname was echoed:", text)
    check_lines_for_people(log)


def test_json_output(env):
    port = unused_port()
    proc, log = env.cfqt(url="http://127.0.0.1:%d" % port,
                         extra=["--log-format-output", "json"])
    host = urllib.parse.urlparse(readline(proc.stdout, "cfqt")).hostname
    log.wait_for(r'"message":"Registered tunnel connection"')
    check(get(env, host) == 502, "want a 502 from a refused origin")
    log.wait_for(r'"message":"Request failed"')
    finish(proc)
    objects = []
    for l in log.snapshot()[0]:
        try:
            o = json.loads(l)
        except ValueError:
            check(False, "not a JSON line:", repr(l))
        check(isinstance(o, dict), "not an object:", l)
        for key in ("level", "time", "message"):
            check(isinstance(o.get(key), str), "no", key, "in", l)
        check(o["level"] in ("debug", "info", "warn", "error", "fatal"), l)
        check(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", o["time"]), l)
        check(" = " not in l and "src=" not in l, "expression dump or location:", l)
        objects.append(o)
    reg = [o for o in objects if o["message"] == "Registered tunnel connection"][0]
    check(reg["connIndex"] == 0 and reg["protocol"] == "quic" and "location" in reg, reg)
    failed = [o for o in objects if o["message"] == "Request failed"][0]
    check(failed["level"] == "warn", failed)
    check("connection refused" in failed["error"], failed)
    check(failed["originService"] == "http://127.0.0.1:%d" % port, failed)


TESTS = [test_api_unreachable, test_origin_refused, test_edge_close, test_registration_rejected,
         test_hostname_with_control_bytes_is_refused, test_json_output]


def main():
    ap = argument_parser()
    ap.add_argument("-k", default="", help="run only the tests whose name contains this")
    args = ap.parse_args()
    prepare_run("test timed out")
    workdir = tempfile.mkdtemp(prefix="cfqt-logs-")
    env = set_up(Env, os.path.abspath(args.bin), workdir)

    def close():
        env.edge.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    finish_suite(lambda: run_tests(TESTS, env, args.k, 60, per_case=True), close,
                 exits=[("cfqt-edge", env.edge, (0,))],
                 summary=lambda failed: "%d failed" % failed if failed else "all passed")


if __name__ == "__main__":
    main()
