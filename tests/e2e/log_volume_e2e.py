#!/usr/bin/env python3
"""Log volume end-to-end test (issue 13): the origin is down and visitors hammer the tunnel.

Starts cfqt-edge and cfqt (loopback only, port 0 everywhere) with cfqt's origin on a port where
nothing listens, so every public request ends in a 502 and one "Request failed" warning inside
cfqt. For about 2 s, many threads send requests through the emulator's front door; the test then
checks that cfqt's stderr log stayed under a fixed number of lines per second (its rate limits
aggregate the repeated warning into `suppressed=N` summary lines) and that no request went
uncounted: after a graceful stop, the written warnings plus the suppressed counts equal the
number of requests that failed. Every wait has a deadline.

Usage: log_volume_e2e.py --bin BUILD/bin [--loglevel debug]     (exit 0 = passed)
"""

import argparse
import collections
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

DEADLINE_S = 20          # bound of every single wait
HAMMER_S = 2.0           # how long the visitors send requests
THREADS = 48             # concurrent visitors
MAX_LINES_PER_S = 50     # what cfqt may write per wall-clock second under this load (defaults:
                         # 5 lines + 1 summary per message per 1 s interval)
LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) ([A-Z]{3}) (.*)$")


class Fail(Exception):
    pass


def check(cond, *msg):
    if not cond:
        raise Fail(" ".join(str(m) for m in msg))


