"""``distrain sweep JOB --run-dir SWEEP_DIR``: a sweep's trials one after another in this process.

Every trial goes through the start-up of ``distrain train`` (``startup.start`` with the trial's
job, ``run.train`` in ``SWEEP_DIR/trial-NNN``), so trial k trains what ``distrain train JOB --set
<the job's --set> --set <trial k's overrides>`` trains, number for number: each starts from a
cleared Keras session and sets the job's seeds as a fresh process does.

Running the same sweep again (``state.open_sweep``) skips finished trials and resumes the others
from their backups, as ``distrain train --resume`` would. A trial that fails (an error, a NaN loss)
is recorded and the sweep goes on with the next; a stop request (SIGTERM, SIGUSR1: a preemption)
stops the trial at its next agreed step with a backup, and the sweep with it: exit 75, run it
again to go on. A signal between trials stops the sweep before the next one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

from distrain import startup
from distrain.errors import EXIT_FAILED, EXIT_NAN, EXIT_PREEMPTED, TrainingStopped, UsageError
from distrain.run import train
from distrain.rundir import RunDir
from distrain.spec import spec_to_dict
from distrain.sweeps import state as sweep_state
from distrain.sweeps.compare import result, value_at
from distrain.sweeps.plan import Plan, Trial, plan
from distrain.sweeps.trials import format_value
from distrain.tf_startup import import_tensorflow
from distrain.world import World, detect

log = logging.getLogger("distrain")

# What TensorFlow sets once per process, before its first op: trials run in one process must agree.
PROCESS_KEYS = ("distribute.cpu_devices", "distribute.devices", "distribute.memory_growth")


def run(sweep: Plan, sweep_dir, *, world: Optional[World] = None) -> sweep_state.SweepState:
    """Runs the trials of ``sweep`` that are not finished, in order, in ``sweep_dir``.

    Args:
        sweep: the planned sweep (``sweeps.plan.plan``).
        sweep_dir: the sweep dir (new, or one a run of the same sweep left).
        world: this process's world (default: detected); a sweep runs in one process.

    Returns:
        The sweep's state, as ``sweep.yaml`` holds it.

    Raises:
        UsageError: another sweep (or a run) in ``sweep_dir``, several workers, or trials whose
            devices differ (``check_one_process``).
        TrainingStopped: a trial was preempted (exit 75) or could not write (exit 74); its state
            is ``stopped`` and a run of the same sweep resumes it.
    """
    world = check_one_process(sweep, world or detect(port_override=sweep.spec.distribute.port))
    state = sweep_state.open_sweep(Path(sweep_dir), sweep)
    todo = [t for t in sweep.trials if state.trials[t.index].to_run]
    _say(f"{state.path}: {sweep_state.describe(state)}; {len(todo)} to run, compared on {sweep.metric} ({sweep.mode})")
    if todo and sweep.spec.logging.tensorboard:
        write_sweep_config(state.root / RunDir.TENSORBOARD, sweep)
    with _signals() as received:
        for n, trial in enumerate(todo, 1):
            if received:
                raise TrainingStopped(f"preempted ({received[0]}) between trials: {sweep_state.describe(state)}; "
                                      f"run the same sweep again to go on", EXIT_PREEMPTED)
            _say(f"{trial.name} ({n}/{len(todo)}): {' '.join(trial.sets) or '(the job as it is)'}")
            run_one(sweep, trial, state, world)
    _say(f"{state.path}: {sweep_state.describe(state)}")
    return state


def check_one_process(sweep: Plan, world: World) -> World:
    """The sweep runs in this one process: not one of several workers, and every trial with the
    devices TensorFlow sets once per process (``PROCESS_KEYS``).

    Raises:
        UsageError: one line naming the key that differs, or the launcher.
    """
    for key in PROCESS_KEYS:
        values = {format_value(value_at(spec_to_dict(t.spec), key)) for t in sweep.trials}
        if len(values) > 1:
            raise UsageError(f"{sweep.source}: {key}: differs between the trials ({', '.join(sorted(values))}), but "
                             "distrain sweep runs them in one process, whose devices TensorFlow sets once: sweep "
                             "it in separate sweeps")
    if world.world_size > 1:
        raise UsageError(f"distrain sweep: runs its trials in one process, but this is one of {world.world_size} "
                         f"workers ({world.launcher}); start it once, outside the launcher")
    return world


def write_sweep_config(log_dir: Path, sweep: Plan) -> None:
    """The sweep's HParams config in ``SWEEP_DIR/tensorboard``, once (``tensorboard_log``)."""
    if log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*")):
        return
    import_tensorflow()  # TensorBoard's hparams API imports it: after distrain's malloc settings
    from distrain.tensorboard_log import write_hparams_config

    write_hparams_config(log_dir, sweep.spec)


