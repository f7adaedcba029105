"""``distrain ray JOB --sweep SWEEP_DIR``: a sweep's trials as Ray Tune trials, each a Ray Train run.

::

    distrain ray jobs/quickstart.yaml --workers 2 --sweep /shared/sweeps/lr \\
        --grid train.learning_rate=0.001,0.003,0.01,0.03 --parallel 2 --scheduler asha

The sweep is planned as ``distrain sweep`` plans it (``sweeps.plan``: every trial validated, the
metric checked) and lives in the same layout: ``SWEEP_DIR/sweep.yaml`` and a run dir per trial,
``SWEEP_DIR/trial-NNN``. Ray Tune runs the trials that are to run (not finished, not pruned),
at most ``--parallel`` at once; each Tune trial is a small driver (``run_trial``) that marks its
trial running (``sweeps.launched.begin``), trains it with ``TensorflowTrainer`` and the same
``launch.ray.train_loop`` as ``distrain ray`` (``--workers`` workers, restarts from the trial's
backup with ``--max-failures``), and records how it ended (``launched.end``). A trial whose
workers are lost beyond ``--max-failures`` fails alone: the other trials are other Train runs.

With ``--scheduler asha``, Tune's ``AsyncHyperBandScheduler`` compares the trials on the sweep's
metric at epochs ``grace × factor^k`` and stops the poor ones: Tune ends such a trial's driver
(and with it its Train run), so the driver of the sweep records it, ``pruned``, with the metric
at its last reported epoch (``Recorder``). A pruned trial is not trained again.

Tune's own files go to ``SWEEP_DIR/ray-tune/run-<time>/`` (one experiment per run of the
sweep; Ray Train's per trial in its ``ray-train/trial-NNN``). Everything that can be checked is
checked before Tune starts, as for ``distrain ray``.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from distrain.errors import EXIT_FAILED, EXIT_NAN, EXIT_OK, UsageError
from distrain.launch import ray as ray_launch
from distrain.rundir import RunDir
from distrain.spec import spec_to_dict
from distrain.sweeps import launched
from distrain.sweeps import state as sweep_state
from distrain.sweeps.local import add_sweep_args, write_sweep_config
from distrain.sweeps.plan import Plan, plan, trial_name
from distrain.user_code import code_to_ship

TUNE_DIR = "ray-tune"  # SWEEP_DIR/ray-tune/run-<time>: one Tune experiment per run of the sweep
TRAIN_DIR = "ray-train"  # .../run-<time>/ray-train/trial-NNN: Ray Train's storage for a trial (pointers)
SCHEDULERS = ("none", "asha")
DEFAULT_GRACE_EPOCHS = 1
DEFAULT_REDUCTION_FACTOR = 2.0
# A Tune trial only drives its Train run and waits, like Train's own controller (0 CPUs). Ray
# refuses a request of nothing, so it asks for a little memory instead of a CPU a worker could use.
TRIAL_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}
# Flags that mean something only with --sweep, and their defaults (argparse's).
SWEEP_ONLY = {"grid": [], "trials": None, "parallel": None, "scheduler": None, "grace_epochs": None,
              "reduction_factor": None}


@dataclass(frozen=True)
class TuneRequest:
    """What ``distrain ray --sweep`` asks of Ray Tune (the flags, validated).

    Attributes:
        sweep_dir: the sweep dir, absolute (shared by every node).
        parallel: trials at once (None: as many as the cluster holds).
        scheduler: ``none`` (every trial runs all its epochs) or ``asha``.
        grace_epochs: ASHA compares a trial from this epoch on.
        reduction_factor: ASHA keeps about 1 in this many trials at each comparison.
    """

    sweep_dir: Path
    parallel: Optional[int] = None
    scheduler: str = "none"
    grace_epochs: int = DEFAULT_GRACE_EPOCHS
    reduction_factor: float = DEFAULT_REDUCTION_FACTOR

    @property
    def tune_storage(self) -> Path:
        return self.sweep_dir / TUNE_DIR


def check_sweep_flags(*, sweep: str, storage_path: Optional[str], name: Optional[str], parallel: Optional[int],
                      scheduler: Optional[str], grace_epochs: Optional[int],
                      reduction_factor: Optional[float]) -> TuneRequest:
    """The flags of a sweep that need no job (pure): everything but ASHA against the epochs.

    Raises:
        UsageError: one line naming the flag.
    """
    for flag, value in (("--storage-path", storage_path), ("--name", name)):
        if value is not None:
            raise UsageError(f"{flag}: not with --sweep: each trial's run dir is SWEEP_DIR/trial-NNN and Ray's "
                             f"files go to SWEEP_DIR/{TUNE_DIR}")
    root = os.path.expanduser(sweep)
    if not os.path.isabs(root):
        raise UsageError(f"--sweep: expected an absolute path (shared by every node), got {sweep}")
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel: expected a positive integer, got {parallel}")
    chosen = "none" if scheduler is None else scheduler
    if chosen not in SCHEDULERS:
        raise UsageError(f"--scheduler: expected asha or none, got {scheduler!r}")
    if chosen != "asha":
        for flag, value in (("--grace-epochs", grace_epochs), ("--reduction-factor", reduction_factor)):
            if value is not None:
                raise UsageError(f"{flag}: only with --scheduler asha")
    factor = DEFAULT_REDUCTION_FACTOR if reduction_factor is None else float(reduction_factor)
    if not (factor >= 2 and math.isfinite(factor)):
        raise UsageError(f"--reduction-factor: expected a number >= 2 (ASHA keeps 1 in that many trials at each "
                         f"comparison), got {reduction_factor:g}")
    grace = DEFAULT_GRACE_EPOCHS if grace_epochs is None else grace_epochs
    if grace < 1:
        raise UsageError(f"--grace-epochs: expected a positive integer, got {grace}")
    return TuneRequest(Path(os.path.normpath(root)), parallel, chosen, grace, factor)


def last_comparison(epochs: Sequence[int]) -> int:
    """ASHA's ``max_t``: the last epoch at which it may stop a trial, the one before the longest
    trial's last. A trial that trained every epoch has only its test left: it finishes."""
    return max(epochs) - 1


