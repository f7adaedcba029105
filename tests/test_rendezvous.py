"""The start-up rendezvous (``distrain/rendezvous.py``): workers meet before the strategy is built.

In-process (threads, no TensorFlow): workers meet; a missing one is named by rank and host:port at
the deadline; peers without the secret, with a wrong one or with another worker list are refused
and do not count; a worker does not trust a "worker 0" without the secret; the listener binds
worker 0's address only and leaves no TIME_WAIT on its port; the secret file's checks.
With real processes: a worker started without its peer exits 76 within the deadline plus a few
seconds, naming it; two workers meet through the run dir's secret and train (TensorFlow's server
binds the port the rendezvous used just before).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import DISTRAIN, free_ports, tf_config, worker_env, write_job
from distrain import rendezvous as rdv
from distrain.errors import EXIT_PEER_LOST, TrainingStopped, UsageError
from distrain.world import World


def world(rank: int, ports: list[int]) -> World:
    return World(launcher="tf_config", rank=rank, world_size=len(ports),
                 worker_addresses=tuple(f"127.0.0.1:{p}" for p in ports))


class Meeting:
    """``rdv.meet`` of some ranks in threads; ``results[rank]`` is None (met) or the exception."""

    def __init__(self, ports, run_dir, timeout_s, ranks, environ=None, delays=None):
        self.results: dict[int, object] = {}
        self.threads = []
        for rank in ranks:
            env = (environ or {}).get(rank, {})
            delay = (delays or {}).get(rank, 0.0)
            t = threading.Thread(target=self._run, args=(rank, ports, run_dir, timeout_s, env, delay), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, rank, ports, run_dir, timeout_s, env, delay):
        time.sleep(delay)
        try:
            rdv.meet(world(rank, ports), run_dir, timeout_s, environ=env)
            self.results[rank] = None
        except Exception as err:  # noqa: BLE001 (the test inspects it)
            self.results[rank] = err

    def join(self, timeout=60):
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "a rendezvous thread did not return"
        return self.results


def secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def listen_states(port: int) -> list[str]:
    """TCP states (hex, /proc/net/tcp) of every IPv4/IPv6 socket whose local port is ``port``."""
    from listeners import tcp_sockets

    return [fields[3] for fields in tcp_sockets() if int(fields[1].rsplit(":", 1)[1], 16) == port]


# ----------------------------------------------------------------------------- in-process

@pytest.mark.timeout(60)
def test_three_workers_meet_whoever_starts_first(tmp_path):
    ports = free_ports(3)
    started = time.monotonic()
    results = Meeting(ports, tmp_path, 20, ranks=[2, 1, 0], delays={0: 1.0, 1: 0.5}).join()
    assert results == {0: None, 1: None, 2: None}
    assert time.monotonic() - started < 10
    secret = tmp_path / rdv.SECRET_FILE
    assert secret.stat().st_mode & 0o777 == 0o600, "worker 0 creates the secret 0600"


@pytest.mark.timeout(60)
def test_a_missing_worker_is_named_by_rank_and_address_at_the_deadline(tmp_path):
    ports = free_ports(3)
    started = time.monotonic()
    results = Meeting(ports, tmp_path, 2.0, ranks=[0, 1]).join()
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 2.0 + 5
    for rank in (0, 1):
        err = results[rank]
        assert isinstance(err, TrainingStopped) and err.exit_code == EXIT_PEER_LOST, err
        assert f"worker 2 (127.0.0.1:{ports[2]}) did not join the rendezvous within 2 s" in str(err)
        assert "\n" not in str(err)
    assert "(reported by worker 0)" in str(results[1])


@pytest.mark.timeout(60)
def test_a_worker_without_worker_0_names_it(tmp_path):
    ports = free_ports(2)
    env = {1: {rdv.SECRET_ENV: str(secret_file(tmp_path / "s", "x" * 64))}}
    err = Meeting(ports, tmp_path, 1.5, ranks=[1], environ=env).join()[1]
    assert isinstance(err, TrainingStopped) and err.exit_code == EXIT_PEER_LOST
    assert f"worker 0 (127.0.0.1:{ports[0]}) did not join the rendezvous within 1.5 s" in str(err)
    assert "nothing listened on its port" in str(err)
    # Without DISTRAIN_SECRET_FILE it waits for worker 0's secret in the run dir, and says so.
    err = Meeting(ports, tmp_path / "run", 1.0, ranks=[1]).join()[1]
    assert isinstance(err, TrainingStopped) and "did not create the rendezvous secret" in str(err)
    assert not (tmp_path / "run").exists(), "only worker 0 writes in the run dir"


def _handshake(port: int, secret: bytes, rank: int, ports: list[int], timeout: float = 10) -> dict:
    """A hand-made client: the challenge, a join signed with ``secret``, worker 0's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        lines = rdv._Lines(sock)
        hello = lines.read(time.monotonic() + timeout)
        assert hello["proto"] == rdv.PROTOCOL
        digest = rdv.world_digest(world(rank, ports).worker_addresses)
        rdv._send(sock, {"rank": rank, "nonce": "n" * 32, "world": digest,
                         "mac": rdv.mac(secret, "join", hello["nonce"], "n" * 32, rank, digest)})
        return lines.read(time.monotonic() + timeout)


