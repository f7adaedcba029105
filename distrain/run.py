"""One training run: ``train(spec, run_dir)``. Every launcher ends here.

A run is a sequence of named stages, each a function below:

1. ``open_run_dir``: the run dir, logging, ``job.yaml`` (chief).
2. ``rendezvous.meet``: every worker present (or exit 76 naming the missing), before TensorFlow.
3. ``backends.factory.build``: the distribution, before any other TensorFlow op of the process.
4. ``load_data``: the data source, this worker's share of it.
5. ``context.resolve``: the ``RunContext`` (batch arithmetic, steps, LR plan, input shape, start
   step); a run whose backup already holds every step returns its ``summary.json`` here.
6. ``record_segment``: this start of the run in ``segments.json`` (chief).
7. ``build_trainee``: model, optimizer and backup restore, inside the strategy's scope.
8. ``build_inputs``: the ``tf.data`` pipelines, from the start step.
9. ``build_run_callbacks``: the callbacks, in their required order.
10. ``fit_and_evaluate``: ``fit``, then the test evaluation over all workers.
11. ``finish``: final backup, artefacts (chief), summary.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from distrain import context
from distrain import lr as lr_lib
from distrain import startup, trainstep
from distrain.backends import factory
from distrain.checkpoint import Backup, UserCheckpoints, WorkerFiles
from distrain.context import RunContext
from distrain.data.pipelines import eval_steps
from distrain.errors import EXIT_PEER_LOST, TrainingStopped
from distrain.rendezvous import meet
from distrain.report import plot_curves
from distrain.rundir import RunDir, write_atomically
from distrain.spec import JobSpec, dump_spec
from distrain.user_code import compile_args
from distrain.world import World, detect

if TYPE_CHECKING:  # annotations only: TensorFlow is imported by the stages that need it
    import tensorflow as tf

    from distrain.data.inputwatch import InputWatch
    from distrain.data.pipelines import Source

log = logging.getLogger("distrain")


@dataclass
class Trainee:
    """What ``build_trainee`` makes: the compiled model, its optimizer and the resume state."""

    model: tf.keras.Model
    optimizer: tf.keras.optimizers.Optimizer
    backup: Backup
    files: WorkerFiles  # this worker's way to write run-dir files
    xla: Optional[str] = None  # what train.jit_compile XLA-compiles (xla_scope), None without XLA


@dataclass
class Inputs:
    """The distributed datasets of a run, how many global steps evaluation takes, and the
    callback that measures how long training waits for its input."""

    watch: InputWatch
    train: tf.distribute.DistributedDataset
    validation: Optional[tf.distribute.DistributedDataset]
    test: tf.distribute.DistributedDataset
    validation_steps: Optional[int]
    test_steps: int
    local_test_examples: int


def train(spec: JobSpec, run_dir: Path, *, world: Optional[World] = None, extra_callbacks: Sequence = ()) -> dict:
    """Trains the job in this process, as one of ``world.world_size`` workers.

    Args:
        spec: the validated job.
        run_dir: shared by every worker of the run; a run dir with a backup resumes from it.
        world: this process's place (default: detected from the environment).
        extra_callbacks: more Keras callbacks; they run after distrain's saving and logging
            callbacks and before the agreement on stopping (``callbacks`` module docstring).

    Returns:
        The run summary (also written to ``RUN_DIR/summary.json`` by the chief).

    Raises:
        UsageError: bad input found after TensorFlow started (a dataset not in the cache, ...).
        TrainingStopped: preempted, peer lost or NaN; ``exit_code`` says which.
    """
    started = time.time()
    world = world or detect(port_override=spec.distribute.port)
    rundir = open_run_dir(spec, run_dir, world)

    meet(world, rundir.root, spec.distribute.startup_timeout_s)  # every peer present before any TF collective
    dist = factory.build(spec.distribute, world)  # first TensorFlow op of the process
    data = load_data(spec, dist)
    ctx = context.resolve(spec, world, dist, data, rundir)
    log.info("%s", ctx.describe())
    log.info("%s", lr_lib.describe(ctx.plan))
    if ctx.is_complete and rundir.summary.exists():
        log.info("run already complete at step %d", ctx.start_step)
        return json.loads(rundir.summary.read_text())
    record_segment(ctx)
    from distrain.callbacks import RunState

    # The deadline runs from the first collective (the weights' broadcast) to the last; the dtype
    # policy from before the model is built to after its evaluation and saving.
    with dist.collective_deadline(), factory.precision_policy(spec.train.precision), stop_on_peer_lost(dist, world):
        trainee = build_trainee(ctx)
        inputs = build_inputs(ctx, data)
        state = RunState(ctx)
        callbacks = build_run_callbacks(ctx, trainee, state, data, inputs.watch, extra_callbacks)
        history, test = fit_and_evaluate(ctx, trainee, inputs, callbacks, state)
        return finish(ctx, trainee, state, history, test, data, started)


def open_run_dir(spec: JobSpec, run_dir: Path, world: World) -> RunDir:
    """Creates the run dir, starts this worker's log and (chief) writes the resolved job."""
    rundir = RunDir(run_dir)
    rundir.root.mkdir(parents=True, exist_ok=True)
    setup_logging(rundir, world)
    # Once per process, also on the terminal of non-chief workers (which show warnings only).
    log.info("distrain worker %s", world.describe(), extra={"terminal": True})
    if world.is_chief:
        write_atomically(rundir.job, dump_spec(spec))
    return rundir


