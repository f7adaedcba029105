"""The Horovod backend: one process per GPU (or CPU slot), gradients averaged by allreduce.

Each process trains its own replica under TensorFlow's default strategy and feeds it its own
shard of every batch; ``hvd.DistributedOptimizer`` averages the gradients across processes, and
the methods of ``HorovodDistribution`` do the rest: rank 0's initial (or restored) state is
broadcast, epoch metrics are reduced over all ranks before any callback reads them, and stop
decisions are agreed with an allreduce. Rank 0 is the chief.

Launch (every process runs the same command; docs/horovod.md has the details)::

    # one machine, 2 processes, Gloo (the build from scripts/install-horovod.sh has no MPI)
    horovodrun -np 2 -H localhost:2 --gloo --network-interface lo distrain train JOB --run-dir DIR
    # several nodes under SLURM, one task per GPU, no MPI needed: rank 0 runs the rendezvous
    srun --ntasks-per-node=4 distrain train JOB --set distribute.strategy=horovod
    # Open MPI, with a Horovod built with MPI
    mpirun -np 8 -H node1:4,node2:4 distrain train JOB --run-dir DIR

Under ``srun`` there is no ``horovodrun`` to start Horovod's rendezvous server and hand every
process its ranks, so ``bootstrap_from_slurm`` does what ``horovodrun --gloo`` does
(``horovod/runner/gloo_run.py``): rank 0 serves Horovod's own ``RendezvousHTTPServer`` on the
first node's address at the job's port (``world.job_port``), and every process gets the
``HOROVOD_*`` variables ``gloo_run`` would have given it, computed from the SLURM layout.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import tensorflow as tf

from distrain.backends.allreduce import reduce_in_loss_scale
from distrain.backends.distribution import Distribution
from distrain.backends.watchdog import Watchdog, heartbeat
from distrain.errors import UsageError
from distrain.world import World

log = logging.getLogger("distrain")

ROOT_RANK = 0
RENDEZVOUS_WAIT_S = 300.0  # how long ranks > 0 wait for rank 0's rendezvous server (TF import, data load)
GLOO_TIMEOUT_S = 30  # Horovod's default HOROVOD_GLOO_TIMEOUT_SECONDS


def _import_hvd():
    try:
        import horovod.tensorflow as hvd
    except ImportError as err:
        raise UsageError(f"distribute.strategy: horovod, but Horovod cannot be imported ({err}); "
                         "install it with scripts/install-horovod.sh (docs/horovod.md)") from None
    return hvd


# --------------------------------------------------------------------------------------------
# srun: Gloo rendezvous from the SLURM layout
# --------------------------------------------------------------------------------------------

class Slot(NamedTuple):
    """One process of the job, with the fields of Horovod's ``SlotInfo`` (the server reads them)."""

    hostname: str
    rank: int
    local_rank: int
    cross_rank: int
    size: int
    local_size: int
    cross_size: int


def slots(nodes: Sequence[str], tasks_per_node: Sequence[int]) -> list[Slot]:
    """Every process's ranks for SLURM's block layout, as ``horovodrun`` assigns them.

    Same rules as ``horovod.runner.common.util.hosts.get_host_assignments``: ranks fill the nodes
    in order; ``cross_rank`` numbers the processes with one ``local_rank`` across nodes.

    Example:
        >>> [s.cross_rank for s in slots(["a", "b"], [2, 1])]
        [0, 1, 0]
    """
    if len(nodes) != len(tasks_per_node):
        raise UsageError(f"environment: {len(tasks_per_node)} task counts for {len(nodes)} SLURM nodes")
    size = sum(tasks_per_node)
    cross_size = [sum(1 for n in tasks_per_node if n > local) for local in range(max(tasks_per_node, default=0))]
    result, rank = [], 0
    for node_index, (node, count) in enumerate(zip(nodes, tasks_per_node)):
        for local in range(count):
            cross_rank = sum(1 for n in tasks_per_node[:node_index] if n > local)
            result.append(Slot(node, rank, local, cross_rank, size, count, cross_size[local]))
            rank += 1
    return result


