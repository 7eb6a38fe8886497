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

import collections
import http.client
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse

from e2e_support import (DEADLINE_S, PROCS, Edge, argument_parser, check, prepare_run,
                         readline, start_process, stop, unused_port)

HAMMER_S = 2.0           # how long the visitors send requests
THREADS = 48             # concurrent visitors
MAX_LINES_PER_S = 50     # what cfqt may write per wall-clock second under this load (defaults:
                         # 5 lines + 1 summary per message per 1 s interval)
LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) ([A-Z]{3}) (.*)$")


def hammer(public, host, until, limit=None):
    """One visitor: keep-alive requests to public (host, port) until `until` (or `limit` of
    them); returns {status: count}."""
    counts = collections.Counter()
    conn = None
    while time.monotonic() < until and (limit is None or sum(counts.values()) < limit):
        try:
            if conn is None:
                conn = http.client.HTTPConnection(*public, timeout=DEADLINE_S)
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


def request_failed_counts(lines):
    """(lines "Request failed" written, requests the summaries among `lines` stand for)."""
    written = sum(1 for l in lines if re.search(r" WRN Request failed (?!suppressed=)", l))
    suppressed = sum(int(m.group(1)) for l in lines
                     for m in [re.search(r" WRN Request failed suppressed=(\d+) ", l)] if m)
    return written, suppressed


def run(bindir, workdir, loglevel):
    cfqt = None
    try:
        edge = Edge(bindir, workdir, listen=["127.0.0.1:0"], follow_log=False)

        dead_port = unused_port()
        cmd = [os.path.join(bindir, "cfqt"), "tunnel", "--url", "http://127.0.0.1:%d" % dead_port,
               "--no-autoupdate", "--protocol", "quic", "--ha-connections", "1"]
        cmd += edge.client_args() + [
            "--metrics", "127.0.0.1:0", "--backoff-base", "20ms", "--ha-stagger", "10ms",
            "--quic-idle-timeout", "5s", "--quic-keepalive-period", "200ms",
            "--rpc-timeout", "5s", "--api-retry-delay", "50ms", "--loglevel", loglevel]
        cfqt, log = start_process(cmd)
        host = urllib.parse.urlparse(readline(cfqt.stdout)).hostname
        log.wait_for(r"Registered tunnel connection connIndex=0")

        # One failing request first, so start-up lines are behind us and the path works.
        counts = hammer(edge.public, host, time.monotonic() + DEADLINE_S, limit=1)
        check(counts[502] == 1 and sum(counts.values()) == 1, "first request:", dict(counts))
        log.wait_for(r"WRN Request failed ")
        before, before_bytes = log.snapshot()

        start = time.monotonic()
        results = [None] * THREADS

        def visitor(i):
            results[i] = hammer(edge.public, host, start + HAMMER_S)

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
        counts = hammer(edge.public, host, time.monotonic() + DEADLINE_S, limit=1)
        check(counts[502] == 1, "last request:", dict(counts))
        log.wait_for(r"WRN Request failed (?!suppressed=)", start=mark)
        after, after_bytes = log.snapshot()
        # That line wrote the summary still pending (if the last interval of the load had one):
        # nothing is left uncounted now. (Whether one was pending depends on the machine's speed,
        # so the test counts instead of looking for the summary at a fixed place.)
        now_written, now_suppressed = request_failed_counts(after)
        check(now_written + now_suppressed == total[502] + 2,
              "a summary is still pending after the line after the load:", now_written,
              now_suppressed, total[502] + 2, after[-2:])
        window = after[len(before):]
        elapsed = time.monotonic() - start

        # Lines per wall-clock second (by the lines' own timestamps) and in total.
        per_second = collections.Counter()
        for l in window:
            m = LINE.match(l)
            check(m, "not a log line:", l)
            per_second[m.group(1)] += 1
        print("cfqt wrote %d lines, %d bytes in %.2fs; busiest second: %d lines" %
              (len(window), after_bytes - before_bytes, elapsed, max(per_second.values())),
              flush=True)
        check(max(per_second.values()) <= MAX_LINES_PER_S,
              "more than %d lines in one second:" % MAX_LINES_PER_S, dict(per_second),
              "\n  " + "\n  ".join(window[:80]))
        check(len(window) <= MAX_LINES_PER_S * (int(elapsed) + 1),
              "too many lines:", len(window), "in %.2fs" % elapsed)
        summaries = [int(m.group(1)) for l in window
                     for m in [re.search(r"WRN Request failed suppressed=(\d+) interval=1s$", l)]
                     if m]
        check(summaries and all(n > 0 for n in summaries), "no summary line with suppressed=N>0")
        check(sum(summaries) > total[502] // 2, "the summaries account for too few requests:",
              summaries, total[502])

        # A graceful stop writes what is still counted; then nothing is missing.
        stop(cfqt)
        log.wait_closed()
        lines = log.snapshot()[0]
        written, suppressed = request_failed_counts(lines)
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
        for p in PROCS:
            stop(p)


def main():
    ap = argument_parser()
    ap.add_argument("--loglevel", default="info", help="cfqt's --loglevel (default: info)")
    args = ap.parse_args()
    prepare_run("test run timed out")
    signal.alarm(240)   # whole-run bound, on top of the per-wait deadlines
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
