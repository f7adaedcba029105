"""Gradient all-reduce in float16 for tf.distribute strategies (``distribute.gradient_compression: fp16``).

Halves the bytes each step sends, the term that dominates a step on a slow network (the cost model
in docs/performance.md). Gradients are cast to float16 for the all-reduce only and back to their
own dtype before the update, so variables and optimizer state stay float32; what changes is the
rounding of each summed gradient (about 3 significant digits), measured in docs/performance.md.
Horovod has its own switch (``hvd.Compression.fp16``), set in ``distrain.horovod``.
"""
from __future__ import annotations

COMPRESSIONS = ("none", "fp16")


def fp16_all_reduce(optimizer):
    """Makes a tf-keras optimizer all-reduce its gradients in float16.

    tf-keras's ``Optimizer.apply_gradients`` sums gradients over replicas in
    ``aggregate_gradients``, documented as the method to override for custom aggregation; this
    replaces it on the instance (the class, and so a saved model's optimizer, stay as they are).

    Args:
        optimizer: a tf-keras optimizer, created in the strategy's scope.

    Returns:
        The same optimizer.
    """
    import tensorflow as tf

    def aggregate_gradients(grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        present = [g for g, _ in grads_and_vars if g is not None]
        if not present:
            return grads_and_vars
        half = [tf.cast(g, tf.float16) if g.dtype in (tf.float32, tf.float64) else g for g in present]
        reduced = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, half)
        summed = iter(tf.cast(r, g.dtype) for r, g in zip(reduced, present))
        return [(None if g is None else next(summed), v) for g, v in grads_and_vars]

    optimizer.aggregate_gradients = aggregate_gradients
    return optimizer
