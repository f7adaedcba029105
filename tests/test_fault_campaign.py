"""The fault campaign: faults drawn at random moments from a seed, each followed by reruns until the
run ends. Every draw must end with the uninterrupted run's test loss and accuracy, bit for bit (the
same world), or stop with a documented exit code and one line, lose nothing, and end exact once
the operator has done what the line says (docs/fault-tolerance.md#the-fault-campaign).

A draw is one run of a tiny job (8 steps, backups at 3, 4, 6 and 8) by 1 process or 2 workers,
and one fault aimed at a moment: after optimizer step k (0: from the start), plus a random delay
that lands it inside a step, a save, the final evaluation or the writing of the run's files.

- 1 process: kill -9; SIGTERM; SIGUSR1; a torn newest backup (kill -9, then the newest committed
  backup's data file cut to a random length); a full file system (the run dir on a small tmpfs,
  filled up, then freed for the rerun).
- 2 workers: kill -9 of one or of both; SIGTERM to both (as SLURM sends it); SIGUSR1 to one;
  SIGSTOP of one (then kill -9 of it, as a requeue does); a torn newest backup; a full file
  system; a cut network (every packet between the workers' network namespaces dropped, then
  restored).

Each run is a process forked from a server that has imported TensorFlow once (tests/forked_runs.py:
about 4 s a run instead of 10). With root the 2 workers run in two network namespaces
(cluster/netns-pair.sh), one per worker, and the run dir of a full-disk draw is on a tmpfs. Without
root the draws that need them are left out (listed in the report), unless
``DISTRAIN_REQUIRE_NETNS`` / ``DISTRAIN_REQUIRE_TMPFS`` is set: then the campaign fails.

CI runs the short campaign: seed 27's first 8 draws, less a draw whose fault an earlier one already
drew (7 runs: draw 6 tears a backup again, as draw 0 did). By hand, the long one, and any draw again::

    DISTRAIN_CAMPAIGN_DRAWS=120 DISTRAIN_CAMPAIGN_REPORT=campaign.json pytest tests/test_fault_campaign.py -s
    DISTRAIN_CAMPAIGN_SEED=27 DISTRAIN_CAMPAIGN_ONLY=41 pytest tests/test_fault_campaign.py -s   # draw 41 only

A failing draw prints its seed and index, and its attempts' logs.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest
from conftest import (REPO, free_ports, netns_missing, required, skip_or_fail, small_disk, tf_config, tmpfs_missing,
                      worker_env, write_job)
from forked_runs import ForkServer

from distrain.errors import EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE, EXIT_WRITE_FAILED
from distrain.rundir import RunDir

SEED = int(os.environ.get("DISTRAIN_CAMPAIGN_SEED", "27"))
DRAWS = int(os.environ.get("DISTRAIN_CAMPAIGN_DRAWS", "8"))
ONLY = [int(i) for i in os.environ.get("DISTRAIN_CAMPAIGN_ONLY", "").split(",") if i.strip()]
REPORT = os.environ.get("DISTRAIN_CAMPAIGN_REPORT")
# CI's short campaign runs each (world, fault) of its draws once; the long one and a replay run every draw.
SHORT = "DISTRAIN_CAMPAIGN_DRAWS" not in os.environ and not ONLY

STEPS = 8
TIMEOUT_S = 10  # distribute.collective_timeout_s
STARTUP_S = 20  # distribute.startup_timeout_s
# A peer lost at any moment: the survivors decide within the deadline (or the start-up's, before the
# strategy exists), then TensorFlow's shutdown may wait up to ~30 s more (docs/fault-tolerance.md).
PEER_LOST_BOUND_S = max(TIMEOUT_S, STARTUP_S) + 30
ATTEMPT_BOUND_S = 240  # any one attempt, whatever happens
JOB = f"""
name: campaign
seed: 11
model: {{name: mlp, params: {{dropout: 0.0}}}}
data: {{source: digits, batch_size_per_replica: 16}}
train: {{epochs: 2, steps_per_epoch: 4, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none}}
distribute: {{collective_timeout_s: {TIMEOUT_S}, startup_timeout_s: {STARTUP_S}, preemption_check_every: 2}}
checkpoint: {{every_epochs: 1, keep: 2, backup_every_steps: 3}}
logging: {{tensorboard: false, verbose: 0}}
"""

ONE = ("kill", "sigterm", "sigusr1", "torn", "full_disk")
TWO = ("kill_one", "kill_all", "sigterm_all", "sigusr1_one", "sigstop", "torn", "full_disk", "cut_network")
NEEDS = {"full_disk": "tmpfs", "cut_network": "netns"}

# The last line of a run that stopped itself, by exit code.
LAST_LINE = {
    EXIT_USAGE: r"distrain: error: .+",
    EXIT_WRITE_FAILED: r"distrain: .+: (backup of step \d+ )?not written: No space left on device \(ENOSPC\); .+",
    EXIT_PREEMPTED: r"distrain: preempted \((SIGTERM|SIGUSR1|signal on a peer)\) at step \d+; backup written, run "
                    r"again with the same run dir to resume",
    EXIT_PEER_LOST: r"distrain: (lost (worker \d \([\d.:]+\)|a peer \(one of [\d.:, ]+\)): .+; rerun with the same "
                    r"run dir to resume from the backup|start-up: .+ did not join the rendezvous within .+)",
}


# ----------------------------------------------------------------------------- the draws

@dataclass
class Draw:
    """One fault, aimed: after optimizer step ``step`` (0: from the start) plus ``delay`` seconds."""

    index: int
    world: int
    fault: str
    step: int
    delay: float
    rank: int  # the worker a one-worker fault hits
    cut_to: float  # torn: the fraction of the data file left
    leave: int  # full_disk: bytes left free

    @property
    def replay(self) -> str:
        return f"DISTRAIN_CAMPAIGN_SEED={SEED} DISTRAIN_CAMPAIGN_ONLY={self.index} pytest {Path(__file__).name} -s"


def draw(seed: int, index: int, faults: dict[int, tuple[str, ...]]) -> Draw:
    """Draw ``index`` of the campaign ``seed``: every fourth draw has 2 workers; each world goes
    through its faults in an order shuffled by the seed, so that a few draws cover them all."""
    world = 2 if index % 4 == 3 else 1
    order = list(faults[world])
    random.Random(f"{seed}:order:{world}").shuffle(order)
    nth = sum(1 for i in range(index) if (2 if i % 4 == 3 else 1) == world)
    rng = random.Random(f"{seed}:{index}")
    step = rng.randint(0, STEPS)
    delay = rng.uniform(0, 2.5) if step == 0 else rng.uniform(0, 1.0) if step == STEPS else rng.uniform(0, 0.15)
    return Draw(index, world, order[nth % len(order)], step, round(delay, 3), rng.randrange(world),
                round(rng.random(), 3), rng.choice((0, 4096, 16384)))


# ----------------------------------------------------------------------------- forked runs

@dataclass
class Attempt:
    """One start of the run: one process per worker."""

    servers: list[ForkServer]
    pids: list[int]
    logs: list[Path]
    codes: list[Optional[int]] = field(default_factory=list)

    def running(self) -> bool:
        return any(server.wait(pid, 0) is None for server, pid in zip(self.servers, self.pids))

    def wait(self, timeout: float, *, skip: tuple[int, ...] = ()) -> list[Optional[int]]:
        """Exit codes (None for ranks in ``skip`` still running); ranks still running after ``timeout`` are killed."""
        until = time.monotonic() + timeout
        codes = [None if rank in skip else server.wait(pid, until)
                 for rank, (server, pid) in enumerate(zip(self.servers, self.pids))]
        hung = [rank for rank, code in enumerate(codes) if code is None and rank not in skip]
        if hung:
            self.signal(signal.SIGKILL)
            raise DrawFailed(f"rank(s) {hung} still running {timeout:.0f} s after the fault (a hang)")
        self.codes = codes
        return codes

    def signal(self, sig: int, ranks: Optional[list[int]] = None) -> None:
        for rank in range(len(self.pids)) if ranks is None else ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pids[rank], sig)

    def output(self, tail: int = 25) -> str:
        return "\n".join(f"--- {log} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-tail:])
                         for log in self.logs if log.exists())


class DrawFailed(Exception):
    """A draw that broke distrain's promise: the reason, in one line."""


