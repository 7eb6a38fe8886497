"""Fixtures: a cfqt-edge subprocess (the offline edge emulator) and visitors of its front door."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import tempfile
from typing import Dict, Iterator, List, Optional, Tuple

import pytest


class Edge:
    def __init__(self, ready: dict) -> None:
        self.ready = ready
        host, port = ready["public"].rsplit(":", 1)
        self.public_host, self.public_port = host, int(port)

    def options(self, **extra) -> dict:
        """Tunnel options that reach this edge."""
        base = dict(quick_service="http://" + self.ready["api"], edges=self.ready["edges"][:1],
                    edge_ca_file=self.ready["ca"], ha_connections=1, grace_period=2.0,
                    backoff_base=0.02, log_level="error",
                    # wait_serving(): the edge's DNS-over-TLS server and HTTPS front door.
                    ready_resolvers=[self.ready["dot"] + "#localhost"],
                    ready_port=int(self.ready["public_tls"].rsplit(":", 1)[1]),
                    ready_ca_file=self.ready["ca"])
        base.update(extra)
        return base

    def request(self, hostname: str, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
        """One request through the front door, as a visitor of https://<hostname>."""
        conn = http.client.HTTPConnection(self.public_host, self.public_port, timeout=30)
        try:
            all_headers = {"Host": hostname}
            all_headers.update(headers or {})
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def stream(self, hostname: str, path: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(self.public_host, self.public_port, timeout=30)
        conn.request("GET", path, headers={"Host": hostname})
        return conn.getresponse()


@pytest.fixture
def edge() -> Iterator[Edge]:
    bin_dir = os.environ.get("CFQT_BIN_DIR")
    if not bin_dir:
        pytest.fail("CFQT_BIN_DIR must point at the build's bin/ (with cfqt-edge)")
    state = tempfile.mkdtemp(prefix="cfqt-py-test-")
    process = subprocess.Popen(
        [os.path.join(bin_dir, "cfqt-edge"), "--state-dir", state, "--edge-listen",
         "127.0.0.1:0", "--loglevel", "error", "--dot-listen", "127.0.0.1:0",
         "--public-tls-listen", "127.0.0.1:0"], stdout=subprocess.PIPE)
    try:
        line = process.stdout.readline()
        assert line, "cfqt-edge printed no ready line"
        yield Edge(json.loads(line))
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def listening_sockets_of_this_process() -> List[str]:
    """Inodes of TCP sockets in LISTEN state that this process holds."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            ours.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in ours:
                    found.append(fields[9])
    return found


def children_of_this_process() -> List[int]:
    children = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            children += [int(pid) for pid in f.read().split()]
    return children
