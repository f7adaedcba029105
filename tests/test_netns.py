"""cluster/netns-pair.sh: two namespaces joined by a shaped veth pair, set up and torn down on every
exit path (done, a failed command, SIGTERM, SIGINT, bad usage).

Needs root and ``ip netns`` (iproute2): without them these tests skip, unless
``DISTRAIN_REQUIRE_NETNS`` is set (scripts/test.sh, as CI runs): then they fail (conftest's
``needs_netns``)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "cluster" / "netns-pair.sh"


needs_netns = pytest.mark.usefixtures("needs_netns")  # conftest: skips, or fails under DISTRAIN_REQUIRE_NETNS

SERVER = """
import os, socket
l = socket.socket(); l.bind(("0.0.0.0", 5001)); l.listen(1); c, _ = l.accept(); n = 0
while True:
    d = c.recv(65536)
    if not d: break
    n += len(d)
c.sendall(b"k"); os.write(1, f"received {n} bytes\\n".encode())
"""
CLIENT = """
import os, socket, time
for _ in range(200):
    try:
        s = socket.create_connection((os.environ["NETNS_PEER"], 5001)); break
    except OSError: time.sleep(0.05)
s.sendall(b"x" * 200000); s.shutdown(socket.SHUT_WR); s.recv(1)
os.write(1, f"index {os.environ['NETNS_INDEX']} self {os.environ['NETNS_SELF']}\\n".encode())
"""


def _name() -> str:
    return f"dtt{os.getpid()}{random.randrange(10**6)}"


def _namespaces_of(name: str) -> list[str]:
    return [ns for ns in (f"{name}-a", f"{name}-b") if Path("/var/run/netns", ns).exists()]


def _processes_with(argv: str) -> list[int]:
    """Processes whose command line is exactly ``argv`` (words separated by spaces)."""
    want = argv.encode().split(b" ")
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0") == want:
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def _remove(name: str) -> None:
    """Backstop after a failed test: the namespaces of this test and what runs in them."""
    for ns in _namespaces_of(name):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@needs_netns
def test_hosts_talk_through_the_shaped_pair_and_everything_is_removed(tmp_path):
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "client.py").write_text(CLIENT)
    name = _name()
    done = _run(["--rate", "100mbit", "--name", name, "--",
                 f"tc qdisc show dev veth0; ip -br addr show veth0; {sys.executable} {tmp_path / 'client.py'}",
                 f"{sys.executable} {tmp_path / 'server.py'}"])
    assert done.returncode == 0, done.stderr
    assert "tbf" in done.stdout and "rate 100Mbit" in done.stdout
    assert "10.213.0.1/30" in done.stdout and "index 0 self 10.213.0.1" in done.stdout
    assert "received 200000 bytes" in done.stdout
    assert _namespaces_of(name) == []


@needs_netns
def test_a_failed_command_stops_the_other_and_its_exit_code_is_returned():
    name, marker = _name(), f"{random.randrange(400, 900)}.{random.randrange(10**6)}"
    done = _run(["--name", name, "--", "exit 3", f"sleep {marker}"], timeout=60)
    assert done.returncode == 3, done.stderr
    assert _namespaces_of(name) == [] and _processes_with(f"sleep {marker}") == []


def _default_signals():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@needs_netns
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_tears_everything_down(sig, code):
    name, marker = _name(), f"{random.randrange(400, 900)}.{random.randrange(10**6)}"
    # As from a terminal: a process started in the background (`cmd &`, as CI may start the suite)
    # inherits SIGINT ignored, and bash cannot trap a signal ignored when it started.
    proc = subprocess.Popen([str(SCRIPT), "--rate", "1gbit", "--name", name, "--", f"sleep {marker}",
                             f"sleep {marker}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 30
        while len(_processes_with(f"sleep {marker}")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_namespaces_of(name)) == 2 and len(_processes_with(f"sleep {marker}")) == 2
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        _remove(name)
    assert _namespaces_of(name) == [] and _processes_with(f"sleep {marker}") == []


@needs_netns
@pytest.mark.parametrize("args, message", [
    (["--rate", "fast", "--", "true", "true"], "--rate"),
    (["--delay", "1s", "--", "true", "true"], "--delay"),
    (["--", "true"], "two commands"),
    (["--bogus", "--", "true", "true"], "unknown option"),
])
def test_bad_usage_exits_2_and_creates_nothing(args, message):
    name = _name()
    done = _run(["--name", name, *args])
    assert done.returncode == 2 and message in done.stderr
    assert _namespaces_of(name) == []


def _kernel_has_netem() -> bool:
    """Whether a netem qdisc can be created (on a throw-away veth pair in a throw-away namespace)."""
    name = f"distrain-netem-probe-{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        subprocess.run(["ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=True,
                       capture_output=True, timeout=10)
        return subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "p0", "root", "netem",
                               "delay", "1ms"], capture_output=True, timeout=10).returncode == 0
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return False
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@needs_netns
def test_delay_needs_netem_and_is_applied_where_the_kernel_has_it():
    name = _name()
    done = _run(["--delay", "1ms", "--rate", "1gbit", "--name", name, "--", "tc qdisc show dev veth0", "true"])
    assert _namespaces_of(name) == []
    if not _kernel_has_netem():
        # This kernel (the CI machine's among them) has no netem: the script must refuse --delay up
        # front, with exit 2 and the reason, and leave nothing behind (checked above).
        assert done.returncode == 2 and "no netem" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert "netem" in done.stdout and "delay 1ms" in done.stdout and "tbf" in done.stdout


@pytest.mark.timeout(30)
def test_script_passes_shellcheck(needs_shellcheck):
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