# ----------------------------------------------------------------------------- the network

@dataclass
class Network:
    """Two fork servers in network namespaces NAME-a and NAME-b joined by a veth pair (netns-pair.sh)."""

    name: str
    script: subprocess.Popen
    hosts: tuple[str, str] = ("10.213.0.1", "10.213.0.2")

    def set_cut(self, cut: bool) -> None:
        """Drops every packet leaving either end (a token bucket of 1 byte passes none), or stops dropping."""
        for ns in (f"{self.name}-a", f"{self.name}-b"):
            tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
            done = subprocess.run(tc + (["replace", "dev", "veth0", "root", "tbf", "rate", "8bit", "burst", "1",
                                         "limit", "1"] if cut else ["del", "dev", "veth0", "root"]),
                                  capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"tc in {ns}: {done.stderr.strip()}")


def remove_namespaces(name: str) -> None:
    """Backstop after a failure: whatever still runs in the namespaces, and the namespaces."""
    for ns in (f"{name}-a", f"{name}-b"):
        if not Path("/var/run/netns", ns).exists():
            continue
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


# ----------------------------------------------------------------------------- the campaign

@dataclass
class Outcome:
    draw: Draw
    result: str  # exact | refused | lost
    codes: list  # every attempt's exit codes
    landed: bool  # the fault met a running attempt
    note: str = ""
    seconds: float = 0.0