def check_asha(request: TuneRequest, epochs: Sequence[int]) -> None:
    """``--grace-epochs`` against the trials' ``train.epochs`` (ASHA only).

    Raises:
        UsageError: the grace period leaves no epoch to compare the trials at.
    """
    if request.scheduler != "asha":
        return
    longest = max(epochs)
    if longest < 2:
        raise UsageError(f"--scheduler asha: the trials train {longest} epoch (train.epochs), but ASHA compares "
                         "trials at epochs before their last: give them 2 or more")
    if request.grace_epochs > last_comparison(epochs):
        raise UsageError(f"--grace-epochs {request.grace_epochs}: expected 1 to {longest - 1}: ASHA compares "
                         f"trials at epochs before their last, and the trials train {longest} (train.epochs)")


def comparison_epochs(grace: int, factor: float, epochs: int) -> list[float]:
    """The epochs at which ASHA compares the trials (its rungs): ``grace × factor^k``, before the
    last epoch.

    >>> comparison_epochs(1, 2, 6), comparison_epochs(2, 3, 20)
    ([1, 2, 4], [2, 6, 18])
    """
    found, k = [], 0
    while grace * factor ** k <= epochs - 1 + 1e-9:
        value = grace * factor ** k
        found.append(int(value) if float(value).is_integer() else value)
        k += 1
    return found


def scheduler_arguments(request: TuneRequest, metric: str, mode: str, epochs: Sequence[int]) -> Optional[dict]:
    """``AsyncHyperBandScheduler``'s keyword arguments (None without ASHA). Pure.

    ``time_attr`` is the epoch every report carries; ``stop_last_trials=False`` keeps ASHA from
    stopping trials that reach ``max_t``: they go on to their last epoch.
    """
    if request.scheduler != "asha":
        return None
    return {"time_attr": "epoch", "metric": metric, "mode": mode, "max_t": last_comparison(epochs),
            "grace_period": request.grace_epochs, "reduction_factor": request.reduction_factor,
            "stop_last_trials": False}


def trials_at_once(request: ray_launch.RayRequest, nodes: Sequence[Mapping[str, float]]) -> int:
    """How many trials of ``request.workers`` workers the cluster holds at once (a trial's workers
    may span nodes; each worker's resources come from one node)."""
    return sum(ray_launch.workers_fitting(request, node) for node in nodes) // request.workers


