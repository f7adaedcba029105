"""Choosing and building the distribution: a ``tf.distribute`` strategy or Horovod.

``choose_strategy`` is pure (no TensorFlow) so ``distrain env`` and the unit tests can call it;
``build`` imports TensorFlow and returns a ``distribution.Distribution`` (``TFDistribution``, defined
here, or ``horovod.HorovodDistribution``), the one object the run talks to for scopes, input
pipelines and agreement across workers, whichever backend is underneath.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable, Sequence

from distrain.distribution import Distribution
from distrain.errors import UsageError
from distrain.watchdog import Watchdog, abort_collectives, heartbeat
from distrain.world import World

log = logging.getLogger("distrain")


def choose_strategy(requested: str, world: World, num_gpus: int) -> str:
    """The strategy a run uses, or a ``UsageError`` when the request cannot work in this world.

    ``auto``: ``horovod`` under a Horovod/MPI launcher, ``multi_worker`` when the world has more
    than one worker, ``mirrored`` when this worker has more than one GPU, else ``one_device``.
    """
    launched_by_mpi = world.launcher in ("horovod", "mpi")
    if requested == "auto":
        if launched_by_mpi and world.world_size > 1:
            return "horovod"
        if world.world_size > 1:
            return "multi_worker"
        return "mirrored" if num_gpus > 1 else "one_device"
    if requested in ("one_device", "mirrored") and world.world_size > 1:
        raise UsageError(
            f"distribute.strategy: {requested} trains in one process, but the {world.launcher} launcher "
            f"started {world.world_size}; use multi_worker (one process per node) or start one task")
    if requested == "multi_worker" and launched_by_mpi and world.world_size > 1:
        raise UsageError(f"distribute.strategy: multi_worker needs TF_CONFIG or srun, but this process was "
                         f"started by {world.launcher}; use strategy horovod")
    if requested == "horovod" and world.world_size > 1 and not (launched_by_mpi or world.launcher == "slurm"):
        # srun works too: distrain.horovod bootstraps Gloo from the SLURM layout.
        raise UsageError(f"distribute.strategy: horovod processes must be started by horovodrun, mpirun or srun, "
                         f"not by {world.launcher}")
    return requested


class TFDistribution(Distribution):
    """A ``tf.distribute`` strategy: one_device (TensorFlow's default strategy), mirrored
    (one process, several devices) or multi_worker (one process per node, collectives).

    Args:
        name: one_device | mirrored | multi_worker.
        strategy: the strategy, already created.
        world: this process's place in the job.
    """

    def __init__(self, name: str, strategy: Any, world: World, gradient_compression: str = "none",
                 collective_timeout_s: float = 300.0, gradient_all_reduce: str = "tensorflow",
                 all_reduce_pack_bytes: int = 0):
        replicas = strategy.num_replicas_in_sync
        workers = world.world_size if name == "multi_worker" else 1
        super().__init__(name, strategy, world, replicas=replicas, local_replicas=replicas // max(1, workers))
        self._sum = _sum_collective(strategy)
        self.gradient_compression = gradient_compression
        self.gradient_all_reduce = gradient_all_reduce
        self._pack_bytes = all_reduce_pack_bytes
        # Collectives between processes: the ones that need a deadline and cost a network round trip.
        self._across_workers = workers > 1
        self._watchdog = Watchdog(collective_timeout_s, abort_collectives) if self._across_workers else None

    @property
    def num_pipelines(self) -> int:
        return self.world.world_size if self.name == "multi_worker" else 1

    @property
    def pipeline_id(self) -> int:
        return self.world.rank if self.name == "multi_worker" else 0

    def distribute_datasets(self, dataset_fn: Callable[[Any], Any], *, even: bool = False) -> Any:
        import tensorflow as tf

        extended = self.strategy.extended
        checks = getattr(extended, "experimental_enable_get_next_as_optional", None)
        if even and checks is not None:
            # Otherwise every step all-reduces "which workers still have data" before its input
            # (MultiWorkerMirroredStrategy): a collective per step that even input does not need.
            extended.experimental_enable_get_next_as_optional = False
        try:
            return self.strategy.distribute_datasets_from_function(
                dataset_fn, options=tf.distribute.InputOptions(experimental_fetch_to_device=True))
        finally:
            if checks is not None:
                extended.experimental_enable_get_next_as_optional = checks

    def adapt_model(self, model) -> None:
        if self._across_workers:
            from distrain.stepmetrics import keep_step_metrics_local

            keep_step_metrics_local(model)

    def callbacks(self, state, steps_per_epoch: int, log_every: int) -> list:
        if not self._across_workers:
            return []
        from distrain.stepmetrics import GlobalLogs

        return [heartbeat(self._watchdog), GlobalLogs(state, steps_per_epoch, log_every)]

    def evaluation_callbacks(self) -> list:
        return [heartbeat(self._watchdog)] if self._across_workers else []

    def collective_deadline(self):
        return self._watchdog.armed() if self._across_workers else contextlib.nullcontext()

    def sum(self, values: Sequence[float]) -> list[float]:
        return self._sum(list(values))

    def wrap_optimizer(self, optimizer):
        if self.replicas == 1:
            return optimizer
        from distrain.allreduce import sum_gradients

        return sum_gradients(optimizer, self.strategy, compression=self.gradient_compression,
                             resolved_once=self._across_workers and self.gradient_all_reduce == "resolved_once",
                             pack_bytes=self._pack_bytes)


def _configure_devices(tf, spec_distribute, world: World) -> list:
    gpus = tf.config.list_physical_devices("GPU")
    if spec_distribute.memory_growth:
        for gpu in gpus:
            try:
                # The course turns memory growth on; without it TF takes all of every GPU it sees.
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised in this process (tests build twice)
                pass
    return gpus


def split_cpu(num: int) -> None:
    """Splits the CPU into ``num`` logical devices (MirroredStrategy on a laptop or in tests)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num)