class Campaign:
    """The servers, the job, the references, and how one draw is run and judged."""

    def __init__(self, root: Path, servers: list[ForkServer], network: Optional[Network], disk: Optional[Path]):
        self.root = root
        self.servers = servers
        self.network = network
        self.disk = disk
        self.job = write_job(root / "job.yaml", JOB)
        self.references: dict[int, dict] = {}
        self._started: dict[int, Attempt] = {}  # uninterrupted runs started, not yet waited for
        self._port = 21000

    # -- starting runs ------------------------------------------------------------------------

    def start(self, world: int, argv: list[str], logs: Path, progress: Optional[Path] = None) -> Attempt:
        logs.mkdir(parents=True, exist_ok=True)
        servers = [self.servers[rank % len(self.servers)] for rank in range(world)]
        envs = [{}] if world == 1 else [{"TF_CONFIG": config} for config in self._tf_configs(world)]
        log_paths = [logs / f"rank{rank}.log" for rank in range(world)]
        pids = [server.start(argv, log, env, progress if rank == 0 else None)
                for rank, (server, log, env) in enumerate(zip(servers, log_paths, envs))]
        return Attempt(servers, pids, log_paths)

    def _tf_configs(self, world: int) -> list[str]:
        if self.network is None:
            ports = free_ports(world)
            return [tf_config(ports, rank) for rank in range(world)]
        self._port += 1  # a new port per attempt: the last one's may still be in TIME_WAIT
        return [json.dumps({"cluster": {"worker": [f"{host}:{self._port}" for host in self.network.hosts]},
                            "task": {"type": "worker", "index": rank}}) for rank in range(world)]

    def start_reference(self, world: int) -> None:
        """Starts the uninterrupted run of ``world`` workers, waited for when a draw needs it: started
        first, the 2-worker one trains on the core that the 1-process draws leave idle."""
        if world not in self.references and world not in self._started:
            run_dir = self.root / f"reference-{world}"
            self._started[world] = self.start(world, ["train", self.job, "--run-dir", run_dir],
                                              run_dir.parent / f"logs-ref-{world}")

    def reference(self, world: int) -> dict:
        """The uninterrupted run's summary, once per world size."""
        if world not in self.references:
            self.start_reference(world)
            run_dir = self.root / f"reference-{world}"
            attempt = self._started.pop(world)
            codes = attempt.wait(ATTEMPT_BOUND_S)
            assert codes == [0] * world, f"the uninterrupted run failed: {codes}\n{attempt.output()}"
            self.references[world] = json.loads((run_dir / "summary.json").read_text())
            assert self.references[world]["steps"] == STEPS
        return self.references[world]

    # -- one draw -------------------------------------------------------------------------------

    def run(self, d: Draw) -> Outcome:
        started = time.monotonic()
        reference = self.reference(d.world)
        where = self.root / f"draw-{d.index:03d}"
        run_dir = (self.disk / f"draw-{d.index:03d}") if d.fault == "full_disk" else where / "run"
        outcome = Outcome(d, "lost", [], False)
        try:
            outcome.result, outcome.note = self._run(d, where, Path(run_dir), reference, outcome)
        except Exception as failed:  # DrawFailed, or what the checks met instead (no summary.json, ...)
            outcome.note = str(failed) if isinstance(failed, DrawFailed) else f"{type(failed).__name__}: {failed}"
            if d.fault == "full_disk" and Path(run_dir).exists():
                shutil.copytree(run_dir, where / "run", dirs_exist_ok=True)  # kept for a look
        finally:
            if d.fault == "full_disk":
                shutil.rmtree(run_dir, ignore_errors=True)
                (self.disk / "filler").unlink(missing_ok=True)
            if self.network is not None and d.fault == "cut_network":
                with contextlib.suppress(RuntimeError):
                    self.network.set_cut(False)
        outcome.seconds = round(time.monotonic() - started, 1)
        return outcome

    def _run(self, d: Draw, where: Path, run_dir: Path, reference: dict, outcome: Outcome) -> tuple[str, str]:
        progress = where / "progress"
        first = self.start(d.world, ["train", self.job, "--run-dir", run_dir], where / "attempt-1", progress)
        outcome.landed = self._aim(first, progress, d)
        at = time.monotonic()
        stopped = self._strike(d, first) if outcome.landed else ()
        codes = first.wait(ATTEMPT_BOUND_S, skip=stopped)
        elapsed = time.monotonic() - at
        if stopped:
            first.signal(signal.SIGKILL, list(stopped))  # the requeue's scancel: a stopped task only dies by SIGKILL
            codes = first.wait(30)
        outcome.codes.append(codes)
        self._judge_first(d, first, codes, elapsed, outcome.landed)
        if d.fault == "full_disk":
            (self.disk / "filler").unlink(missing_ok=True)  # the operator frees space
        if d.fault == "cut_network":
            self.network.set_cut(False)

        torn = self._tear(d, run_dir) if d.fault == "torn" else None
        refused = any(c in (EXIT_WRITE_FAILED, EXIT_USAGE) for c in codes)
        needs_rerun = codes != [0] * d.world or torn is not None
        for n in range(2, 5):
            if not needs_rerun:
                break
            start = self._check_nothing_lost(run_dir, torn)
            # A run that ended before its peer was killed is complete: the rerun only says so.
            complete = (run_dir / "summary.json").exists() and torn is None
            # As a requeue reruns it (slurm/distrain-launch.sh): the job and the run dir, which a kill
            # before the run dir was made leaves absent (then the rerun starts it), not --resume.
            attempt = self.start(d.world, ["train", self.job, "--run-dir", run_dir], where / f"attempt-{n}")
            codes = attempt.wait(ATTEMPT_BOUND_S)
            outcome.codes.append(codes)
            if codes == [0] * d.world:
                if not complete:
                    self._check_resumed(attempt, run_dir, start, torn)
                break
            if codes[0] == EXIT_USAGE and start is None:
                # Every backup torn: one line, nothing removed; the operator moves them away.
                self._check_last_line(attempt, 0, EXIT_USAGE, "no backup verifies, so the run cannot resume")
                refused = True
                run_dir.joinpath("backup").rename(run_dir / "backup.torn")
                torn = None
                continue
            raise DrawFailed(f"rerun {n - 1} ended with {codes}:\n{attempt.output()}")
        else:
            raise DrawFailed(f"no end after 3 reruns: {outcome.codes}")
        self._check_exact(run_dir, reference)
        return ("refused" if refused else "exact"), ""

    def _aim(self, attempt: Attempt, progress: Path, d: Draw) -> bool:
        """Waits for the draw's moment; whether the attempt is still running then."""
        deadline = time.monotonic() + ATTEMPT_BOUND_S
        while d.step and _read_step(progress) < d.step:
            if not attempt.running() or time.monotonic() > deadline:
                return attempt.running()
            time.sleep(0.005)
        time.sleep(d.delay)
        return attempt.running()

    def _strike(self, d: Draw, attempt: Attempt) -> tuple[int, ...]:
        """Applies the fault; returns the ranks left stopped (SIGSTOP)."""
        if d.fault in ("kill", "kill_all", "torn"):
            attempt.signal(signal.SIGKILL)
        elif d.fault == "kill_one":
            attempt.signal(signal.SIGKILL, [d.rank])
        elif d.fault in ("sigterm", "sigterm_all"):
            attempt.signal(signal.SIGTERM)
        elif d.fault == "sigusr1":
            attempt.signal(signal.SIGUSR1)
        elif d.fault == "sigusr1_one":
            attempt.signal(signal.SIGUSR1, [d.rank])
        elif d.fault == "sigstop":
            attempt.signal(signal.SIGSTOP, [d.rank])
            return (d.rank,)
        elif d.fault == "full_disk":
            _fill(self.disk, d.leave)
        elif d.fault == "cut_network":
            self.network.set_cut(True)
        else:
            raise ValueError(d.fault)
        return ()

    # -- judging ----------------------------------------------------------------------------------

    def _judge_first(self, d: Draw, attempt: Attempt, codes: list, elapsed: float, landed: bool) -> None:
        """The faulted attempt's exit codes are documented ones, each stop says why in one line, and
        survivors of a lost peer ended within the bound."""
        expected = _expected_codes(d)
        for rank, code in enumerate(codes):
            allowed = expected[rank] | {0}
            if code not in allowed:
                raise DrawFailed(f"rank {rank} ended with {code}, expected one of {sorted(allowed)}:\n"
                                 f"{attempt.output()}")
            if code in LAST_LINE:
                self._check_last_line(attempt, rank, code)
        if landed and EXIT_PEER_LOST in codes and elapsed > PEER_LOST_BOUND_S:
            raise DrawFailed(f"the survivors took {elapsed:.0f} s to end (bound {PEER_LOST_BOUND_S} s)")

    @staticmethod
    def _check_last_line(attempt: Attempt, rank: int, code: int, contains: str = "") -> None:
        text = attempt.logs[rank].read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if not re.fullmatch(LAST_LINE[code], last) or contains not in last:
            raise DrawFailed(f"rank {rank} exited {code} without its one line; last line: {last!r}")
        if "Traceback" in _without_logging_errors(text):
            raise DrawFailed(f"rank {rank} exited {code} with a traceback:\n{attempt.output()}")

    @staticmethod
    def _tear(d: Draw, run_dir: Path) -> Optional[int]:
        """Cuts the newest committed backup's data file (what a crash leaves of a file in the page
        cache); returns its step, or None when there is none."""
        backups = RunDir(run_dir)
        committed = backups.committed_backups()
        if not committed:
            return None
        data = next(p for p in backups.backup_files(committed[-1]) if ".data-" in p.name)
        size = data.stat().st_size
        os.truncate(data, min(size - 1, int(size * d.cut_to)))
        return committed[-1]

    @staticmethod
    def _check_nothing_lost(run_dir: Path, torn: Optional[int]) -> Optional[int]:
        """Every committed backup verifies (but the one torn on purpose); returns the step a rerun
        must start from (None: none verifies, the rerun must refuse)."""
        backups = RunDir(run_dir)
        committed = backups.committed_backups()
        bad = {step: backups.verify_backup(step) for step in committed}
        bad = {step: why for step, why in bad.items() if why}
        if set(bad) - {torn}:
            raise DrawFailed(f"a committed backup does not verify: {bad}")
        good = [step for step in committed if step not in bad]
        if good:
            return good[-1]
        return None if committed else 0

    def _check_resumed(self, attempt: Attempt, run_dir: Path, start: Optional[int], torn: Optional[int]) -> None:
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary["resumed_from_step"] != start:
            raise DrawFailed(f"resumed from step {summary['resumed_from_step']}, the newest good backup is {start}")
        if torn is not None:
            chief = attempt.logs[0].read_text(errors="replace")
            said = [line for line in chief.splitlines() if f"ckpt-{torn}: skipped: " in line]
            if len(said) != 1 or not said[0].endswith(f"resuming from ckpt-{start} (step {start})"):
                raise DrawFailed(f"the torn backup ckpt-{torn} was not skipped in one line: {said}")

    @staticmethod
    def _check_exact(run_dir: Path, reference: dict) -> None:
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary["steps"] != STEPS or summary["test"] != reference["test"]:
            raise DrawFailed(f"ended at step {summary['steps']} with test {summary['test']}, the uninterrupted run "
                             f"with {reference['test']}")


