"""TensorBoard logging of a run, written by the chief only.

``tensorboard_callbacks`` is called on the chief alone: no event file ever comes from another
worker, and nothing here may run a collective (the other workers would not join it). Everything
read here is local: the ``logs`` Keras hands every callback (already reduced across replicas),
``optimizer.iterations`` (a mirrored variable, read from this worker's copy) and the wall clock.

Layout of ``RUN_DIR/tensorboard``: each directory is one TensorBoard "run", with one writer for
the whole process (TensorBoard's default loader reads a directory's event files one after the
other and stops polling a file once a newer one exists: a second writer would hide the first's
data from a live dashboard):

- ``.``: text ``world``, ``job_spec``, ``lr_plan`` and the hparams session and config, at the step
  training starts from. A trial of a sweep (a job with a ``sweep:`` section) also logs its swept
  keys as hparams, and the sweep's metric comes first among the metrics (``hparam_infos``,
  ``hparam_metrics``): the same config in every trial and in ``SWEEP_DIR/tensorboard``
  (``write_hparams_config``), so the HParams dashboard lists a sweep's trials together.
- ``train/``: per epoch ``epoch_loss``, ``epoch_accuracy``, ``epoch_lr``, ``epoch_images_per_s``,
  ``epoch_step_time_s`` (the last two include validation); every ``logging.update_every_steps``
  global steps ``batch_loss``, ``batch_accuracy`` (the epoch's running mean, as Keras' progress
  bar shows), ``batch_lr`` (the LR applied at that step), ``batch_step_time_s``,
  ``batch_images_per_s`` and ``batch_images_per_s_per_replica``.
- ``validation/``: ``epoch_loss``, ``epoch_accuracy`` (the tags of ``train/``: TensorBoard draws
  train and validation in one chart).
- ``test/``: ``epoch_loss``, ``epoch_accuracy`` after training, at the last epoch
  (``write_test_metrics``).
- ``plugins/profile/``: the profiler trace of ``logging.profile_steps`` (the chief's process).

Epochs are numbered from 1 like ``history.json`` (Keras' own callback numbers them from 0), and
steps are optimizer steps since the run began, so a resumed run continues the same curves. With
``train.steps_per_execution: K`` a step scalar is written at the end of the call (of up to K steps)
that reached a multiple of ``logging.update_every_steps``, at the step that call ended on
(``callbacks.RunState.reached``): the same steps when the interval is a multiple of K.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import tensorflow as tf

from distrain import lr as lr_lib
from distrain.callbacks import StepCallback
from distrain.lossscale import LOSS_SCALE_KEYS
from distrain.lr import SCHEDULES
from distrain.models import MODELS
from distrain.rundir import RunDir
from distrain.spec import DATA_SOURCES, PRECISIONS, STRATEGIES, JobSpec, TrainSpec, dump_spec
from distrain.sweeps.compare import metric_and_mode, swept_hparams, swept_keys

log = logging.getLogger("distrain")

TRAIN, VALIDATION, TEST = RunDir.TB_TRAIN, RunDir.TB_VALIDATION, RunDir.TB_TEST
EPOCH_PREFIX, STEP_PREFIX = "epoch_", "batch_"
# The hparams the dashboard shows for every run, in this order, with a description.
HPARAMS = {
    "model": "course model (distrain models)", "data": "data.source", "strategy": "tf.distribute strategy",
    "workers": "worker processes", "replicas": "replicas in sync", "batch_per_replica": "examples per replica",
    "global_batch": "examples per optimizer step", "optimizer": "train.optimizer",
    "base_lr": "LR of the spec, before scaling", "peak_lr": "LR after scaling to the global batch",
    "schedule": "train.schedule.name", "warmup_steps": "steps of linear warmup", "epochs": "train.epochs",
    "steps_per_epoch": "optimizer steps per epoch", "precision": "train.precision (Keras's dtype policy)",
}
# (group, tag) of the metrics shown beside them: the last value written is the run's final one.
HPARAM_METRICS = ((VALIDATION, "epoch_accuracy"), (VALIDATION, "epoch_loss"), (TRAIN, "epoch_accuracy"),
                  (TRAIN, "epoch_loss"), (TEST, "epoch_accuracy"), (TEST, "epoch_loss"),
                  (TRAIN, "epoch_images_per_s"))


class Writers:
    """One summary writer per sub-directory of the log dir, created on first use."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writers: dict[str, tf.summary.SummaryWriter] = {}

    def __getitem__(self, name: str):
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(str(self.log_dir / name))
        return self._writers[name]

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _scalars(writer, prefix: str, values: dict, step: int) -> None:
    with writer.as_default(step=step):
        for name, value in values.items():
            if value is not None:
                tf.summary.scalar(prefix + name, float(value))


