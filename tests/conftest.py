"""Shared test helpers and fixtures: real worker processes on 127.0.0.1, always bounded by a timeout;
runs forked from one process that imported TensorFlow once (``Forked``, ``run_distrain(forked=True)``);
the ``needs_*`` fixtures for what a machine may lack (Horovod, shellcheck, network namespaces); one
local SLURM of each size per session; the 2-worker run that test_tensorboard.py and test_report.py read.

Test modules import helpers from here (``from conftest import ...``) or from ``helpers.py``, never
from another test module.

A ``needs_*`` fixture skips its tests where the tool is missing, unless the matching
``DISTRAIN_REQUIRE_*`` variable is set (``scripts/test.sh`` sets them all, as CI runs): then they
fail. SLURM and Ray have theirs in ``slurm_cluster.py`` and ``ray_cluster.py``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NoReturn, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRAIN = [sys.executable, "-m", "distrain.cli"]

sys.path.insert(0, str(REPO / "cluster"))
from free_ports import free_port_block, free_ports  # noqa: E402  (ports below the ephemeral range)


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def worker_env(**extra) -> dict:
    """A clean environment for a worker: no launcher variables inherited from whoever runs pytest."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "HOROVOD_")) and k not in ("TF_CONFIG", "DISTRAIN_RUN_ID")}
    # Two workers share two cores here; one thread each keeps them from fighting.
    env.update({"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "CUDA_VISIBLE_DEVICES": "-1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Workers:
    """Processes started together; ``wait`` bounds them and kills every one on timeout."""

    def __init__(self, commands: list[list[str]], envs: list[dict], log_dir: Path, cwd: Path = REPO):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"worker{i}.log" for i in range(len(commands))]
        self.procs = []
        for cmd, env, log in zip(commands, envs, self.logs):
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"workers did not finish within {timeout}s (a hung collective?)\n" + self.output())
        return [p.returncode for p in self.procs]

    def kill(self, sig=signal.SIGKILL) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def output(self, tail: int = 40) -> str:
        return "\n".join(f"--- worker {i} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-tail:])
                         for i, log in enumerate(self.logs))