def gloo_env(slot: Slot, rendezvous: tuple[str, int], iface: Optional[str]) -> dict[str, str]:
    """The variables ``horovodrun --gloo`` sets for one process (``gloo_run.create_slot_env_vars``
    and ``create_run_env_vars``); Horovod's C++ core reads them in ``hvd.init()``."""
    env = {
        "HOROVOD_HOSTNAME": slot.hostname, "HOROVOD_RANK": str(slot.rank), "HOROVOD_SIZE": str(slot.size),
        "HOROVOD_LOCAL_RANK": str(slot.local_rank), "HOROVOD_LOCAL_SIZE": str(slot.local_size),
        "HOROVOD_CROSS_RANK": str(slot.cross_rank), "HOROVOD_CROSS_SIZE": str(slot.cross_size),
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": rendezvous[0], "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rendezvous[1]),
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
    }
    if iface:
        env["HOROVOD_GLOO_IFACE"] = iface
    return env


def interface_of(address: str) -> Optional[str]:
    """The local network interface holding ``address`` (a host name or IP), or None.

    Gloo binds its sockets to one interface; without ``HOROVOD_GLOO_IFACE`` it picks the address
    the machine's host name resolves to, which need not be the one SLURM reaches the node by.
    """
    import psutil  # a Horovod dependency

    try:
        ips = {info[4][0] for info in socket.getaddrinfo(address, None)}
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] in ips for a in addrs):
            return name
    return None


