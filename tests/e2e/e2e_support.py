"""What the end-to-end scripts in this directory share (tunnel_e2e.py, isolation_e2e.py,
log_volume_e2e.py): failures (Fail, check), processes started with their stderr followed
(start_process, readline, stop, LogFollower, the sanitizer-report scan), cfqt-edge started and
read from its JSON ready line (Edge), WebSocket framing (ws_*), and the runner around the tests
(argument_parser, prepare_run, set_up, run_tests, sanitizer_failures, exit_failure).

Every process started here is listed in PROCS and every followed log in ALL_LOGS, so that a
failed set-up can kill them all and the end of a run can scan every log for a sanitizer report.
A script imports this module by name: Python puts the script's own directory on sys.path.
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

DEADLINE_S = 20  # bound of every single wait

ALL_LOGS = []    # every LogFollower, in the order started
PROCS = []       # every process started through start_process(), in the order started
SANITIZER = re.compile(r"ERROR: (Address|Leak)Sanitizer|runtime error:|SUMMARY: .*Sanitizer")


class Fail(Exception):
    pass


class Skip(Exception):
    """Raised by a test that does not apply to this run (its message is the reason): reported
    as "[ SKIP ] name: reason", not a failure."""


def check(cond, *msg):
    if not cond:
        raise Fail(" ".join(str(m) for m in msg))


def check_no_sanitizer_report(text):
    check(not SANITIZER.search(text), "sanitizer report:\n" + text[-6000:])


# ---------------------------------------------------------------------------------------------
# Processes

class LogFollower:
    """Collects a process's stderr lines on a thread (a copy goes to sink if given)."""

    def __init__(self, stream, sink=None):
        ALL_LOGS.append(self)
        self.lines = []
        self.bytes = 0       # as read, before decoding
        self.cond = threading.Condition()
        self.closed = False
        self.sink = sink
        threading.Thread(target=self._run, args=(stream,), daemon=True).start()

    def _run(self, stream):
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if self.sink:
                self.sink.write(line + "\n")
            with self.cond:
                self.lines.append(line)
                self.bytes += len(raw)
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def mark(self):
        """The index of the next line, for the `start` of matching/count/wait_for."""
        with self.cond:
            return len(self.lines)

    def matching(self, pattern, start=0):
        rx = re.compile(pattern)
        with self.cond:
            return [l for l in self.lines[start:] if rx.search(l)]

    def count(self, pattern, start=0):
        return len(self.matching(pattern, start))

    def wait_for(self, pattern, count=1, timeout=DEADLINE_S, start=0):
        """The count-th line from index `start` on that matches pattern; Fail after timeout or
        once the stream ended without it."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                matches = [l for l in self.lines[start:] if rx.search(l)]
                if len(matches) >= count:
                    return matches[count - 1]
                left = end - time.monotonic()
                if left <= 0 or self.closed:
                    raise Fail("log never showed %r (x%d) within %.1fs; last lines:\n      %s" %
                               (pattern, count, timeout, "\n      ".join(self.lines[-15:])))
                self.cond.wait(left)

    def wait_closed(self, timeout=DEADLINE_S):
        with self.cond:
            self.cond.wait_for(lambda: self.closed, timeout=timeout)

    def snapshot(self):
        """(the lines so far, their bytes)."""
        with self.cond:
            return list(self.lines), self.bytes

    def tail(self, n):
        with self.cond:
            return self.lines[-n:]

    def text(self):
        with self.cond:
            return "\n".join(self.lines)


def wait_until(what, predicate, timeout=DEADLINE_S, interval=0.02, ignore=()):
    """Polls predicate() (state with no event to wait on, e.g. an admin API) until it returns a
    true value, which is returned; exceptions of the types in `ignore` count as "not yet". Fail
    after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ignore:
            pass
        if time.monotonic() > deadline:
            raise Fail("timed out waiting for " + what)
        time.sleep(interval)


