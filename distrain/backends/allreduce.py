"""How a step's gradients are summed over the replicas of a ``tf.distribute`` strategy.

tf-keras sums them in ``Optimizer.aggregate_gradients``, the method it documents for custom
aggregation; distrain replaces it on the optimizer instance (the class, and so a saved model's
optimizer, stay as they are) for two things:

- **fp16 compression** (``distribute.gradient_compression: fp16``; mirrored and multi_worker).
  Gradients are cast to float16 for the all-reduce only and back to their own dtype before the
  update, so variables and optimizer state stay float32; what changes is the rounding of each
  summed gradient (about 3 significant digits, measured in docs/performance.md). Half the bytes a
  step sends: the term that dominates a step on a slow network. Under dynamic loss scaling
  (mixed_float16) the gradients are compressed multiplied by the loss scale, as the float16
  backward pass computed them (``compress_in_loss_scale`` says why). Horovod has its own switch
  (``hvd.Compression.fp16``), set in ``distrain.backends.horovod``, which multiplies distrain's
  step's gradients by the loss scale the same way (``reduce_in_loss_scale``).
- **Collectives set up once** (``distribute.gradient_all_reduce: setup_once``, multi_worker).
  MultiWorkerMirroredStrategy's all-reduce is TensorFlow's ``CollectiveReduceV2``, whose instance
  key is fed anew at every call of the step function and whose parameters are resolved at every
  execution. On every worker but the group leader that resolution is a gRPC request to the leader
  (``CompleteInstance``) before the ring can start, every step: the resolver caches instances
  under the call's step id, and each call of a ``tf.function`` gets a new one (its cost is
  measured in docs/performance-log.md; at N workers the leader answers N-1 requests per step).
  TensorFlow's ``CollectiveReduce`` (V1) op takes its group and instance keys as attributes,
  resolves them on its first execution and keeps them in the kernel, so every later step starts
  the ring at once. It is the same ring over the same channels (gRPC between CPU
  workers, NCCL between GPUs), the same bytes and the same sum.

The keys. The group is MultiWorkerMirroredStrategy's own (the same devices; already resolved when
the strategy broadcast the initial weights, and on GPUs the same NCCL communicator). Instance keys
lie in [``INSTANCE_KEY_BASE``, 1.5 x that) and come from what is reduced (``_InstanceKeys``), so
every worker derives the same ones without talking to the others. The strategy's own instance
keys count up from 100, one per collective launched, and would need 2**30 of them to meet these.
"""
from __future__ import annotations

import logging
import threading
import weakref
import zlib
from typing import Any, Callable

log = logging.getLogger("distrain")

INSTANCE_KEY_BASE = 1 << 30


def sum_gradients(optimizer, strategy, *, compression: str = "none", setup_once: bool = False,
                  pack_bytes: int = 0):
    """Makes a tf-keras optimizer sum its gradients over the strategy's replicas distrain's way.

    Args:
        optimizer: a tf-keras optimizer, created in the strategy's scope.
        strategy: the ``tf.distribute`` strategy the optimizer trains under.
        compression: ``none`` or ``fp16`` (``distribute.gradient_compression``).
        setup_once: all-reduce with collectives whose parameters are resolved on their first
            step only (MultiWorkerMirroredStrategy; ``distribute.gradient_all_reduce``).
        pack_bytes: with ``setup_once``: one collective per about this many bytes, in the
            strategy's packing; 0: one collective per dtype.

    Returns:
        The same optimizer. With ``setup_once`` on a strategy whose collective keys cannot be
        read (another TensorFlow version), TensorFlow's own all-reduce stays, with a warning.
    """
    reduce = None
    if setup_once:
        reduce = _setup_once_reducer(strategy, pack_bytes)
        if reduce is None:
            log.warning("distribute.gradient_all_reduce: setup_once needs MultiWorkerMirroredStrategy's "
                        "collective keys, which this TensorFlow does not expose; using TensorFlow's all-reduce")
    if reduce is None and compression == "none":
        return optimizer
    optimizer.aggregate_gradients = _GradientSum(reduce or _tensorflow_sum, compression)
    return optimizer