def _split_address(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def bootstrap_from_slurm(world: World, environ=os.environ) -> Optional[Any]:
    """Makes ``hvd.init()`` work in an ``srun`` step: sets the ``HOROVOD_*`` variables in
    ``environ`` and, on rank 0, starts the rendezvous server (returned; it serves until exit).

    The server listens on rank 0's address from the SLURM world (the first node's ``NodeAddr``,
    at the job's port, ``world.job_port``), not on every interface as ``horovodrun``'s does.
    Ranks > 0 wait until it accepts connections: Horovod's HTTP store aborts the whole process
    (``std::terminate``) after a few refused requests.
    """
    if not world.tasks_per_node:
        raise UsageError("environment: SLURM tasks per node are unknown; run distrain under srun")
    layout = slots(world.nodes, world.tasks_per_node)
    me = layout[world.rank]
    if (me.local_rank, me.local_size) != (world.local_rank, world.local_size):
        raise UsageError(f"environment: SLURM_LOCALID={world.local_rank} does not match the block layout "
                         f"(local rank {me.local_rank}); use srun --distribution=block")
    host, port = _split_address(world.worker_addresses[ROOT_RANK])
    try:
        # One IPv4 address for the server's socket and every client (horovodrun passes an IP too).
        rendezvous = (socket.gethostbyname(host), port)
    except OSError as err:
        raise UsageError(f"environment: cannot resolve rank 0's address {host!r} ({err})") from None
    own_host = _split_address(world.worker_addresses[world.rank])[0]
    iface = environ.get("HOROVOD_GLOO_IFACE") or interface_of(own_host)
    if iface is None:
        log.warning("no local interface holds %s; Gloo binds to the address of this host's name", own_host)
    environ.update(gloo_env(me, rendezvous, iface))
    server = None
    if world.rank == ROOT_RANK:
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
        from horovod.runner.util.threads import in_thread

        try:
            server = RendezvousHTTPServer(rendezvous, RendezvousHandler, 0)
        except OSError as err:
            raise UsageError(f"distribute.port: cannot serve the Horovod rendezvous on {rendezvous[0]}:{rendezvous[1]} "
                             f"({err.strerror}); set distribute.port or DISTRAIN_PORT to a free port") from None
        server.init(layout)
        in_thread(target=server.serve_forever)
        log.info("Horovod rendezvous on %s:%d for %d processes", *rendezvous, len(layout))
    else:
        _wait_for(rendezvous, RENDEZVOUS_WAIT_S)
    return server


def _wait_for(address: tuple[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(address, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise UsageError(f"environment: rank 0's Horovod rendezvous at {address[0]}:{address[1]} did not "
                                 f"answer within {timeout:.0f} s; is rank 0 running and the port reachable?") from None
            time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# A deadline on the collectives: a frozen or stalled peer ends the run (exit 76)
# --------------------------------------------------------------------------------------------

def gloo_timeout_s(collective_timeout_s: float) -> int:
    """Seconds Gloo waits for a peer's answer (``HOROVOD_GLOO_TIMEOUT_SECONDS``): Horovod's own 30,
    or ``distribute.collective_timeout_s`` when that is shorter (whole seconds, at least 1).

    Gloo's timeout is what ends the wait for a peer whose Horovod no longer answers (its process
    stopped or frozen, the network cut): Horovod's background thread fails with "Timed out waiting
    ...", shuts Horovod down, and every op that waits fails. In a healthy run the background
    threads exchange messages every cycle (milliseconds), also while a rank traces or saves, so a
    longer deadline would only find a frozen peer later.

    Example:
        >>> gloo_timeout_s(300.0), gloo_timeout_s(10.0), gloo_timeout_s(0.2)
        (30, 10, 1)
    """
    return max(1, min(GLOO_TIMEOUT_S, math.ceil(collective_timeout_s)))


# --------------------------------------------------------------------------------------------
# Metrics over all ranks
# --------------------------------------------------------------------------------------------

def _accumulators(model) -> dict[str, tuple[float, float]]:
    """(total, count) of each of the model's mean metrics, as Keras holds them right now.

    Keras's loss tracker and accuracy are weighted means over examples: summing total and count
    over ranks and dividing gives the metric over all examples, exactly, however unevenly the
    examples were dealt (tf.distribute reduces metric variables the same way).
    """
    sums = {}
    for m in model.metrics:
        total, count = getattr(m, "total", None), getattr(m, "count", None)
        if isinstance(total, tf.Variable) and isinstance(count, tf.Variable):
            sums[m.name] = (float(total.numpy()), float(count.numpy()))
    return sums


def _sum_and_weight(value: float, acc: Optional[tuple[float, float]], examples: float) -> tuple[float, float]:
    """What this rank contributes to one metric: Keras's accumulators when they give the logged
    value, otherwise the value weighted by the examples this rank saw."""
    if acc is not None and acc[1] > 0 and abs(acc[0] / acc[1] - value) <= 1e-5 * max(1.0, abs(value)):
        return acc
    return value * examples, examples


def reduce_metrics(values: Mapping[str, float], phases: Mapping[str, tuple[str, dict]], sum_fn) -> dict:
    """Metrics over all ranks (a collective: every rank calls it with the same keys).

    Args:
        values: this rank's metrics (Keras logs).
        phases: for each key of ``values`` to reduce, (the model metric's name, the accumulators of
            that key's phase); other keys are returned unchanged.
        sum_fn: sums a list of floats over all ranks.
    """
    keys = sorted(k for k in values if k in phases)
    if not keys:
        return dict(values)
    local = []
    for key in keys:
        name, accs = phases[key]
        examples = accs.get("loss", (0.0, 1.0))[1] or 1.0
        local.extend(_sum_and_weight(float(values[key]), accs.get(name), examples))
    total = sum_fn(local)
    out = dict(values)
    for i, key in enumerate(keys):
        out[key] = total[2 * i] / total[2 * i + 1] if total[2 * i + 1] else float("nan")
    return out


class MetricAverage(tf.keras.callbacks.Callback):
    """Replaces this rank's epoch metrics (``loss``, ``accuracy``, ``val_*``) by those over all ranks.

    Must run before anything that reads the epoch's logs (EarlyStopping, checkpoints, history,
    TensorBoard): ``build_callbacks`` puts the backend's callbacks right after ``RunMetrics``.
    Horovod's own ``MetricAverageCallback`` cannot be used: it imports Keras 3's backend, and it
    averages the ranks' means, which is off when the ranks saw different numbers of examples.
    The training accumulators are read in ``on_test_begin``, before validation resets them.
    """

    def __init__(self, sum_fn):
        super().__init__()
        self.sum_fn = sum_fn
        self._train: Optional[dict] = None
        self._val: dict = {}
        self._in_epoch = False

    def on_epoch_begin(self, epoch, logs=None):
        self._train, self._val, self._in_epoch = None, {}, True

    def on_test_begin(self, logs=None):
        if self._in_epoch and self._train is None:
            self._train = _accumulators(self.model)

    def on_test_end(self, logs=None):
        if self._in_epoch:
            self._val = _accumulators(self.model)

    def on_epoch_end(self, epoch, logs=None):
        self._in_epoch = False
        if not logs:
            return
        train = self._train if self._train is not None else _accumulators(self.model)
        names = {m.name for m in self.model.metrics}
        phases = {**{n: (n, train) for n in names}, **{f"val_{n}": (n, self._val) for n in names}}
        logs.update(reduce_metrics(logs, phases, self.sum_fn))


# --------------------------------------------------------------------------------------------
# The distribution
# --------------------------------------------------------------------------------------------

def _tf_keras_optimizer_types() -> tuple:
    import tf_keras

    return (tf_keras.optimizers.Optimizer, tf_keras.optimizers.legacy.Optimizer)


class HorovodDistribution(Distribution):
    """``Distribution`` over Horovod: every hook that needs the other ranks uses an allreduce.

    Args:
        world: this process's place in the job (its rank and size agree with Horovod's).
        hvd: the initialised ``horovod.tensorflow`` module.
        rendezvous: under ``srun``, rank 0's rendezvous server, kept alive with the run.
        compression: ``distribute.gradient_compression``.
        collective_timeout_s: ``distribute.collective_timeout_s``, the watchdog's deadline.
    """

    def __init__(self, world: World, hvd, rendezvous: Any = None, compression: str = "none",
                 collective_timeout_s: float = 300.0):
        super().__init__("horovod", tf.distribute.get_strategy(), world, replicas=hvd.size(), local_replicas=1)
        self._hvd = hvd
        self.compression = compression
        self._loss_scaled = None  # the LossScaleOptimizer whose scale fp16 compression applies (adapt_model)
        self.rendezvous = rendezvous
        # A peer alive but stalled (in Python, in a callback, on a file system) keeps its Horovod
        # answering, so Gloo's timeout never ends the wait and Horovod's stall check only warns.
        self._watchdog = Watchdog(collective_timeout_s, self._shut_down) if self.replicas > 1 else None
        # One instance per run, created here so that every call of callbacks() returns it.
        self._callbacks = [heartbeat(self._watchdog), MetricAverage(self.sum)] if self.replicas > 1 else []

    def distribute_datasets(self, dataset_fn, *, even: bool = False):
        # Horovod has no distributed dataset: each rank feeds its own replica.
        return dataset_fn(tf.distribute.InputContext(self.num_pipelines, self.pipeline_id, self.replicas))

    def sum(self, values: Sequence[float]) -> list[float]:
        # float64: metric totals are sums over many examples. One name: the calls never overlap.
        reduced = self._hvd.allreduce(tf.constant(list(values), tf.float64), op=self._hvd.Sum, name="distrain_sum")
        return reduced.numpy().tolist()

    def wrap_optimizer(self, optimizer):
        """``hvd.DistributedOptimizer`` around a tf-keras optimizer.

        Raises:
            TypeError: a Keras 3 (or other) optimizer; Horovod would wrap it and then never
                average its gradients, so every rank would silently train alone.
        """
        if not isinstance(optimizer, _tf_keras_optimizer_types()):
            raise TypeError(f"Horovod needs a tf-keras optimizer, got {type(optimizer).__module__}."
                            f"{type(optimizer).__name__} (is TF_USE_LEGACY_KERAS=1 set before TensorFlow is imported?)")
        import horovod.tensorflow.keras as hvd_keras

        wrapped = hvd_keras.DistributedOptimizer(optimizer, compression=self._compressor())
        # Horovod subclasses the optimizer's class under the same name, in module horovod._keras.
        # Saved under that module, model.keras could not be compiled again without Horovod.
        type(wrapped).__module__ = type(optimizer).__module__
        return wrapped

    def reduce_gradients(self, gradients: list) -> list:
        """The mean over all ranks, in one grouped allreduce (what ``hvd.DistributedOptimizer``
        does inside ``compute_gradients``, which distrain's own step does not call).

        The gradients come unscaled (distrain's step divides each micro-batch's by the loss scale);
        with fp16 compression under loss scaling they are sent multiplied by the scale again, as
        ``hvd.DistributedOptimizer`` sends them from inside the ``LossScaleOptimizer``'s
        ``compute_gradients`` (``allreduce.compress_in_loss_scale`` says why).
        """
        if self.replicas == 1:
            return gradients

        def average(values):
            return self._hvd.grouped_allreduce(list(values), op=self._hvd.Average, compression=self._compressor())

        scale = self._loss_scaled.loss_scale if self._loss_scaled is not None else None
        return reduce_in_loss_scale(average, list(gradients), scale)

    def adapt_model(self, model) -> None:
        """Notes the ``LossScaleOptimizer`` (mixed_float16) whose scale fp16 compression applies."""
        if self.compression == "fp16" and isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
            self._loss_scaled = model.optimizer

    def _compressor(self):
        """Horovod's gradient compression for ``distribute.gradient_compression``."""
        return self._hvd.Compression.fp16 if self.compression == "fp16" else self._hvd.Compression.none

    def broadcast_initial_state(self, model, optimizer) -> None:
        """Rank 0's weights and optimizer state (slots, ``iterations``) on every rank.

        The optimizer's variables are created first (``optimizer.build``): Keras makes them at the
        first step otherwise, too late to broadcast. A restored backup's slot values are applied
        when they are created (TensorFlow's deferred restore), so they are broadcast too.
        """
        if hasattr(optimizer, "build"):
            optimizer.build(model.trainable_variables)
        if self.replicas == 1:
            return
        variables = list(model.variables) + list(optimizer.variables)
        self._hvd.broadcast_variables(variables, root_rank=ROOT_RANK)
        log.info("broadcast %d variables from rank %d", len(variables), ROOT_RANK)

    def callbacks(self, state, steps_per_epoch: int, log_every: int) -> list:
        """The watchdog's heartbeat and the metric averaging (the same instances on every call)."""
        return list(self._callbacks)

    def evaluation_callbacks(self) -> list:
        return self._callbacks[:1]

    def collective_deadline(self):
        """The watchdog armed: no step for ``distribute.collective_timeout_s`` shuts Horovod down."""
        return self._watchdog.armed() if self._watchdog is not None else contextlib.nullcontext()

    def _shut_down(self, message: str) -> None:
        # Horovod has no abort: its shutdown, agreed with the other ranks' background threads, fails
        # every op that waits here (and there) with "Horovod has been shut down" (peer_lost).
        log.warning("%s; shutting Horovod down", message)
        self._hvd.shutdown()

    def peer_lost(self, err: Exception) -> bool:
        # When a rank dies, Horovod's background loop shuts down and every op on the survivors
        # fails with this message (as an UnknownError), not with a collective timeout.
        return super().peer_lost(err) or (self.world.world_size > 1 and "Horovod has been shut down" in str(err))

    def average_metrics(self, model, metrics: dict, local_examples: int) -> dict:
        """Test metrics over all ranks' shards, weighted by examples (a collective).

        Reduces Keras's accumulators from the evaluation that produced ``metrics``; a metric
        without them is weighted by ``local_examples``.
        """
        if self.replicas == 1:
            return metrics
        accs = _accumulators(model)
        if "loss" not in accs:
            accs["loss"] = (0.0, float(local_examples))
        return reduce_metrics(metrics, {k: (k, accs) for k in metrics}, self.sum)


def _pin_gpu(gpus: Sequence, local_rank: int, local_size: int) -> None:
    if len(gpus) == 1:
        return  # the launcher already gave this process one GPU (CUDA_VISIBLE_DEVICES per task)
    if local_rank >= len(gpus):
        raise UsageError(f"environment: local rank {local_rank} of {local_size} on this node, but only {len(gpus)} "
                         "GPUs are visible; start one process per GPU")
    tf.config.set_visible_devices(gpus[local_rank], "GPU")


def build(world: World, gpus: Sequence, compression: str = "none",
          collective_timeout_s: float = 300.0) -> HorovodDistribution:
    """Initialises Horovod for this process and returns the distribution.

    Args:
        world: this process's place; under ``srun`` Horovod is bootstrapped from it.
        gpus: the physical GPUs TensorFlow sees; each process keeps the one of its local rank.
        compression: ``distribute.gradient_compression`` (none | fp16), Horovod's ``Compression``.
        collective_timeout_s: ``distribute.collective_timeout_s``: Gloo's timeout (``gloo_timeout_s``;
            a ``HOROVOD_GLOO_TIMEOUT_SECONDS`` already set, e.g. by ``horovodrun --gloo-timeout-seconds``,
            wins) and the watchdog's deadline.

    Raises:
        UsageError: Horovod missing, or its ranks disagree with the launcher's (an MPI launcher
            with a Horovod built without MPI starts N single-process jobs; this stops them).
    """
    hvd = _import_hvd()
    server = bootstrap_from_slurm(world) if world.launcher == "slurm" and world.world_size > 1 else None
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(gloo_timeout_s(collective_timeout_s)))
    hvd.init()
    if (hvd.rank(), hvd.size()) != (world.rank, world.world_size):
        mpi = "" if hvd.mpi_built() else " (this Horovod was built without MPI: use horovodrun --gloo, or srun)"
        raise UsageError(f"distribute.strategy: horovod: Horovod sees rank {hvd.rank()} of {hvd.size()}, the "
                         f"{world.launcher} launcher rank {world.rank} of {world.world_size}{mpi}")
    if gpus:
        _pin_gpu(gpus, hvd.local_rank(), hvd.local_size())
    log.info("Horovod rank %d of %d (local %d of %d), %s controller", hvd.rank(), hvd.size(), hvd.local_rank(),
             hvd.local_size(), "Gloo" if hvd.gloo_enabled() else "MPI")
    return HorovodDistribution(world, hvd, rendezvous=server, compression=compression,
                               collective_timeout_s=collective_timeout_s)