class EpochScalars(tf.keras.callbacks.Callback):
    """At every epoch end: the epoch's logs, ``val_*`` to ``validation/``, the rest to ``train/``."""

    def __init__(self, writers: Writers):
        super().__init__()
        self.writers = writers

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        _scalars(self.writers[TRAIN], EPOCH_PREFIX, {k: v for k, v in logs.items() if not k.startswith("val_")},
                 epoch + 1)
        val = {k[len("val_"):]: v for k, v in logs.items() if k.startswith("val_")}
        if val:
            _scalars(self.writers[VALIDATION], EPOCH_PREFIX, val, epoch + 1)
        self.writers.flush()  # the dashboard sees every epoch at once, and a killed run loses none


class StepScalars(StepCallback):
    """Every N global steps: the running metrics, the LR applied, step time and images/s, and under
    mixed_float16 the loss scale and the skipped steps (``lossscale.LossScaleLogs``).

    Step time is the wall time per optimizer step over the steps since the last write, measured
    from one batch hook's end to the next (a hook covers ``RunState.hook_steps`` steps): the train
    steps and every callback (backups, checkpoints, the agreement all-reduce), but not the work
    between epochs (validation, epoch-end saves); an epoch's first hook counts from its own begin.
    ``lr`` (the LR of the hook's last step) is put into the logs by ``callbacks.RunMetrics``, which
    runs before this callback.
    """

    def __init__(self, state, writers: Writers, every: int, replicas: int):
        super().__init__(state)
        self.writers = writers
        self.every = every
        self.replicas = replicas
        self._began = 0.0
        self._last_end = None
        self._time = 0.0
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._last_end = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._last_end is None:
            self._began = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self._time += now - (self._began if self._last_end is None else self._last_end)
        self._last_end = now
        self._steps += self.state.hook_steps
        step = self.state.step
        if not self.state.reached(self.every):
            return
        step_time = self._time / self._steps
        self._time, self._steps = 0.0, 0
        logs = logs or {}
        # The step logs are global: run.py sets distribute_reduction_method = "first".
        values = {k: float(v) for k, v in logs.items()
                  if (k in self.model.metrics_names or k in LOSS_SCALE_KEYS) and _is_number(v)}
        values.update(lr=logs.get("lr"), step_time_s=step_time,
                      images_per_s=self.state.ctx.global_batch / step_time,
                      images_per_s_per_replica=self.state.ctx.global_batch / step_time / self.replicas)
        _scalars(self.writers[TRAIN], STEP_PREFIX, values, step)
        self.writers.flush()


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class RunInfo(tf.keras.callbacks.Callback):
    """At train begin: the world, the resolved spec and the LR plan as text, and the hparams.

    Written at the global step training starts from, so a resumed run (perhaps with another
    world) shows both. The hparams session gets the run's id as trial id: runs with equal
    hyperparameters stay separate rows in the dashboard instead of being averaged.
    """

    def __init__(self, writers: Writers, texts: dict, hparams: dict, trial_id: str, spec: Optional[JobSpec] = None):
        super().__init__()
        from tensorboard.plugins.hparams import api as hp

        self.writers = writers
        self.texts = texts
        self.hparams = hparams
        self.trial_id = trial_id
        self.spec = spec
        self._hp = hp
        hp.hparams_pb(hparams, trial_id=trial_id)  # bad values fail here, before training starts

    def on_train_begin(self, logs=None):
        hp = self._hp
        step = int(self.model.optimizer.iterations.numpy())  # once, at the start
        with self.writers["."].as_default(step=step):
            for tag, text in self.texts.items():
                tf.summary.text(tag, text)
            hp.hparams_config(hparams=hparam_infos(self.spec), metrics=hparam_metrics(self.spec))
            hp.hparams(self.hparams, trial_id=self.trial_id)
        self.writers.flush()

    def on_train_end(self, logs=None):
        from tensorboard.plugins.hparams import api_pb2
        from tensorboard.plugins.hparams import summary as hp_summary

        # What hp.KerasCallback writes at the end: the session finished (a stopped run has none).
        with self.writers["."].as_default():
            tf.summary.experimental.write_raw_pb(
                hp_summary.session_end_pb(api_pb2.STATUS_SUCCESS).SerializeToString(), step=0)
        self.writers.flush()


