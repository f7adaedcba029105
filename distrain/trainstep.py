"""distrain's training step, which replaces Keras's where Keras's cannot do what the job asks.

Two things need it:

- **Gradient accumulation** (``train.accumulation_steps`` k > 1): one optimizer step from the mean
  gradient of k micro-batches (the arithmetic and why by stride: ``distrain.accumulation``).
- **XLA under a strategy over several devices or workers** (``train.jit_compile`` under mirrored,
  multi_worker or horovod). Keras's ``compile(jit_compile=True)`` compiles the whole replica step,
  the gradients' all-reduce and the optimizer's update included, and that fails here: under
  MirroredStrategy XLA reaches another device's variables ("Trying to access resource ... located
  in device CPU:1 from device CPU:0"), under MultiWorkerMirroredStrategy it cannot compile the
  collectives ("Collectives are not yet implemented for CPU devices when compiling with XLA"), and
  tensorflow/tensorflow#120998 reports wrong reduced gradients with mixed_float16 when the
  all-reduce is compiled. distrain compiles what holds the arithmetic, each replica's forward and
  backward pass (``gradients``: the model, the loss, loss scaling, the gradients), and leaves the
  all-reduce and the update to the strategy as without XLA. Nothing in the compiled part talks to
  another replica: BatchNorm's moving statistics are per-replica (``ON_READ``) variables, updated
  locally. Under one_device Keras's whole-step compilation works and is kept.

The step is the same for both: per micro-batch ``gradients`` (XLA-compiled or not), their mean, the
backend's ``reduce_gradients`` (Horovod's allreduce; tf.distribute reduces inside
``apply_gradients``), then one ``apply_gradients``, where a ``LossScaleOptimizer`` checks the
reduced gradients (``distrain.lossscale``). Metrics cover every micro-batch.
"""
from __future__ import annotations

import types
from typing import Callable


def enable(model, *, micro_batches: int, reduce_gradients: Callable[[list], list], xla_gradients: bool) -> bool:
    """Replaces ``model.train_step`` (this instance only) when accumulation or per-replica XLA asks for it.

    Args:
        model: a compiled tf-keras model (the saved model is unchanged).
        micro_batches: k, micro-batches per optimizer step.
        reduce_gradients: the backend's reduction of the averaged gradients before they are
            applied (``Distribution.reduce_gradients``).
        xla_gradients: XLA-compile each replica's forward and backward pass.

    Returns:
        Whether the step was replaced.
    """
    if micro_batches < 2 and not xla_gradients:
        return False
    model.train_step = types.MethodType(_train_step(model, micro_batches, reduce_gradients, xla_gradients), model)
    model.train_function = None  # Keras builds it again, around the new step
    return True


def _train_step(model, k: int, reduce_gradients: Callable[[list], list], xla: bool):
    import tensorflow as tf

    def gradients(x, y):
        """One micro-batch's unscaled gradients and predictions (loss scaling inside, if any)."""
        optimizer = model.optimizer
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, None)
            scaled = optimizer.get_scaled_loss(loss) if hasattr(optimizer, "get_scaled_loss") else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        if hasattr(optimizer, "get_unscaled_gradients"):  # mixed precision's loss scaling
            grads = optimizer.get_unscaled_gradients(grads)
        return [tf.convert_to_tensor(g) for g in grads], y_pred

    if xla:
        gradients = tf.function(gradients, jit_compile=True)

    def train_step(self, data):
        x, y = data[0], data[1]
        variables = self.trainable_variables
        total = None
        for m in range(k):  # unrolled: see distrain.accumulation
            x_m, y_m = (x[m::k], y[m::k]) if k > 1 else (x, y)
            grads, y_pred = gradients(x_m, y_m)
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
            self.compiled_metrics.update_state(y_m, y_pred, None)
        mean = reduce_gradients([t / k for t in total] if k > 1 else total)
        self.optimizer.apply_gradients(zip(mean, variables))
        return self.get_metrics_result()

    return train_step