def run_one(sweep: Plan, trial: Trial, state: sweep_state.SweepState, world: World) -> sweep_state.TrialRecord:
    """Trains one trial and records how it ended.

    Raises:
        TrainingStopped: preempted, a lost peer or a failed write (not a NaN loss: a failure).
        KeyboardInterrupt: the trial is recorded as stopped first.
    """
    state.update(trial.index, sweep_state.RUNNING)
    try:
        summary = train_trial(sweep, trial, state.trial_dir(trial.index), world)
    except TrainingStopped as err:
        if err.exit_code == EXIT_NAN:  # the trial's hyperparameters diverge: its result, not a retry
            return _failed(state, trial, err, err.exit_code)
        state.update(trial.index, sweep_state.STOPPED, error=str(err), exit_code=err.exit_code)
        raise
    except KeyboardInterrupt:
        state.update(trial.index, sweep_state.STOPPED, error="interrupted", exit_code=EXIT_FAILED)
        raise
    except Exception as err:  # noqa: BLE001  (one trial's failure must not lose the others)
        log.exception("%s failed", trial.name)  # the traceback into the trial's own log
        return _failed(state, trial, err, EXIT_FAILED)
    finally:
        _close_run_log()
    record = state.update(trial.index, sweep_state.FINISHED, result=result(summary, sweep.metric))
    _say(f"{trial.name}: {sweep.metric} {'-' if record.result is None else f'{record.result:.4f}'}")
    return record


def _failed(state, trial: Trial, err: BaseException, exit_code: int) -> sweep_state.TrialRecord:
    line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    _say(f"{trial.name} failed: {line}")
    return state.update(trial.index, sweep_state.FAILED, error=line, exit_code=exit_code)


def train_trial(sweep: Plan, trial: Trial, run_dir: Path, world: World) -> dict:
    """One trial, started as ``distrain train`` starts a run; returns its summary."""
    tf = import_tensorflow()
    # Keras's global state (layer names, its graph) as in a fresh process; the seeds are set by
    # run.build_trainee, as in every run.
    tf.keras.backend.clear_session()
    begun = startup.start(trial.spec, source=sweep.source, run_dir=run_dir, world=world)
    return train(begun.spec, begun.run_dir, world=begun.world)


def _close_run_log() -> None:
    # run.setup_logging points distrain's log at the trial's logs/rank0.log; close it, so that a
    # sweep of many trials does not keep every trial's log file open.
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def _say(line: str) -> None:
    print(f"distrain sweep: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _signals() -> Iterator[list]:
    """Within it, SIGTERM and SIGUSR1 between trials are recorded (the list names the first) rather
    than killing the process; a trial's own handlers (``RunState.stop_on_signals``) take over
    while it trains."""
    received: list = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, _frame):
        received.append(signal.Signals(signum).name)
        _say(f"received {received[-1]}: stopping before the next trial")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------
# The command


def add_sweep_args(p) -> None:
    """``--grid`` and ``--trials``, for ``distrain sweep`` and ``distrain validate``."""
    p.add_argument("--grid", action="append", default=[], metavar="KEY.PATH=A,B,...",
                   help="sweep a key over these values (each read as YAML); adds to the job's sweep.grid or "
                        "replaces its key (repeatable)")
    p.add_argument("--trials", type=int, metavar="N", help="random trials: replaces the job's sweep.random.trials")


def add_parser(subparsers) -> None:
    """Registers ``distrain sweep``."""
    p = subparsers.add_parser(
        "sweep", help="train a job's sweep: its trials one after another on this machine",
        description="Train every trial of the job's sweep (its sweep: section, --grid, --trials) one after another "
                    "in this process, each a run dir SWEEP_DIR/trial-NNN. Run the same command again to resume: "
                    "finished trials are skipped, stopped ones resume from their backups. Compare them with "
                    "`distrain report SWEEP_DIR` and `distrain tensorboard SWEEP_DIR` (docs/sweeps.md).")
    p.add_argument("job", help="the job's YAML file (see jobs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the job for every trial (repeatable)")
    add_sweep_args(p)
    p.add_argument("--run-dir", type=Path, required=True, metavar="SWEEP_DIR",
                   help="the sweep dir: sweep.yaml and a run dir per trial")
    p.set_defaults(handler=cmd_sweep)


def cmd_sweep(args) -> int:
    """``distrain sweep``: every trial checked, then trained; exit 1 if a trial failed."""
    sweep = plan(args.job, args.overrides, grid=args.grid, trials=args.trials)
    done = run(sweep, args.run_dir)
    # A NaN loss is a trial's result (its learning rate diverges), not a failure of the sweep.
    failed = [t for t in done.trials if t.state == sweep_state.FAILED and t.exit_code != EXIT_NAN]
    if failed:
        print(f"distrain sweep: {len(failed)} trial(s) failed: "
              + "; ".join(f"{t.name}: {t.error}" for t in failed[:3]), file=sys.stderr)
    print(f"sweep dir: {done.root}\ncompare: distrain report {os.fspath(done.root)}")
    return EXIT_FAILED if failed else 0