def _expected_codes(d: Draw) -> list[set]:
    """What each rank of the faulted attempt may end with (0 too: the fault may come after its end)."""
    lost = {EXIT_PEER_LOST}
    if d.fault in ("kill", "kill_all", "torn"):
        return [{-signal.SIGKILL}] * d.world
    if d.fault in ("sigterm", "sigterm_all", "sigusr1"):
        sig = signal.SIGTERM if d.fault.startswith("sigterm") else signal.SIGUSR1
        # Before the handler is in place (start-up, the last evaluation) the signal ends the process;
        # a worker whose peer ended so has lost it.
        return [{EXIT_PREEMPTED, -sig} | (lost if d.world > 1 else set())] * d.world
    if d.fault == "sigusr1_one":
        return [{EXIT_PREEMPTED, -signal.SIGUSR1} | lost if rank == d.rank else {EXIT_PREEMPTED} | lost
                for rank in range(d.world)]
    if d.fault in ("kill_one", "sigstop"):
        return [{-signal.SIGKILL} if rank == d.rank else lost for rank in range(d.world)]
    if d.fault == "full_disk":
        return [{EXIT_WRITE_FAILED} | (lost if d.world > 1 else set())] * d.world
    if d.fault == "cut_network":
        return [lost] * d.world
    raise ValueError(d.fault)