def concurrency(parallel: Optional[int], fit: int, todo: int) -> tuple[int, Optional[str]]:
    """Tune's ``max_concurrent_trials`` and a note when ``--parallel`` asks more than fits. Pure.

    More Train runs at once than the cluster holds would each wait inside a running Tune trial for
    workers; Tune queues the extra trials instead, and starts them as others end.

    >>> concurrency(None, 2, 4), concurrency(1, 2, 4)
    ((2, None), (1, None))
    """
    wanted = todo if parallel is None else parallel
    at_once = max(1, min(wanted, fit, todo))
    note = None
    if parallel is not None and parallel > fit:
        note = (f"--parallel {parallel}: {fit} trial(s) of this size fit on the Ray cluster at once; "
                f"{at_once} run at once, Tune queues the others")
    return at_once, note


def train_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The driver's ``RAY_TRAIN_*`` settings that Ray Train passes from its driver to its controller
    and workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, ...): each trial's Train run gets them too."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    return {key: env[key] for key in sorted(ENV_VARS_TO_PROPAGATE) if key in env}


def tune_metrics(metrics: Mapping[str, Any]) -> dict:
    """A Train report as Tune takes it (pure): ``done`` is Tune's own key (a result with it ends the
    trial at once, before the trial records its end), so the last report's says ``finished``."""
    return {("finished" if key == "done" else key): value for key, value in metrics.items()}


def exit_code(records: Sequence[sweep_state.TrialRecord]) -> int:
    """0 when every trial finished or was pruned (or ended with a NaN loss: its result), else 1."""
    bad = [r for r in records if r.state in (sweep_state.FAILED, sweep_state.STOPPED, sweep_state.RUNNING,
                                              sweep_state.PENDING) and r.exit_code != EXIT_NAN]
    return EXIT_FAILED if bad else EXIT_OK


def prune(root: Path, index: int, value: Optional[float], epoch: Optional[int]) -> Optional[sweep_state.TrialRecord]:
    """Records trial ``index`` as pruned by ASHA with the metric at its last reported epoch, unless
    it recorded its own end first (it finished just as it was stopped). Returns the new record,
    or None when it was left as it was."""
    at = f" at epoch {epoch}" if epoch is not None else ""
    # Tune's stop may reach the trial's Train run first, which then ends it as failed: ASHA's
    # decision stands over that record (only a trial that finished keeps its own).
    return _end_if_running(root, index, state=sweep_state.PRUNED, result=value, exit_code=None,
                           error=f"stopped by ASHA{at}: behind the trials that reached that epoch before it",
                           unless=(sweep_state.FINISHED,))


def lost(root: Path, index: int, why: str) -> Optional[sweep_state.TrialRecord]:
    """Records trial ``index`` as stopped when its Tune trial ended without recording how (its
    driver died, or the sweep was interrupted): run the sweep again to resume it from its backup."""
    return _end_if_running(root, index, state=sweep_state.STOPPED, result=None, exit_code=EXIT_FAILED, error=why)


def _end_if_running(root: Path, index: int, unless: Optional[Sequence[str]] = None,
                    **fields) -> Optional[sweep_state.TrialRecord]:
    """Sets fields of trial ``index``'s record if it is still ``running`` (or, given ``unless``, in
    none of those states); checked and written under the sweep's lock, so a trial's own
    ``launched.end`` is not overwritten by a guess."""
    with sweep_state.locked(root):
        state = sweep_state.load(root)
        current = state.trials[index].state
        if (current in unless) if unless is not None else (current != sweep_state.RUNNING):
            return None
        state.trials[index] = dataclasses.replace(state.trials[index], **fields)
        state.save()
        return state.trials[index]


def describe_record(record: sweep_state.TrialRecord, metric: str) -> str:
    """``trial-002 pruned (loss 2.3011): stopped by ASHA at epoch 1 ...``: a trial's end in one line."""
    value = "" if record.result is None else f" ({metric} {record.result:.4f})"
    why = f": {record.error}" if record.error and record.state != sweep_state.FINISHED else ""
    return f"{record.name} {record.state}{value}{why}"