class Profiler(StepCallback):
    """Profiles global steps ``first``..``last`` (1-based) of this process with TensorFlow's profiler.

    With ``train.steps_per_execution: K`` it starts before the call (of up to K steps) that may take
    step ``first`` and stops after the call that took ``last``: whole calls, perhaps a few steps more.

    Keras' ``TensorBoard(profile_batch=...)`` counts batches from the start of ``fit``, so after a
    resume it would profile other steps, and it brings its own writers for ``train/``; the
    profiler API it calls is used here directly. Works on CPU: the trace (host threads, TensorFlow
    ops) goes to ``plugins/profile/<time>/<host>.xplane.pb``; TensorBoard's Profile tab needs the
    ``tensorboard-plugin-profile`` package to show it. Only the chief's process is traced.
    """

    def __init__(self, state, log_dir: Path, first: int, last: int):
        super().__init__(state)
        self.log_dir = Path(log_dir)
        self.first, self.last = first, last
        self._running = False

    def on_train_batch_begin(self, batch, logs=None):
        step = self.state.step + 1  # the first step of the call about to run
        last_of_call = self.state.step + self.state.ctx.spec.train.steps_per_execution  # at most
        if not self._running and step <= self.last and self.first <= last_of_call:
            try:
                tf.profiler.experimental.start(str(self.log_dir))
                self._running = True
                log.info("profiling steps %d-%d into %s", step, self.last, self.log_dir / "plugins" / "profile")
            except tf.errors.AlreadyExistsError as err:  # someone else's profiler: not worth failing the run
                log.warning("profiler not started: %s", err.message)
                self.last = 0

    def on_train_batch_end(self, batch, logs=None):
        if self._running and self.state.step >= self.last:
            self._stop()

    def on_train_end(self, logs=None):
        if self._running:
            self._stop()

    def _stop(self):
        self._running = False
        try:
            tf.profiler.experimental.stop()
        except tf.errors.UnavailableError as err:
            log.warning("profiler: %s", err.message)


class CloseWriters(tf.keras.callbacks.Callback):
    """Flushes and closes the writers when training ends (last of the TensorBoard callbacks)."""

    def __init__(self, writers: Writers):
        super().__init__()
        self.writers = writers

    def on_train_end(self, logs=None):
        self.writers.close()


def world_text(ctx, synthetic: bool) -> str:
    """The world of the run as a markdown table (TensorBoard's text plugin renders it)."""
    world = ctx.world
    rows = [
        ("strategy", ctx.dist.name),
        ("workers", f"{world.world_size} (launcher {world.launcher})"),
        ("replicas", f"{ctx.replicas} ({ctx.local_replicas} in the chief's process)"),
        ("global batch", ctx.batch_arithmetic),
        ("accumulation steps", f"{ctx.accumulation_steps} micro-batch(es) per optimizer step"),
        ("start step", ctx.start_step),
        ("steps per epoch", ctx.steps_per_epoch),
        ("worker addresses", ", ".join(world.worker_addresses) or "-"),
        ("nodes", ", ".join(world.nodes) or "-"),
        ("job id", world.job_id or "-"),
        ("synthetic data", synthetic),
        ("TensorFlow", tf.__version__),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def hparam_infos(spec: Optional[JobSpec] = None) -> list:
    """The hparams config: the same in every run, because TensorBoard shown a whole runs dir takes
    the config of whichever run it finds first. So no run's values go into it: the choices of the
    string hparams come from the spec, and numbers have no domain (the dashboard shows them as
    they come; a numeric range would have to guess bounds). A sweep's trial (``spec`` with a
    ``sweep:`` section) adds the swept keys, the same in every trial of the sweep."""
    from tensorboard.plugins.hparams import api as hp


    optimizers = next(f for f in dataclasses.fields(TrainSpec) if f.name == "optimizer").metadata["choices"]
    choices = {"model": tuple(MODELS), "data": DATA_SOURCES, "strategy": STRATEGIES, "optimizer": optimizers,
               "schedule": SCHEDULES, "precision": PRECISIONS}
    swept = swept_keys(spec.sweep) if spec is not None else {}
    return [hp.HParam(name, hp.Discrete(list(choices[name])) if name in choices else None, description=text)
            for name, text in HPARAMS.items()] + [hp.HParam(key, None, description=f"swept by {how}")
                                                  for key, how in swept.items()]


def metric_tag(metric: str) -> tuple[str, str]:
    """Where an epoch metric of the logs is in TensorBoard: ``val_loss`` → (``validation``, ``epoch_loss``).

    >>> metric_tag("val_accuracy"), metric_tag("loss")
    (('validation', 'epoch_accuracy'), ('train', 'epoch_loss'))
    """
    if metric.startswith("val_"):
        return VALIDATION, EPOCH_PREFIX + metric[len("val_"):]
    return TRAIN, EPOCH_PREFIX + metric


def hparam_metrics(spec: Optional[JobSpec] = None) -> list:
    """The metrics the dashboard shows beside the hparams (``HPARAM_METRICS``); a sweep's trial
    puts the sweep's metric first (``sweeps.compare.metric_and_mode``)."""
    from tensorboard.plugins.hparams import api as hp

    pairs, described = list(HPARAM_METRICS), {}
    if spec is not None and spec.sweep.defined:
        metric, mode = metric_and_mode(spec)
        first = metric_tag(metric)
        pairs = [first] + [pair for pair in pairs if pair != first]
        described[first] = f"the sweep's metric: {metric}, {mode} is best"
    return [hp.Metric(tag, group=group, display_name=f"{group} {tag[len(EPOCH_PREFIX):]}",
                      description=described.get((group, tag))) for group, tag in pairs]


def write_hparams_config(log_dir: Path, spec: JobSpec) -> None:
    """Writes the HParams config of ``spec`` (``hparam_infos``, ``hparam_metrics``) alone, as one
    event file in ``log_dir``: a sweep's (``SWEEP_DIR/tensorboard``), which its trials write too.

    Without a TensorFlow op (TensorBoard's own event writer), so a sweep writes it before its first
    trial configures TensorFlow's devices (``distribute.cpu_devices``).
    """
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import api as hp
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(log_dir))
    summary = hp.hparams_config_pb(hparams=hparam_infos(spec), metrics=hparam_metrics(spec))
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))
    writer.close()


