"""A peer that stops answering without closing its sockets: frozen (SIGSTOP), stalled in Python, or
cut off (every packet between two network namespaces dropped). The others exit 76 within
``distribute.collective_timeout_s`` (plus TensorFlow's shutdown), and the rerun, as a requeue
starts it, resumes from the backup and ends with the uninterrupted run's test loss and accuracy,
bit for bit (the same world).

- multi_worker: worker 1 freezes itself (SIGSTOP) after step 5; worker 0 exits 76, worker 1 is
  killed as a requeue kills it, and the rerun resumes from the backup of step 4.
- Horovod (horovodrun, Gloo): rank 1 freezes after step 5, and in the rerun stalls in a callback
  after step 7 (alive, its Horovod answering: only distrain's watchdog ends that wait; without it
  the job waited forever); each time rank 0 exits 76, then the last rerun ends exact.
- A cut network: 2 workers in two network namespaces (cluster/netns-pair.sh); mid-run every
  packet between them is dropped; both exit 76; the network is restored and the rerun, in the
  same namespaces, ends exact.

Horovod's tests skip without Horovod and the network's without root and iproute2, unless
``DISTRAIN_REQUIRE_HOROVOD`` / ``DISTRAIN_REQUIRE_NETNS`` is set (conftest's ``needs_*``).
"""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import (DISTRAIN, REPO, Forked, Workers, backup_step, free_ports, horovodrun, tf_config, worker_env,
                      write_job)

from distrain.errors import EXIT_PEER_LOST

TIMEOUT_S = 10  # distribute.collective_timeout_s
STEPS = 8
# 2 epochs of 4 steps; backups at steps 3, 4 (epoch end), 6 and 8.
JOB = """
name: silent
seed: 11
model: {{name: mlp, params: {{dropout: 0.0}}}}
data: {{source: digits, batch_size_per_replica: 16}}
train: {{epochs: 2, steps_per_epoch: 4, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none}}
distribute: {{strategy: {strategy}, collective_timeout_s: {timeout}, startup_timeout_s: 60}}
checkpoint: {{every_epochs: 1, keep: 2, backup_every_steps: 3}}
logging: {{tensorboard: false, verbose: 0}}
"""

# `distrain train JOB --run-dir RUN_DIR` in which, after optimizer step AT, rank 1 freezes (SIGSTOP
# to itself: alive, its sockets open, nothing answered) or stalls (asleep in a callback: its
# runtime, heartbeats and Horovod's background thread all running); "slow" makes every worker
# sleep 0.5 s after each step (the same numbers, a run long enough to cut its network mid-run).
SILENCE = """
import json, os, signal, sys, time
from pathlib import Path
import distrain
import tensorflow as tf
from distrain import cli

job, run_dir, how, at = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rank = int(os.environ.get("HOROVOD_RANK") or json.loads(os.environ["TF_CONFIG"])["task"]["index"])

class Silence(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if how == "slow":
            time.sleep(0.5)
        elif rank == 1 and int(self.model.optimizer.iterations.numpy()) == at:
            print(f"{how} at {time.time():.3f} pid {os.getpid()}", flush=True)
            if how == "freeze":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(3600)

real_train = cli.train
cli.train = lambda spec, run_dir, **kwargs: real_train(spec, run_dir, extra_callbacks=[Silence()], **kwargs)
sys.exit(cli.main(["train", job, "--run-dir", str(run_dir)]))
"""
LOST_LINE = (r"distrain: lost (worker \d \([\d.:]+\)|a peer \(one of [^)]+\)): .+; rerun with the same run dir to "
             r"resume from the backup")


def job(path: Path, strategy: str) -> Path:
    return write_job(path, JOB.format(strategy=strategy, timeout=TIMEOUT_S))


def silenced(job_file: Path, run_dir: Path, how: str, at: int = 0) -> list[str]:
    return [sys.executable, "-c", SILENCE, str(job_file), str(run_dir), how, str(at)]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def silenced_at(text: str, how: str) -> float:
    """When rank 1 said it froze or stalled (its clock: the same machine's)."""
    found = re.search(rf"{how} at (\d+\.\d+)", text)
    assert found, f"rank 1 never got to {how}:\n{text[-3000:]}"
    return float(found.group(1))


