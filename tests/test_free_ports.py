"""cluster/free_ports.py: the ports local clusters, tests and benchmarks bind, below the ephemeral range."""
from __future__ import annotations

import socket
import subprocess
import sys

from conftest import REPO
import free_ports as free_ports_module
from free_ports import ephemeral_start, free_port_block, free_ports


def test_ports_are_consecutive_free_and_below_the_ephemeral_range():
    ports = free_ports(3)
    assert ports == list(range(ports[0], ports[0] + 3))
    assert 20000 <= ports[0] and ports[-1] < ephemeral_start()
    socks = [socket.socket() for _ in ports]
    try:
        for s, port in zip(socks, ports):
            s.bind(("127.0.0.1", port))  # free: binding them all must work
    finally:
        for s in socks:
            s.close()


def test_a_block_with_a_port_in_use_is_skipped(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port_block(1)))
        taken = held.getsockname()[1]
        # The first candidate block contains the held port; the second does not.
        candidates = iter([taken - 1, taken + 10])
        monkeypatch.setattr(free_ports_module.random, "randrange", lambda *_: next(candidates))
        assert free_port_block(2) == taken + 10


def test_the_command_line_prints_n_ports_and_refuses_bad_input():
    script = str(REPO / "cluster" / "free_ports.py")
    out = subprocess.run([sys.executable, script, "4"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and len(out.stdout.split()) == 4
    bad = subprocess.run([sys.executable, script, "zero"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "usage: free_ports.py N" in bad.stderr
