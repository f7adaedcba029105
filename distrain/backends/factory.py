"""Choosing and building the backend: a ``tf.distribute`` strategy or Horovod.

``choose_strategy`` and ``gradient_all_reduce`` are pure (no TensorFlow), so ``distrain env``, the
launchers and the unit tests can call them; ``build`` imports TensorFlow and returns the one
``Distribution`` the run talks to (``tensorflow.TFDistribution`` or ``horovod.HorovodDistribution``).
"""
from __future__ import annotations

import contextlib
import logging

from distrain.backends import tensorflow
from distrain.backends.distribution import Distribution
from distrain.backends.tensorflow import SETUP_ONCE, TENSORFLOW
from distrain.errors import UsageError
from distrain.tf_startup import import_tensorflow
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
        # srun works too: backends.horovod bootstraps Gloo from the SLURM layout.
        raise UsageError(f"distribute.strategy: horovod processes must be started by horovodrun, mpirun or srun, "
                         f"not by {world.launcher}")
    return requested


def gradient_all_reduce(requested: str, gpus: bool) -> str:
    """``distribute.gradient_all_reduce`` resolved: ``auto`` is setup_once on CPU workers only.

    On CPU the round trip it saves was measured and the V1 ring is tested; on GPUs NCCL orders a
    step's collectives by MultiWorkerMirroredStrategy's ordering tokens, which V1 ops do not take,
    and no GPU was at hand to test it (docs/distributed.md).

    Example:
        >>> gradient_all_reduce("auto", gpus=False), gradient_all_reduce("auto", gpus=True)
        ('setup_once', 'tensorflow')
    """
    if requested != "auto":
        return requested
    return TENSORFLOW if gpus else SETUP_ONCE


def split_cpu(num: int) -> None:
    """Splits the CPU into ``num`` logical devices (MirroredStrategy on a laptop or in tests)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num)


def _configure_devices(tf, spec_distribute) -> list:
    gpus = tf.config.list_physical_devices("GPU")
    if spec_distribute.memory_growth:
        for gpu in gpus:
            try:
                # The course turns memory growth on; without it TF takes all of every GPU it sees.
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised in this process (tests build twice)
                pass
    return gpus


@contextlib.contextmanager
def precision_policy(precision: str):
    """Keras's global dtype policy is ``precision`` (``train.precision``) inside the block, and what
    it was before after it.

    The policy is global to the process, and the layers take it when they are built: a run sets
    it before its model is built, and a notebook (or a test) that trains several runs in one
    process gets each run's own, whatever the run before it used. Under ``mixed_float16``,
    ``Model.compile`` wraps the optimizer in a ``LossScaleOptimizer`` (dynamic loss scaling).
    """
    tf = import_tensorflow()
    mixed_precision = tf.keras.mixed_precision
    previous = mixed_precision.global_policy()
    mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        mixed_precision.set_global_policy(previous)


def build(spec_distribute, world: World) -> Distribution:
    """Creates the backend for this process.

    Must run before any other TensorFlow op: MultiWorkerMirroredStrategy and Horovod configure the
    runtime, and device configuration is fixed at the first op.
    """

    tf = import_tensorflow()

    gpus = _configure_devices(tf, spec_distribute)
    if spec_distribute.cpu_devices > 1 and not gpus:
        split_cpu(spec_distribute.cpu_devices)
    name = choose_strategy(spec_distribute.strategy, world, len(gpus))
    if name == "horovod":
        from distrain.backends import horovod

        return horovod.build(world, gpus, compression=spec_distribute.gradient_compression,
                             collective_timeout_s=spec_distribute.collective_timeout_s)

    return tensorflow.build(name, spec_distribute, world, gpus,
                            gradient_all_reduce(spec_distribute.gradient_all_reduce, bool(gpus)))
