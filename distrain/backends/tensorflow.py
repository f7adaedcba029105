"""The TensorFlow backend: a ``tf.distribute`` strategy behind the ``Distribution`` interface.

one_device (TensorFlow's default strategy), mirrored (one process, several devices) or
multi_worker (MultiWorkerMirroredStrategy: one process per node, collectives between them).
``factory.build`` chooses the strategy and calls ``build`` here.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Sequence

from distrain.backends.allreduce import compress_in_loss_scale, sum_gradients
from distrain.backends.distribution import Distribution
from distrain.backends.watchdog import Watchdog, abort_collectives, heartbeat
from distrain.world import World

# distribute.gradient_all_reduce, as factory.gradient_all_reduce resolves it (docs/distributed.md).
SETUP_ONCE = "setup_once"  # collectives set up on the first step only: no per-step round trip to the leader
TENSORFLOW = "tensorflow"  # MultiWorkerMirroredStrategy's own all-reduce


class TFDistribution(Distribution):
    """A ``tf.distribute`` strategy: one_device (TensorFlow's default strategy), mirrored
    (one process, several devices) or multi_worker (one process per node, collectives).

    Args:
        name: one_device | mirrored | multi_worker.
        strategy: the strategy, already created.
        world: this process's place in the job.
        workers: the worker processes the strategy spans (1 unless multi_worker): each has its
            own input pipeline, and collectives between them get a deadline.
        gradient_compression: ``distribute.gradient_compression``.
        collective_timeout_s: ``distribute.collective_timeout_s``, the watchdog's deadline.
        gradient_all_reduce: ``setup_once`` or ``tensorflow`` (resolved, not ``auto``).
        all_reduce_pack_bytes: ``distribute.all_reduce_pack_bytes``.
    """

    def __init__(self, name: str, strategy: Any, world: World, *, workers: int = 1,
                 gradient_compression: str = "none", collective_timeout_s: float = 300.0,
                 gradient_all_reduce: str = TENSORFLOW, all_reduce_pack_bytes: int = 0):
        replicas = strategy.num_replicas_in_sync
        super().__init__(name, strategy, world, replicas=replicas, local_replicas=replicas // workers)
        self._sum = _sum_collective(strategy)
        self._workers = workers
        self.gradient_compression = gradient_compression
        self.gradient_all_reduce = gradient_all_reduce
        self._pack_bytes = all_reduce_pack_bytes
        # Collectives between processes: the ones that need a deadline and cost a network round trip.
        self._across_workers = workers > 1
        self._watchdog = Watchdog(collective_timeout_s, abort_collectives) if self._across_workers else None

    @property
    def num_pipelines(self) -> int:
        return self._workers

    @property
    def pipeline_id(self) -> int:
        return self.world.rank if self._across_workers else 0

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
        # compile has wrapped the optimizer in a LossScaleOptimizer by now (mixed_float16).
        compress_in_loss_scale(model.optimizer)
        if self._across_workers:
            from distrain.backends.stepmetrics import keep_step_metrics_local

            keep_step_metrics_local(model)

    def callbacks(self, state, steps_per_epoch: int, log_every: int) -> list:
        if not self._across_workers:
            return []
        from distrain.backends.stepmetrics import GlobalLogs

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

        return sum_gradients(optimizer, self.strategy, compression=self.gradient_compression,
                             setup_once=self._across_workers and self.gradient_all_reduce == SETUP_ONCE,
                             pack_bytes=self._pack_bytes)


def _sum_collective(strategy) -> Callable[[list], list]:
    """Sums a small vector over all replicas of all workers (compiled once, reused every step)."""
    import tensorflow as tf

    @tf.function
    def reduce(value):
        per_replica = strategy.run(lambda: tf.identity(value))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return lambda values: reduce(tf.constant(values, tf.float32)).numpy().tolist()


def build(name: str, spec_distribute, world: World, gpus: Sequence, all_reduce: str) -> TFDistribution:
    """Creates the ``tf.distribute`` strategy ``name`` for this process (TensorFlow already imported,
    devices configured and ``distribute.gradient_all_reduce`` resolved to ``all_reduce``: ``factory.build``)."""
    import tensorflow as tf

    workers = 1
    if name == "multi_worker":
        workers = world.world_size
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
        # slower distributed iterator (benchmarks/throughput.py, docs/performance-log.md).
        strategy = tf.distribute.get_strategy()
    return TFDistribution(name, strategy, world, workers=workers,
                          gradient_compression=spec_distribute.gradient_compression,
                          collective_timeout_s=spec_distribute.collective_timeout_s,
                          gradient_all_reduce=all_reduce,
                          all_reduce_pack_bytes=spec_distribute.all_reduce_pack_bytes)
