"""Gradient accumulation: one optimizer step from the mean gradient of k micro-batches.

tf-keras has none (keras-team/keras#16633 is open, tf-keras#107 was closed unfixed), so distrain
replaces the model's ``train_step`` when ``train.accumulation_steps`` is above 1:

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

import types
from typing import Callable

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


def enable(model, steps: int, reduce_gradients: Callable[[list], list]) -> None:
    """Makes ``model.fit`` take one optimizer step per ``steps`` micro-batches (``steps`` > 1).

    Args:
        model: a compiled tf-keras model; its ``train_step`` is replaced on this instance only
            (the saved model is unchanged).
        steps: micro-batches per optimizer step (k).
        reduce_gradients: the backend's reduction of the averaged gradients before they are
            applied (``Distribution.reduce_gradients``).
    """
    if steps < 2:
        return
    model.train_step = types.MethodType(_accumulating_train_step(steps, reduce_gradients), model)
    model.train_function = None  # Keras builds it again, around the new step


def _accumulating_train_step(k: int, reduce_gradients: Callable[[list], list]):
    import tensorflow as tf

    def train_step(self, data):
        x, y = data[0], data[1]
        variables = self.trainable_variables
        total = [tf.zeros_like(v) for v in variables]
        for m in range(k):  # unrolled: see the module docstring
            x_m, y_m = x[m::k], y[m::k]
            with tf.GradientTape() as tape:
                y_pred = self(x_m, training=True)
                loss = self.compute_loss(x_m, y_m, y_pred, None)
                scaled = self.optimizer.get_scaled_loss(loss) if hasattr(self.optimizer, "get_scaled_loss") else loss
            grads = tape.gradient(scaled, variables)
            if hasattr(self.optimizer, "get_unscaled_gradients"):  # mixed precision's loss scaling
                grads = self.optimizer.get_unscaled_gradients(grads)
            total = [t + tf.convert_to_tensor(g) for t, g in zip(total, grads)]
            self.compiled_metrics.update_state(y_m, y_pred, None)
        mean = reduce_gradients([t / k for t in total])
        self.optimizer.apply_gradients(zip(mean, variables))
        return self.get_metrics_result()

    return train_step