# ----------------------------------------------------------------------------- in each Tune trial

class TrialFailed(RuntimeError):
    """A trial's Train run ended without finishing; Tune shows the trial as errored with this line."""


def run_trial(config: dict, sweep: Optional[Plan] = None, settings: Optional[dict] = None) -> Optional[dict]:
    """What each Ray Tune trial runs: ``begin``, a ``TensorflowTrainer`` run of the trial, ``end``.

    Args:
        config: Tune's trial config, ``{"index": k}``.
        sweep: the planned sweep (``tune.with_parameters``).
        settings: from the driver (``make_tuner``): ``root`` (the sweep dir), ``request`` (the
            ``RayRequest`` fields but the name and storage), ``train_storage``, ``env`` and
            ``train_env`` (environment variables for the workers and for Train), ``shipped``.

    Raises:
        TrialFailed: the Train run did not finish (its end is recorded first).
    """
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    # Ray Train reads its RAY_TRAIN_* settings from its driver's environment, which is this Tune
    # trial, not the process the user started: they come from there (``train_settings``).
    os.environ.update(settings["train_env"])
    index, root = int(config["index"]), Path(settings["root"])
    started = launched.begin(sweep, root, index)
    if started.done:
        return None
    trial = started.trial
    request = ray_launch.RayRequest(**settings["request"], name=trial.name, storage_path=settings["train_storage"])
    kwargs = ray_launch.trainer_arguments(request, keep_checkpoints=trial.spec.checkpoint.keep, env=settings["env"])
    trainer = TensorflowTrainer(
        train_loop_per_worker=ray_launch.train_loop,
        train_loop_config={"spec": spec_to_dict(trial.spec), "run_dir": str(started.run_dir),
                           "shipped": settings["shipped"]},
        scaling_config=ray.train.ScalingConfig(**kwargs["scaling"]),
        run_config=ray.train.RunConfig(failure_config=ray.train.FailureConfig(**kwargs["failure"]),
                                       checkpoint_config=ray.train.CheckpointConfig(**kwargs["checkpoint"]),
                                       callbacks=[tune_report_callback()], **kwargs["run"]))
    try:
        trainer.fit()
        code, message = EXIT_OK, None
    except ray.train.TrainingFailedError as err:
        code, message = ray_launch.failure_exit_code(err)
    except Exception as err:  # noqa: BLE001  (Train's controller itself failed: the trial fails, not the sweep)
        code, message = EXIT_FAILED, f"{type(err).__name__}: {ray_launch.last_line(err)}"
    record = launched.end(root, index, code)
    if record.state != sweep_state.FINISHED:
        raise TrialFailed(f"{trial.name} {record.state} (exit {code}): {message or record.error}")
    return None


def tune_report_callback():
    """Ray's ``TuneReportCallback`` (each Train report to Tune, rank 0's metrics) with ``done``
    renamed (``tune_metrics``). Built in the Tune trial, which it must be."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [tune_metrics(m) for m in metrics], checkpoint)

    return ReportToTune()


# ----------------------------------------------------------------------------- in the driver

def asha_scheduler(arguments: dict):
    """Tune's ASHA, remembering which trials it stopped (the ``Recorder`` prunes those)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    class Asha(AsyncHyperBandScheduler):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.stopped: set = set()

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                self.stopped.add(trial.trial_id)
            return action

    return Asha(**arguments)