def _wait_listening(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while "0A" not in listen_states(port):  # 0A: LISTEN
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_peers_without_the_secret_are_refused_and_do_not_count(tmp_path):
    ports = free_ports(2)
    chief = Meeting(ports, tmp_path, 20, ranks=[0])
    _wait_listening(ports[0])
    # A wrong secret, a well-formed request without one, and plain garbage: refused, one by one.
    assert _handshake(ports[0], b"not-the-secret" * 4, 1, ports) == {"refused": "wrong secret"}
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as sock:
        lines = rdv._Lines(sock)
        lines.read(time.monotonic() + 10)
        rdv._send(sock, {"rank": 1, "nonce": "n"})
        assert lines.read(time.monotonic() + 10) == {"refused": "not a distrain rendezvous request"}
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        lines = rdv._Lines(sock)
        lines.read(time.monotonic() + 10)
        assert lines.read(time.monotonic() + 10) == {"refused": "not a distrain rendezvous request"}
    # A peer that holds a connection open and says nothing does not block the real worker.
    idle = socket.create_connection(("127.0.0.1", ports[0]), timeout=10)
    assert chief.results == {}, "worker 0 still waits: none of them counted"
    worker = Meeting(ports, tmp_path, 20, ranks=[1])
    assert worker.join() == {1: None}
    assert chief.join() == {0: None}
    idle.close()


@pytest.mark.timeout(60)
def test_a_worker_with_another_secret_file_is_told_so(tmp_path):
    ports = free_ports(2)
    env = {1: {rdv.SECRET_ENV: str(secret_file(tmp_path / "other", "y" * 64))}}
    results = Meeting(ports, tmp_path, 3, ranks=[0, 1], environ=env).join()
    assert isinstance(results[1], UsageError) and "refused worker 1: wrong secret" in str(results[1])
    assert isinstance(results[0], TrainingStopped) and f"worker 1 (127.0.0.1:{ports[1]})" in str(results[0])


@pytest.mark.timeout(60)
def test_a_worker_with_another_worker_list_is_refused(tmp_path):
    ports, other = free_ports(2), free_ports(1)
    chief = Meeting(ports, tmp_path, 3, ranks=[0])
    _wait_listening(ports[0])
    secret = (tmp_path / rdv.SECRET_FILE).read_text().split()[-1].encode()
    answer = _handshake(ports[0], secret, 1, [ports[0], other[0]])
    assert answer["refused"].startswith("its worker list differs from worker 0's")
    assert isinstance(chief.join()[0], TrainingStopped)


@pytest.mark.timeout(60)
def test_a_worker_does_not_trust_a_worker_0_without_the_secret(tmp_path):
    ports = free_ports(2)
    impostor = socket.socket()
    impostor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    impostor.bind(("127.0.0.1", ports[0]))
    impostor.listen(8)
    stop = threading.Event()

    def serve():  # speaks the protocol, but signs its welcome with a guess
        impostor.settimeout(0.2)
        while not stop.is_set():
            try:
                sock, _ = impostor.accept()
            except OSError:
                continue
            with sock:
                rdv._send(sock, {"proto": rdv.PROTOCOL, "nonce": "c" * 32})
                rdv._Lines(sock).read(time.monotonic() + 5)
                rdv._send(sock, {"welcome": "0" * 64, "deadline_in": 1})

    threading.Thread(target=serve, daemon=True).start()
    env = {1: {rdv.SECRET_ENV: str(secret_file(tmp_path / "s", "z" * 64))}}
    try:
        err = Meeting(ports, tmp_path, 2, ranks=[1], environ=env).join()[1]
    finally:
        stop.set()
        impostor.close()
    assert isinstance(err, TrainingStopped) and err.exit_code == EXIT_PEER_LOST
    assert "the process on its port does not hold the job's secret" in str(err)


@pytest.mark.timeout(60)
def test_the_listener_binds_worker_0s_address_only_and_frees_the_port(tmp_path):
    ports = free_ports(2)
    chief = Meeting(ports, tmp_path, 20, ranks=[0])
    _wait_listening(ports[0])
    # 127.0.0.2 is loopback too: a socket bound to all interfaces would accept it.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", ports[0]), timeout=5).close()
    assert Meeting(ports, tmp_path, 20, ranks=[1]).join() == {1: None}
    assert chief.join() == {0: None}
    # Worker 0 let the worker hang up first: nothing of the rendezvous lingers in TIME_WAIT (06)
    # on its port, and a server binds it at once (as TensorFlow's does, with SO_REUSEADDR).
    time.sleep(0.2)
    assert "06" not in listen_states(ports[0]), listen_states(ports[0])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", ports[0]))
    server.close()


@pytest.mark.timeout(30)
def test_a_single_process_or_a_world_without_addresses_does_nothing(tmp_path):
    rdv.meet(World(launcher="local"), tmp_path / "a", 0.01)
    rdv.meet(World(launcher="horovod", rank=1, world_size=2), tmp_path / "b", 0.01)  # horovodrun: its own
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.timeout(30)
def test_secret_files_others_can_read_or_do_not_own_are_refused(tmp_path):
    good = secret_file(tmp_path / "good", "distrain-secret " + "a" * 64 + "\n")
    assert rdv.read_secret(good, rdv.SECRET_ENV) == b"a" * 64
    with pytest.raises(UsageError, match=r"readable or writable by others \(mode 0644\); chmod 600 it"):
        rdv.read_secret(secret_file(tmp_path / "open", "a" * 64, 0o644), rdv.SECRET_ENV)
    with pytest.raises(UsageError, match="DISTRAIN_SECRET_FILE: no such file"):
        rdv.read_secret(tmp_path / "absent", rdv.SECRET_ENV)
    with pytest.raises(UsageError, match="at least 32 characters"):
        rdv.read_secret(secret_file(tmp_path / "short", "abc"), rdv.SECRET_ENV)
    (tmp_path / "link").symlink_to(good)
    with pytest.raises(UsageError, match="symbolic link"):
        rdv.read_secret(tmp_path / "link", rdv.SECRET_ENV)
    # Worker 0 creates the run dir's secret once and reuses it (a resumed or requeued run).
    first = rdv.create_secret(tmp_path)
    assert rdv.create_secret(tmp_path) == first and len(first) == 64
    assert (tmp_path / rdv.SECRET_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.timeout(10)
def test_missing_message_is_one_line_naming_rank_and_address():
    text = rdv.missing_message([1, 3], ["h0:1", "h1:2", "h2:3", "h3:4"], 120)
    assert text.startswith("start-up: workers 1 (h1:2), 3 (h3:4) did not join the rendezvous within 120 s "
                           "(distribute.startup_timeout_s)")
    assert "\n" not in text


# ----------------------------------------------------------------------------- real processes

JOB = """
name: rdv
seed: 5
model: {{name: mlp, params: {{dropout: 0.0}}}}
data: {{source: digits, batch_size_per_replica: 16}}
train: {{epochs: 1, steps_per_epoch: 3}}
distribute: {{strategy: multi_worker, startup_timeout_s: {timeout}, collective_timeout_s: 60}}
checkpoint: {{every_epochs: 1, backup_every_steps: 0}}
logging: {{tensorboard: false, verbose: 0}}
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_worker_started_without_its_peer_exits_76_naming_it(tmp_path, workers_factory):
    timeout = 6
    job = write_job(tmp_path / "job.yaml", JOB.format(timeout=timeout))
    chief_ports, worker_ports = free_ports(2), free_ports(2)
    secret = secret_file(tmp_path / "secret", "s" * 64)
    cmd = lambda run: [*DISTRAIN, "train", str(job), "--run-dir", str(tmp_path / run)]  # noqa: E731
    # Worker 0 of one job, whose worker 1 never starts; worker 1 of another, whose worker 0 never starts.
    started = time.monotonic()
    alone = workers_factory([cmd("run0"), cmd("run1")],
                            [worker_env(TF_CONFIG=tf_config(chief_ports, 0)),
                             worker_env(TF_CONFIG=tf_config(worker_ports, 1), DISTRAIN_SECRET_FILE=secret)])
    codes = alone.wait(timeout=timeout + 60)
    elapsed = time.monotonic() - started
    assert codes == [EXIT_PEER_LOST, EXIT_PEER_LOST], alone.output()
    # The deadline plus Python's start (no TensorFlow is imported before the rendezvous).
    assert elapsed < timeout + 15, f"took {elapsed:.0f} s"
    last = [log.read_text().strip().splitlines()[-1] for log in alone.logs]
    assert last[0].startswith(f"distrain: start-up: worker 1 (127.0.0.1:{chief_ports[1]}) did not join the "
                              f"rendezvous within {timeout} s (distribute.startup_timeout_s)"), last[0]
    assert last[1].startswith(f"distrain: start-up: worker 0 (127.0.0.1:{worker_ports[0]}) did not join the "
                              f"rendezvous within {timeout} s"), last[1]
    assert not (tmp_path / "run0" / "summary.json").exists()


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_two_workers_with_the_run_dirs_secret_meet_and_train(tmp_path, workers_factory):
    job = write_job(tmp_path / "job.yaml", JOB.format(timeout=120))
    ports = free_ports(2)
    run_dir = tmp_path / "run"
    cmd = [*DISTRAIN, "train", str(job), "--run-dir", str(run_dir)]
    # Worker 1 first: it waits for worker 0's secret and listener, then both train.
    worker = workers_factory([cmd], [worker_env(TF_CONFIG=tf_config(ports, 1))], tmp_path / "logs1")
    time.sleep(3)
    chief = workers_factory([cmd], [worker_env(TF_CONFIG=tf_config(ports, 0))], tmp_path / "logs0")
    assert chief.wait(timeout=180) == [0], chief.output() + worker.output()
    assert worker.wait(timeout=60) == [0], worker.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["strategy"], summary["steps"]) == (2, "multi_worker", 3)
    assert "rendezvous: all 2 workers present" in (run_dir / "logs" / "rank0.log").read_text()
    assert "rendezvous: joined worker 0" in (run_dir / "logs" / "rank1.log").read_text()
    assert (run_dir / rdv.SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert os.stat(run_dir / rdv.SECRET_FILE).st_uid == os.geteuid()
