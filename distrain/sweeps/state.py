"""A sweep dir and its ``sweep.yaml``: every trial's overrides, state and result.

Layout::

    SWEEP_DIR/sweep.yaml      the sweep: its job, metric and mode, and every trial (index,
                              overrides, state, result), replaced atomically at every change
    SWEEP_DIR/trial-NNN/      trial NNN's run dir, an ordinary one (distrain report, --resume,
                              TensorBoard work on it as on any run)
    SWEEP_DIR/tensorboard/    the sweep's HParams experiment config (the swept keys, its metric)

A trial is ``pending`` (not started), ``running``, ``finished`` (its result recorded),
``pruned`` (stopped early by a scheduler, Ray Tune's ASHA: its result is the metric at its last
epoch, and it is not trained again), ``stopped`` (preempted, interrupted or killed: run the sweep
again to resume it from its backup) or ``failed`` (an error; a NaN loss is its result and is not
tried again). ``running`` found by a later run of the sweep means the process died: the trial
resumes like a stopped one.

Several processes may write one ``sweep.yaml`` at once (the tasks of a SLURM job array, each
recording its own trial): every change is a read-modify-write under an exclusive ``flock`` of
``SWEEP_DIR/.sweep.lock`` (``locked``), so no task's record overwrites another's.

Running a sweep in a dir that holds one checks that it is the same sweep, trial by trial: the
same overrides and the same job (its fingerprint: the resolved job without the keys that do not
change what it trains, ``sweep``, ``logging`` and ``output_dir``). More trials after the same
first ones (``--trials 8`` after 4) are added; any other difference is refused, so nothing
finished is trained again or overwritten.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from distrain.errors import EXIT_NAN, UsageError
from distrain.rundir import RunDir, write_atomically
from distrain.spec import JobSpec, spec_to_dict
from distrain.sweeps.plan import Plan, trial_name
from distrain.sweeps.trials import format_value, override

SWEEP_FILE = "sweep.yaml"
LOCK_FILE = ".sweep.lock"
PENDING, RUNNING, FINISHED, PRUNED, STOPPED, FAILED = "pending", "running", "finished", "pruned", "stopped", "failed"
STATES = (PENDING, RUNNING, FINISHED, PRUNED, STOPPED, FAILED)
# Keys of a trial's job that do not change what it trains: left out of its fingerprint.
UNTRAINED_KEYS = ("sweep", "logging", "output_dir")
HEADER = "# A distrain sweep (docs/sweeps.md): every trial-NNN/ here is a run dir. Written by distrain sweep.\n"


def trial_dir(root: Path, index: int) -> Path:
    """``SWEEP_DIR/trial-NNN``: trial ``index``'s run dir."""
    return Path(root) / trial_name(index)