def hparams_of(ctx) -> dict:
    """The key hyperparameters of the run, by the names in ``HPARAMS``, and a sweep's trial's
    swept keys (``sweeps.compare.swept_hparams``)."""
    spec, plan = ctx.spec, ctx.plan
    return {
        "model": spec.model.name, "data": spec.data.source, "strategy": ctx.dist.name,
        "workers": ctx.world.world_size, "replicas": ctx.replicas, "batch_per_replica": ctx.per_replica_batch,
        "global_batch": ctx.global_batch, "optimizer": spec.train.optimizer, "base_lr": plan.base_lr,
        "peak_lr": plan.peak_lr, "schedule": plan.schedule, "warmup_steps": plan.warmup_steps,
        "epochs": spec.train.epochs, "steps_per_epoch": ctx.steps_per_epoch, "precision": spec.train.precision,
        **swept_hparams(spec),
    }


def tensorboard_callbacks(ctx, state, *, synthetic: bool = False) -> list:
    """The chief's TensorBoard callbacks, writing to ``RUN_DIR/tensorboard``.

    Args:
        ctx: the ``context.RunContext`` (the job, world, batch arithmetic, LR plan, run dir).
        state: the run's ``callbacks.RunState`` (the global step, kept in Python).
        synthetic: whether the data is synthetic (shown with the world).

    Returns:
        Keras callbacks to put after ``callbacks.RunMetrics`` (they read its ``lr``), or ``[]``
        when ``logging.tensorboard`` is false. Call on the chief only.
    """
    spec = ctx.spec
    if not spec.logging.tensorboard:
        return []

    log_dir = ctx.run_dir.tensorboard
    writers = Writers(log_dir)
    texts = {"world": world_text(ctx, synthetic),
             "job_spec": "```yaml\n" + dump_spec(spec) + "```",
             "lr_plan": lr_lib.describe(ctx.plan)}
    callbacks = [RunInfo(writers, texts, hparams_of(ctx), trial_id=f"{spec.name}/{ctx.run_dir.name}", spec=spec),
                 EpochScalars(writers)]
    if spec.logging.step_scalars_every:
        callbacks.append(StepScalars(state, writers, spec.logging.step_scalars_every, ctx.replicas))
    if spec.logging.profile_steps:
        first, last = spec.logging.profile_steps
        callbacks.append(Profiler(state, log_dir, first, last))
    callbacks.append(CloseWriters(writers))
    return callbacks


def write_test_metrics(run_dir: RunDir, metrics: dict, epoch: int) -> None:
    """The test metrics after training, as ``test/epoch_*`` at the last epoch (chief only).

    They complete the hparams dashboard's final metrics. Does nothing without a TensorBoard dir
    (``logging.tensorboard: false``).
    """
    log_dir = run_dir.tensorboard
    if not log_dir.is_dir():
        return
    writers = Writers(log_dir)
    _scalars(writers[TEST], EPOCH_PREFIX, metrics, epoch)
    writers.close()