@pytest.fixture
def workers_factory(tmp_path):
    started = []

    def start(commands, envs, log_dir=None):
        w = Workers(commands, envs, log_dir or tmp_path / "logs")
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def write_job(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_distrain(args: list[str], timeout: float = 300, env: dict | None = None, cwd: Path = REPO,
                 forked: bool = False) -> subprocess.CompletedProcess:
    """Runs ``distrain ARGS`` in a fresh process; a test fails, not hangs, past the timeout.

    ``forked``: in a process forked from one that has imported TensorFlow and distrain once
    (``Forked``; about 4 s less a run), for a run whose point is not a fresh process's start-up."""
    if not forked:
        return subprocess.run([*DISTRAIN, *args], capture_output=True, text=True, timeout=timeout,
                              env=env or worker_env(), cwd=cwd)
    with tempfile.TemporaryDirectory(prefix="forked-run-") as where:
        return Forked(args, Path(where) / "stdout", stderr=Path(where) / "stderr", env=env, cwd=cwd).wait(timeout)


def run_python(code: str, args: list[str], timeout: float = 300, env: dict | None = None,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -c CODE ARGS`` (a run with callbacks of the test's own), forked as ``Forked``: for a
    script that imports distrain and TensorFlow first, as the fork server has; killed past the timeout."""
    with tempfile.TemporaryDirectory(prefix="forked-run-") as where:
        return Forked(args, Path(where) / "stdout", stderr=Path(where) / "stderr", env=env, cwd=cwd,
                      code=code).wait(timeout)


class Forked:
    """``distrain ARGS`` (or, with ``code``, ``python -c CODE ARGS``) in a process forked from the
    session's fork server (tests/forked_runs.py), which imported TensorFlow and distrain once: about
    4 s less than a fresh process. Not for a run whose point is a fresh process's start-up, nor
    where the environment must be there before TensorFlow's import (``TF_CPP_*``, ``PYTHONPATH``,
    ``DISTRAIN_MALLOC``). The child leads its own process group; ``pid`` is its pid."""

    def __init__(self, args: list[str], stdout: Path, *, stderr: Path | None = None, env: dict | None = None,
                 cwd: Path = REPO, code: str | None = None):
        self.server = _fork_server()
        # What the child's environment changes of the server's (worker_env(); what importing
        # distrain set there, TF_USE_LEGACY_KERAS, stays).
        wanted, base = env or worker_env(), _FORK_SERVER["env"]
        changes = {k: v for k, v in wanted.items() if base.get(k) != v}
        changes.update({k: None for k in base if k not in wanted})
        self.args, self.stdout, self.stderr = [str(a) for a in args], stdout, stderr
        self.command = [sys.executable, "-c", code, *self.args] if code is not None else [*DISTRAIN, *self.args]
        self.pid = self.server.start(self.args, stdout, changes, stderr=stderr, cwd=cwd, code=code)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Its exit code (minus the signal that ended it) and output; killed past ``timeout``
        (``subprocess.TimeoutExpired``, as ``subprocess.run`` raises)."""
        code = self.server.wait(self.pid, time.monotonic() + timeout)
        read = lambda path: path.read_text(errors="replace") if path and path.exists() else ""  # noqa: E731
        if code is None:
            self.kill()
            raise subprocess.TimeoutExpired(self.command, timeout, read(self.stdout), read(self.stderr))
        return subprocess.CompletedProcess(self.command, code, read(self.stdout), read(self.stderr))

    def poll(self) -> Optional[int]:
        """Its exit code (minus the signal that ended it) if it has ended, else None."""
        return self.server.wait(self.pid, time.monotonic())

    def kill(self) -> None:
        """Kills it if it still runs (once it has ended its pid may be another process's)."""
        if self.server.wait(self.pid, time.monotonic()) is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.server.wait(self.pid, time.monotonic() + 30)


_FORK_SERVER: dict = {}  # the one fork server of this pytest session: its process, client and socket dir


def _fork_server():
    """The session's fork server (tests/forked_runs.py), started on first use, stopped at the session's end."""
    from forked_runs import ForkServer

    if _FORK_SERVER and _FORK_SERVER["process"].poll() is None:
        return _FORK_SERVER["client"]
    where = tempfile.mkdtemp(prefix="distrain-fork-", dir="/tmp")  # short: a unix socket's path is limited
    log, env = open(Path(where) / "server.log", "w"), worker_env()
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / "forked_runs.py"), str(Path(where) / "sock")],
                               env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    _FORK_SERVER.update(process=process, client=ForkServer(Path(where) / "sock"), dir=where, env=env)
    return _FORK_SERVER["client"]


def pytest_sessionfinish(session, exitstatus) -> None:
    """Stops the fork server, if one was started: closing its socket ends it and what it still runs."""
    if not _FORK_SERVER:
        return
    _FORK_SERVER["client"].close()
    try:
        _FORK_SERVER["process"].wait(timeout=30)
    except subprocess.TimeoutExpired:
        _FORK_SERVER["process"].kill()
        _FORK_SERVER["process"].wait(timeout=30)
    shutil.rmtree(_FORK_SERVER["dir"], ignore_errors=True)


def model_weights(run_dir: Path) -> list:
    """The weights of a run's ``model.keras`` (loaded in safe mode, without the optimizer)."""
    import distrain  # noqa: F401  (tf-keras for tf.keras)
    import tensorflow as tf

    model = tf.keras.models.load_model(str(run_dir / "model.keras"), safe_mode=True, compile=False)
    return [w.numpy() for w in model.weights]


def assert_same_weights(a: list, b: list, tol: float = 1e-5) -> None:
    """Each weight tensor of ``a`` within ``tol`` relative (L2) distance of ``b``'s."""
    import numpy as np

    assert len(a) == len(b)
    for x, y in zip(a, b):
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)
        assert rel <= tol, f"relative difference {rel:.2e} > {tol}"


def backup_step(run_dir: Path) -> int:
    """The global step of a run's latest backup (0 without one)."""
    from distrain.rundir import RunDir

    return RunDir(run_dir).backup_step()