class _GradientSum:
    """A tf-keras optimizer's ``aggregate_gradients`` (set on the instance by ``sum_gradients``):
    the replica's gradients compressed, summed over the replicas by ``reduce``, uncompressed."""

    def __init__(self, reduce: Callable[[list], list], compression: str):
        self.reduce = reduce
        self.compression = compression
        # The LossScaleOptimizer's current scale, once compress_in_loss_scale has found one.
        self.loss_scale: Callable[[], Any] | None = None

    def __call__(self, grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        present = [g for g, _ in grads_and_vars if g is not None]
        if not present:
            return grads_and_vars
        scale = self.loss_scale() if self.loss_scale is not None else None
        summed = iter(reduce_in_loss_scale(
            lambda values: _uncompress(self.reduce(_compress(values, self.compression)), values), present, scale))
        return [(None if g is None else next(summed), v) for g, v in grads_and_vars]


def compress_in_loss_scale(optimizer) -> bool:
    """Makes fp16 compression send the gradients multiplied by the loss scale (dynamic loss scaling).

    tf-keras's ``LossScaleOptimizer`` divides the gradients by the loss scale in
    ``compute_gradients`` and sums them over the replicas later, in ``apply_gradients`` (its inner
    optimizer's ``aggregate_gradients``, which ``sum_gradients`` replaced). Cast to float16 there,
    the unscaled gradients lose what the scale was for: below float16's smallest normal number
    (6.1e-5) they keep fewer digits and below 6e-8 they become zero, where the float16 backward pass
    had held them, scaled, in range. Measured with a loss multiplied by 2**-20 (its float16
    gradients need the scale): 2 workers compressing unscaled gradients ended 0.06-0.33 relative
    away from 1 process, and 2e-4 to 3e-4 compressing scaled ones (tests/test_precision_distributed.py).
    Multiplied by the scale (a power of two: exact, and divided again after the sum) the gradients
    have the range the backward pass had. A sum that overflows float16 is inf, so the
    ``LossScaleOptimizer`` skips the step and halves the scale, which cures it; compressed unscaled,
    halving the scale would not change the gradients and every later step would be skipped too.

    Args:
        optimizer: the model's optimizer after ``compile`` (under mixed_float16 the
            ``LossScaleOptimizer`` around the optimizer ``sum_gradients`` set up).

    Returns:
        Whether the compressed gradients are now scaled: fp16 compression under a
        ``LossScaleOptimizer``; otherwise nothing changes (float32, mixed_bfloat16: no loss scale).
    """
    summing = getattr(getattr(optimizer, "inner_optimizer", None), "aggregate_gradients", None)
    if not isinstance(summing, _GradientSum) or summing.compression != "fp16":
        return False
    summing.loss_scale = lambda: optimizer.loss_scale
    return True


def reduce_in_loss_scale(reduce: Callable[[list], list], gradients: list, scale: Any = None) -> list:
    """``reduce(gradients)``, the gradients multiplied by ``scale`` before and divided by it after.

    Args:
        reduce: sums (or averages) a list of gradients over the replicas, compressing them.
        gradients: this replica's unscaled gradients (tensors or ``tf.IndexedSlices``).
        scale: the loss scale, a float32 scalar; None: the gradients are reduced as they are.
    """
    if scale is None:
        return reduce(gradients)
    reduced = reduce([_multiply(g, scale) for g in gradients])
    return [_multiply(g, 1.0 / scale) for g in reduced]


def _multiply(gradient, scale):
    import tensorflow as tf

    scale = tf.cast(scale, gradient.dtype)
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(gradient.values * scale, gradient.indices, dense_shape=gradient.dense_shape)
    return gradient * scale


def _tensorflow_sum(values: list) -> list:
    """The strategy's own all-reduce (MultiWorkerMirroredStrategy: V2 collectives) of a replica's values."""
    import tensorflow as tf

    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)


def _compress(gradients: list, compression: str) -> list:
    if compression != "fp16":
        return gradients
    import tensorflow as tf

    return [tf.cast(g, tf.float16) if g.dtype in (tf.float32, tf.float64) else g for g in gradients]


def _uncompress(summed: list, gradients: list) -> list:
    import tensorflow as tf

    return [s if s.dtype == g.dtype else tf.cast(s, g.dtype) for s, g in zip(summed, gradients)]


def _setup_once_reducer(strategy, pack_bytes: int) -> Callable[[list], list] | None:
    """The all-reduce of a list of gradients with V1 collectives, or None without the strategy's keys."""
    extended = strategy.extended
    keys = getattr(extended, "_collective_keys", None)
    devices = getattr(extended, "worker_devices", None)
    if not devices or not hasattr(keys, "get_group_key"):
        return None
    keep_collectives_apart()
    local_devices = list(devices)
    group_key = keys.get_group_key(local_devices)
    group_size = strategy.num_replicas_in_sync
    gpus = any("GPU" in d.upper() for d in local_devices)

    def reduce(values: list) -> list:
        import tensorflow as tf
        from tensorflow.python.distribute import device_util
        from tensorflow.python.ops import collective_ops

        if tf.executing_eagerly():
            # Keras's run_eagerly: no traced function to keep a kernel in, so nothing to resolve once.
            return _tensorflow_sum(values)
        # The replica's device: MirroredStrategy's replica threads run under it; with one local
        # device MultiWorkerMirroredStrategy may set none, and that device is the only one.
        device = device_util.current() or local_devices[0]
        # A collective's length is fixed when it is traced: gradients of a static shape only.
        dense = [i for i, v in enumerate(values)
                 if not isinstance(v, tf.IndexedSlices) and v.shape.is_fully_defined()]
        out: list[Any] = list(values)
        previous = None
        for pack in _packs([values[i] for i in dense], dense, pack_bytes):
            flat = tf.concat([tf.reshape(values[i], [-1]) for i in pack], axis=0)
            # One pack after the other: NCCL needs every device to launch collectives in the same
            # order, and nothing orders V1 ops but these edges (V2 has ordering tokens).
            with tf.device(device), tf.control_dependencies([previous] if previous is not None else []):
                key = _INSTANCE_KEYS.next(device, flat.dtype.name, flat.shape.num_elements())
                summed = collective_ops.all_reduce(
                    flat, group_size, group_key, key, merge_op="Add", final_op="Id",
                    communication_hint="nccl" if gpus else "ring")
            previous = summed
            sizes = [values[i].shape.num_elements() for i in pack]
            for i, part in zip(pack, tf.split(summed, sizes)):
                out[i] = tf.reshape(part, values[i].shape)
        others = sorted(set(range(len(values))) - set(dense))
        if others:
            # Embedding gradients (TensorFlow all-gathers IndexedSlices) and any of unknown shape:
            # left to TensorFlow, after distrain's packs.
            with tf.control_dependencies([previous] if previous is not None else []):
                reduced = _tensorflow_sum([values[i] for i in others])
            for i, g in zip(others, reduced):
                out[i] = g
        return out

    return reduce