def _read_step(progress: Path) -> int:
    try:
        return int(progress.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _fill(disk: Path, leave: int) -> None:
    """Fills ``disk`` but for ``leave`` bytes, as another job's output would."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(65536))
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(512))
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def _without_logging_errors(text: str) -> str:
    """``text`` without Python logging's reports of a record it could not write (``--- Logging error ---``
    up to its ``Arguments:`` line): a full disk fails the log file too, which is documented."""
    return re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", text, flags=re.S)


# ----------------------------------------------------------------------------- the fixture

def _available(kind: str) -> Optional[str]:
    """Why ``kind`` (tmpfs | netns) is missing here, or None; fails the campaign where it is required."""
    reason = tmpfs_missing() if kind == "tmpfs" else netns_missing()
    variable = "DISTRAIN_REQUIRE_TMPFS" if kind == "tmpfs" else "DISTRAIN_REQUIRE_NETNS"
    if reason and required(variable):
        skip_or_fail(variable, reason)
    return reason


@contextlib.contextmanager
def _servers(root: Path, netns: bool) -> Iterator[tuple[list[ForkServer], Optional[Network]]]:
    """One fork server here, or one in each of two network namespaces (torn down on every exit)."""
    server = [sys.executable, str(REPO / "tests" / "forked_runs.py")]
    log = open(root / "servers.log", "w")
    clients: list[ForkServer] = []
    if netns:
        name = f"dtc{os.getpid() % 100000}"
        sockets = [root / "server-a.sock", root / "server-b.sock"]
        script = subprocess.Popen([str(REPO / "cluster" / "netns-pair.sh"), "--name", name, "--",
                                   *("exec " + shlex.join([*server, str(path)]) for path in sockets)],
                                  env=worker_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        network: Optional[Network] = Network(name, script)
    else:
        sockets = [root / "server.sock"]
        script = subprocess.Popen([*server, str(sockets[0])], env=worker_env(), cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT)
        network = None
    try:
        clients = [ForkServer(path) for path in sockets]
        yield clients, network
    finally:
        for client in clients:
            client.close()  # each server then kills what it still runs and ends
        try:
            script.wait(timeout=60)
        except subprocess.TimeoutExpired:
            script.terminate()  # netns-pair.sh: stops what runs in the namespaces, removes them
            try:
                script.wait(timeout=60)
            except subprocess.TimeoutExpired:
                script.kill()
        if network is not None:
            remove_namespaces(network.name)
        log.close()


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Iterator[tuple[Campaign, dict]]:
    root = tmp_path_factory.mktemp("campaign")
    missing = {kind: _available(kind) for kind in ("tmpfs", "netns")}
    left_out = {fault: missing[kind] for fault, kind in NEEDS.items() if missing[kind]}
    with contextlib.ExitStack() as stack:
        # Mounted before the servers start: their namespaces then see it.
        disk = stack.enter_context(small_disk(root / "disk", "16m")) if not missing["tmpfs"] else None
        servers, network = stack.enter_context(_servers(root, netns=not missing["netns"]))
        yield Campaign(root, servers, network, disk), left_out


# ----------------------------------------------------------------------------- the test

def test_draws_are_replayable_and_cover_every_fault():
    faults = {1: ONE, 2: TWO}
    draws = [draw(27, i, faults) for i in range(32)]
    assert draws == [draw(27, i, faults) for i in range(32)]
    # 24 draws of 1 process, 8 of 2 workers: each world's faults all come up in its first draws.
    assert [d.world for d in draws[:8]] == [1, 1, 1, 2, 1, 1, 1, 2]
    assert {d.fault for d in draws[:7] if d.world == 1} == set(ONE)
    assert {d.fault for d in draws if d.world == 2} == set(TWO)
    assert all(0 <= d.step <= STEPS for d in draws) and len({d.step for d in draws}) > STEPS // 2
    assert draw(27, 3, faults) != draw(28, 3, faults)


def table(outcomes: list[Outcome]) -> str:
    """The campaign's figures: faults drawn, survived exactly, refused cleanly, lost, per fault."""
    rows = {}
    for o in outcomes:
        key = (o.draw.world, o.draw.fault)
        row = rows.setdefault(key, {"drawn": 0, "exact": 0, "refused": 0, "lost": 0, "codes": set(), "missed": 0})
        row["drawn"] += 1
        row[o.result] += 1
        row["missed"] += not o.landed
        row["codes"] |= {c for codes in o.codes for c in codes if c not in (0, None)}
    lines = ["| workers | fault | drawn | survived exactly | refused cleanly | lost | exit codes seen | fault after "
             "the end |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (world, fault), row in sorted(rows.items()):
        lines.append(f"| {world} | {fault} | {row['drawn']} | {row['exact']} | {row['refused']} | {row['lost']} | "
                     f"{', '.join(map(str, sorted(row['codes']))) or '-'} | {row['missed']} |")
    total = {k: sum(r[k] for r in rows.values()) for k in ("drawn", "exact", "refused", "lost", "missed")}
    lines.append(f"| all | | {total['drawn']} | {total['exact']} | {total['refused']} | {total['lost']} | | "
                 f"{total['missed']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what the campaign found

EPOCHS = [{"epoch": 1, "accuracy": 0.5, "val_accuracy": 0.4, "loss": 1.2, "val_loss": 1.3},
          {"epoch": 2, "accuracy": 0.7, "val_accuracy": 0.6, "loss": 0.9, "val_loss": 1.0}]


@pytest.mark.timeout(120)
def test_curves_on_a_full_disk_stop_in_one_line_and_keep_the_old_picture(tmp_path, needs_tmpfs):
    # Draws 82 and 96 of seed 27: a full disk while curves.png was written ended with exit 1 and a
    # traceback (matplotlib wrote it in place).
    from distrain.errors import WriteFailed
    from distrain.report import plot_curves

    with small_disk(tmp_path / "disk", "256k") as disk:
        path = plot_curves(EPOCHS[:1], disk / "curves.png")
        before = path.read_bytes()
        _fill(disk, 0)
        with pytest.raises(WriteFailed) as err:
            plot_curves(EPOCHS, path)
        assert err.value.exit_code == EXIT_WRITE_FAILED
        assert str(err.value).startswith(f"{path}: not written: No space left on device (ENOSPC); curves.png as it "
                                         "was before is unchanged. Free space")
        assert path.read_bytes() == before and sorted(p.name for p in disk.iterdir()) == ["curves.png", "filler"]


# A checkpoint saved, the disk filled but for 16 KiB, a second one saved: HDF5 meets the full disk in
# the middle of the file. In a process of its own: it crashed with SIGSEGV.
SAVE_ON_A_FULL_DISK = """
import contextlib, os, sys
from pathlib import Path
import distrain
import tensorflow as tf
from distrain.checkpoint import UserCheckpoints, WorkerFiles
from distrain.errors import WriteFailed
from distrain.rundir import RunDir

disk = Path(sys.argv[1])
model = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(128), tf.keras.layers.Dense(10)])
run_dir = RunDir(disk / "run")
checkpoints = UserCheckpoints(model, run_dir, WorkerFiles(run_dir, 0, True), keep=2, monitor="val_loss", mode="auto")
checkpoints.save_periodic("epoch-0001")
with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
    while True:
        f.write(bytes(4096))
os.truncate(disk / "filler", os.path.getsize(disk / "filler") - 16384)
try:
    checkpoints.save_periodic("epoch-0002")
except WriteFailed as err:
    print(err)
"""


@pytest.mark.timeout(120)
def test_a_weights_file_cut_off_by_a_full_disk_stops_in_one_line_not_a_crash(tmp_path, needs_tmpfs):
    # Draw 109 of seed 27: exit -11 (SIGSEGV in h5py after "file write failed") instead of 74.
    with small_disk(tmp_path / "disk", "1m") as disk:
        done = subprocess.run([sys.executable, "-c", SAVE_ON_A_FULL_DISK, str(disk)],
                              capture_output=True, text=True, timeout=100, env=worker_env(), cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        path = disk / "run" / "checkpoints" / "epoch-0002.weights.h5"
        assert done.stdout.strip().startswith(f"{path}: not written: No space left on device (ENOSPC); "
                                              f"{path.name} as it was before is unchanged. Free space"), done.stdout
        assert sorted(p.name for p in path.parent.iterdir()) == ["epoch-0001.weights.h5", "index.json"]
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "run"]


@pytest.mark.multiprocess
@pytest.mark.timeout(max(600, 150 * (len(ONLY) or DRAWS)))
def test_every_fault_ends_exact_or_is_refused_in_one_line(campaign):
    runner, left_out = campaign
    faults = {1: tuple(f for f in ONE if f not in left_out), 2: tuple(f for f in TWO if f not in left_out)}
    if any(draw(SEED, index, faults).world == 2 for index in ONLY or range(DRAWS)):
        runner.start_reference(2)
    outcomes, drawn = [], set()
    for index in ONLY or range(DRAWS):
        d = draw(SEED, index, faults)
        if SHORT and (d.world, d.fault) in drawn:
            print(f"draw {d.index}: {d.world} worker(s), {d.fault} again: left to the long campaign", flush=True)
            continue
        drawn.add((d.world, d.fault))
        outcome = runner.run(d)
        outcomes.append(outcome)
        print(f"draw {d.index}: {d.world} worker(s), {d.fault} after step {d.step} + {d.delay} s: {outcome.result} "
              f"{outcome.codes} {outcome.seconds} s {outcome.note.splitlines()[0] if outcome.note else ''}", flush=True)
    report = table(outcomes)
    print(f"\nseed {SEED}, {len(outcomes)} draws" + (f"; left out: {left_out}" if left_out else "") + "\n" + report)
    if REPORT:
        Path(REPORT).write_text(json.dumps({"seed": SEED, "left_out": left_out, "table": report,
                                            "draws": [asdict(o) for o in outcomes]}, indent=1, default=str))
    lost = [o for o in outcomes if o.result == "lost"]
    assert not lost, "\n\n".join(f"draw {o.draw.index} ({o.draw}) lost: {o.note}\nreplay: {o.draw.replay}"
                                 for o in lost)
