"""``distrain ray``: a job trained by Ray Train's ``TensorflowTrainer`` (Ray 2.60, Train V2).

On one machine (see docs/ray.md for a cluster from ``ray up`` or inside SLURM)::

    ray start --head --num-cpus=2 --dashboard-host=127.0.0.1
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- distrain ray jobs/quickstart.yaml --workers 2 --storage-path /tmp/ray-runs
    ray stop

Every Ray worker runs the same ``distrain.run.train(spec, run_dir, world=..., extra_callbacks=...)``
as any other launcher. Ray sets ``TF_CONFIG`` in each worker (so ``distrain.world.detect`` finds a
``MultiWorkerMirroredStrategy`` world); a Keras callback reports each epoch's metrics with a small
pointer checkpoint to Ray (``ray.train.report``). The run dir is ``STORAGE/NAME/run`` for every
attempt, so when ``--max-failures`` makes Ray restart the worker group, the new workers resume from
distrain's own backup (``RUN_DIR/backup``) at the exact step; Ray's checkpoints only say where it is.

Everything that can be checked is checked before Ray starts a worker: the job, the flags, and the
cluster's CPUs and GPUs against the request (Ray would otherwise wait forever for them).

With ``--sweep``, ``distrain ray`` trains a job's sweep, each trial a Ray Tune trial running this
same Train run (``launch.ray_tune``, which adds those flags to this command).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from distrain import startup, user_code
from distrain.backends.factory import choose_strategy
from distrain.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, TrainingStopped, UsageError
from distrain.run import train
from distrain.rundir import RunDir, write_atomically
from distrain.spec import spec_from_dict, spec_to_dict
from distrain.user_code import code_to_ship
from distrain.world import World, detect

log = logging.getLogger("distrain")

RESULT_FILE = "distrain-result.json"  # STORAGE/NAME/distrain-result.json: the Result, for scripts and tests
POINTER_FILE = "distrain.json"  # inside each Ray checkpoint: where distrain's backup is
DEFAULT_STORAGE = "~/ray_results"  # Ray's own default; on several nodes it must be shared storage

# Ray's TensorFlow backend sets TF_USE_LEGACY_KERAS=1 in each worker, but only after Ray's
# checkpoint module has imported TensorFlow and resolved tf.keras to Keras 3. Setting it in the
# workers' runtime environment makes it reach the process before anything imports TensorFlow.
WORKER_ENV_VARS = {"TF_USE_LEGACY_KERAS": "1"}
# distrain's own default (distrain/__init__.py), which comes too late in a Ray worker for the same reason.
DEFAULT_TF_CPP_MIN_LOG_LEVEL = "2"

EPILOG = """\
examples:
  ray job submit --address http://127.0.0.1:8265 --working-dir . \\
      -- distrain ray jobs/quickstart.yaml --workers 2 --storage-path /shared/ray-runs
  distrain ray jobs/cnn.yaml --workers 4 --gpus-per-worker 1 --max-failures 3 --name cnn-a
      (on a node of the cluster: RAY_ADDRESS or a local head is used)
  rerun with the same --storage-path and --name to continue a stopped run from its backup
  distrain ray jobs/quickstart.yaml --workers 1 --sweep /shared/sweeps/lr --grid train.learning_rate=0.001,0.01 \\
      --parallel 2 --scheduler asha
      (a sweep: each trial a Ray Tune trial of --workers N; exit 1 if a trial failed; docs/ray.md)
exit codes: 0 done, 1 failed, 2 bad input (nothing started, or no backup that verifies), 74/75/76/77
  as distrain train when the last attempt stopped for that reason (a write failed: disk full;
  preempted; peer lost; NaN loss). Ray restarts a failed attempt (--max-failures) whatever its code
