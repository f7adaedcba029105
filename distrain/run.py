"""One training run: ``train(spec, run_dir)``. Every launcher ends here.

Order: world → strategy (before any other TensorFlow op) → data → model, optimizer, backup
restore (inside the strategy scope) → input pipelines from the restored step → callbacks →
``fit`` → test evaluation → artefacts (chief) → summary.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from distrain.errors import EXIT_PEER_LOST, TrainingStopped, UsageError
from distrain.spec import JobSpec, dump_spec
from distrain.world import World, detect

log = logging.getLogger("distrain")


def setup_logging(run_dir: Path, world: World) -> None:
    """Rank-tagged log lines: to ``logs/rank<r>.log`` always, to the terminal from the chief only."""
    fmt = logging.Formatter(f"%(asctime)s [rank {world.rank}] %(levelname)s %(message)s", "%H:%M:%S")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    to_file = logging.FileHandler(run_dir / "logs" / f"rank{world.rank}.log")
    to_file.setFormatter(fmt)
    log.addHandler(to_file)
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setFormatter(fmt)
    to_terminal.setLevel(logging.INFO if world.is_chief else logging.WARNING)
    log.addHandler(to_terminal)


def _optimizer(tf, spec: JobSpec, schedule):
    t = spec.train
    if t.optimizer == "sgd":
        return tf.keras.optimizers.SGD(learning_rate=schedule, momentum=t.momentum)
    if t.optimizer == "rmsprop":
        return tf.keras.optimizers.RMSprop(learning_rate=schedule)
    return tf.keras.optimizers.Adam(learning_rate=schedule)


def _input_shape(spec: JobSpec, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    if spec.model.input_shape is None:
        return tuple(data_shape)
    shape = tuple(spec.model.input_shape)
    if len(shape) == 2:
        shape = (*shape, data_shape[-1])
    if shape[-1] != data_shape[-1]:
        raise UsageError(f"model.input_shape: {list(shape)} has {shape[-1]} channels, the data has {data_shape[-1]}")
    return shape


def _peer_lost_message(err: Exception, world: World) -> str:
    import re

    task = re.search(r"/job:(?:worker|chief)/replica:\d+/task:(\d+)", str(err))
    who = (f"worker {task.group(1)} ({world.worker_addresses[int(task.group(1))]})"
           if task and int(task.group(1)) < len(world.worker_addresses) else
           "a peer (one of " + ", ".join(world.worker_addresses) + ")")
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return f"lost {who}: {type(err).__name__}: {first_line}; rerun with the same run dir to resume from the backup"


def train(spec: JobSpec, run_dir: Path, *, world: Optional[World] = None, extra_callbacks: Sequence = ()) -> dict:
    """Trains the job in this process, as one of ``world.world_size`` workers.

    Args:
        spec: the validated job.
        run_dir: shared by every worker of the run; a run dir with a backup resumes from it.
        world: this process's place (default: detected from the environment).
        extra_callbacks: more Keras callbacks, run after distrain's own (Ray's reporting uses it).

    Returns:
        The run summary (also written to ``RUN_DIR/summary.json`` by the chief).

    Raises:
        UsageError: bad input found after TensorFlow started (a dataset not in the cache, ...).
        TrainingStopped: preempted, peer lost or NaN; ``exit_code`` says which.
    """
    started = time.time()
    world = world or detect(port_override=spec.distribute.port)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, world)
    # Once per process, also on the terminal of non-chief workers (which show warnings only).
    log.log(logging.INFO if world.is_chief else logging.WARNING, "distrain worker %s", world.describe())

    from distrain import strategy as strategy_lib

    dist = strategy_lib.build(spec.distribute, world)  # first TensorFlow op of the process
    import tensorflow as tf

    from distrain import data as data_lib
    from distrain import lr as lr_lib
    from distrain.callbacks import RunState, build_callbacks
    from distrain.checkpoint import Backup, UserCheckpoints, WorkerFiles
    from distrain.models import MODELS, build_model
    from distrain.tensorboard import tensorboard_callbacks, write_test_metrics

    if world.is_chief:
        (run_dir / "job.yaml").write_text(dump_spec(spec))
    files = WorkerFiles(run_dir, world.rank, world.is_chief)

    channels = (spec.model.input_shape or MODELS[spec.model.name].default_input_shape)
    splits = data_lib.load(spec.data, spec.seed, channels=channels[-1] if len(channels) == 3 else 3,
                           shard=(dist.pipeline_id, dist.num_pipelines))
    if splits.synthetic:
        log.warning("data.source synthetic: random images and labels, for throughput only; accuracy means nothing")
    input_shape = _input_shape(spec, splits.input_shape)
    num_classes = spec.model.num_classes or splits.num_classes
    global_batch = spec.data.batch_size_per_replica * dist.replicas
    steps = data_lib.steps_per_epoch(splits.train_size_global, global_batch, spec.train.steps_per_epoch)
    plan = lr_lib.LRPlan.from_spec(spec.train, global_batch=global_batch,
                                   per_replica_batch=spec.data.batch_size_per_replica, steps_per_epoch=steps)
    log.info("strategy %s: %d replicas (%d here), global batch %d = %d per replica x %d, %d steps/epoch",
             dist.name, dist.replicas, dist.local_replicas, global_batch, spec.data.batch_size_per_replica,
             dist.replicas, steps)
    log.info("%s", lr_lib.describe(plan))

    # Same seed on every worker: identical initial weights (MultiWorkerMirroredStrategy also
    # broadcasts the chief's, Horovod broadcasts rank 0's) and identical augmentation streams.
    tf.keras.utils.set_random_seed(spec.seed)
    with dist.scope():
        model = build_model(spec.model.name, input_shape, num_classes, l1=spec.train.l1, l2=spec.train.l2,
                            **spec.model.params)
        optimizer = dist.wrap_optimizer(_optimizer(tf, spec, lr_lib.keras_schedule(plan)))
        model.compile(optimizer=optimizer, loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                      metrics=["accuracy"])
        # Keras's metric results are already global (computed in a merge_call); its default "auto"
        # reduction then sums them over MultiWorkerMirroredStrategy's workers, so step logs and the
        # progress bar would show N x the loss. "first" takes them as they are.
        model.distribute_reduction_method = "first"
        backup = Backup(model, optimizer, run_dir, files)
        start_step = backup.restore()
    dist.broadcast_initial_state(model, optimizer)
    total_steps = spec.train.epochs * steps
    if start_step >= total_steps and (run_dir / "summary.json").exists():
        log.info("run already complete at step %d", start_step)
        return json.loads((run_dir / "summary.json").read_text())
    start_epoch, step_in_epoch = divmod(start_step, steps)

    from distrain.inputwatch import InputWatch

    watch = InputWatch(batches_per_step=dist.local_replicas)
    pipes = data_lib.Pipelines(splits, global_batch, steps, spec.seed, input_shape, spec.data.augment, watch=watch)
    train_ds = dist.distribute_datasets(lambda ctx: pipes.train(ctx, spec.train.epochs, start_step))
    val_ds = (dist.distribute_datasets(lambda ctx: pipes.evaluation(ctx, "val")) if splits.val_size else None)
    test_ds = dist.distribute_datasets(lambda ctx: pipes.evaluation(ctx, "test"))

    state = RunState(global_batch, plan, start_step)
    checkpoints = UserCheckpoints(model, run_dir, files, keep=spec.checkpoint.keep,
                                  monitor=spec.checkpoint.monitor, mode=spec.checkpoint.mode)
    callbacks = build_callbacks(
        spec=spec, dist=dist, state=state, run_dir=run_dir, backup=backup, checkpoints=checkpoints,
        tensorboard_callbacks=tensorboard_callbacks(spec, run_dir, dist, plan, splits, state) if world.is_chief else (),
        extra=list(extra_callbacks))
    callbacks.insert(1, watch)  # before the history and TensorBoard callbacks, which log what it adds
    # fit() asks this hook where a recovering run starts; answering with the restored step makes
    # the first epoch run only its remaining steps, so the total step count stays exact.
    model._maybe_load_initial_counters_from_ckpt = lambda *_: (start_epoch, step_in_epoch)

    previous_handlers = state.install_signal_handlers()
    try:
        history = model.fit(train_ds, epochs=spec.train.epochs, steps_per_epoch=steps, initial_epoch=start_epoch,
                            validation_data=val_ds,
                            validation_steps=data_lib.eval_steps(splits.val_size, global_batch) if val_ds else None,
                            callbacks=callbacks, verbose=spec.logging.verbose if world.is_chief else 0)
        test = model.evaluate(test_ds, steps=data_lib.eval_steps(splits.test_size, global_batch),
                              verbose=0, return_dict=True)
        test = dist.average_metrics(test, len(range(dist.pipeline_id, splits.test_size, dist.num_pipelines)))
    except tf.errors.OpError as err:
        if not dist.peer_lost(err):
            raise
        raise TrainingStopped(_peer_lost_message(err, world), EXIT_PEER_LOST) from err
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    backup.save()  # a complete run resumes as "already complete", not from its last periodic backup

    steps_done = int(optimizer.iterations.numpy())
    if world.is_chief:
        write_test_metrics(run_dir, test, epoch=steps_done // steps)
    trained = (steps_done - start_step) * global_batch
    summary = {
        "job": spec.name, "run_dir": str(run_dir), "world_size": world.world_size,
        "num_workers": world.num_workers, "launcher": world.launcher, "strategy": dist.name,
        "replicas": dist.replicas, "global_batch": global_batch, "steps_per_epoch": steps,
        "steps": steps_done, "resumed_from_step": start_step,
        "epochs_completed": steps_done // steps, "synthetic_data": splits.synthetic,
        "test": {k: float(v) for k, v in test.items()},
        "history": _history(run_dir, history),
        "images_per_s": trained / state.train_time_s if state.train_time_s else None,
        "wall_time_s": time.time() - started,
        "lr": {"base": plan.base_lr, "peak": plan.peak_lr, "warmup_steps": plan.warmup_steps,
               "schedule": plan.schedule},
    }
    _save_artefacts(model, run_dir, files, summary)
    files.cleanup()
    log.info("test accuracy %.4f, loss %.4f (%d examples); run dir %s", test.get("accuracy", float("nan")),
             test.get("loss", float("nan")), splits.test_size, run_dir)
    return summary


def _history(run_dir: Path, history) -> dict:
    """Per-metric lists over all epochs of the run: the chief's history.json covers earlier
    attempts too; Keras's History (other workers) only this one."""
    history_file = run_dir / "history.json"
    if history_file.exists():
        epochs = json.loads(history_file.read_text())
        keys = [k for k in epochs[-1] if k not in ("epoch", "step")] if epochs else []
        return {k: [float(e[k]) for e in epochs if k in e] for k in keys}
    return {k: [float(x) for x in v] for k, v in history.history.items()}


def _save_artefacts(model, run_dir: Path, files, summary: dict) -> None:
    """model.keras on every worker (a collective read), the rest on the chief only."""
    with files.write(run_dir / "model.keras") as tmp:
        model.save(str(tmp))
    if not files.is_chief:
        return
    from distrain.report import plot_curves

    history_file = run_dir / "history.json"
    epochs = json.loads(history_file.read_text()) if history_file.exists() else []
    if epochs:
        plot_curves(epochs, run_dir / "curves.png", title=summary["job"])
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(run_dir / "summary.json")
