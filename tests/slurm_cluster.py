"""A real local SLURM for tests: starts ``cluster/slurm-local.sh`` and submits batch jobs to it.

Not a test module. A test module declares the clusters it needs and marks its tests::

    from slurm_cluster import slurm_fixture

    slurm_one_node = slurm_fixture(nodes=1)

    @pytest.mark.slurm
    @pytest.mark.timeout(60)
    def test_job(slurm_one_node, tmp_path):
        result = slurm_one_node.sbatch_wait(script, "--ntasks=2", timeout=30)
        assert result.returncode == 0, result.output

Without SLURM installed (no ``slurmctld``) such tests are skipped, unless ``DISTRAIN_REQUIRE_SLURM``
is set (CI): then they fail. Install it with ``cluster/slurm-local.sh install`` (root, Debian).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, skip_or_fail
SCRIPT = REPO / "cluster" / "slurm-local.sh"
# slurm-local.sh refuses longer state dirs: unix sockets inside them are limited to 107 characters.
MAX_DIR_LEN = 60
# Variables a caller's own SLURM job or shell would leak into sbatch/srun/squeue (SBATCH_* and
# SRUN_* set options, SQUEUE_FORMAT changes output, SLURM_JOB_ID makes srun join that job).
_LAUNCHER_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")
_DAEMON_PATH = "/usr/sbin:/sbin"  # slurmctld/slurmd live in sbin, which a user's PATH may lack


class SlurmJobTimeout(TimeoutError):
    """``sbatch --wait`` did not return in time; the job was cancelled."""


class SbatchResult(subprocess.CompletedProcess):
    """A finished ``sbatch --wait --parsable``.

    Attributes:
        returncode: the job's exit code as ``sbatch --wait`` reports it (the largest over the job).
        job_id: the job id sbatch printed ("" if the submission failed).
        output: the job's output file (stdout and stderr of the batch script and its steps).
        stdout, stderr: sbatch's own output.
    """

    def __init__(self, args, returncode, stdout, stderr, job_id: str, output: str):
        super().__init__(args, returncode, stdout, stderr)
        self.job_id = job_id
        self.output = output


def _which(command: str) -> str | None:
    return shutil.which(command, path=os.environ.get("PATH", "") + os.pathsep + _DAEMON_PATH)


def skip_unless_slurm() -> None:
    """Skips the calling test when SLURM is not installed, unless DISTRAIN_REQUIRE_SLURM is set.

    Raises:
        pytest.skip.Exception: slurmctld is not installed and DISTRAIN_REQUIRE_SLURM is unset.
        pytest.fail.Exception: slurmctld is not installed and DISTRAIN_REQUIRE_SLURM is set.
    """
    if _which("slurmctld"):
        return
    skip_or_fail("DISTRAIN_REQUIRE_SLURM", f"slurmctld not found (install it with: {SCRIPT.relative_to(REPO)} install)")


def _client_env(exports: str) -> dict[str, str]:
    """os.environ without launcher variables, plus the ``export K=V`` lines of ``slurm-local.sh env``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env["PATH"] = env.get("PATH", "") + os.pathsep + _DAEMON_PATH
    for line in exports.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    if "SLURM_CONF" not in env:
        raise RuntimeError(f"{SCRIPT} env printed no SLURM_CONF:\n{exports}")
    return env