def is_sweep_dir(path: Path) -> bool:
    """Whether ``path`` holds a sweep (its ``sweep.yaml``)."""
    return (Path(path) / SWEEP_FILE).is_file()


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Within it, this process alone reads and writes ``root``'s ``sweep.yaml`` (an exclusive
    ``flock`` of ``SWEEP_DIR/.sweep.lock``; it holds on NFS v4 and Lustre, where job arrays write)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fingerprint(spec: JobSpec) -> str:
    """What a trial trains, as a hash: its resolved job without ``UNTRAINED_KEYS``."""
    job = {k: v for k, v in spec_to_dict(spec).items() if k not in UNTRAINED_KEYS}
    return hashlib.sha256(yaml.safe_dump(job, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrialRecord:
    """A trial as ``sweep.yaml`` lists it.

    Attributes:
        index: its place in the sweep.
        overrides: ``{job key: value}``.
        job: its job's ``fingerprint``.
        state: one of ``STATES``.
        result: the sweep's metric at its last epoch (finished trials).
        error: why it stopped or failed (one line).
        exit_code: the exit code a stopped or failed trial's training would have ended with.
    """

    index: int
    overrides: dict
    job: str
    state: str = PENDING
    result: Optional[float] = None
    error: Optional[str] = None
    exit_code: Optional[int] = None

    @property
    def name(self) -> str:
        return trial_name(self.index)

    @property
    def sets(self) -> list[str]:
        return [override(k, v) for k, v in self.overrides.items()]

    @property
    def to_run(self) -> bool:
        """Whether a run of the sweep trains it (again): all but finished and pruned trials and NaN
        losses."""
        return self.state not in (FINISHED, PRUNED) and not (self.state == FAILED and self.exit_code == EXIT_NAN)


@dataclass
class SweepState:
    """``sweep.yaml``: the sweep and its trials."""

    root: Path
    job: str
    overrides: list
    metric: str
    mode: str
    keys: list
    trials: list = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.root / SWEEP_FILE

    def trial_dir(self, index: int) -> Path:
        return trial_dir(self.root, index)

    def save(self) -> None:
        """Replaces ``sweep.yaml`` atomically (``rundir.write_atomically``)."""
        data = {"job": self.job, "overrides": list(self.overrides), "metric": self.metric, "mode": self.mode,
                "keys": list(self.keys), "trials": [dataclasses.asdict(t) for t in self.trials]}
        write_atomically(self.path, HEADER + yaml.safe_dump(data, sort_keys=False, width=1 << 16))

    def update(self, index: int, state: str, *, result: Optional[float] = None, error: Optional[str] = None,
               exit_code: Optional[int] = None) -> TrialRecord:
        """Sets trial ``index``'s state (and result or error) and saves, under the sweep's lock: the
        other trials' records are read again first, as other processes may have changed them."""
        with locked(self.root):
            if self.path.is_file():
                self.trials = load(self.root).trials
            record = dataclasses.replace(self.trials[index], state=state, result=result, error=error,
                                         exit_code=exit_code)
            self.trials[index] = record
            self.save()
        return record

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)


def new_state(root: Path, plan: Plan) -> SweepState:
    """The state of ``plan`` in ``root`` before any trial ran: every trial pending."""
    trials = [TrialRecord(t.index, dict(t.overrides), fingerprint(t.spec)) for t in plan.trials]
    return SweepState(Path(root), plan.source, list(plan.overrides), plan.metric, plan.mode, list(plan.keys), trials)


def load(root: Path) -> SweepState:
    """Reads ``SWEEP_DIR/sweep.yaml``.

    Raises:
        UsageError: missing, not YAML, or not a sweep's.
    """
    path = Path(root) / SWEEP_FILE
    try:
        data = yaml.safe_load(path.read_text())
        trials = [TrialRecord(**t) for t in data["trials"]]
        in_order = [t.index for t in trials] == list(range(len(trials)))
        if not in_order or {t.state for t in trials} - set(STATES):
            raise ValueError("a trial's state or index is not one distrain writes")
        fields = (data["job"], data["overrides"], data["metric"], data["mode"], data["keys"])
        return SweepState(Path(root), *fields, trials)
    except FileNotFoundError:
        raise UsageError(f"{root}: not a sweep dir (no {SWEEP_FILE})") from None
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{path}: not a sweep's {SWEEP_FILE} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                         "restore it, or run the sweep in a new dir") from None


def check_sweep_dir(root: Path, plan: Plan, *, flag: str = "--run-dir") -> Optional[SweepState]:
    """Reading only, refuses a sweep dir ``open_sweep`` would refuse (a file, a run, trial dirs
    without a ``sweep.yaml``, another sweep), so a launcher can refuse it before submitting.

    Args:
        flag: the option that named ``root``, for messages (``--sweep`` for the launchers).

    Returns:
        The state found there (None: no sweep ran there yet).

    Raises:
        UsageError: one line naming ``flag`` or the ``sweep.yaml``.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{flag}: {root} is a file")
    if not is_sweep_dir(root):
        if RunDir(root).is_started():
            raise UsageError(f"{flag}: {root} holds a run, not a sweep: give a new directory for the sweep")
        strays = sorted(p.name for p in root.glob("trial-*") if re.fullmatch(r"trial-\d{3,}", p.name))
        if strays:
            raise UsageError(f"{flag}: {root} holds trial dirs ({', '.join(strays[:3])}) but no {SWEEP_FILE}: "
                             "restore it, or give a new directory for the sweep")
        return None
    found = load(root)
    why = difference(found, new_state(root, plan), {t.index: t.spec for t in plan.trials})
    if why:
        raise UsageError(f"{found.path}: another sweep ran here ({why}); give a new {flag}, or run that sweep "
                         "as it was")
    return found


def open_sweep(root: Path, plan: Plan, *, flag: str = "--run-dir") -> SweepState:
    """The sweep's state in ``root``: new (saved, every trial pending), or the one a run of the
    same sweep left there, with the trials ``plan`` adds after it.

    Args:
        flag: the option that named ``root``, for messages (``--sweep`` for the launchers).

    Raises:
        UsageError: ``root`` is refused by ``check_sweep_dir``.
    """
    root = Path(root)
    if not is_sweep_dir(root):
        check_sweep_dir(root, plan, flag=flag)  # refused before the lock, which would leave its file there
    with locked(root):
        found = check_sweep_dir(root, plan, flag=flag)
        wanted = new_state(root, plan)
        if found is None:
            wanted.save()
            return wanted
        if len(wanted.trials) > len(found.trials) or found.job != wanted.job:  # else sweep.yaml stays as it is
            found.job, found.trials = wanted.job, found.trials + wanted.trials[len(found.trials):]
            found.save()
        return found


def difference(found: SweepState, wanted: SweepState, specs: dict) -> Optional[str]:
    """How the sweep that ran (``found``) differs from ``wanted`` (None: the same, perhaps with more
    trials). ``specs`` gives each trial's job, to name a changed key."""
    if (found.metric, found.mode) != (wanted.metric, wanted.mode):
        return f"it compares on {found.metric} ({found.mode}), this sweep on {wanted.metric} ({wanted.mode})"
    if len(wanted.trials) < len(found.trials):
        return f"it has {len(found.trials)} trials, this sweep {len(wanted.trials)}"
    for old, new in zip(found.trials, wanted.trials):
        if old.overrides != new.overrides:
            return f"its trial {old.index} is {' '.join(old.sets) or '(none)'}, this sweep's {' '.join(new.sets)}"
        if old.job != new.job:
            changed = changed_key(trial_dir(found.root, old.index) / RunDir.JOB, specs[new.index])
            return f"trial {old.index} ran another job{': ' + changed if changed else ''}"
    return None


def changed_key(job_file: Path, spec: JobSpec) -> Optional[str]:
    """``train.epochs: 1 → 2``: the first key where the job a trial ran (its run dir's job.yaml)
    differs from ``spec`` (None: no job.yaml to compare with, or none differs)."""
    try:
        ran = yaml.safe_load(job_file.read_text())
    except (OSError, yaml.YAMLError):
        return None
    now = spec_to_dict(spec)
    for key in UNTRAINED_KEYS:
        for job in (ran, now):
            if isinstance(job, dict):
                job.pop(key, None)
    return _first_difference(ran, now, "")


def _first_difference(a: Any, b: Any, path: str) -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if a == b else f"{path}: {format_value(a)} → {format_value(b)}"


def describe(state: SweepState) -> str:
    """``4 trials: 3 finished, 1 stopped``."""
    counts = [f"{state.count(s)} {s}" for s in (FINISHED, PRUNED, RUNNING, STOPPED, FAILED, PENDING) if state.count(s)]
    return f"{len(state.trials)} trial(s): {', '.join(counts)}"
