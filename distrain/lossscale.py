"""Dynamic loss scaling (``train.precision: mixed_float16``): the scale and the steps it skipped, where
users see them.

Under mixed_float16, tf-keras's ``compile`` wraps the optimizer in a ``LossScaleOptimizer``. Its state,
the scale and the count of finite steps since the scale last changed, is tracked by the optimizer's
checkpoint, so distrain's backup holds it and a resumed run (``--resume``, a SLURM requeue, a Ray
restart) goes on with the scale it had (tests/test_loss_scale.py).

A step whose gradients, summed over every replica of every worker, hold an inf or NaN is skipped: the
weights and the inner optimizer's slots are left as they were, the scale halves, and the optimizer's
step count still advances (tf-keras increments ``iterations`` on the skipped branch), so the LR plan,
backups and logs stay on the planned steps. The check runs after the all-reduce in every backend
(tf.distribute aggregates inside ``LossScaleOptimizer.apply_gradients`` before the check; Horovod's
``DistributedOptimizer`` all-reduces in ``compute_gradients``; accumulation reduces before
``apply_gradients``), so every worker skips the same steps and keeps the same scale.

tf-keras keeps no count of skipped steps. ``count_skipped_steps`` adds one to the loss-scale state
(a variable beside the scale, so it is in the backup too), and ``LossScaleLogs`` puts ``loss_scale``
and ``skipped_steps`` into the logs that the step lines, ``history.json`` and TensorBoard read.
"""
from __future__ import annotations

from typing import Any, Optional

import tensorflow as tf

LOSS_SCALE, SKIPPED_STEPS = "loss_scale", "skipped_steps"
LOSS_SCALE_KEYS = (LOSS_SCALE, SKIPPED_STEPS)


def dynamic_loss_scale(optimizer) -> Optional[Any]:
    """The dynamic loss-scale state of a tf-keras ``LossScaleOptimizer``, or None (no loss scaling:
    float32, mixed_bfloat16, or a fixed scale)."""
    state = getattr(optimizer, "_loss_scale", None)
    # tf-keras's _DynamicLossScaleState: private, so recognised by what distrain uses of it.
    needed = ("current_loss_scale", "counter", "update", "_add_weight")
    return state if state is not None and all(hasattr(state, name) for name in needed) else None


def count_skipped_steps(optimizer) -> Optional[tf.Variable]:
    """Counts the steps ``optimizer``'s dynamic loss scaling skips; returns the counter (None without
    dynamic loss scaling).

    Call it where the optimizer's variables are created (the strategy's scope), before the backup is
    restored: the counter is a weight of the loss-scale state (saved with it) and is restored with
    the scale. Counting wraps the state's ``update``, which returns whether the step's gradients are
    applied, on this instance only.
    """
    state = dynamic_loss_scale(optimizer)
    if state is None:
        return None
    existing = getattr(state, "_distrain_skipped_steps", None)
    if existing is not None:
        return existing
    # _add_weight makes it like the scale's own variables: not trainable, never aggregated
    # (every replica holds the same value), and named in the checkpoint under the loss scale.
    skipped = state._add_weight(name=SKIPPED_STEPS, initial_value=0, dtype=tf.int64)
    update = state.update

    def update_counting_skips(grads):
        update_op, should_apply = update(grads)
        counted = skipped.assign_add(tf.cast(tf.logical_not(tf.cast(should_apply, tf.bool)), tf.int64))
        return tf.group(update_op, counted) if update_op is not None else None, should_apply

    state.update = update_counting_skips
    state._distrain_skipped_steps = skipped
    return skipped


class LossScaleLogs(tf.keras.callbacks.Callback):
    """Puts ``loss_scale`` (the scale the next step uses) and ``skipped_steps`` (steps skipped since the
    run began, over all its resumes) into the logs, for the callbacks after it.

    At batch ends the values stay tensors (read from the variables; nothing waits for the step), so
    only the callbacks that act at a step (step lines, TensorBoard's step scalars) convert them; at
    epoch ends they are numbers, for ``history.json`` and TensorBoard's epoch scalars.
    """

    def __init__(self, optimizer):
        super().__init__()
        state = dynamic_loss_scale(optimizer)
        if state is None:
            raise ValueError("LossScaleLogs needs an optimizer with dynamic loss scaling")
        self._scale = state.current_loss_scale
        self._skipped = count_skipped_steps(optimizer)
        self._supports_tf_logs = True

    def _values(self):
        return {LOSS_SCALE: self._scale.read_value(), SKIPPED_STEPS: self._skipped.read_value()}

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None:
            logs.update(self._values())

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update({LOSS_SCALE: float(self._scale.numpy()), SKIPPED_STEPS: int(self._skipped.numpy())})


def loss_scale_callbacks(optimizer) -> list:
    """``[LossScaleLogs]`` when ``optimizer`` scales the loss dynamically, else none."""
    return [LossScaleLogs(optimizer)] if dynamic_loss_scale(optimizer) is not None else []
