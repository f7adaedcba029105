"""Every listener of every launcher, with its bind address and authentication, measured, and
compared with the table in docs/security.md (the test fails when the doc and the measurement differ).

- TF_CONFIG / srun ``multi_worker``: distrain's start-up rendezvous on worker 0 (while it waits),
  then TensorFlow's gRPC server on every worker, asked for its devices without any credential.
- Horovod under ``srun``: the rendezvous HTTP server distrain starts on rank 0, and Gloo's sockets
  while the ranks connect; ``horovodrun``: its own rendezvous HTTP server and the same Gloo sockets.
- Ray (the single-machine head of tests/ray_cluster.py, token authentication on): every daemon.
- ``distrain tensorboard``: TensorBoard and its data server.

The processes only start their servers (no training) and are killed at the end; only 127.0.0.1 is
contacted. Listeners are read from /proc (tests/listeners.py), as ``ss -ltnp`` shows them.
Without Horovod or Ray their tests skip, unless ``DISTRAIN_REQUIRE_HOROVOD`` / ``DISTRAIN_REQUIRE_RAY``
is set (then they fail).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import DISTRAIN, REPO, Workers, free_ports, horovodrun, tf_config, worker_env
from listeners import WILDCARD, Listener, descendants, documented, environ_has, listening
from ray_cluster import head_pids, ray_head_fixture

pytestmark = pytest.mark.multiprocess

DOC = REPO / "docs" / "security.md"
WORKER_0 = "worker 0's address"
GLOO_IFACE = "the Gloo interface's address"

# Starts what `distrain train` starts before training: the rendezvous, then the strategy's servers.
PROBE = """
import os, sys, time
import distrain
from pathlib import Path
from distrain.backends import factory
from distrain.rendezvous import meet
from distrain.spec import DistributeSpec
from distrain.world import detect

world = detect()
meet(world, Path(sys.argv[1]), 120)
if world.rank == 1 and os.environ.get("PROBE_DELAY_RANK1"):
    time.sleep(float(os.environ["PROBE_DELAY_RANK1"]))  # rank 0 waits in hvd.init with Gloo listening