"""


@dataclass(frozen=True)
class RayRequest:
    """What ``distrain ray`` asks of the Ray cluster (the command-line flags, validated).

    Attributes:
        workers: Ray Train workers, one TensorFlow worker process each.
        gpus_per_worker: GPUs reserved for each worker (Ray sets its ``CUDA_VISIBLE_DEVICES``).
        cpus_per_worker: logical CPUs reserved for each worker.
        max_failures: worker-group restarts Ray may make (-1: unlimited).
        storage_path: absolute path of shared storage; the run lives in ``STORAGE/NAME``.
        name: the Ray Train run's name.
    """

    workers: int
    name: str
    storage_path: str
    gpus_per_worker: int = 0
    cpus_per_worker: float = 1.0
    max_failures: int = 0

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def run_dir(self) -> Path:
        return RunDir.for_ray(self.experiment_dir)


def make_request(*, workers: int, spec_name: str, gpus_per_worker: int = 0, cpus_per_worker: float = 1.0,
                 max_failures: int = 0, storage_path: Optional[str] = None, name: Optional[str] = None,
                 now: Optional[datetime.datetime] = None) -> RayRequest:
    """Validates the flags and fills in the defaults (pure: no Ray, no environment).

    Args:
        workers, gpus_per_worker, cpus_per_worker, max_failures: the flags of the same names.
        spec_name: the job's ``name``; the default run name is ``<job name>-<time>``.
        storage_path: ``--storage-path``; ``~`` is expanded, the result must be absolute
            (default ``~/ray_results``). A relative path would land in the temporary copy of the
            working dir that ``ray job submit`` makes.
        name: ``--name``; reuse one to continue a stopped run.
        now: the time for the default name (tests pass a fixed one).

    Raises:
        UsageError: naming the flag, the value and what is valid.
    """
    if workers < 1:
        raise UsageError(f"--workers: expected a positive integer, got {workers}")
    if gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker: expected 0 or more, got {gpus_per_worker}")
    if not (cpus_per_worker > 0 and math.isfinite(cpus_per_worker)):
        raise UsageError(f"--cpus-per-worker: expected a positive number, got {cpus_per_worker:g}")
    if max_failures < -1:
        raise UsageError(f"--max-failures: expected -1 (unlimited), 0 or more, got {max_failures}")
    storage = os.path.expanduser(storage_path or DEFAULT_STORAGE)
    if not os.path.isabs(storage):
        raise UsageError(f"--storage-path: expected an absolute path (shared by every node), got {storage_path}")
    if name is None:
        name = f"{spec_name}-{(now or datetime.datetime.now()).strftime('%Y%m%d-%H%M%S')}"
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise UsageError(f"--name: expected a plain name usable as a directory, got {name!r}")
    return RayRequest(workers=workers, name=name, storage_path=os.path.normpath(storage),
                      gpus_per_worker=gpus_per_worker, cpus_per_worker=float(cpus_per_worker),
                      max_failures=max_failures)


def check_strategy(spec, request: RayRequest) -> None:
    """The job's ``distribute.strategy`` must work with Ray's workers (checked before starting them)."""

    world = World(launcher="ray", world_size=request.workers)
    choose_strategy(spec.distribute.strategy, world, request.gpus_per_worker)


def trainer_arguments(request: RayRequest, *, keep_checkpoints: Optional[int] = None,
                      env: Optional[Mapping[str, str]] = None, py_modules: Sequence[str] = ()) -> dict[str, dict]:
    """Keyword arguments of Ray Train's config objects for this request (pure, tested without Ray).

    Args:
        request: the validated request.
        keep_checkpoints: how many of Ray's (pointer) checkpoints to keep; None keeps all.
        env: the driver's environment; its ``TF_CPP_MIN_LOG_LEVEL`` is passed on to the workers.
        py_modules: the user's code to copy to every worker (``user_code.code_to_ship``): Ray's
            ``py_modules``, so a job's own model or loader reaches nodes without the files. Ray
            uploads local paths only for the job (``ray.init``), whose workers inherit them.

    Returns:
        ``{"scaling": ScalingConfig kwargs, "failure": FailureConfig kwargs,
        "checkpoint": CheckpointConfig kwargs, "run": RunConfig kwargs (without the three configs),
        "init": ray.init kwargs}``.
    """
    env = env or {}
    resources: dict[str, float] = {"CPU": request.cpus_per_worker}
    if request.gpus_per_worker:
        resources["GPU"] = request.gpus_per_worker
    return {
        "scaling": {"num_workers": request.workers, "use_gpu": request.gpus_per_worker > 0,
                    "resources_per_worker": resources},
        "failure": {"max_failures": request.max_failures},
        # Ray's checkpoints are pointer files of a few bytes; keep as many as the job keeps its own.
        "checkpoint": {"num_to_keep": keep_checkpoints},
        "run": {"name": request.name, "storage_path": request.storage_path,
                "worker_runtime_env": {"env_vars": {
                    **WORKER_ENV_VARS,
                    "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", DEFAULT_TF_CPP_MIN_LOG_LEVEL)}}},
        "init": {"runtime_env": {"py_modules": sorted(py_modules)}} if py_modules else {},
    }


def workers_fitting(request: RayRequest, node: Mapping[str, float]) -> int:
    """How many of the request's workers one node holds: a worker's CPUs and GPUs all come from one node."""
    g, c = request.gpus_per_worker, request.cpus_per_worker
    by_cpu = math.floor(node.get("CPU", 0) / c + 1e-9)
    return min(by_cpu, math.floor(node.get("GPU", 0) / g + 1e-9)) if g else by_cpu


def check_resources(request: RayRequest, nodes: Sequence[Mapping[str, float]]) -> None:
    """Fails fast when the cluster cannot ever place the workers (Ray would wait for them forever).

    Checks capacity, not what is free now: busy resources are worth waiting for, missing ones not.

    Args:
        request: the validated request.
        nodes: each alive node's total resources (``ray.nodes()[i]["Resources"]``).

    Raises:
        UsageError: naming the flag whose request cannot be met.
    """
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    n, g, c = request.workers, request.gpus_per_worker, request.cpus_per_worker
    if g and n * g > gpus:
        raise UsageError(f"--gpus-per-worker {g}: --workers {n} x {g} GPU = {n * g:g} GPUs, but the Ray cluster "
                         f"has {gpus:g} (ray.cluster_resources())")
    if n * c > cpus:
        raise UsageError(f"--workers {n} x --cpus-per-worker {c:g} = {n * c:g} CPUs, but the Ray cluster has "
                         f"{cpus:g} (ray.cluster_resources())")

    per_node = [workers_fitting(request, node) for node in nodes]
    if not any(per_node):
        flag, amount = ("--gpus-per-worker", f"{g} GPU(s) and {c:g} CPU(s)") if g else ("--cpus-per-worker", f"{c:g} CPUs")
        raise UsageError(f"{flag}: no node of the Ray cluster has {amount} for one worker")
    if sum(per_node) < n:
        raise UsageError(f"--workers {n}: only {sum(per_node)} worker(s) of {c:g} CPU"
                         f"{f' and {g} GPU' if g else ''} fit on the nodes of the Ray cluster")


# ----------------------------------------------------------------------------- the command

def add_parser(subparsers) -> None:
    """Registers ``distrain ray``."""
    p = subparsers.add_parser(
        "ray", help="train a job with Ray Train (run it with ray job submit)", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a job on a Ray cluster with Ray Train's TensorflowTrainer: N workers, "
                    "MultiWorkerMirroredStrategy, restarts from distrain's backup on failure.")
    p.add_argument("job", help="the job's YAML file (see jobs/)")
    p.add_argument("--workers", type=int, required=True, help="Ray Train workers (one TensorFlow process each)")
    p.add_argument("--gpus-per-worker", type=int, default=0, metavar="G", help="GPUs per worker (default 0)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs per worker (default 1)")
    p.add_argument("--max-failures", type=int, default=0, metavar="K",
                   help="restart the workers up to K times after a failure, from the backup (-1: no limit)")
    p.add_argument("--storage-path", metavar="DIR",
                   help=f"shared storage for the run: DIR/NAME/run is the run dir (default {DEFAULT_STORAGE})")
    p.add_argument("--name", help="the run's name (default: <job name>-<time>); reuse it to continue a run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the job, e.g. --set train.epochs=3 (repeatable)")
    p.set_defaults(handler=cmd_ray)


def cmd_ray(args) -> int:
    """``distrain ray``: validate everything, then ``TensorflowTrainer(...).fit()``."""

    spec = startup.check(args.job, args.overrides)  # the user's code imports here, before Ray starts a worker
    shipped = code_to_ship(spec)
    request = make_request(workers=args.workers, spec_name=spec.name, gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                           storage_path=args.storage_path, name=args.name)
    check_strategy(spec, request)
    kwargs = trainer_arguments(request, keep_checkpoints=spec.checkpoint.keep, env=os.environ, py_modules=list(shipped))
    ray = connect(**kwargs["init"])
    check_resources(request, [node["Resources"] for node in ray.nodes() if node.get("Alive")])

    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    trainer = TensorflowTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"spec": spec_to_dict(spec), "run_dir": str(request.run_dir),
                           "shipped": {path: name for path, name in shipped.items() if path.endswith(".py")}},
        scaling_config=ray.train.ScalingConfig(**kwargs["scaling"]),
        run_config=ray.train.RunConfig(failure_config=ray.train.FailureConfig(**kwargs["failure"]),
                                       checkpoint_config=ray.train.CheckpointConfig(**kwargs["checkpoint"]),
                                       **kwargs["run"]))
    print(f"distrain ray: {request.workers} worker(s), run dir {request.run_dir}", file=sys.stderr, flush=True)
    try:
        result, error = trainer.fit(), None
    except ray.train.TrainingFailedError as err:
        result, error = None, err
    report = result_report(request, result, error)
    request.experiment_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(request.experiment_dir / RESULT_FILE, json.dumps(report, indent=1, default=str))
    if error is not None:
        print(f"distrain ray: failed: {report['error']}", file=sys.stderr)
        print(f"result: {request.experiment_dir / RESULT_FILE}")
        return report["exit_code"]
    summary = report["summary"] or {}
    test = summary.get("test", {})
    print(f"test accuracy: {test.get('accuracy', float('nan')):.4f}  loss: {test.get('loss', float('nan')):.4f}"
          f"  ({summary.get('steps')} steps, {summary.get('world_size')} worker(s))"
          f"\nrun dir: {request.run_dir}\nresult: {request.experiment_dir / RESULT_FILE}")
    return EXIT_OK


def connect(runtime_env: Optional[dict] = None):
    """Imports Ray and joins the cluster: ``RAY_ADDRESS`` (set by ``ray job submit``) or a local head.

    ``runtime_env`` (the user's code as ``py_modules``) is merged with the submitted job's."""
    try:
        import ray
        from ray.train.v2._internal.constants import is_v2_enabled
    except ImportError as err:
        raise UsageError(f"ray: not installed ({err}); install it with: pip install -e .[ray]") from None
    if not is_v2_enabled():
        raise UsageError("RAY_TRAIN_V2_ENABLED=0: distrain ray needs Ray Train V2 (unset the variable)")
    address = os.environ.get("RAY_ADDRESS") or "auto"
    try:
        # The driver's own output is the user's; Ray's worker logs still reach it (log_to_driver).
        ray.init(address=address, logging_level=logging.WARNING, **({"runtime_env": runtime_env} if runtime_env else {}))
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"ray: no Ray cluster at {address} ({first}); start one with `ray start --head` "
                         "or submit with `ray job submit`") from None
    return ray


def result_report(request: RayRequest, result, error: Optional[BaseException]) -> dict:
    """The ``distrain-result.json`` payload: Ray's Result (or error) in plain JSON."""
    report: dict[str, Any] = {"name": request.name, "storage_path": request.storage_path,
                              "run_dir": str(request.run_dir), "workers": request.workers,
                              "metrics": None, "checkpoint": None, "summary": None, "path": None,
                              "error": None, "exit_code": EXIT_OK}
    if result is not None:
        report.update(metrics=_plain(result.metrics), path=result.path, summary=_plain(result.return_value),
                      checkpoint=result.checkpoint.path if result.checkpoint is not None else None)
    if error is not None:
        code, message = failure_exit_code(error)
        report.update(error=message, exit_code=code)
    return report


def failure_exit_code(error: BaseException) -> tuple[int, str]:
    """The exit code and a one-line message for a failed Ray Train run.

    A worker that stopped with ``TrainingStopped`` (74 a write failed, 75 preempted, 76 peer lost,
    77 NaN) or ``UsageError`` (2) gives that code; anything else is 1. Where several workers
    failed, the first by rank that gave a documented code decides.
    """
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        exc = getattr(failures[rank], "_base_exc", failures[rank])  # Ray wraps it with its traceback
        if isinstance(exc, TrainingStopped):
            return exc.exit_code, f"worker {rank}: {exc}"
        if isinstance(exc, UsageError):
            return EXIT_USAGE, f"worker {rank}: {exc}"
    for rank in sorted(failures):
        exc = getattr(failures[rank], "_base_exc", failures[rank])
        return EXIT_FAILED, f"worker {rank}: {type(exc).__name__}: {last_line(exc)}"
    return EXIT_FAILED, f"{type(error).__name__}: {last_line(error)}"


def last_line(err: BaseException) -> str:
    """The line that names the error: Ray's messages put the traceback first and the exception last."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


def _plain(value):
    """JSON-safe copy (numpy scalars → floats)."""
    return json.loads(json.dumps(value, default=lambda v: float(v) if hasattr(v, "__float__") else str(v)))


# ----------------------------------------------------------------------------- on each Ray worker

def train_loop(config: dict) -> Optional[dict]:
    """What each Ray Train worker runs: ``distrain.run.train`` with Ray's ``TF_CONFIG``.

    Returns:
        The run summary on rank 0 (Ray hands it back as ``Result.return_value``), else None.
    """
    require_tf_keras()
    import ray.train

    # Ray configures the root logger at INFO in its workers; TensorFlow's Python logger would then
    # print a line per collective. distrain's own logger is set up by run.train.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


    # The user's files arrived through py_modules: where their paths do not exist on this node,
    # their references import the copies.
    for path, module_name in config.get("shipped", {}).items():
        user_code.ship(path, module_name)
    context = ray.train.get_context()
    world = dataclasses.replace(detect(), launcher="ray", job_id=context.get_experiment_name())
    if (world.rank, world.world_size) != (context.get_world_rank(), context.get_world_size()):
        raise RuntimeError(f"TF_CONFIG says rank {world.rank}/{world.world_size}, Ray says "
                           f"{context.get_world_rank()}/{context.get_world_size()}")
    begun = startup.start(spec_from_dict(config["spec"], source="distrain ray"), source="distrain ray",
                          run_dir=config["run_dir"], world=world)
    run_dir = begun.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # Which process is which rank, for people (and the fault-tolerance test) who need to signal one.
    RunDir(run_dir).ray_worker_pid(world.rank).write_text(f"{os.getpid()}\n")

    reporter = ray_report_callback(run_dir, world.is_chief)

    summary = train(begun.spec, run_dir, world=world, extra_callbacks=[reporter])
    # A last report with the test metrics: every worker reports as often as the others.
    final = {k: v[-1] for k, v in summary.get("history", {}).items() if v}
    final.update({f"test_{k}": v for k, v in summary.get("test", {}).items()})
    final.update(step=summary["steps"], epoch=summary["epochs_completed"], done=True)
    report_to_ray(final, run_dir, world.is_chief)
    return summary if world.is_chief else None


def require_tf_keras() -> None:
    """Fails loudly unless ``tf.keras`` is tf-keras (Keras 2), which distrain's training needs."""
    import tensorflow as tf
    import tf_keras

    if tf.keras.Model is not tf_keras.Model:
        raise RuntimeError(
            f"tf.keras is {tf.keras.Model.__module__}, not tf_keras: TensorFlow was imported before "
            f"TF_USE_LEGACY_KERAS=1 reached this Ray worker (pass it in the runtime_env env_vars)")


def report_to_ray(metrics: dict, run_dir: Path, is_chief: bool) -> None:
    """``ray.train.report`` on every worker; the chief attaches a pointer checkpoint.

    Train V2 keeps only reports with a checkpoint (``Result.metrics`` comes from them), so each
    report carries one: a directory with ``distrain.json`` naming the run dir and the backup step.
    The backup itself stays in the run dir; nothing large is copied.
    """
    import ray.train

    metrics = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
               for k, v in metrics.items()}
    if not is_chief:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="distrain-ray-") as tmp:
        pointer = {"run_dir": str(run_dir), "backup": str(RunDir(run_dir).backup),
                   "step": int(metrics.get("step", 0)), "epoch": int(metrics.get("epoch", 0))}
        (Path(tmp) / POINTER_FILE).write_text(json.dumps(pointer, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ray_report_callback(run_dir: Path, is_chief: bool):
    """A Keras callback reporting each epoch's metrics to Ray (TensorFlow is imported here, lazily)."""
    import tensorflow as tf

    class ReportToRay(tf.keras.callbacks.Callback):
        """Runs after distrain's callbacks, so the epoch's backup is already saved when Ray hears of it."""

        def on_epoch_end(self, epoch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                return  # no backup was written for it; the Agreement callback stops the run (exit 77)
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            metrics.update(epoch=epoch + 1, step=int(self.model.optimizer.iterations.numpy()))
            report_to_ray(metrics, run_dir, is_chief)

    return ReportToRay()