def wait_for_line(path: Path, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.05)
    pytest.fail(f"{path} never said {pattern!r} within {timeout:.0f} s:\n" + (path.read_text()[-3000:] if path.exists()
                                                                              else "(no file)"))


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_ends_exact(run_dir: Path, reference: Path, resumed_from: int) -> None:
    done, uninterrupted = summary(run_dir), summary(reference)
    assert (done["steps"], done["resumed_from_step"]) == (STEPS, resumed_from)
    assert done["test"] == uninterrupted["test"]  # loss and accuracy, bit for bit


def process_state(pid: int) -> str:
    """The one-letter state in /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


# ----------------------------------------------------------------------------- multi_worker

def forked_pair(args: list, envs: list[dict], log_dir: Path, request, code: str | None = None) -> list[Forked]:
    """Two workers forked from the session's fork server (``Forked``), each killed at the test's end."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pair = [Forked(args, log_dir / f"worker{i}.log", env=env, code=code) for i, env in enumerate(envs)]
    for run in pair:
        request.addfinalizer(run.kill)
    return pair


def pair_output(pair: list[Forked], tail: int = 40) -> str:
    """The last lines of each worker's output, for a failure's message."""
    return "\n".join(f"--- worker {i} ---\n" + "\n".join(run.stdout.read_text(errors="replace").splitlines()[-tail:])
                     for i, run in enumerate(pair))