def files_written(trace: Path, under: Path | None = None) -> set[str]:
    """Paths a process opened for writing, created or renamed something to, from its strace log
    (``strace -f -e trace=open,openat,creat,rename,renameat,renameat2``). With ``under``: only the
    paths below it, relative to it."""
    import re

    written = set()
    for line in trace.read_text(errors="replace").splitlines():
        if line.rstrip().endswith(("ENOENT (No such file or directory)", "EEXIST (File exists)")):
            continue
        m = re.search(r'(?:open|openat|creat)\((?:AT_FDCWD, )?"([^"]+)"(?:, ([A-Z_|]+))?', line)
        if m and ("creat(" in line or re.search(r"O_WRONLY|O_RDWR|O_CREAT", m.group(2) or "")):
            written.add(m.group(1))
            continue
        m = re.search(r'rename(?:at2?)?\((?:AT_FDCWD, )?"[^"]+", (?:AT_FDCWD, )?"([^"]+)"', line)
        if m:
            written.add(m.group(1))
    if under is None:
        return written
    root = str(Path(under).resolve())
    return {os.path.relpath(p, root) for p in written if p == root or p.startswith(root + os.sep)}


# ----------------------------------------------------------------------------- what a machine may lack

def required(variable: str) -> bool:
    """Whether a missing tool must fail its tests instead of skipping them: ``variable`` (a
    ``DISTRAIN_REQUIRE_*``) is set to anything but "" or "0" (scripts/test.sh sets it to 1)."""
    return os.environ.get(variable, "") not in ("", "0")


def skip_or_fail(variable: str, reason: str) -> NoReturn:
    """Skips the calling test (or fixture) because of ``reason``; fails it when ``variable`` is required."""
    if required(variable):
        pytest.fail(f"{variable} is set but {reason}", pytrace=False)
    pytest.skip(reason)


HOROVODRUN = Path(sys.executable).parent / "horovodrun"


def horovod_missing() -> Optional[str]:
    """Why Horovod cannot run here (None: ``horovod.tensorflow`` imports and ``horovodrun`` exists)."""
    try:
        import horovod.tensorflow  # noqa: F401
    except Exception as err:  # an ImportError, or the extension failing to load
        return f"Horovod is not installed ({type(err).__name__}: {err}); scripts/install-horovod.sh builds it"
    if not HOROVODRUN.exists():
        return f"horovod.tensorflow imports but {HOROVODRUN} is missing; scripts/install-horovod.sh installs it"
    return None


@pytest.fixture(scope="session")
def needs_horovod() -> None:
    """Skips a test where Horovod is not built; fails it instead under ``DISTRAIN_REQUIRE_HOROVOD``."""
    reason = horovod_missing()
    if reason:
        skip_or_fail("DISTRAIN_REQUIRE_HOROVOD", reason)


def horovodrun(command: list[str]) -> list[str]:
    """``horovodrun`` starting ``command`` as 2 ranks on this host over Gloo."""
    # --network-interface lo: Gloo binds 127.0.0.1 only. horovodrun's own rendezvous server
    # listens on every interface whatever is given (docs/horovod.md).
    return [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", "--network-interface", "lo",
            "--start-timeout", "120", *command]


@pytest.fixture(scope="session")
def needs_shellcheck() -> None:
    """Skips a test where shellcheck is not installed; fails it instead under ``DISTRAIN_REQUIRE_SHELLCHECK``."""
    if not shutil.which("shellcheck"):
        skip_or_fail("DISTRAIN_REQUIRE_SHELLCHECK", "shellcheck is not installed (scripts/test.sh installs it)")


def netns_missing() -> Optional[str]:
    """Why network namespaces cannot be made here (None: root, ``ip`` and ``tc``, and ``ip netns`` works)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if not shutil.which(tool)]
    if missing:
        return f"{' and '.join(missing)} not found (iproute2; scripts/test.sh installs it)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return None if probe.returncode == 0 else f"ip netns does not work here: {probe.stderr.strip()}"


@pytest.fixture(scope="session")
def needs_netns() -> None:
    """Skips a test where network namespaces cannot be made (not root, no iproute2); fails it instead
    under ``DISTRAIN_REQUIRE_NETNS``."""
    reason = netns_missing()
    if reason:
        skip_or_fail("DISTRAIN_REQUIRE_NETNS", reason)


def tmpfs_missing() -> Optional[str]:
    """Why a tmpfs cannot be mounted here (None: it can; a 64 KiB one was mounted and unmounted)."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if not (shutil.which("mount") and shutil.which("umount")):
        return "mount/umount not found (util-linux)"
    with tempfile.TemporaryDirectory() as where:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", where], capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            return f"mount -t tmpfs fails here: {done.stderr.strip()}"
        subprocess.run(["umount", where], check=True, timeout=30)
    return None