def recorder(root: Path, metric: str, scheduler):
    """A Tune callback (in the driver) that prints each trial's start and end, and records the
    ends its trial could not: pruned by ASHA, or its Tune trial lost."""
    from ray import tune

    def say(line: str) -> None:
        print(f"distrain ray: {line}", file=sys.stderr, flush=True)

    class Recorder(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            index = int(trial.config["index"])
            record = sweep_state.load(root).trials[index]
            say(f"{record.name} started: {' '.join(record.sets) or '(the job as it is)'}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            index = int(trial.config["index"])
            last = trial.last_result or {}
            if scheduler is not None and trial.trial_id in getattr(scheduler, "stopped", ()):
                value = last.get(metric)
                value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
                epoch = last.get("epoch")
                prune(root, index, value, int(epoch) if isinstance(epoch, (int, float)) else None)
            else:
                lost(root, index, "its Ray Tune trial was stopped before it ended (the sweep was interrupted?); "
                                  "run the sweep again to resume it")
            say(describe_record(sweep_state.load(root).trials[index], metric))

        def on_trial_error(self, iteration, trials, trial, **info):
            index = int(trial.config["index"])
            error = trial.error_file or "its Ray Tune trial failed"
            lost(root, index, f"its Ray Tune trial failed before recording its end (see {error}); run the sweep "
                              "again to resume it")
            say(describe_record(sweep_state.load(root).trials[index], metric))

    return Recorder()


def add_parser(subparsers) -> None:
    """Adds the sweep's flags to ``distrain ray`` (registered by ``launch.ray`` before it), whose
    handler becomes ``cmd_ray``: the sweep with ``--sweep``, else the plain ``launch.ray.cmd_ray``."""
    p = subparsers.choices.get("ray")
    if p is None:
        return
    add_sweep_arguments(p)
    p.set_defaults(handler=cmd_ray)


def cmd_ray(args) -> int:
    """``distrain ray``: with ``--sweep``, the sweep as Ray Tune trials (``cmd_ray_sweep``); else one
    Ray Train run, as ``launch.ray`` trains it."""
    if wants_sweep(args):
        return cmd_ray_sweep(args)
    return ray_launch.cmd_ray(args)


def add_sweep_arguments(p) -> None:
    """The ``distrain ray`` flags of a sweep (``--sweep`` and what goes with it)."""
    p.add_argument("--sweep", metavar="SWEEP_DIR",
                   help="train the job's sweep as Ray Tune trials, each a Ray Train run of --workers N, in "
                        "SWEEP_DIR/trial-NNN (absolute, shared by every node); rerun to resume it")
    add_sweep_args(p)
    p.add_argument("--parallel", type=int, metavar="P", help="trials at once (default: as many as the cluster holds)")
    p.add_argument("--scheduler", metavar="NAME",
                   help="asha: stop poor trials early on the sweep's metric (default none: every trial runs all "
                        "its epochs)")
    p.add_argument("--grace-epochs", type=int, metavar="G",
                   help=f"ASHA compares a trial from epoch G on (default {DEFAULT_GRACE_EPOCHS})")
    p.add_argument("--reduction-factor", type=float, metavar="R",
                   help=f"ASHA keeps about 1 trial in R at each comparison, at epochs G x R^k "
                        f"(default {DEFAULT_REDUCTION_FACTOR:g})")


def wants_sweep(args) -> bool:
    """Whether ``distrain ray`` was asked for a sweep (``--sweep``).

    Raises:
        UsageError: a sweep's flag without ``--sweep``.
    """
    if getattr(args, "sweep", None) is not None:
        return True
    for key, default in SWEEP_ONLY.items():
        if getattr(args, key, default) != default:
            raise UsageError(f"--{key.replace('_', '-')}: only with --sweep SWEEP_DIR")
    return False


def checked_sweep(args) -> tuple[TuneRequest, Plan, ray_launch.RayRequest]:
    """Everything of ``distrain ray --sweep`` that can be checked without Ray: the flags, every
    trial (``sweeps.plan``), ASHA against the epochs, the workers' request and strategy.

    Raises:
        UsageError: one line naming the flag, key or trial.
    """
    request = check_sweep_flags(sweep=args.sweep, storage_path=args.storage_path, name=args.name,
                                parallel=args.parallel, scheduler=args.scheduler, grace_epochs=args.grace_epochs,
                                reduction_factor=args.reduction_factor)
    sweep = plan(args.job, args.overrides, grid=args.grid, trials=args.trials)
    check_asha(request, [t.spec.train.epochs for t in sweep.trials])
    workers = ray_launch.make_request(workers=args.workers, spec_name=sweep.spec.name,
                                      gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                                      max_failures=args.max_failures, storage_path=str(request.sweep_dir),
                                      name=TUNE_DIR)
    for trial in sweep.trials:
        ray_launch.check_strategy(trial.spec, workers)
    return request, sweep, workers


def cmd_ray_sweep(args) -> int:
    """``distrain ray JOB --sweep SWEEP_DIR``: every input checked, then ``Tuner(...).fit()``; exit 1
    if a trial failed or stopped."""
    request, sweep, workers = checked_sweep(args)
    root = request.sweep_dir
    if sweep_state.is_sweep_dir(root):  # a sweep run before: perhaps nothing is left to train
        state = sweep_state.open_sweep(root, sweep, flag="--sweep")
        if not any(state.trials[t.index].to_run for t in sweep.trials):
            return finish(state, [], sweep.metric)
    shipped = code_to_ship(sweep.spec)
    ray = ray_launch.connect(**ray_launch.trainer_arguments(workers, py_modules=list(shipped))["init"])
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    ray_launch.check_resources(workers, nodes)
    state = sweep_state.open_sweep(root, sweep, flag="--sweep")
    todo = [t.index for t in sweep.trials if state.trials[t.index].to_run]
    if not todo:
        return finish(state, [], sweep.metric)
    at_once, note = concurrency(request.parallel, trials_at_once(workers, nodes), len(todo))
    if note:
        print(f"distrain ray: {note}", file=sys.stderr, flush=True)
    if sweep.spec.logging.tensorboard:
        write_sweep_config(root / RunDir.TENSORBOARD, sweep)
    tuner, line = make_tuner(request, sweep, workers, todo, at_once, shipped)
    print(f"distrain ray: {state.path}: {sweep_state.describe(state)}; {len(todo)} to run as Ray Tune trials, "
          f"{at_once} at once, {workers.workers} worker(s) each, {line}", file=sys.stderr, flush=True)
    tuner.fit()
    for index in todo:  # a trial Tune never reported back on (the driver was interrupted)
        lost(root, index, "the sweep ended before this trial did; run the sweep again to resume it")
    return finish(sweep_state.load(root), todo, sweep.metric)


def make_tuner(request: TuneRequest, sweep: Plan, workers: ray_launch.RayRequest, todo: Sequence[int],
               at_once: int, shipped: Mapping[str, str]):
    """Ray Tune's ``Tuner`` over the trials ``todo`` (one grid value each: its index), and a line
    saying how it runs them."""
    from ray import tune

    epochs = [t.spec.train.epochs for t in sweep.trials]
    arguments = scheduler_arguments(request, sweep.metric, sweep.mode, epochs)
    scheduler = asha_scheduler(arguments) if arguments else None
    experiment = f"run-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    settings = {"root": str(request.sweep_dir), "train_storage": str(request.tune_storage / experiment / TRAIN_DIR),
                "env": {k: v for k, v in os.environ.items() if k == "TF_CPP_MIN_LOG_LEVEL"},
                "train_env": train_settings(os.environ),
                "shipped": {path: name for path, name in shipped.items() if path.endswith(".py")},
                "request": {f.name: getattr(workers, f.name) for f in dataclasses.fields(workers)
                            if f.name not in ("name", "storage_path")}}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, settings=settings), TRIAL_RESOURCES),
        param_space={"index": tune.grid_search(list(todo))},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=at_once,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=experiment, storage_path=str(request.tune_storage), verbose=0,
                                  callbacks=[recorder(request.sweep_dir, sweep.metric, scheduler)]))
    rungs = comparison_epochs(request.grace_epochs, request.reduction_factor, max(epochs))
    how = (f"ASHA on {sweep.metric} ({sweep.mode}) at epochs {', '.join(map(str, rungs))}" if scheduler is not None
           else "every trial to its last epoch")
    return tuner, f"{how}; Tune's files in {request.tune_storage / experiment}"


def _trial_name(trial) -> str:
    return trial_name(int(trial.config["index"]))


def finish(state: sweep_state.SweepState, ran: Sequence[int], metric: str) -> int:
    """Prints the sweep's end and returns the exit code (``exit_code``)."""
    bad = [r for r in state.trials if r.index in ran and exit_code([r]) != EXIT_OK]
    for record in bad:
        print(f"distrain ray: {describe_record(record, metric)}", file=sys.stderr)
    print(f"distrain ray: {state.path}: {sweep_state.describe(state)}{'' if ran else '; nothing to run'}",
          file=sys.stderr)
    print(f"sweep dir: {state.root}\ncompare: distrain report {os.fspath(state.root)}")
    return exit_code([r for r in state.trials if r.index in ran])