factory.build(DistributeSpec(strategy=sys.argv[2]), world)
print("READY", flush=True)
time.sleep(300)
"""


def doc(listener_id: str) -> dict[str, str]:
    rows = documented(DOC)
    assert listener_id in rows, f"docs/security.md has no row `{listener_id}` (rows: {sorted(rows)})"
    return rows[listener_id]


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def ready(workers: Workers, count: int = 1) -> bool:
    return all(log.read_text(errors="replace").count("READY") >= count for log in workers.logs)


def http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def auth_of_http(status: int) -> str:
    """An HTTP server that answered a request without credentials by anything but 401/403 has none."""
    return "none" if status not in (401, 403) else "refused without credentials"


def bind_of(listeners: list[Listener], named: dict[str, str]) -> set[str]:
    return {WILDCARD if l.wildcard else named.get(l.address, l.address) for l in listeners}


# ----------------------------------------------------------------------------- TF_CONFIG

@pytest.mark.timeout(180)
def test_rendezvous_and_tensorflow_grpc(tmp_path):
    import grpc  # a TensorFlow dependency

    from distrain import rendezvous as rdv

    ports = free_ports(2)
    cmd = [sys.executable, "-c", PROBE, str(tmp_path / "run"), "multi_worker"]
    chief = Workers([cmd], [worker_env(TF_CONFIG=tf_config(ports, 0))], tmp_path / "logs0")
    others = None
    try:
        # Worker 0 alone: only the rendezvous listens, on worker 0's address from TF_CONFIG.
        found = wait_until(lambda: listening(descendants(chief.procs[0].pid)), 60, "the rendezvous listener")
        assert [(l.address, l.port) for l in found] == [("127.0.0.1", ports[0])]
        assert bind_of(found, {"127.0.0.1": WORKER_0}) == {doc("rendezvous")["bind"]}
        assert (tmp_path / "run" / rdv.SECRET_FILE).stat().st_mode & 0o077 == 0
        # (A join with the right secret is the real worker 1 below: one here would complete the world.)
        assert _rendezvous_join(ports, b"a guess, not the secret" * 2) == {"refused": "wrong secret"}
        assert doc("rendezvous")["auth"] == "per-job secret"

        others = Workers([cmd], [worker_env(TF_CONFIG=tf_config(ports, 1))], tmp_path / "logs1")
        wait_until(lambda: ready(chief) and ready(others), 120, "both strategies", poll=0.5)
        servers = [listening(descendants(w.procs[0].pid)) for w in (chief, others)]
        assert [[l.port for l in s] for s in servers] == [[ports[0]], [ports[1]]], servers
        assert bind_of(servers[0] + servers[1], {}) == {WILDCARD} == {doc("tf-grpc")["bind"]}
        # Anyone who reaches the port is served: a WorkerService call with no credential at all.
        with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
            get_status = channel.unary_unary("/tensorflow.WorkerService/GetStatus",
                                             request_serializer=lambda b: b, response_deserializer=lambda b: b)
            devices = get_status(b"", timeout=30)
        assert b"/job:worker/replica:0/task:1/device:CPU:0" in devices
        assert doc("tf-grpc")["auth"] == "none"
    finally:
        chief.kill()
        if others:
            others.kill()


def _rendezvous_join(ports, secret: bytes) -> dict:
    """One join as worker 1 would send it, signed with ``secret``; worker 0's answer."""
    from distrain import rendezvous as rdv

    with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as sock:
        lines = rdv._Lines(sock)
        hello = lines.read(time.monotonic() + 10)
        digest = rdv.world_digest([f"127.0.0.1:{p}" for p in ports])
        rdv._send(sock, {"rank": 1, "nonce": "n" * 32, "world": digest,
                         "mac": rdv.mac(secret, "join", hello["nonce"], "n" * 32, 1, digest)})
        return lines.read(time.monotonic() + 10)


# ----------------------------------------------------------------------------- Horovod

FAKE_SCONTROL = """#!/bin/sh
echo "NodeName=n1 NodeAddr=127.0.0.1 NodeHostName=n1"
echo "NodeName=n2 NodeAddr=127.0.0.1 NodeHostName=n2"
"""