class Uninterrupted:
    """An uninterrupted run started beside the faulted ones, which spend most of their time waiting
    for a timeout with the cores idle; ``run_dir()`` waits for it to end."""

    def __init__(self, workers: Workers, run_dir: Path):
        self.workers, self._run_dir, self._ended = workers, run_dir, False

    def run_dir(self) -> Path:
        if not self._ended:
            assert self.workers.wait(timeout=240) == [0] * len(self.workers.procs), self.workers.output()
            assert summary(self._run_dir)["steps"] == STEPS
            self._ended = True
        return self._run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request) -> Uninterrupted:
    """The uninterrupted 2-worker multi_worker run, started now, waited for when a test compares with it."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    ports = free_ports(2)
    workers = Workers([[*DISTRAIN, "train", str(job(tmp / "job.yaml", "multi_worker")), "--run-dir", str(tmp / "run")]]
                      * 2, [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)], tmp / "logs")
    request.addfinalizer(workers.kill)
    return Uninterrupted(workers, tmp / "run")


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_a_frozen_worker_ends_the_other_with_76_and_the_requeue_resumes_exact(tmp_path, request, reference):
    run_dir, job_file = tmp_path / "run", job(tmp_path / "job.yaml", "multi_worker")
    ports = free_ports(2)
    envs = [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)]
    # Forked (conftest.Forked): a fresh process's start-up is not the point here (test_collectives
    # stops a worker that started as a process of its own).
    first = forked_pair([job_file, run_dir, "freeze", 5], envs, tmp_path / "logs1", request, code=SILENCE)
    frozen_at = silenced_at(wait_for_line(first[1].stdout, r"freeze at \d", 240), "freeze")
    code = first[0].wait(timeout=TIMEOUT_S + 90).returncode
    waited = time.time() - frozen_at
    assert code == EXIT_PEER_LOST, pair_output(first)
    assert process_state(first[1].pid) == "T", "worker 1 is frozen, not gone"
    assert waited < TIMEOUT_S + 30, f"worker 0 took {waited:.0f} s to give up"
    assert re.fullmatch(LOST_LINE, last_line(first[0].stdout.read_text())), pair_output(first)
    first[1].kill()  # what a requeue does to the frozen task (only SIGKILL ends a stopped process)
    assert backup_step(run_dir) == 4

    second = forked_pair(["train", job_file, "--run-dir", run_dir], envs, tmp_path / "logs2", request)
    assert [run.wait(timeout=240).returncode for run in second] == [0, 0], pair_output(second)
    assert_ends_exact(run_dir, reference.run_dir(), resumed_from=4)


# ----------------------------------------------------------------------------- Horovod

def test_gloo_waits_for_a_peer_no_longer_than_the_collective_timeout():
    from distrain.backends.horovod import gloo_timeout_s

    # Horovod's 30 s, shorter when the job's deadline is shorter; whole seconds, at least 1.
    assert [gloo_timeout_s(t) for t in (300.0, 30.0, 10.0, 9.2, 0.3)] == [30, 30, 10, 10, 1]


def test_the_horovod_watchdog_shuts_horovod_down_when_no_step_finishes(caplog):
    from distrain.backends.horovod import HorovodDistribution
    from distrain.world import World

    shutdowns = []
    hvd = types.SimpleNamespace(size=lambda: 2, shutdown=lambda: shutdowns.append(time.monotonic()))
    dist = HorovodDistribution(World(launcher="horovod", world_size=2), hvd, collective_timeout_s=0.3)
    assert [type(c).__name__ for c in dist.callbacks(None, 4, 0)] == ["Heartbeat", "MetricAverage"]
    with caplog.at_level("WARNING", logger="distrain"), dist.collective_deadline():
        armed = time.monotonic()
        for _ in range(25):  # beaten for 0.5 s: no expiry
            dist.callbacks(None, 4, 0)[0].on_train_batch_end(0)
            time.sleep(0.02)
        assert not shutdowns
        deadline = time.monotonic() + 10
        while not shutdowns and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(shutdowns) == 1 and shutdowns[0] - armed >= 0.5
    assert caplog.messages == ["no step finished for 0.3 s (distribute.collective_timeout_s): a peer is lost or "
                               "stalled; shutting Horovod down"]
    one = HorovodDistribution(World(launcher="horovod", world_size=1), types.SimpleNamespace(size=lambda: 1))
    assert one.callbacks(None, 4, 0) == [] and one.evaluation_callbacks() == []


def test_leaving_an_expired_deadline_waits_for_the_expiry_to_finish():
    from distrain.backends.watchdog import Watchdog

    finished = []

    def expire(_message):  # as Horovod's shutdown: it takes a while, and must be over before the exit
        time.sleep(0.5)
        finished.append(time.monotonic())

    dog = Watchdog(0.1, expire)
    with dog.armed():
        deadline = time.monotonic() + 10
        while not dog.expired and time.monotonic() < deadline:
            time.sleep(0.01)
    left = time.monotonic()
    assert dog.expired and finished and finished[0] <= left


def horovod_start(command: list[str], log_dir: Path, request) -> Workers:
    """horovodrun with 2 ranks, started (killed at the test's end)."""
    workers = Workers([horovodrun(command)], [worker_env()], log_dir)
    request.addfinalizer(workers.kill)
    return workers


def horovod_attempt(command: list[str], log_dir: Path, request, timeout: float = 240) -> tuple[int, str]:
    """horovodrun with 2 ranks, waited for: (its exit code, its output)."""
    workers = horovod_start(command, log_dir, request)
    (code,) = workers.wait(timeout=timeout)
    return code, workers.logs[0].read_text(errors="replace")


def end_silenced(workers: Workers, how: str, timeout: float = 240) -> tuple[int, str, float]:
    """Waits for rank 0 to exit, then kills the silenced rank 1, as a requeue's scancel does:
    horovodrun would first send it SIGTERM, which neither a frozen nor a stalled rank heeds, and
    give it and its shell 5 s of grace each. (horovodrun's exit code, its output, when rank 0 exited)."""
    text = wait_for_line(workers.logs[0], r"Process 0 exit with status code -?\d+\.", timeout)
    ended = time.time()
    found = re.search(rf"{how} at [\d.]+ pid (\d+)", text)
    assert found, f"rank 1 never got to {how}:\n{text[-3000:]}"
    try:
        group = os.getpgid(int(found.group(1)))  # its own, from horovodrun's middleman (setsid)
        assert group not in (os.getpgid(0), workers.procs[0].pid), "rank 1 shares a process group with horovodrun"
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:  # horovodrun was quicker
        pass
    (code,) = workers.wait(timeout=60)
    return code, workers.logs[0].read_text(errors="replace"), ended


def rank0_last_line(output: str) -> str:
    """The last line rank 0 wrote to its stderr (horovodrun prefixes each line with [rank]<stream>:)."""
    lines = [line.split(":", 1)[1] for line in output.splitlines() if line.startswith("[0]<stderr>:")]
    return last_line("\n".join(lines))


@pytest.mark.multiprocess
@pytest.mark.horovod
@pytest.mark.timeout(600)
def test_under_horovod_a_frozen_then_a_stalled_rank_end_the_job_with_76_and_the_rerun_resumes_exact(
        needs_horovod, tmp_path, request):
    job_file, run_dir = job(tmp_path / "job.yaml", "horovod"), tmp_path / "run"
    # Frozen: Gloo's timeout, set to the job's 10 s (Horovod's own is 30 s), or the watchdog ends it.
    frozen = horovod_start(silenced(job_file, run_dir, "freeze", at=5), tmp_path / "logs1", request)
    frozen_at = silenced_at(wait_for_line(frozen.logs[0], r"freeze at \d", 240), "freeze")
    # The uninterrupted run trains while rank 0 only waits for its deadline. Not started together
    # with the frozen run: beside a second starting horovodrun, rank 1 of the frozen run once failed
    # to start ("Horovod has not been initialized").
    uninterrupted = horovod_start([*DISTRAIN, "train", str(job_file), "--run-dir", str(tmp_path / "reference")],
                                  tmp_path / "logs0", request)
    code, output, ended = end_silenced(frozen, "freeze")
    waited = ended - frozen_at
    assert code != 0 and "Process 0 exit with status code 76." in output, output[-3000:]
    assert re.fullmatch(LOST_LINE, rank0_last_line(output)), output[-3000:]
    assert "Timed out waiting 10000ms" in output or "no step finished for 10 s" in output, output[-3000:]
    assert waited < TIMEOUT_S + 30, f"rank 0 took {waited:.0f} s to give up"
    assert backup_step(run_dir) == 4
    assert uninterrupted.wait(timeout=240) == [0], uninterrupted.output()

    # Stalled in Python: only the watchdog ends it (Horovod's stall check only warns).
    stalled = horovod_start(silenced(job_file, run_dir, "stall", at=7), tmp_path / "logs2", request)
    code, output, ended = end_silenced(stalled, "stall")
    waited = ended - silenced_at(output, "stall")
    assert code != 0 and "Process 0 exit with status code 76." in output, output[-3000:]
    assert "no step finished for 10 s (distribute.collective_timeout_s): a peer is lost or stalled; shutting " \
           "Horovod down" in output, output[-3000:]
    assert re.fullmatch(LOST_LINE, rank0_last_line(output)), output[-3000:]
    assert waited < TIMEOUT_S + 30, f"rank 0 took {waited:.0f} s to give up"
    assert backup_step(run_dir) == 6

    code, output = horovod_attempt([*DISTRAIN, "train", str(job_file), "--run-dir", str(run_dir)],
                                   tmp_path / "logs3", request)
    assert code == 0, output[-3000:]
    assert_ends_exact(run_dir, tmp_path / "reference", resumed_from=6)


# ----------------------------------------------------------------------------- a cut network

HOSTS = ("10.213.0.1", "10.213.0.2")  # cluster/netns-pair.sh's, inside the namespaces only
PORT = 23456  # the namespaces are ours: any port is free, and the rerun uses the same (a requeue's)


def cut(name: str, dropping: bool) -> None:
    """Drops every packet leaving either end of the pair (tbf with a 1-byte bucket passes none;
    this kernel has neither netem nor iptables), or removes that again."""
    for ns in (f"{name}-a", f"{name}-b"):
        args = (["replace", "dev", "veth0", "root", "tbf", "rate", "8bit", "burst", "1", "limit", "1"] if dropping
                else ["del", "dev", "veth0", "root"])
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", *args], check=True, timeout=30)


def worker_commands(tmp_path: Path, job_file: Path, run_dir: Path) -> list[str]:
    """Each worker's shell command: the run (slowed down), its exit code, a wait for the network to
    come back (the file ``restored``), the rerun, its exit code."""
    commands = []
    for rank in range(2):
        config = json.dumps({"cluster": {"worker": [f"{h}:{PORT}" for h in HOSTS]},
                             "task": {"type": "worker", "index": rank}})
        env = f"TF_CONFIG={shlex.quote(config)}"
        first = shlex.join(silenced(job_file, run_dir, "slow"))
        rerun = shlex.join([*DISTRAIN, "train", str(job_file), "--run-dir", str(run_dir)])
        commands.append(
            f"{env} {first} > {tmp_path}/first{rank}.log 2>&1; echo $? $(date +%s.%N) > {tmp_path}/first{rank}.rc; "
            f"n=0; while [ ! -e {tmp_path}/restored ] && [ $n -lt 1800 ]; do sleep 0.1; n=$((n+1)); done; "
            f"{env} {rerun} > {tmp_path}/rerun{rank}.log 2>&1; echo $? > {tmp_path}/rerun{rank}.rc")
    return commands


def remove_namespaces(name: str) -> None:
    """Backstop when the script could not clean up: what runs in the namespaces, then the namespaces."""
    for ns in (f"{name}-a", f"{name}-b"):
        if not Path("/var/run/netns", ns).exists():
            continue
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_a_cut_network_ends_both_workers_with_76_and_the_rerun_once_it_is_back_ends_exact(needs_netns, tmp_path,
                                                                                           reference):
    job_file, run_dir = job(tmp_path / "job.yaml", "multi_worker"), tmp_path / "run"
    name = f"dtcut{os.getpid() % 100000}{random.randrange(100)}"
    script = subprocess.Popen([str(REPO / "cluster" / "netns-pair.sh"), "--name", name, "--",
                               *worker_commands(tmp_path, job_file, run_dir)],
                              env=worker_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while backup_step(run_dir) < 3:
            assert script.poll() is None and time.monotonic() < deadline, "the run did not reach its first backup"
            time.sleep(0.05)
        cut(name, dropping=True)
        cut_at = time.time()
        ends = [tmp_path / f"first{rank}.rc" for rank in range(2)]
        deadline = time.monotonic() + TIMEOUT_S + 90
        while not all(p.exists() for p in ends):
            assert time.monotonic() < deadline, "a worker did not end after the network was cut"
            time.sleep(0.05)
        finished = [p.read_text().split() for p in ends]
        logs = [(tmp_path / f"first{rank}.log").read_text(errors="replace") for rank in range(2)]
        assert [int(code) for code, _ in finished] == [EXIT_PEER_LOST] * 2, "\n".join(log[-3000:] for log in logs)
        waited = max(float(at) for _, at in finished) - cut_at
        assert waited < TIMEOUT_S + 30, f"the workers took {waited:.0f} s to give up"
        for log in logs:
            assert re.fullmatch(LOST_LINE, last_line(log)), log[-3000:]
        resumed_from = backup_step(run_dir)
        assert 3 <= resumed_from < STEPS

        cut(name, dropping=False)
        (tmp_path / "restored").touch()
        out, _ = script.communicate(timeout=300)
        assert script.returncode == 0, out
        reruns = [int((tmp_path / f"rerun{rank}.rc").read_text()) for rank in range(2)]
        assert reruns == [0, 0], "\n".join((tmp_path / f"rerun{rank}.log").read_text()[-3000:] for rank in range(2))
        assert_ends_exact(run_dir, reference.run_dir(), resumed_from=resumed_from)
    finally:
        if script.poll() is None:
            script.terminate()  # the script stops what runs in the namespaces and removes them
            try:
                script.wait(timeout=60)
            except subprocess.TimeoutExpired:
                script.kill()
        remove_namespaces(name)
    assert not Path("/var/run/netns", f"{name}-a").exists()