class SlurmCluster:
    """A running local cluster (see :func:`local_slurm`).

    Attributes:
        nodes: number of nodes (1: n1 with 2 CPUs; 2: n1 and n2 with 1 CPU each).
        dir: the cluster's state directory (slurm.conf, log/, ...).
        job_dir: where job output files go, and the jobs' default working directory.
        env: the environment to run SLURM client commands (sbatch, srun, squeue, ...) with.
    """

    def __init__(self, nodes: int, state_dir: Path, job_dir: Path, env: dict[str, str]):
        self.nodes = nodes
        self.dir = state_dir
        self.job_dir = job_dir
        self.env = env

    def sbatch_wait(self, script: str | os.PathLike, *args: str, timeout: float,
                    cwd: str | os.PathLike | None = None) -> SbatchResult:
        """Submits SCRIPT with ``sbatch --wait --parsable ARGS`` and waits for the job to end.

        The output file is ``job_dir/slurm-<jobid>.out`` (stdout and stderr together), set on the
        command line, so a script's own ``#SBATCH --output`` is overridden; ``#SBATCH
        --open-mode=append`` in the script still applies (a requeued job then keeps its first run's
        output).

        Args:
            script: the batch script.
            *args: more sbatch options (not ``--output``/``-o``).
            timeout: seconds to wait for the job, queueing included.
            cwd: where to submit from, the job's working directory (default: ``job_dir``).

        Returns:
            The result: ``returncode`` is the job's exit code, plus ``job_id`` and ``output``.

        Raises:
            ValueError: ARGS set the output file.
            SlurmJobTimeout: the job did not end in time; it has been cancelled.
        """
        if any(a in ("-o", "--output") or a.startswith(("--output=", "-o")) for a in args):
            raise ValueError(f"sbatch_wait sets the output file itself; drop it from {args}")
        cmd = ["sbatch", "--wait", "--parsable", f"--output={self.job_dir}/slurm-%j.out", *args, str(script)]
        proc = subprocess.Popen(cmd, env=self.env, cwd=cwd or self.job_dir, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            job_id = _job_id(stdout)
            if job_id:
                subprocess.run(["scancel", job_id], env=self.env, capture_output=True, timeout=30)
            raise SlurmJobTimeout(f"job {job_id or '(not submitted)'} did not end within {timeout}s; cancelled.\n"
                                  f"sbatch stderr: {stderr}\njob output:\n{self._output(job_id)}\n"
                                  f"queue:\n{self._squeue()}") from None
        job_id = _job_id(stdout)
        return SbatchResult(cmd, proc.returncode, stdout, stderr, job_id=job_id, output=self._output(job_id))

    def scontrol(self, *args: str, timeout: float = 30) -> str:
        """Runs ``scontrol ARGS`` against this cluster and returns its stdout.

        Raises:
            subprocess.CalledProcessError: scontrol failed (its stderr is in the exception).
        """
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=True).stdout

    def _output(self, job_id: str) -> str:
        path = self.job_dir / f"slurm-{job_id}.out"
        return path.read_text(errors="replace") if job_id and path.exists() else ""

    def _squeue(self) -> str:
        done = subprocess.run(["squeue", "-t", "all"], env=self.env, capture_output=True, text=True, timeout=30)
        return done.stdout + done.stderr


def _job_id(parsable: str) -> str:
    """The job id from ``sbatch --parsable`` output ("123" or "123;cluster")."""
    first = parsable.strip().splitlines()[0] if parsable.strip() else ""
    return first.split(";")[0].strip()


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": os.environ.get("PATH", "") + os.pathsep + _DAEMON_PATH})


@contextlib.contextmanager
def local_slurm(nodes: int, tmp_dir: str | os.PathLike) -> Iterator[SlurmCluster]:
    """Starts a local SLURM with NODES nodes for the duration of the ``with`` block.

    Skips the calling test if SLURM is not installed (see :func:`skip_unless_slurm`).

    Args:
        nodes: 1 or 2.
        tmp_dir: a directory for the cluster's state (``tmp_dir/slurm``; a short directory under
            /tmp instead when that path is too long for the sockets inside it) and the job output
            (``tmp_dir/jobs``).

    Yields:
        The running cluster. It is stopped on exit, and its jobs cancelled.

    Raises:
        RuntimeError: the cluster did not start (the message has the daemons' log tails).

    Example:
        >>> with local_slurm(2, tmp_path) as cluster:
        ...     result = cluster.sbatch_wait(script, "--nodes=2", "--ntasks=2", timeout=30)
    """
    skip_unless_slurm()
    tmp_dir = Path(tmp_dir).resolve()
    job_dir = tmp_dir / "jobs"
    job_dir.mkdir(parents=True, exist_ok=True)
    state_dir = tmp_dir / "slurm"
    short_dir = None
    if len(str(state_dir)) > MAX_DIR_LEN:
        short_dir = Path(tempfile.mkdtemp(prefix="distrain-slurm-", dir="/tmp"))
        state_dir = short_dir
    try:
        started = _run_script("start", "--nodes", str(nodes), "--dir", str(state_dir), timeout=90)
        if started.returncode != 0:
            raise RuntimeError(f"{SCRIPT.name} start --nodes {nodes} --dir {state_dir} failed "
                               f"(exit {started.returncode}):\n{started.stdout}{started.stderr}")
        try:
            exports = _run_script("env", "--dir", str(state_dir), timeout=30)
            if exports.returncode != 0:
                raise RuntimeError(f"{SCRIPT.name} env failed: {exports.stderr}")
            yield SlurmCluster(nodes, state_dir, job_dir, _client_env(exports.stdout))
        finally:
            stopped = _run_script("stop", "--dir", str(state_dir), timeout=120)
            if stopped.returncode != 0:
                raise RuntimeError(f"{SCRIPT.name} stop --dir {state_dir} failed: {stopped.stderr}")
    finally:
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)


def slurm_fixture(nodes: int, name: str | None = None):
    """A session-scoped pytest fixture that yields a running ``local_slurm(nodes, ...)``.

    Args:
        nodes: 1 or 2.
        name: the fixture's name, if it is not the name the returned fixture is bound to.

    Example:
        >>> slurm_two_nodes = slurm_fixture(2)   # in a test module
    """
    @pytest.fixture(scope="session", name=name)
    def _cluster(tmp_path_factory):
        with local_slurm(nodes, tmp_path_factory.mktemp(f"slurm{nodes}n")) as cluster:
            yield cluster

    return _cluster