def _sum_collective(strategy) -> Callable[[list], list]:
    """Sums a small vector over all replicas of all workers (compiled once, reused every step)."""
    import tensorflow as tf

    @tf.function
    def reduce(value):
        per_replica = strategy.run(lambda: tf.identity(value))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return lambda values: reduce(tf.constant(values, tf.float32)).numpy().tolist()


def build(spec_distribute, world: World) -> Distribution:
    """Creates the strategy for this process.

    Must run before any other TensorFlow op: MultiWorkerMirroredStrategy and Horovod configure the
    runtime, and device configuration is fixed at the first op.
    """
    from distrain.tf_startup import import_tensorflow

    tf = import_tensorflow()

    gpus = _configure_devices(tf, spec_distribute, world)
    if spec_distribute.cpu_devices > 1 and not gpus:
        split_cpu(spec_distribute.cpu_devices)
    name = choose_strategy(spec_distribute.strategy, world, len(gpus))
    if spec_distribute.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")

    if name == "horovod":
        from distrain import horovod

        return horovod.build(world, gpus, compression=spec_distribute.gradient_compression)

    if name == "multi_worker":
        if world.tf_config is not None:
            # MultiWorkerMirroredStrategy reads the cluster from TF_CONFIG and nowhere else.
            os.environ["TF_CONFIG"] = json.dumps(world.tf_config)
        implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
                          else tf.distribute.experimental.CommunicationImplementation.RING)
        # No timeout_seconds: see watchdog.py (threads per collective); the deadline is the watchdog's.
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation, bytes_per_pack=spec_distribute.all_reduce_pack_bytes)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    elif name == "mirrored":
        devices = list(spec_distribute.devices) or None
        if devices is None and not gpus:
            cpus = tf.config.list_logical_devices("CPU")
            devices = [d.name for d in cpus] if len(cpus) > 1 else None
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        # One device needs no distribution: TensorFlow's default strategy places the model on the
        # first GPU if there is one, else the CPU. OneDeviceStrategy would do the same through a
        # distributed iterator that cost 15-20% throughput here (benchmarks/throughput.py).
        strategy = tf.distribute.get_strategy()
    return TFDistribution(name, strategy, world, spec_distribute.gradient_compression,
                          spec_distribute.collective_timeout_s,
                          gradient_all_reduce(spec_distribute.gradient_all_reduce, bool(gpus)),
                          spec_distribute.all_reduce_pack_bytes)


def gradient_all_reduce(requested: str, gpus: bool) -> str:
    """``distribute.gradient_all_reduce`` resolved: ``auto`` is resolved_once on CPU workers only.

    On CPU the round trip it saves was measured and the V1 ring is tested; on GPUs NCCL orders a
    step's collectives by MultiWorkerMirroredStrategy's ordering tokens, which V1 ops do not take,
    and no GPU was at hand to test it (docs/distributed.md).

    Example:
        >>> gradient_all_reduce("auto", gpus=False), gradient_all_reduce("auto", gpus=True)
        ('resolved_once', 'tensorflow')
    """
    if requested != "auto":
        return requested
    return "tensorflow" if gpus else "resolved_once"