def keep_collectives_apart() -> None:
    """Stops Grappler's scoped allocator from merging the V1 collectives of a traced function.

    MultiWorkerMirroredStrategy turns it on for ``CollectiveReduce`` (V1) when it configures the
    runtime; its own all-reduces are V2, which it does not touch. On distrain's V1 collectives it
    merges a function's collectives into one, even across the control edges that order them (for
    2 KiB packs, ``TF_CPP_VMODULE=scoped_allocator_optimizer=2`` logs "Rewrite CollectiveReduce
    to: CollectiveReduce, CollectiveReduce_1"). So ``all_reduce_pack_bytes`` is silently undone,
    and the merged collective runs under the instance key of one of them with another length,
    which TensorFlow rejects where that key is also used unmerged in another function ("Shape
    mismatch in the collective instance"). Called where the V1 reducer is made, before any
    function holding one is traced.
    """
    from tensorflow.python.eager import context

    eager = context.context()
    if getattr(eager, "_collective_scoped_allocator_enabled_ops", None):
        eager._collective_scoped_allocator_enabled_ops = None
        # The call options of this thread were made from the config with it on.
        eager.function_call_options = None


def _packs(dense: list, positions: list[int], pack_bytes: int) -> list[list[int]]:
    """Positions of the gradients in each collective: by dtype, then in packs of ~pack_bytes."""
    by_dtype: dict[Any, list[int]] = {}
    # Last layers first: their gradients are ready first, as in MultiWorkerMirroredStrategy's packing.
    for value, position in reversed(list(zip(dense, positions))):
        by_dtype.setdefault(value.dtype, []).append(position)
    if pack_bytes <= 0:
        return list(by_dtype.values())
    sizes = {p: v.shape.num_elements() * v.dtype.size for v, p in zip(dense, positions)}
    return [pack for group in by_dtype.values() for pack in pack_by_size(group, sizes, pack_bytes)]


def pack_by_size(positions: list[int], sizes: dict[int, int], pack_bytes: int) -> list[list[int]]:
    """Splits ``positions`` in order into packs of at least ``pack_bytes`` (the last may be smaller).

    Example:
        >>> pack_by_size([0, 1, 2, 3], {0: 4, 1: 4, 2: 8, 3: 2}, 8)
        [[0, 1], [2], [3]]
    """
    packs: list[list[int]] = [[]]
    filled = 0
    for position in positions:
        packs[-1].append(position)
        filled += sizes[position]
        if filled >= pack_bytes:
            packs.append([])
            filled = 0
    return [p for p in packs if p]


class _InstanceKeys:
    """Instance keys that every worker derives alike from what it traces, without talking to the others.

    TensorFlow's V1 collectives resolve an instance once per process and check every later kernel
    with the same key against it: a key may be used again only for the same dtype and length. So
    a key is a hash of (dtype, elements, how many such collectives this function already has on
    this device), moved on deterministically if it is taken within the function. A function traced
    again, or another function with the same gradients, gets the same keys, whatever the order
    or number of traces on each worker.
    """

    SPACE = 1 << 29

    def __init__(self):
        self._lock = threading.Lock()  # MirroredStrategy traces each local replica in its own thread
        self._used: "weakref.WeakKeyDictionary[Any, dict[str, dict]]" = weakref.WeakKeyDictionary()

    def next(self, device: str, dtype: str, elements: int) -> int:
        from tensorflow.python.framework import ops

        graph = ops.get_default_graph()
        with self._lock:
            used = self._used.setdefault(graph, {}).setdefault(device, {"keys": set(), "signatures": {}})
            signature = f"{dtype}:{elements}"
            occurrence = used["signatures"].get(signature, 0)
            used["signatures"][signature] = occurrence + 1
            key = zlib.crc32(f"{signature}:{occurrence}".encode()) % self.SPACE
            while key in used["keys"]:
                key = (key + 1) % self.SPACE
            used["keys"].add(key)
        return INSTANCE_KEY_BASE + key


# One for the process: two optimizers' collectives in one step function must not share keys.
_INSTANCE_KEYS = _InstanceKeys()