@pytest.fixture(scope="session")
def needs_tmpfs() -> None:
    """Skips a test where a tmpfs cannot be mounted (not root, a container without the right);
    fails it instead under ``DISTRAIN_REQUIRE_TMPFS``."""
    reason = tmpfs_missing()
    if reason:
        skip_or_fail("DISTRAIN_REQUIRE_TMPFS", reason)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created): a disk that fills up; always unmounted on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], timeout=60)  # busy: detach it now, freed when unused


# ----------------------------------------------------------------------------- local SLURM clusters

@pytest.fixture(scope="session")
def slurm_one_node(tmp_path_factory):
    """A local SLURM with one node (slurm_cluster.local_slurm), one for the whole session: a module
    that defines its own (``slurm_fixture``) starts another, and every one is stopped only at the
    session's end (~4 s each)."""
    from slurm_cluster import local_slurm

    with local_slurm(1, tmp_path_factory.mktemp("slurm1n")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    """A local SLURM with two nodes, one for the whole session (as ``slurm_one_node``)."""
    from slurm_cluster import local_slurm

    with local_slurm(2, tmp_path_factory.mktemp("slurm2n")) as cluster:
        yield cluster


# ----------------------------------------------------------------------------- tests that need a GPU

_GPU_PROBE = ("import distrain\nfrom distrain.tf_startup import import_tensorflow\n"
              "print(len(import_tensorflow().config.list_physical_devices('GPU')))")


@functools.lru_cache(maxsize=None)
def tensorflow_sees_a_gpu() -> bool:
    """Whether TensorFlow sees a GPU here, asked once in a child process (this one's TensorFlow stays
    unconfigured). Without an NVIDIA device node TensorFlow cannot see one: no 5 s child then."""
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return False
    done = subprocess.run([sys.executable, "-c", _GPU_PROBE], capture_output=True, text=True, timeout=120, cwd=REPO)
    counted = done.stdout.split()
    return done.returncode == 0 and bool(counted) and counted[-1] != "0"


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` are not collected (deselected, not skipped) unless TensorFlow sees a GPU."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu or tensorflow_sees_a_gpu():
        return
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]


# ----------------------------------------------------------------------------- a 2-worker run, once

# 1150 training digits; 2 x 16 per step, 6 steps per epoch, 2 epochs: 12 steps, scalars every 2.
# lr 0.05 for batch 16, linear scaling to the global batch 32: peak 0.1 after 3 warmup steps.
TWO_WORKER_JOB = """
name: tbjob
seed: 5
model: {name: cnn, params: {filters: 8}}
data: {source: digits, batch_size_per_replica: 16}
train: {epochs: 2, steps_per_epoch: 6, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, warmup_steps: 3,
        schedule: {name: cosine, min_factor: 0.1}}
distribute: {strategy: multi_worker, collective_timeout_s: 60}
checkpoint: {every_epochs: 1, save_best: false, backup_every_steps: 4}
logging: {update_every_steps: 2, profile_steps: [3, 4], verbose: 0}
"""


@dataclass
class TwoWorkerRun:
    run_dir: Path
    chief_pid: int
    other_trace: Path  # strace of the other worker's file opens and renames


@pytest.fixture(scope="session")
def two_worker_run(tmp_path_factory) -> TwoWorkerRun:
    """``TWO_WORKER_JOB`` trained by two worker processes, once per pytest session (test_tensorboard.py
    and test_report.py read it).

    The second worker runs under strace, so a test can tell every file it wrote, even one it
    deleted again (its ``.workertemp`` scratch dir is gone at the end)."""
    if not shutil.which("strace"):
        pytest.fail("strace is needed (scripts/test.sh installs it)")
    root = tmp_path_factory.mktemp("tensorboard-two-workers")
    job = write_job(root / "job.yaml", TWO_WORKER_JOB)
    ports = free_ports(2)
    cmd = [*DISTRAIN, "train", str(job), "--run-dir", str(root / "run")]
    strace = ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=open,openat,creat,rename,renameat,renameat2",
              "-o", str(root / "worker1.strace")]
    workers = Workers([cmd, strace + cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)],
                      root / "logs")
    try:
        assert workers.wait(timeout=180) == [0, 0], workers.output()
    finally:
        workers.kill()
    return TwoWorkerRun(root / "run", workers.procs[0].pid, root / "worker1.strace")
