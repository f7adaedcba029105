"""Gradient accumulation: one optimizer step from the mean gradient of k micro-batches.

tf-keras has none (keras-team/keras#16633 is open, tf-keras#107 was closed unfixed), so distrain
replaces the model's ``train_step`` when ``train.accumulation_steps`` is above 1 (``trainstep``):

- Each replica receives ``k x per-replica batch`` examples per Keras step (the input pipelines
  deal ``global_batch / replicas`` as always, with the global batch including k) and splits them
  into k micro-batches **by stride**: micro-batch ``m`` is examples ``m, m+k, m+2k, ...``. The
  pipelines deal positions to workers by stride too, so the micro-batches of 1 worker with k = 2
  hold exactly the examples the 2 workers of a k = 1 run hold at the same step: the same batch
  statistics (BatchNorm) and the same mean gradient.
- The k gradients are summed in the step and divided by k; the backend then reduces the mean
  across replicas as it would a single gradient (tf.distribute inside ``apply_gradients``,
  Horovod with one allreduce: ``Distribution.reduce_gradients``), and the optimizer applies it
  once. ``optimizer.iterations``, the LR schedule, backups, logs and TensorBoard all count
  optimizer steps of the whole global batch.
- Metrics accumulate over the k micro-batches, so a step's loss and accuracy cover all its examples.
- BatchNorm's moving statistics are updated once per micro-batch, in sequence (k updates per
  step), where k replicas would each update once and the strategy averages their updates. They
  then move as with momentum μ^k per optimizer step instead of μ: k times as fast while they are
  far from the batch statistics (early in training), alike once they have settled. Trainable
  weights are unaffected (training uses the batch statistics, which agree); evaluation uses the
  moving statistics.

The k micro-batches are unrolled in the step's graph (k is small and fixed; a ``tf.while_loop``
would put BatchNorm's cross-replica variable updates inside a loop, which ``MirroredStrategy``
does not support), so tracing takes about k times as long.
"""
from __future__ import annotations

from distrain.errors import UsageError


def accumulation_for(global_batch: int, per_replica_batch: int, replicas: int) -> int:
    """The micro-batches per optimizer step that keep ``global_batch`` with this many replicas.

    Raises:
        UsageError: ``global_batch`` is not a multiple of ``per_replica_batch × replicas``; the
            message lists the replica counts that work.

    Example:
        >>> accumulation_for(64, 8, 2), accumulation_for(64, 8, 8)
        (4, 1)
    """
    if global_batch % (per_replica_batch * replicas) == 0:
        return global_batch // (per_replica_batch * replicas)
    micro_batches = global_batch // per_replica_batch if global_batch % per_replica_batch == 0 else 0
    working = [r for r in range(1, micro_batches + 1) if micro_batches % r == 0]
    hint = (f"replica counts that keep it with {per_replica_batch} per replica: {', '.join(map(str, working))}"
            if working else f"it is not a multiple of {per_replica_batch}; set data.batch_size_per_replica to a "
                            f"divisor of {global_batch}")
    raise UsageError(f"train.accumulation_steps: the run's global batch is {global_batch}, which {replicas} replicas "
                     f"x {per_replica_batch} per replica cannot make with whole micro-batches; {hint}")
