#!/usr/bin/env python3
"""End-to-end: this host refuses outbound UDP to the edge (issue 14).

Where a firewall, security policy or route forbids the edge's UDP port, sendmsg fails at once
(EPERM, EACCES, ENETUNREACH, EHOSTUNREACH). `--protocol auto` must then use HTTP/2 for that
address at once, not after --fallback-after; an explicit `--protocol quic` never falls back and
keeps retrying with a clear error.

The refusal is real: the script re-runs itself in a network namespace of its own
(`unshare -rn`, no root needed where user namespaces are allowed), where policy-routing rules
refuse UDP to the edge's ports only (`ip rule ... ipproto udp dport P unreachable|prohibit`:
sendmsg fails with ENETUNREACH or EACCES; TCP to the same ports is untouched). Where no such
namespace can be made (user namespaces disabled, no `ip`, a kernel without ipproto/dport
rules), the script says why and exits 77, which ctest reports as skipped.

Usage: udp_refused_e2e.py --bin BUILD/bin [-k NAME]   (exit 0 = passed, 77 = skipped)
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from e2e_support import (DEADLINE_S, Edge, Fail, argument_parser, check, finish_suite, prepare_run,
                         run_tests, set_up)
import tunnel_e2e
from tunnel_e2e import Cfqt, Origin, blob, front

SKIP = 77
INSIDE = "CFQT_E2E_UDP_REFUSED_NETNS"   # set in the re-run inside the namespace

# auto with --fallback-after 30s must be on HTTP/2 well before 30 s: only the refusal gets it
# there. The bound is generous (TCP + TLS dial and registration on a loaded machine).
REFUSED_BOUND_S = 10
REFUSED_WRN = (r" WRN UDP to (\S+) is refused by this host \(sendmsg: %s\); using HTTP/2 over "
               r"TCP\. Allow outbound UDP ([0-9]+) for QUIC\.")


def run(*cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20,
                          text=True)


def ip(*args):
    r = run("ip", *args)
    if r.returncode != 0:
        raise Fail("ip %s: %s" % (" ".join(args), r.stdout.strip()))


def enter_namespace():
    """Re-runs this script in a new user + network namespace; returns its exit status, or
    SKIP (with the reason printed) where the namespace or the rules are not available."""
    unshare, iptool = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not iptool:
        print("SKIP: needs unshare(1) and ip(8) to refuse UDP in a network namespace")
        return SKIP
    probe = run(unshare, "-rn", "--", iptool, "rule", "add", "pref", "10", "ipproto", "udp",
                "dport", "9", "unreachable")
    if probe.returncode != 0:
        print("SKIP: cannot make a network namespace that refuses UDP here "
              "(unshare -rn + ip rule ipproto/dport): %s" % probe.stdout.strip())
        return SKIP
    env = dict(os.environ, **{INSIDE: "1"})
    return subprocess.run([unshare, "-rn", "--", sys.executable, os.path.abspath(__file__)] +
                          sys.argv[1:], env=env).returncode


def set_up_namespace():
    """Inside the namespace: loopback up, and the `local` table looked up after the rules that
    refuse UDP (it comes first by default, and routes every 127/8 address)."""
    ip("link", "set", "lo", "up")
    ip("rule", "add", "pref", "100", "table", "local")
    ip("rule", "del", "pref", "0")


class Env:
    def __init__(self, bindir):
        self.bindir = bindir
        self.workdir = tempfile.mkdtemp(prefix="cfqt-e2e-udp-refused-")
        self.origin = Origin()
        self.edge = Edge(bindir, self.workdir)
        self.ports = sorted({e.rsplit(":", 1)[1] for e in self.edge.ready["edges"]})
        self.rule = None

    def refuse_udp(self, action):
        """UDP to the edge's ports: refused by the rule `action` (unreachable: ENETUNREACH,
        prohibit: EACCES), or allowed (None)."""
        if self.rule:
            for port in self.ports:
                ip("rule", "del", "pref", "10", "ipproto", "udp", "dport", port, self.rule)
        self.rule = action
        if action:
            for port in self.ports:
                ip("rule", "add", "pref", "10", "ipproto", "udp", "dport", port, action)

    def cfqt(self, args):
        return Cfqt(self.bindir, self.edge, ["--url", "http://127.0.0.1:%d" % self.origin.port] +
                    args)

    def close(self):
        self.edge.stop()
        self.origin.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def check_refused_lines(env, t, strerror):
    """The WRN line: once per edge address, with the port of the advice."""
    pattern = REFUSED_WRN % re.escape(strerror)
    lines = t.log.matching(pattern)
    addrs = []
    for line in lines:
        m = re.search(pattern, line)
        check(m.group(1).rsplit(":", 1)[1] == m.group(2), "port of the advice", line)
        addrs.append(m.group(1))
    check(sorted(addrs) == sorted(env.edge.ready["edges"]),
          "want the WRN line exactly once per edge address", env.edge.ready["edges"], lines)
    check(t.log.count(r"got no answer") == 0, t.log.matching(r"got no answer"))
    print("    " + lines[0])


def test_auto_uses_http2_at_once_when_udp_is_refused(env):
    env.refuse_udp("unreachable")
    started = time.monotonic()
    t = env.cfqt(["--protocol", "auto", "--ha-connections", "2", "--fallback-after", "30s"])
    try:
        for idx in (0, 1):
            left = REFUSED_BOUND_S - (time.monotonic() - started)
            check(left > 0, "connIndex=%d not registered within %ds" % (idx, REFUSED_BOUND_S))
            t.log.wait_for(r"Registered tunnel connection connIndex=%d .*protocol=http2" % idx,
                           timeout=left)
        print("    both connections registered over HTTP/2 %.2fs after start "
              "(--fallback-after 30s)" % (time.monotonic() - started))
        status, _, data = front(env.edge, t.host, "GET", "/blob?n=100000")
        check(status == 200 and data == blob(100000), "GET through the front door", status)
        conns = env.edge.connections(t.host)
        check(sorted((c["connIndex"], c["protocol"]) for c in conns) ==
              [(0, "http2"), (1, "http2")], conns)
        check_refused_lines(env, t, "Network is unreachable")
    finally:
        t.stop()


def test_refusal_of_an_open_quic_connection(env):
    # QUIC works, then the host starts refusing UDP: the open connection ends at its next send
    # (a keep-alive PING within --quic-keepalive-period 200ms), not after its idle timeout, and
    # auto reconnects over HTTP/2.
    env.refuse_udp(None)
    t = env.cfqt(["--protocol", "auto", "--ha-connections", "1", "--fallback-after", "30s",
                  "--quic-idle-timeout", "20s", "--quic-keepalive-period", "200ms"])
    try:
        t.log.wait_for(r"Registered tunnel connection connIndex=0 .*protocol=quic")
        env.refuse_udp("prohibit")
        started = time.monotonic()
        t.log.wait_for(r"Connection terminated connIndex=0 .*QUIC send refused by this host.*"
                       r"Permission denied \(EACCES\)", timeout=REFUSED_BOUND_S)
        t.log.wait_for(r"Registered tunnel connection connIndex=0 .*protocol=http2",
                       timeout=REFUSED_BOUND_S)
        print("    on HTTP/2 %.2fs after UDP was refused (idle timeout 20s)" %
              (time.monotonic() - started))
        # Once per address dialled: the edge may still hold the dead QUIC connection (it has
        # not timed out yet) and answer EDUPCONN, which sends the connection to the other
        # address, refused too.
        lines = t.log.matching(REFUSED_WRN % re.escape("Permission denied"))
        addrs = [re.search(REFUSED_WRN % re.escape("Permission denied"), l).group(1)
                 for l in lines]
        check(lines and len(set(addrs)) == len(addrs), "want the WRN line once per address",
              lines)
        status, _, data = front(env.edge, t.host, "GET", "/blob?n=1000")
        check(status == 200 and data == blob(1000), status)
    finally:
        t.stop()


def test_quic_never_falls_back_when_udp_is_refused(env):
    env.refuse_udp("prohibit")
    t = env.cfqt(["--protocol", "quic", "--ha-connections", "1"])
    try:
        failed = (r"Failed to dial a quic connection connIndex=0 .*QUIC send refused by this "
                  r"host: sendmsg to \S+ failed: Permission denied \(EACCES\).*--protocol quic "
                  r"does not fall back: allow outbound UDP [0-9]+, or use --protocol auto or "
                  r"http2")
        t.log.wait_for(failed, count=3)
        print("    " + t.log.matching(failed)[0])
        check(t.log.count(r"Registered tunnel connection") == 0,
              t.log.matching(r"Registered tunnel connection"))
        check(t.log.count(r"using HTTP/2") == 0, t.log.matching(r"using HTTP/2"))
        check(env.edge.connections(t.host, state=None) == [],
              "quic reached the edge", env.edge.connections(t.host, state=None))
        t.log.wait_for(r"Retrying connection in up to .*connIndex=0")
    finally:
        t.stop()


TESTS = [
    test_auto_uses_http2_at_once_when_udp_is_refused,
    test_refusal_of_an_open_quic_connection,
    test_quic_never_falls_back_when_udp_is_refused,
]


def main():
    ap = argument_parser()
    ap.add_argument("-k", default=None)
    args = ap.parse_args()
    if os.environ.get(INSIDE) != "1":
        sys.exit(enter_namespace())
    prepare_run("test run timed out")
    set_up_namespace()
    env = set_up(Env, os.path.abspath(args.bin))
    finish_suite(lambda: run_tests(TESTS, env, args.k, alarm_s=60), env.close,
                 exits=[("cfqt-edge", env.edge, (0,))],
                 tails=[("cfqt-edge", env.edge.log, 3000)])


if __name__ == "__main__":
    main()
