"""A trial trained by a launcher, one of many at once: a SLURM job array's task, a Ray Tune trial.

``distrain sweep`` trains its trials in its own process and records each in ``sweep.yaml`` as it
goes (``sweeps.local``). A launcher runs a trial elsewhere, as an ordinary ``distrain train`` of
the trial's job in the trial's run dir, and records it around that run: ``begin`` before (the
sweep dir opened or created, the trial marked ``running``, or nothing to train because it
finished already), ``end`` after, from the run's exit code and ``summary.json``. Several
launchers' processes may do so at once: ``sweep.yaml`` is changed under its lock
(``state.locked``), one trial's record at a time.

A trial's run dir keeps what a requeued or restarted run needs: its backup. Training the trial
again in it (a requeued array task, a Ray Tune trial restarted after a lost worker, the same sweep
submitted again) resumes from that backup, as ``distrain train --resume`` does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from distrain.errors import (EXIT_FAILED, EXIT_NAN, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE,
                             EXIT_WRITE_FAILED, UsageError)
from distrain.rundir import RunDir
from distrain.sweeps import state as sweep_state
from distrain.sweeps.compare import result
from distrain.sweeps.plan import Plan, Trial

# Exit codes after which the trial resumes from its backup when trained again (a requeue, a rerun).
RESUMABLE = {EXIT_PREEMPTED: "preempted", EXIT_PEER_LOST: "a peer was lost",
             EXIT_WRITE_FAILED: "a file could not be written (disk full?)"}


@dataclass(frozen=True)
class Started:
    """A trial ``begin`` found.

    Attributes:
        trial: the planned trial (its overrides and validated job).
        record: its record in ``sweep.yaml`` after ``begin``.
        run_dir: its run dir, ``SWEEP_DIR/trial-NNN``.
        done: why there is nothing to train (finished, pruned, or a NaN loss: its result stands);
            None when the trial is to be trained.
    """

    trial: Trial
    record: sweep_state.TrialRecord
    run_dir: Path
    done: Optional[str] = None


def begin(sweep: Plan, root: Path, index: int, *, flag: str = "--sweep", trial_flag: str = "--trial") -> Started:
    """Opens the sweep dir (creating it, or checking it holds the same sweep) and marks trial
    ``index`` running, unless it needs no training.

    Args:
        sweep: the planned sweep, every trial validated (``sweeps.plan.plan``).
        root: the sweep dir.
        index: the trial (a SLURM array task's ``SLURM_ARRAY_TASK_ID``).
        flag, trial_flag: the options that named ``root`` and ``index``, for messages.

    Raises:
        UsageError: no such trial, or ``root`` holds another sweep or a run (``state.open_sweep``).
    """
    if not 0 <= index < len(sweep.trials):
        raise UsageError(f"{trial_flag} {index}: the sweep has {len(sweep.trials)} trial(s), "
                         f"0 to {len(sweep.trials) - 1}")
    trial = sweep.trials[index]
    state = sweep_state.open_sweep(Path(root), sweep, flag=flag)
    record = state.trials[index]
    run_dir = state.trial_dir(index)
    if not record.to_run:
        return Started(trial, record, run_dir, done=finished_line(record, sweep.metric))
    return Started(trial, state.update(index, sweep_state.RUNNING), run_dir)


def finished_line(record: sweep_state.TrialRecord, metric: str) -> str:
    """``trial-002 finished already (val_accuracy 0.9132)``: why a trial is not trained again."""
    if record.state == sweep_state.FAILED:
        return f"{record.name} ended with a NaN loss already ({record.error}); its learning rate diverges"
    value = "-" if record.result is None else f"{record.result:.4f}"
    return f"{record.name} {record.state} already ({metric} {value})"


def outcome(exit_code: int, summary: Optional[Mapping], metric: str) -> tuple[str, Optional[float], Optional[str]]:
    """How a trial's run ended, for ``sweep.yaml``: ``(state, result, error)``.

    Pure. Exit 0 with a summary is ``finished`` with the metric at the last epoch; 74, 75 and 76
    are ``stopped`` (trained again, it resumes from its backup); 77 (NaN loss), 2 (bad input) and
    anything else are ``failed``.
    """
    if exit_code == EXIT_OK:
        if summary is None:
            return sweep_state.FAILED, None, "exit 0 but no summary.json in its run dir"
        return sweep_state.FINISHED, result(summary, metric), None
    if exit_code in RESUMABLE:
        return sweep_state.STOPPED, None, f"{RESUMABLE[exit_code]} (exit {exit_code}); resumes from its backup"
    if exit_code == EXIT_NAN:
        return sweep_state.FAILED, None, f"NaN loss (exit {EXIT_NAN})"
    if exit_code == EXIT_USAGE:
        return sweep_state.FAILED, None, f"bad input (exit {EXIT_USAGE}): see its output"
    return sweep_state.FAILED, None, f"exit {exit_code}: see its output and logs/"


def end(root: Path, index: int, exit_code: int) -> sweep_state.TrialRecord:
    """Records how trial ``index`` of the sweep in ``root`` ended (``outcome``), reading its run
    dir's ``summary.json`` for the sweep's metric.

    Raises:
        UsageError: ``root`` holds no sweep, or no such trial.
    """
    state = sweep_state.load(Path(root))
    if not 0 <= index < len(state.trials):
        raise UsageError(f"--trial {index}: the sweep in {root} has {len(state.trials)} trial(s)")
    summary = read_summary(state.trial_dir(index))
    status, value, error = outcome(exit_code, summary, state.metric)
    return state.update(index, status, result=value, error=error,
                        exit_code=None if status == sweep_state.FINISHED else (exit_code or EXIT_FAILED))


def read_summary(run_dir: Path) -> Optional[dict]:
    """A run dir's ``summary.json`` (None: none, or unreadable)."""
    try:
        return json.loads(RunDir(run_dir).summary.read_text())
    except (OSError, ValueError):
        return None
