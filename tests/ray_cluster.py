"""A real local Ray head for tests: started on 127.0.0.1 with free ports, stopped by its pids.

Not a test module. A test module declares the head it needs and marks its tests::

    from ray_cluster import ray_head_fixture

    ray_head = ray_head_fixture(num_cpus=3)

    @pytest.mark.ray
    @pytest.mark.timeout(120)
    def test_job(ray_head, tmp_path):
        result = ray_head.submit(["python", "-c", "print(1)"], timeout=60)
        assert result.returncode == 0, result.stdout

Without Ray installed such tests are skipped, unless ``DISTRAIN_REQUIRE_RAY`` is set (CI): then they
fail. Install it with ``pip install -e .[ray]``.

Why it is done this way:

- ``ray stop`` kills every Ray process on the host by name, other people's heads included. The head
  runs as ``ray start --head --block`` in a session of its own, with a marker variable in its
  environment that every process it starts inherits; ``stop`` kills the head's process tree, its
  process group and every process carrying the marker, and waits until they are gone.
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's single-machine mode: the node IP becomes
  127.0.0.1 and its daemons bind there. ``--node-ip-address=127.0.0.1`` alone does not do it: Ray
  2.60 replaces a loopback node IP with the host's routable one, and the GCS, raylet and agents then
  listen on all interfaces.
- ``--temp-dir`` is short: Ray's unix sockets live under it and their paths are limited to 107 bytes.
- Token authentication is on (``RAY_AUTH_MODE=token``, a fresh token in the temp dir): other users
  of the machine cannot use the head, and the tests show that ``ray job submit`` and
  ``distrain ray`` work with it, as docs/ray.md recommends.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

from conftest import REPO, free_ports, skip_or_fail, worker_env

BIN = Path(sys.executable).parent
MARKER = "DISTRAIN_TEST_RAY_HEAD"  # inherited by everything the head starts; how stop() finds them
# What ray job submit uploads of the repo (.gitignore'd paths are skipped by Ray as well).
WORKING_DIR_EXCLUDES = [".venv", ".git", "runs", ".cache", ".pytest_cache", "*.egg-info", "__pycache__"]


def skip_unless_ray() -> None:
    """Skips the calling test when Ray is not importable, unless DISTRAIN_REQUIRE_RAY is set."""
    try:
        import ray  # noqa: F401
        import ray.train  # noqa: F401
    except ImportError as err:
        skip_or_fail("DISTRAIN_REQUIRE_RAY", f"ray is not installed ({err}); install it with: pip install -e .[ray]")


def _proc_stat(pid: int) -> Optional[tuple[int, int]]:
    """(parent pid, process group) of a live process, None if it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _has_marker(pid: int, token: str) -> bool:
    try:
        return f"{MARKER}={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def head_pids(root: int, token: str) -> set[int]:
    """Live processes of one head: the tree under ``root``, its process group, and the marked ones."""
    stats = {pid: _proc_stat(pid) for pid in _all_pids()}
    stats = {pid: s for pid, s in stats.items() if s is not None}
    found = {root} if root in stats else set()
    found |= {pid for pid, (_, pgid) in stats.items() if pgid == root}
    changed = True
    while changed:
        children = {pid for pid, (ppid, _) in stats.items() if ppid in found} - found
        changed = bool(children)
        found |= children
    found |= {pid for pid in stats if pid != os.getpid() and _has_marker(pid, token)}
    return found