class LogFollower:
    """Collects a process's stderr lines (with the time each arrived) on a thread."""

    def __init__(self, stream):
        self.lines = []      # (monotonic arrival time, text)
        self.bytes = 0
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._run, args=(stream,), daemon=True).start()

    def _run(self, stream):
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            with self.cond:
                self.lines.append((time.monotonic(), line))
                self.bytes += len(raw)
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for(self, pattern, after=0, timeout=DEADLINE_S):
        """The first line from index `after` on that matches."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for _, l in self.lines[after:]:
                    if rx.search(l):
                        return l
                left = end - time.monotonic()
                if left <= 0 or self.closed:
                    raise Fail("log never showed %r; last lines:\n  %s" %
                               (pattern, "\n  ".join(self.tail(15))))
                self.cond.wait(left)

    def wait_closed(self, timeout=DEADLINE_S):
        with self.cond:
            self.cond.wait_for(lambda: self.closed, timeout=timeout)

    def snapshot(self):
        with self.cond:
            return list(self.lines), self.bytes

    def tail(self, n):
        return [l for _, l in self.lines[-n:]]


def readline(stream):
    r, _, _ = select.select([stream], [], [], DEADLINE_S)
    check(r, "process printed nothing on stdout in time")
    line = stream.readline().decode().strip()
    check(line, "process exited before its ready line")
    return line


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hammer(public, host, until, limit=None):
    """One visitor: keep-alive requests until `until` (or `limit` of them); returns
    {status: count}."""
    h, p = public.rsplit(":", 1)
    counts = collections.Counter()
    conn = None
    while time.monotonic() < until and (limit is None or sum(counts.values()) < limit):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(h, int(p), timeout=DEADLINE_S)
            conn.request("GET", "/hammer", headers={"Host": host})
            r = conn.getresponse()
            r.read()
            counts[r.status] += 1
            if r.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException):
            counts["error"] += 1
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return counts


def run(bindir, workdir, loglevel):
    procs = []
    edge = subprocess.Popen(
        [os.path.join(bindir, "cfqt-edge"), "--state-dir", os.path.join(workdir, "edge-state"),
         "--edge-listen", "127.0.0.1:0", "--open-stream-timeout", "5s",
         "--response-timeout", "30s"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    procs.append(edge)
    cfqt = None
    try:
        ready = json.loads(readline(edge.stdout))

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
        s.close()  # nothing listens there now

        cmd = [os.path.join(bindir, "cfqt"), "tunnel", "--url", "http://127.0.0.1:%d" % dead_port,
               "--no-autoupdate", "--protocol", "quic", "--ha-connections", "1",
               "--quick-service", "http://" + ready["api"], "--edge-ca", ready["ca"],
               "--metrics", "127.0.0.1:0", "--backoff-base", "20ms", "--ha-stagger", "10ms",
               "--quic-idle-timeout", "5s", "--quic-keepalive-period", "200ms",
               "--rpc-timeout", "5s", "--api-retry-delay", "50ms", "--loglevel", loglevel]
        for e in ready["edges"]:
            cmd += ["--edge", e]
        cfqt = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(cfqt)
        log = LogFollower(cfqt.stderr)
        host = urllib.parse.urlparse(readline(cfqt.stdout)).hostname
        log.wait_for(r"Registered tunnel connection connIndex=0")

        # One failing request first, so start-up lines are behind us and the path works.
        counts = hammer(ready["public"], host, time.monotonic() + DEADLINE_S, limit=1)
        check(counts[502] == 1 and sum(counts.values()) == 1, "first request:", dict(counts))
        log.wait_for(r"WRN Request failed ")
        before, before_bytes = log.snapshot()

        start = time.monotonic()
        results = [None] * THREADS

        def visitor(i):
            results[i] = hammer(ready["public"], host, start + HAMMER_S)

        threads = [threading.Thread(target=visitor, args=(i,), daemon=True)
                   for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HAMMER_S + DEADLINE_S)
            check(not t.is_alive(), "a visitor thread did not finish in time")
        total = collections.Counter()
        for c in results:
            total.update(c)
        hammered = time.monotonic() - start
        print("requests in %.2fs: %s" % (hammered, dict(total)), flush=True)
        check(total[502] >= 500, "too few failing requests to mean anything:", dict(total))

        # An interval after the load, one more failure writes the last pending summary, then its
        # own line (in one write).
        time.sleep(1.2)
        mark = len(log.snapshot()[0])
        counts = hammer(ready["public"], host, time.monotonic() + DEADLINE_S, limit=1)
        check(counts[502] == 1, "last request:", dict(counts))
        log.wait_for(r"WRN Request failed (?!suppressed=)", after=mark)
        after, after_bytes = log.snapshot()
        check(re.search(r"WRN Request failed suppressed=\d+ interval=1s$", after[-2][1]),
              "no summary before the line after the load:", after[-2:])
        window = after[len(before):]
        elapsed = time.monotonic() - start

        # Lines per wall-clock second (by the lines' own timestamps) and in total.
        per_second = collections.Counter()
        for _, l in window:
            m = LINE.match(l)
            check(m, "not a log line:", l)
            per_second[m.group(1)] += 1
        print("cfqt wrote %d lines, %d bytes in %.2fs; busiest second: %d lines" %
              (len(window), after_bytes - before_bytes, elapsed, max(per_second.values())),
              flush=True)
        check(max(per_second.values()) <= MAX_LINES_PER_S,
              "more than %d lines in one second:" % MAX_LINES_PER_S, dict(per_second),
              "\n  " + "\n  ".join(l for _, l in window[:80]))
        check(len(window) <= MAX_LINES_PER_S * (int(elapsed) + 1),
              "too many lines:", len(window), "in %.2fs" % elapsed)
        summaries = [int(m.group(1)) for _, l in window
                     for m in [re.search(r"WRN Request failed suppressed=(\d+) interval=1s$", l)]
                     if m]
        check(summaries and all(n > 0 for n in summaries), "no summary line with suppressed=N>0")
        check(sum(summaries) > total[502] // 2, "the summaries account for too few requests:",
              summaries, total[502])

        # A graceful stop writes what is still counted; then nothing is missing.
        stop(cfqt)
        log.wait_closed()
        lines = [l for _, l in log.snapshot()[0]]
        written = sum(1 for l in lines if re.search(r" WRN Request failed (?!suppressed=)", l))
        suppressed = sum(int(m.group(1)) for l in lines
                         for m in [re.search(r" WRN Request failed suppressed=(\d+) ", l)] if m)
        failed = total[502] + 2
        print("Request failed: %d written + %d suppressed; %d requests answered 502" %
              (written, suppressed, failed), flush=True)
        check(written + suppressed == failed, "the counts do not add up:", written, suppressed,
              failed)
        check(written <= 6 * (int(elapsed) + 2), "too many Request failed lines:", written)
    except Exception:
        if cfqt is not None:
            print("---- cfqt log tail ----\n" + "\n".join(log.tail(40)))
        raise
    finally:
        for p in procs:
            stop(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("CFQT_BIN_DIR", "build/bin"))
    ap.add_argument("--loglevel", default="info", help="cfqt's --loglevel (default: info)")
    args = ap.parse_args()
    # Whole-run bound, on top of the per-wait deadlines.
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Fail("test run timed out")))
    signal.alarm(240)
    os.environ["KJ_CLEAN_SHUTDOWN"] = "1"
    workdir = tempfile.mkdtemp(prefix="cfqt-logvol-")
    try:
        run(os.path.abspath(args.bin), workdir, args.loglevel)
        print("[ PASS ] log volume bounded with the origin down under load", flush=True)
        code = 0
    except Exception as e:
        print("[ FAIL ] log volume: %s" % e, flush=True)
        code = 1
    finally:
        signal.alarm(0)
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