class TerminalFilter(logging.Filter):
    """Which log records reach the terminal: from ``level`` up, unless a record says otherwise with
    ``extra={"terminal": True}`` (a worker's start-up line, on every worker) or ``False`` (step
    lines beside Keras's progress bar); the log file gets every record."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        wanted = getattr(record, "terminal", None)
        return record.levelno >= self.level if wanted is None else bool(wanted)


def setup_logging(run_dir: RunDir, world: World) -> None:
    """Rank-tagged log lines: to ``logs/rank<r>.log`` always; to the terminal from the chief, and
    warnings (and each worker's start-up line) from the other workers (``TerminalFilter``)."""
    fmt = logging.Formatter(f"%(asctime)s [rank {world.rank}] %(levelname)s %(message)s", "%H:%M:%S")
    run_dir.logs.mkdir(parents=True, exist_ok=True)
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    to_file = logging.FileHandler(run_dir.log_file(world.rank))
    to_file.setFormatter(fmt)
    log.addHandler(to_file)
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setFormatter(fmt)
    to_terminal.addFilter(TerminalFilter(logging.INFO if world.is_chief else logging.WARNING))
    log.addHandler(to_terminal)


def record_segment(ctx: RunContext) -> None:
    """Appends this start of the run to ``segments.json`` (chief): its step, world and batch arithmetic.

    A segment that started at or after this start step is replaced: its steps past the backup are
    being trained again. The recorded global batch is what a resume on another world keeps.
    """
    segments = ctx.run_dir.read_segments()
    previous = [s for s in segments if s.get("start_step", 0) < ctx.start_step]
    if previous and ctx.accumulation_steps != previous[-1].get("accumulation_steps"):
        log.warning("resumed at step %d with %d replica(s) (was %s): %d micro-batch(es) per step keep the global "
                    "batch %d", ctx.start_step, ctx.replicas, previous[-1].get("replicas"), ctx.accumulation_steps,
                    ctx.global_batch)
    if not ctx.is_chief:
        return
    segment = {"start_step": ctx.start_step, "workers": ctx.world.world_size, "replicas": ctx.replicas,
               "per_replica_batch": ctx.per_replica_batch, "accumulation_steps": ctx.accumulation_steps,
               "global_batch": ctx.global_batch, "strategy": ctx.dist.name, "launcher": ctx.world.launcher,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomically(ctx.run_dir.segments, json.dumps(previous + [segment], indent=1))


def load_data(spec: JobSpec, dist) -> Source:
    """This worker's data source (TFRecord: its share of the shards), decoded with the model's channels."""
    data = startup.load_data(spec, shard=(dist.pipeline_id, dist.num_pipelines))
    if data.synthetic:
        log.warning("data.source synthetic: random images and labels, for throughput only; accuracy means nothing")
    return data


def _optimizer(tf, spec: JobSpec, schedule):
    t = spec.train
    if t.optimizer == "sgd":
        return tf.keras.optimizers.SGD(learning_rate=schedule, momentum=t.momentum)
    if t.optimizer == "rmsprop":
        return tf.keras.optimizers.RMSprop(learning_rate=schedule)
    return tf.keras.optimizers.Adam(learning_rate=schedule)


def build_trainee(ctx: RunContext) -> Trainee:
    """The compiled model and optimizer, created in the strategy's scope, restored from the backup.

    Raises:
        RuntimeError: the backup chosen to resume from (``RunDir.choose_backup``) holds another step.
    """
    import tensorflow as tf

    from distrain.lossscale import count_skipped_steps

    spec, dist = ctx.spec, ctx.dist
    files = WorkerFiles(ctx.run_dir, ctx.world.rank, ctx.is_chief)
    # Same seed on every worker: identical initial weights (MultiWorkerMirroredStrategy also
    # broadcasts the chief's, Horovod broadcasts rank 0's) and identical augmentation streams.
    tf.keras.utils.set_random_seed(spec.seed)
    with dist.scope():
        model = startup.build_job_model(spec, ctx.input_shape, ctx.num_classes)
        optimizer = dist.wrap_optimizer(_optimizer(tf, spec, lr_lib.keras_schedule(ctx.plan)))
        loss, metrics = compile_args(spec.train)
        # Under mixed_float16 compile wraps the optimizer in a LossScaleOptimizer (dynamic loss
        # scaling, docs/precision.md); ``optimizer`` stays the inner one, which holds the step count.
        # steps_per_execution: the callbacks count the steps each batch hook covers (callbacks.py).
        xla = xla_scope(spec.train.jit_compile, dist.name)
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=xla == XLA_WHOLE_STEP,
                      steps_per_execution=spec.train.steps_per_execution)
        # Keras's metric results are already global (computed in a merge_call); its default "auto"
        # reduction then sums them over MultiWorkerMirroredStrategy's workers, so step logs and the
        # progress bar would show N x the loss. "first" takes them as they are.
        model.distribute_reduction_method = "first"
        trainstep.enable(model, micro_batches=ctx.accumulation_steps, reduce_gradients=dist.reduce_gradients,
                         xla_gradients=xla == XLA_GRADIENTS)
        if xla:
            log.info("train.jit_compile: XLA compiles the %s under strategy %s", xla, dist.name)
        dist.adapt_model(model)
        count_skipped_steps(model.optimizer)  # before the restore: the counter is in the backup
        backup = Backup(model, optimizer, ctx.run_dir, files)
        restored = backup.restore()
    if restored != ctx.start_step:
        raise RuntimeError(f"{ctx.run_dir.backup}: the backup chosen to resume from is step {ctx.start_step}, the "
                           f"checkpoint restored holds step {restored}")
    dist.broadcast_initial_state(model, optimizer)
    return Trainee(model, optimizer, backup, files, xla)


# Where ``train.jit_compile`` puts XLA (docs/precision.md): Keras compiles the whole step under
# one_device; elsewhere Keras's whole step cannot be compiled (``distrain.trainstep``), and distrain
# compiles each replica's forward and backward pass instead.
XLA_WHOLE_STEP, XLA_GRADIENTS = "whole step", "each replica's forward and backward pass"


def xla_scope(requested: bool, strategy: str) -> Optional[str]:
    """What ``train.jit_compile`` XLA-compiles under ``strategy``: ``XLA_WHOLE_STEP``,
    ``XLA_GRADIENTS`` or None (not requested).

    Example:
        >>> xla_scope(True, "one_device") == XLA_WHOLE_STEP, xla_scope(True, "multi_worker") == XLA_GRADIENTS
        (True, True)
    """
    if not requested:
        return None
    return XLA_WHOLE_STEP if strategy == "one_device" else XLA_GRADIENTS


def build_inputs(ctx: RunContext, data) -> Inputs:
    """The distributed train, validation and test datasets; training starts at ``ctx.start_step``."""
    from distrain.data.inputwatch import InputWatch

    spec, dist = ctx.spec, ctx.dist
    watch = InputWatch(batches_per_step=dist.local_replicas)
    pipes = data.pipelines(ctx.global_batch, ctx.steps_per_epoch, spec.seed, ctx.input_shape, spec.data.augment,
                           watch=watch)
    val_size, test_size = data.val_size, data.test_size

    def training(input_context):
        return pipes.train(input_context, spec.train.epochs, ctx.start_step)

    def evaluation(split: str):
        return dist.distribute_datasets(lambda input_context: pipes.evaluation(input_context, split))

    return Inputs(
        watch=watch,
        # Every pipeline yields exactly the run's steps (a user's dataset is repeated): even.
        train=dist.distribute_datasets(training, even=True),
        validation=evaluation("validation") if val_size else None,
        test=evaluation("test"),
        validation_steps=eval_steps(val_size, ctx.global_batch) if val_size else None,
        test_steps=eval_steps(test_size, ctx.global_batch),
        local_test_examples=len(range(dist.pipeline_id, test_size, dist.num_pipelines)))


def build_run_callbacks(ctx: RunContext, trainee: Trainee, state, data, input_watch, extra: Sequence) -> list:
    """The run's callbacks (``callbacks.build_callbacks``), TensorBoard's on the chief."""
    from distrain.callbacks import build_callbacks
    from distrain.lossscale import loss_scale_callbacks
    from distrain.tensorboard_log import tensorboard_callbacks

    c = ctx.spec.checkpoint
    checkpoints = UserCheckpoints(trainee.model, ctx.run_dir, trainee.files, keep=c.keep, monitor=c.monitor,
                                  mode=c.mode)
    return build_callbacks(ctx, state, trainee.backup, checkpoints, input_watch=input_watch,
                           loss_scale=loss_scale_callbacks(trainee.model.optimizer),
                           tensorboard=lambda: tensorboard_callbacks(ctx, state, synthetic=data.synthetic),
                           extra=list(extra))


def fit_and_evaluate(ctx: RunContext, trainee: Trainee, inputs: Inputs, callbacks: list, state) -> tuple:
    """``fit`` from the start step, then the test metrics over all workers.

    Returns:
        (Keras's ``History``, the test metrics).

    Raises:
        TrainingStopped: a callback stopped the run (a lost peer: ``stop_on_peer_lost`` around the run).
    """
    from distrain.callbacks import fit_verbosity

    model, dist = trainee.model, ctx.dist
    # fit() asks this hook where a recovering run starts; answering with the restored step makes
    # the first epoch run only its remaining steps, so the total step count stays exact.
    model._maybe_load_initial_counters_from_ckpt = lambda *_: (ctx.start_epoch, ctx.step_in_start_epoch)
    with state.stop_on_signals():
        history = model.fit(inputs.train, epochs=ctx.spec.train.epochs, steps_per_epoch=ctx.steps_per_epoch,
                            initial_epoch=ctx.start_epoch, validation_data=inputs.validation,
                            validation_steps=inputs.validation_steps, callbacks=callbacks,
                            verbose=fit_verbosity(ctx.spec.logging.verbose) if ctx.is_chief else 0)
        test = model.evaluate(inputs.test, steps=inputs.test_steps, verbose=0, return_dict=True,
                              callbacks=dist.evaluation_callbacks())
        test = dist.average_metrics(model, test, inputs.local_test_examples)
    return history, test


@contextlib.contextmanager
def stop_on_peer_lost(dist, world: World) -> Iterator[None]:
    """Inside it, a TensorFlow error that means a peer is gone (``dist.peer_lost``) ends the run with
    exit 76 and one line (``peer_lost_message``), wherever a collective meets it: in ``fit`` and
    ``evaluate``, and as much in the weights' first broadcast, the final backup and ``model.keras``'s
    save (reads that are collectives under multi_worker). Found by the fault campaign
    (docs/fault-tolerance.md): a peer lost there used to exit 1 with a traceback, which the
    launchers do not requeue."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as err:
        if not dist.peer_lost(err):
            raise
        raise TrainingStopped(peer_lost_message(err, world), EXIT_PEER_LOST) from err


def peer_lost_message(err: Exception, world: World) -> str:
    """One line naming the lost worker (from the collective's error) and how to resume.

    TensorFlow names a task by its job and index; with a ``chief`` in ``TF_CONFIG`` the workers'
    ranks come after the chief's, as ``world.detect_tf_config`` numbers them.
    """
    task = re.search(r"/job:(worker|chief)/replica:\d+/task:(\d+)", str(err))
    chiefs = len(((world.tf_config or {}).get("cluster") or {}).get("chief", []))
    rank = int(task.group(2)) + (chiefs if task.group(1) == "worker" else 0) if task else None
    if rank is not None and rank < len(world.worker_addresses):
        who = f"worker {rank} ({world.worker_addresses[rank]})"
    elif world.worker_addresses:
        who = "a peer (one of " + ", ".join(world.worker_addresses) + ")"
    else:  # Horovod and MPI worlds know no addresses
        who = f"a peer (one of the {world.world_size} workers)"
    return f"lost {who}: {type(err).__name__}: {_error_reason(str(err))}; rerun with the same run dir to resume from the backup"


def _error_reason(text: str) -> str:
    """The line of a TensorFlow error that says why: the innermost abort reason when collectives
    were aborted (a peer's watchdog, the coordination service), else the first line that is not
    only "Graph execution error:" nor the "Detected at node ... (most recent call last):" traceback
    TensorFlow puts before the reason (Horovod's "Horovod has been shut down" comes after one)."""
    aborted = re.findall(r"(?:Collective ops is aborted by: )+(.+)", text)
    if aborted:
        return aborted[0].strip()[:300]
    lines, in_traceback = [], False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Detected at node"):
            in_traceback = line.endswith("(most recent call last):")
            continue
        if in_traceback and (not line or raw[:1].isspace()):  # its "  File ..." lines and the blank ones between
            continue
        in_traceback = False
        if line and line != "Graph execution error:":
            lines.append(line)
    return lines[0][:300] if lines else "no message"


def finish(ctx: RunContext, trainee: Trainee, state, history, test: dict, data, started: float) -> dict:
    """Final backup, artefacts and the summary; returns the summary."""
    from distrain.tensorboard_log import write_test_metrics

    # A complete run then resumes as "already complete", not from its last periodic backup.
    trainee.backup.save()
    steps_done = int(trainee.optimizer.iterations.numpy())
    if ctx.is_chief:
        write_test_metrics(ctx.run_dir, test, epoch=steps_done // ctx.steps_per_epoch)
    summary = run_summary(ctx, state, history, test, data, steps_done, time.time() - started,
                          xla=trainee.xla)
    save_artefacts(ctx, trainee, summary)
    trainee.files.cleanup()
    log.info("test accuracy %.4f, loss %.4f (%d examples); run dir %s", test.get("accuracy", float("nan")),
             test.get("loss", float("nan")), data.test_size, ctx.run_dir)
    return summary


def run_summary(ctx: RunContext, state, history, test: dict, data, steps_done: int, wall_time_s: float, *,
                xla: Optional[str]) -> dict:
    """The run summary (``summary.json``): the world, the arithmetic, the results; ``xla`` is what
    XLA compiled (``xla_scope``)."""
    world, plan = ctx.world, ctx.plan
    trained = (steps_done - ctx.start_step) * ctx.global_batch
    return {
        "job": ctx.spec.name, "run_dir": str(ctx.run_dir), "world_size": world.world_size,
        "num_workers": world.num_workers, "launcher": world.launcher, "strategy": ctx.dist.name,
        "replicas": ctx.replicas, "global_batch": ctx.global_batch, "per_replica_batch": ctx.per_replica_batch,
        "accumulation_steps": ctx.accumulation_steps, "steps_per_epoch": ctx.steps_per_epoch,
        "precision": ctx.spec.train.precision,
        "jit_compile": xla is not None, "xla": xla, "steps_per_execution": ctx.spec.train.steps_per_execution,
        "steps": steps_done, "resumed_from_step": ctx.start_step,
        "epochs_completed": steps_done // ctx.steps_per_epoch, "synthetic_data": data.synthetic,
        "test": {k: float(v) for k, v in test.items()},
        "history": _history(ctx.run_dir, history),
        "images_per_s": trained / state.train_time_s if state.train_time_s else None,
        "wall_time_s": wall_time_s,
        "lr": {"base": plan.base_lr, "peak": plan.peak_lr, "warmup_steps": plan.warmup_steps,
               "schedule": plan.schedule},
        "segments": ctx.run_dir.read_segments(),
    }


def _history(run_dir: RunDir, history) -> dict:
    """Per-metric lists over all epochs of the run: the chief's history.json covers earlier
    attempts too; Keras's History (other workers) only this one."""
    if run_dir.history.exists():
        epochs = json.loads(run_dir.history.read_text())
        keys = [k for k in epochs[-1] if k not in ("epoch", "step")] if epochs else []
        return {k: [float(e[k]) for e in epochs if k in e] for k in keys}
    return {k: [float(x) for x in v] for k, v in history.history.items()}


def save_artefacts(ctx: RunContext, trainee: Trainee, summary: dict) -> None:
    """model.keras on every worker (a collective read), the rest on the chief only."""
    run_dir = ctx.run_dir
    with trainee.files.write(run_dir.model) as tmp:
        trainee.model.save(str(tmp))
    if not ctx.is_chief:
        return

    epochs = json.loads(run_dir.history.read_text()) if run_dir.history.exists() else []
    if epochs:
        plot_curves(epochs, run_dir.curves, title=summary["job"])
    write_atomically(run_dir.summary, json.dumps(summary, indent=1))