class RayHead:
    """A running local head (see :func:`start_head`).

    Attributes:
        gcs_address: ``127.0.0.1:PORT``, what ``ray.init`` / ``RAY_ADDRESS`` take.
        dashboard_url: ``http://127.0.0.1:PORT``, what ``ray job submit --address`` takes.
        temp_dir: Ray's ``--temp-dir`` (session dirs and logs).
        env: the environment to run Ray clients and ``distrain ray`` with.
        num_cpus: logical CPUs of the head.
    """

    def __init__(self, proc: subprocess.Popen, token: str, gcs_address: str, dashboard_url: str,
                 temp_dir: Path, env: dict, num_cpus: int, log: Path):
        self.proc = proc
        self.token = token
        self.gcs_address = gcs_address
        self.dashboard_url = dashboard_url
        self.temp_dir = temp_dir
        self.env = env
        self.num_cpus = num_cpus
        self.log = log

    def client_env(self, **extra) -> dict:
        """Environment for a process that connects to this head (``RAY_ADDRESS`` set)."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address, **{k: str(v) for k, v in extra.items()}}

    def submit_command(self, entrypoint: Sequence[str], *, working_dir: Path = REPO,
                       env_vars: Optional[dict] = None, submission_id: Optional[str] = None) -> list[str]:
        """``ray job submit`` of ENTRYPOINT with WORKING_DIR uploaded (minus the excludes).

        A ``submission_id`` of the caller's choosing lets it ``ray job stop`` the job on failure.
        """
        runtime_env = {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES,
                       "env_vars": dict(env_vars or {})}
        return [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url,
                "--runtime-env-json", json.dumps(runtime_env),
                *(["--submission-id", submission_id] if submission_id else []),
                "--", *entrypoint]

    def submit(self, entrypoint: Sequence[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """Submits and waits: ``returncode`` is 0 when the job SUCCEEDED; ``stdout`` has its logs."""
        return subprocess.run(self.submit_command(entrypoint, **kwargs), env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=REPO)

    def stop_job(self, submission_id: str) -> None:
        """Best effort ``ray job stop`` (a test that gives up on a job must not leave it running)."""
        subprocess.run([str(BIN / "ray"), "job", "stop", "--address", self.dashboard_url, submission_id],
                       env=self.env, capture_output=True, timeout=30)

    def logs(self, tail: int = 60) -> str:
        """The last lines of ``ray start``'s output, for failure messages."""
        lines = self.log.read_text(errors="replace").splitlines()[-tail:]
        return "\n".join(lines)

    def stop(self, timeout: float = 30) -> None:
        """Kills every process of this head (never ``ray stop``) and waits until they are gone."""
        pids = head_pids(self.proc.pid, self.token)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = head_pids(self.proc.pid, self.token) - {self.proc.pid}
            if not left:
                break
            for pid in left:  # started while we were killing the others
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"Ray head processes still alive after {timeout}s: {sorted(left)}")
        # The killed daemons were re-parented to init when `ray start` died; wait until it has
        # reaped them, so that no trace of the head is left in `ps` (best effort: no failure).
        reap_deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < reap_deadline:
            time.sleep(0.2)


def start_head(num_cpus: int, *, timeout: float = 90) -> RayHead:
    """Starts ``ray start --head --block`` on 127.0.0.1 with free ports and waits for its job API.

    Raises:
        RuntimeError: the head did not come up within ``timeout`` seconds (it is stopped first).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="dray-", dir="/tmp"))
    (gcs, dashboard, client, node_manager, object_manager, agent_http, agent_grpc, runtime_env_agent,
     metrics) = free_ports(9)
    token = uuid.uuid4().hex
    auth_token = temp_dir / "auth_token"
    auth_token.write_text(secrets.token_hex(32))
    auth_token.chmod(0o600)
    env = worker_env(**{MARKER: token, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(auth_token)})
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = temp_dir / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=temp_dir,
                                start_new_session=True)
    head = RayHead(proc, token, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp_dir, env, num_cpus, log)
    try:
        _wait_until_ready(head, timeout)
    except BaseException:  # including a pytest timeout: never leave a head behind
        head.stop()
        raise
    return head


def _wait_until_ready(head: RayHead, timeout: float) -> None:
    """Until ``ray start`` reports success and the job API answers (with the token)."""
    request = urllib.request.Request(f"{head.dashboard_url}/api/version", headers={
        "Authorization": f"Bearer {Path(head.env['RAY_AUTH_TOKEN_PATH']).read_text().strip()}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200 and "Ray runtime started" in head.log.read_text(errors="replace"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not start within {timeout}s:\n{head.logs()}")


def ray_head_fixture(num_cpus: int = 3):
    """A module-scoped pytest fixture: one head for the module's tests, stopped at the end."""

    @pytest.fixture(scope="module")
    def head() -> Iterator[RayHead]:
        skip_unless_ray()
        started = start_head(num_cpus)
        try:
            yield started
        finally:
            started.stop()
            shutil.rmtree(started.temp_dir, ignore_errors=True)

    return head