def _srun_env(procid: int, port: int, bin_dir: Path) -> dict:
    """``srun -N2 --ntasks-per-node=1`` task ``procid`` on two nodes that both live at 127.0.0.1."""
    return worker_env(SLURM_JOB_ID="4243", SLURM_STEP_ID="0", SLURM_PROCID=procid, SLURM_NTASKS=2,
                      SLURM_STEP_NUM_TASKS=2, SLURM_STEP_NODELIST="n[1-2]", SLURM_JOB_NODELIST="n[1-2]",
                      SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_NODEID=procid, SLURM_LOCALID=0,
                      DISTRAIN_PORT=port, PROBE_DELAY_RANK1=4, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _collect(workers: Workers, count: int, timeout: float) -> set[Listener]:
    """Every listener seen under the workers until each printed READY ``count`` times."""
    seen: set[Listener] = set()
    deadline = time.monotonic() + timeout
    while not ready(workers, count):
        assert time.monotonic() < deadline, "the Horovod processes did not start\n" + workers.output()
        for p in workers.procs:
            seen |= set(listening(descendants(p.pid)))
        time.sleep(0.01)
    for p in workers.procs:
        seen |= set(listening(descendants(p.pid)))
    return seen


@pytest.mark.horovod
@pytest.mark.timeout(300)
def test_horovod_under_srun_and_horovodrun(needs_horovod, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    (port,) = free_ports(1)
    cmd = [sys.executable, "-c", PROBE, str(tmp_path / "srun-run"), "horovod"]
    pair = Workers([cmd, cmd], [_srun_env(i, port, bin_dir) for i in range(2)], tmp_path / "srun")
    try:
        seen = _collect(pair, 1, 180)
        rank0 = set(listening(descendants(pair.procs[0].pid)))
        # What stays: Horovod's rendezvous HTTP server on rank 0, at worker 0's address and port.
        assert {(l.address, l.port) for l in rank0} == {("127.0.0.1", port)}
        assert bind_of(list(rank0), {"127.0.0.1": WORKER_0}) == {doc("horovod-rendezvous-srun")["bind"]}
        assert auth_of_http(http_status(f"http://127.0.0.1:{port}/distrain-audit/probe")) == \
            doc("horovod-rendezvous-srun")["auth"]
        gloo = {l for l in seen if l.port != port}
        assert gloo, "no Gloo listener seen while the ranks connected"
        assert bind_of(list(gloo), {"127.0.0.1": GLOO_IFACE}) == {doc("gloo")["bind"]}
    finally:
        pair.kill()

    run = Workers([horovodrun([*cmd[:-2], str(tmp_path / "hvd-run"), "horovod"])], [worker_env(PROBE_DELAY_RANK1=4)],
                  tmp_path / "horovodrun")
    try:
        seen = _collect(run, 2, 180)
        # horovodrun's children (multiprocessing helpers) inherit its socket; the ranks have HOROVOD_RANK.
        launcher = {l for l in seen if not environ_has(l.pid, "HOROVOD_RANK")}
        assert len(launcher) == 1, seen
        (server,) = launcher
        assert bind_of([server], {}) == {doc("horovod-rendezvous-horovodrun")["bind"]}
        assert auth_of_http(http_status(f"http://127.0.0.1:{server.port}/distrain-audit/probe")) == \
            doc("horovod-rendezvous-horovodrun")["auth"]
        gloo = seen - launcher
        assert gloo, "no Gloo listener seen while the ranks connected"
        assert bind_of(list(gloo), {"127.0.0.1": GLOO_IFACE}) == {doc("gloo")["bind"]}
        assert doc("gloo")["auth"] == "none"
    finally:
        run.kill()


# ----------------------------------------------------------------------------- Ray

ray_head = ray_head_fixture(num_cpus=1)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_ray_single_machine_head(ray_head):
    found = listening(head_pids(ray_head.proc.pid, ray_head.token))
    assert len(found) >= 5, found  # GCS, raylet, object manager, dashboard, agents, ...
    assert bind_of(found, {}) == {"127.0.0.1"} == {doc("ray-single-machine")["bind"]}, found
    api = f"{ray_head.dashboard_url}/api/version"
    token = Path(ray_head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert http_status(api) == 401
    assert http_status(api, {"Authorization": f"Bearer {token}"}) == 200
    assert doc("ray-single-machine")["auth"] == "Ray token"


# ----------------------------------------------------------------------------- TensorBoard

@pytest.mark.timeout(120)
def test_distrain_tensorboard(tmp_path):
    (port,) = free_ports(1)
    (tmp_path / "runs").mkdir()
    with open(tmp_path / "tb.log", "w") as out:
        server = subprocess.Popen([*DISTRAIN, "tensorboard", str(tmp_path / "runs"), "--port", str(port)],
                                  env=worker_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_until(lambda: http_status_or_none(f"http://127.0.0.1:{port}/data/runs") == 200, 90,
                   "TensorBoard", poll=0.5)
        # The data server (a second process) starts with the first request; give it a moment.
        found = wait_until(lambda: (lambda ls: ls if len(ls) >= 2 else None)(listening(descendants(server.pid))),
                           30, "TensorBoard's data server")
        assert any(l.port == port for l in found)
        assert bind_of(found, {}) == {"127.0.0.1"} == {doc("tensorboard")["bind"]}, found
        assert auth_of_http(http_status(f"http://127.0.0.1:{port}/data/runs")) == doc("tensorboard")["auth"]
    finally:
        import signal

        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=30)


def http_status_or_none(url: str):
    try:
        return http_status(url)
    except OSError:
        return None
