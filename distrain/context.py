"""The run, resolved once: ``RunContext`` holds every number and object the stages of a run share.

``resolve`` turns the job, the world, the distribution and the data into the facts everything else
reads: who is chief, how many replicas, the global batch, steps per epoch, the step training starts
from, the LR plan, the model's input shape and the run dir. Nothing downstream recomputes them, so
the callbacks, TensorBoard and the summary cannot disagree about, say, the global batch.

``resolve`` imports no TensorFlow: given a data description it is plain arithmetic, unit-tested in
``tests/test_context.py``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from distrain import lr as lr_lib
from distrain.accumulation import accumulation_for
from distrain.data.pipelines import steps_per_epoch
from distrain.errors import UsageError
from distrain.rundir import RunDir
from distrain.spec import JobSpec
from distrain.world import World

log = logging.getLogger("distrain")

DEFAULT_CHANNELS = 3  # image folders are decoded as RGB unless the model says otherwise


@dataclass(frozen=True)
class RunContext:
    """Everything a run decided before building its model (frozen: no stage changes it).

    Attributes:
        spec: the validated job.
        world: this process's place in the job.
        dist: the backend (``distribution.Distribution``).
        run_dir: the run dir, shared by every worker.
        is_chief: whether this process writes the files a user sees (rank 0).
        replicas: replicas in sync over the whole job.
        local_replicas: replicas in this process.
        per_replica_batch: examples per replica per micro-batch.
        accumulation_steps: micro-batches per optimizer step (k; ``accumulation`` module).
        global_batch: examples per optimizer step (per-replica batch × replicas × k).
        steps_per_epoch: optimizer steps per epoch.
        total_steps: optimizer steps of the whole run (epochs × steps per epoch).
        start_step: the global step training starts from (the backup's; 0 for a new run).
        plan: the learning-rate plan (scaled, warmup, schedule).
        input_shape: the model's input shape (images are resized to it).
        num_classes: classes the model predicts.
    """

    spec: JobSpec
    world: World
    dist: Any
    run_dir: RunDir
    is_chief: bool
    replicas: int
    local_replicas: int
    per_replica_batch: int
    accumulation_steps: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    start_step: int
    plan: lr_lib.LRPlan
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    def start_epoch(self) -> int:
        """The epoch (0-based) the start step falls in."""
        return self.start_step // self.steps_per_epoch

    @property
    def step_in_start_epoch(self) -> int:
        """Steps of the start epoch already done."""
        return self.start_step % self.steps_per_epoch

    @property
    def is_complete(self) -> bool:
        """Whether the backup already holds every step of the run."""
        return self.start_step >= self.total_steps

    @property
    def batch_arithmetic(self) -> str:
        """``64 = 8 per replica x 2`` (and ``x 4 micro-batches`` with accumulation)."""
        k = f" x {self.accumulation_steps} micro-batches" if self.accumulation_steps > 1 else ""
        return f"{self.global_batch} = {self.per_replica_batch} per replica x {self.replicas}{k}"

    def describe(self) -> str:
        """One log line: the distribution and the batch arithmetic."""
        return (f"strategy {self.dist.name}: {self.replicas} replicas ({self.local_replicas} here), global batch "
                f"{self.batch_arithmetic}, {self.steps_per_epoch} steps/epoch")


def image_channels(spec: JobSpec, default_input_shape: Optional[Sequence[int]] = None) -> int:
    """Channels to decode images with: the job's ``model.input_shape``, else the model's default
    input shape, else RGB."""
    shape = spec.model.input_shape or default_input_shape
    return int(shape[-1]) if shape is not None and len(shape) == 3 else DEFAULT_CHANNELS


def input_shape(spec: JobSpec, data_shape: Sequence[int]) -> tuple[int, ...]:
    """The model's input shape: ``model.input_shape`` (``[H, W]`` takes the data's channels) or
    the data's own shape.

    Raises:
        UsageError: ``model.input_shape`` has other channels than the data.

    Example:
        >>> from distrain.spec import spec_from_dict
        >>> input_shape(spec_from_dict({"model": {"input_shape": [32, 32]}}), (8, 8, 1))
        (32, 32, 1)
    """
    if spec.model.input_shape is None:
        return tuple(data_shape)
    shape = tuple(spec.model.input_shape)
    if len(shape) == 2:
        shape = (*shape, data_shape[-1])
    if shape[-1] != data_shape[-1]:
        raise UsageError(f"model.input_shape: {list(shape)} has {shape[-1]} channels, the data has {data_shape[-1]}")
    return shape


def global_batch_of(spec: JobSpec, replicas: int, run_dir: RunDir, start_step: int) -> int:
    """The run's global batch: the one recorded in ``segments.json`` once the run has trained
    (a resume on another number of replicas keeps it), else the job's arithmetic
    (``batch_size_per_replica × replicas × train.accumulation_steps``)."""
    if start_step > 0:
        recorded = [s.get("global_batch") for s in run_dir.read_segments() if s.get("start_step", 0) < start_step]
        if recorded and isinstance(recorded[-1], int):
            return recorded[-1]
    return spec.data.batch_size_per_replica * replicas * spec.train.accumulation_steps


def start_step_of(run_dir: RunDir, is_chief: bool) -> int:
    """The step the run starts from: its newest backup that verifies (0 without one). Says in one
    line (a warning on the chief, in the log file elsewhere) each newer backup it skipped and why.

    Raises:
        UsageError: backups exist and none verifies.
    """
    backup = run_dir.choose_backup()
    level = logging.WARNING if is_chief else logging.INFO
    resumed = f"resuming from {backup.prefix.name} (step {backup.step})" if backup.prefix else "starting from step 0"
    for step, why in backup.skipped:
        log.log(level, "%s: skipped: %s; %s", run_dir.backup_prefix(step), why, resumed)
    if backup.prefix and not backup.verified:
        log.log(level, "%s: written before commit markers, so not verified before it is restored", backup.prefix)
    return backup.step


def resolve(spec: JobSpec, world: World, dist, data, run_dir: RunDir) -> RunContext:
    """Resolves the run: batch arithmetic, steps, LR plan, input shape and start step.

    Args:
        spec: the validated job.
        world: this process's place in the job.
        dist: the backend (its ``replicas`` and ``local_replicas``).
        data: the loaded ``data.pipelines.Source`` (``train_size``, ``input_shape``, ``num_classes``).
        run_dir: the run dir; its newest backup that verifies, if any, gives the start step
            (``RunDir.choose_backup``; each newer one skipped is logged in one line).

    Raises:
        UsageError: the global batch does not fit the data or this number of replicas, the
            model's input shape does not fit the data, or the run dir's backups exist and none
            verifies.
    """
    per_replica = spec.data.batch_size_per_replica
    start_step = start_step_of(run_dir, world.is_chief)
    global_batch = global_batch_of(spec, dist.replicas, run_dir, start_step)
    accumulation = accumulation_for(global_batch, per_replica, dist.replicas)
    steps = steps_per_epoch(data.train_size, global_batch, spec.train.steps_per_epoch)
    plan = lr_lib.LRPlan.from_spec(spec.train, global_batch=global_batch, per_replica_batch=per_replica,
                                   steps_per_epoch=steps)
    return RunContext(
        spec=spec, world=world, dist=dist, run_dir=run_dir, is_chief=world.is_chief,
        replicas=dist.replicas, local_replicas=dist.local_replicas, per_replica_batch=per_replica,
        accumulation_steps=accumulation, global_batch=global_batch, steps_per_epoch=steps,
        total_steps=spec.train.epochs * steps, start_step=start_step, plan=plan, input_shape=input_shape(spec, data.input_shape),
        num_classes=spec.model.num_classes or data.num_classes)