def start_process(cmd, env=None, sink=None, follow_log=True):
    """Starts cmd with its stdout piped and lists it in PROCS: (process, LogFollower of its
    stderr), or (process, None) with follow_log=False (stderr then goes nowhere)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if follow_log else subprocess.DEVNULL,
                            env=env)
    PROCS.append(proc)
    return proc, (LogFollower(proc.stderr, sink) if follow_log else None)


def readline(stream, what="process", before="its ready line"):
    """The next stdout line of a process (within DEADLINE_S). select() looks at the descriptor:
    a stream read this way more than once must be unbuffered (bufsize=0) or read only here."""
    r, _, _ = select.select([stream], [], [], DEADLINE_S)
    check(r, what, "printed nothing on stdout in time")
    line = stream.readline().decode().strip()
    check(line, what, "exited before", before)
    return line


def stop(proc):
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def unused_port():
    """A loopback TCP port where nothing listens (bound once, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


class Edge:
    """cfqt-edge on loopback, port 0 everywhere. ready is its JSON ready line (api, ca, edges,
    public, admin); public is the front door as (host, port)."""

    def __init__(self, bindir, workdir, listen=("127.0.0.1:0", "127.0.0.2:0"), follow_log=True,
                 extra_args=()):
        cmd = [os.path.join(bindir, "cfqt-edge"),
               "--state-dir", os.path.join(workdir, "edge-state")]
        for addr in listen:
            cmd += ["--edge-listen", addr]
        cmd += ["--open-stream-timeout", "5s", "--response-timeout", "30s"] + list(extra_args)
        self.proc, self.log = start_process(cmd, follow_log=follow_log)
        self.ready = json.loads(readline(self.proc.stdout, "cfqt-edge"))
        h, p = self.ready["public"].rsplit(":", 1)
        self.public = (h, int(p))

    def client_args(self):
        """The flags that point cfqt (or the C API example) at this emulator."""
        args = ["--quick-service", "http://" + self.ready["api"], "--edge-ca", self.ready["ca"]]
        for e in self.ready["edges"]:
            args += ["--edge", e]
        return args

    def admin(self, method, path):
        host, port = self.ready["admin"].rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
        c.request(method, path)
        r = c.getresponse()
        data = r.read()
        c.close()
        check(r.status == 200, "admin", method, path, "->", r.status, data)
        return json.loads(data) if data else None

    def connections(self, hostname, state="registered"):
        return [c for c in self.admin("GET", "/connections")["connections"]
                if c["hostname"] == hostname and (state is None or c["state"] == state)]

    def stop(self):
        stop(self.proc)


# ---------------------------------------------------------------------------------------------
# WebSocket (RFC 6455) frames, for the visitors and origins of the scripts

def ws_accept(key):
    return base64.b64encode(hashlib.sha1(
        (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()


def ws_mask(data, key):
    """data XOR the 4-byte key (masks and unmasks)."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def ws_frame_head(opcode, n, mask_key=None):
    """The head of a final frame of n payload bytes; with mask_key, masked (bit and key)."""
    head = bytearray([0x80 | opcode])
    mbit = 0x80 if mask_key is not None else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack(">Q", n)
    return bytes(head) + (mask_key or b"")


def ws_read_frame(read, max_len=None):
    """One frame through read(n) (a file's read, or Reader.exact): (opcode, payload unmasked),
    or (None, None) when the stream ends before a frame. A payload of max_len bytes or more is
    a Fail."""
    h = read(2)
    if len(h) < 2:
        return None, None
    n = h[1] & 0x7F
    if n == 126:
        n = struct.unpack(">H", read(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", read(8))[0]
    mask = read(4) if h[1] & 0x80 else None
    check(max_len is None or n < max_len, "frame of", n, "bytes")
    data = read(n)
    return h[0] & 0x0F, ws_mask(data, mask) if mask else bytes(data)


# ---------------------------------------------------------------------------------------------
# The runner

def argument_parser():
    """The options every script takes (more are added by the script)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("CFQT_BIN_DIR", "build/bin"))
    return ap


def prepare_run(timeout_message):
    """SIGALRM (signal.alarm, the bound of a test or of the whole run) then raises
    Fail(timeout_message) in the main thread."""
    def timed_out(signum, frame):
        raise Fail(timeout_message)

    signal.signal(signal.SIGALRM, timed_out)
    # KJ_MAIN programs (cfqt-edge) otherwise end with _exit() and skip their destructors and
    # the leak check of sanitizer builds; with it they unwind and exit() normally.
    os.environ["KJ_CLEAN_SHUTDOWN"] = "1"


def set_up(make_env, *args):
    """make_env(*args); if that fails: its traceback, every process killed, their log tails,
    "[ FAIL ] set-up" and exit 1."""
    try:
        return make_env(*args)
    except Exception:
        traceback.print_exc()
        kill(PROCS)
        for log in ALL_LOGS:
            print("---- process log tail ----\n" + log.text()[-4000:])
        print("[ FAIL ] set-up")
        sys.exit(1)


def run_tests(tests, env, k, alarm_s, name=lambda t: t.__name__, per_case=False):
    """Runs test(env) for each test whose name contains k (each one without -k), under
    signal.alarm(alarm_s); prints "[ PASS ] name (1.23s)", "[ SKIP ] name: reason" (the test
    raised Skip) or the failure. Returns how many failed.

    A failure is "[ FAIL ] name: why" and its traceback. With per_case (tests that each start
    their own processes): "[ RUN  ] name" first; a failure is "[ FAIL ] name (1.23s): why", the
    traceback only for an exception other than Fail, and the log tails of the processes the test
    started; those processes are killed after the test."""
    failed = 0
    for t in tests:
        n = name(t)
        if k and k not in n:
            continue
        if per_case:
            print("[ RUN  ] %s" % n, flush=True)
        started = time.monotonic()
        logs, procs = len(ALL_LOGS), len(PROCS)
        signal.alarm(alarm_s)
        try:
            t(env)
            print("[ PASS ] %s (%.2fs)" % (n, time.monotonic() - started), flush=True)
        except Skip as e:
            print("[ SKIP ] %s: %s" % (n, e), flush=True)
        except Exception as e:
            failed += 1
            if not per_case:
                print("[ FAIL ] %s: %s" % (n, e), flush=True)
                traceback.print_exc()
            else:
                print("[ FAIL ] %s (%.2fs): %s" % (n, time.monotonic() - started, e),
                      flush=True)
                if not isinstance(e, Fail):
                    traceback.print_exc()
                for log in ALL_LOGS[logs:]:
                    print("    ---- log tail of a process of this case ----\n      " +
                          "\n      ".join(log.text()[-2500:].splitlines()))
        finally:
            signal.alarm(0)
            if per_case:
                kill(PROCS[procs:])
    return failed


def sanitizer_failures():
    """Once the processes have ended: each log holding a sanitizer report is printed and counts
    as one failure (sanitizer builds: any report of any process fails the run)."""
    failed = 0
    for log in ALL_LOGS:
        log.wait_closed()
        if any(SANITIZER.search(l) for l in log.lines):
            failed += 1
            print("[ FAIL ] sanitizer report:\n  " + "\n  ".join(log.lines[-40:]))
    return failed


def exit_failure(proc, what, ok=(0,)):
    """1 (and the failure printed) if proc, stopped with SIGTERM, exited with a code not in
    ok, else 0."""
    if proc.returncode in ok:
        return 0
    print("[ FAIL ] %s exited with %s after SIGTERM" % (what, proc.returncode))
    return 1


def finish_suite(run, close, exits=(), tails=(), summary=lambda failed: "%d failed" % failed):
    """How every suite's run ends. run() runs the tests and returns how many failed; close()
    stops the suite's processes (also when run() raised, which then propagates). Then what
    shows only once they ended fails the run too: sanitizer reports (sanitizer_failures()), and
    each of `exits`, (what, process, ok) where process has .proc and .log, whose exit status
    after SIGTERM is not in ok (exit_failure(), then the last 3000 characters of its log). When
    anything failed, the tails of `tails`, (what, log, chars), are printed, taken before close()
    if a test failed (so that they end where it failed, not with the shutdown). Prints
    summary(failed) and exits 1 if anything failed, else 0."""
    def texts(logs):
        return [(what, log.text()[-chars:] if log else "(not followed)")
                for what, log, chars in logs]

    failed, before = 0, None
    try:
        failed = run()
    finally:
        if failed:
            before = texts(tails)
        close()
    failed += sanitizer_failures()
    exit_tails = []
    for what, process, ok in exits:
        if exit_failure(process.proc, what, ok):
            failed += 1
            if not any(log is process.log for _, log, _ in tails):
                exit_tails += texts([(what, process.log, 3000)])
    if failed:
        for what, text in (before if before is not None else texts(tails)) + exit_tails:
            print("---- %s log tail ----\n%s" % (what, text))
    print(summary(failed), flush=True)
    sys.exit(1 if failed else 0)
