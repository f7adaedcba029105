"""Shared test helpers: real worker processes on 127.0.0.1, always bounded by a timeout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def run_distrain(args: list[str], timeout: float = 300, env: dict | None = None, cwd: Path = REPO):
    """Runs ``distrain ARGS`` in a fresh process; a test fails, not hangs, past the timeout."""
    return subprocess.run([*DISTRAIN, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or worker_env(), cwd=cwd)


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
