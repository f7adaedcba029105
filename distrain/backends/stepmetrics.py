"""Training metrics under multi_worker: each step reads this worker's own accumulators; the logs
that are kept hold all workers'.

tf-keras's ``train_step`` returns ``metric.result()`` for every metric, and under
MultiWorkerMirroredStrategy each result reads the metric's sync-on-read accumulators across the
workers: one all-reduce per accumulator (two per ``Mean``), every step, each a round trip through
the workers' gRPC servers, even for a scalar. With the loss and one metric that is four
collectives a step besides the gradients' (what they cost the course CNN on 2 pinned CPU workers:
benchmarks/pinned.py, docs/performance-log.md).

So distrain's training step returns the results of this worker's accumulators, and ``GlobalLogs``
reads them across the workers where logs are kept: at the last step of each epoch (before
validation resets the metrics) and at TensorBoard's step points (``logging.update_every_steps``).
Every worker reads at the same steps, so the collectives match. History, TensorBoard,
checkpoints' ``monitor``, EarlyStopping and Ray's reports see the same numbers as before (and as
one process); only the chief's per-step progress bar shows its own running means between those
points. Evaluation steps (validation, test) are left as Keras makes them: over all workers.
"""
from __future__ import annotations

import types

import tensorflow as tf


def keep_step_metrics_local(model) -> None:
    """Makes ``model.fit``'s step return this worker's metric results (no collective).

    Wraps the ``train_step`` the model has now (Keras's, or accumulation's), on this instance.
    """
    train_step = model.train_step

    def local_train_step(self, data):
        # Traced once: the swap lasts while Keras builds the step's graph.
        self.get_metrics_result = types.MethodType(_local_results, self)
        try:
            return train_step(data)
        finally:
            del self.get_metrics_result

    model.train_step = types.MethodType(local_train_step, model)
    model.train_function = None


def _local_results(model) -> dict:
    results = {}
    for metric in model.metrics:
        # The class's own result(): Keras wraps each instance's in a cross-replica read.
        result = tf.__internal__.autograph.tf_convert(type(metric).result, tf.__internal__.autograph.control_status_ctx())
        value = result(metric)
        if isinstance(value, dict):
            results.update(value)
        else:
            results[metric.name] = value
    return results


def global_results(model) -> dict:
    """The model's metric results over all workers' accumulators (collectives: every worker calls it)."""
    with model.distribute_strategy.scope():
        results = model.get_metrics_result()
    return {name: float(value) for name, value in results.items()}


class GlobalLogs(tf.keras.callbacks.Callback):
    """Replaces this worker's metric results in the logs with all workers' where logs are kept.

    Args:
        state: the run's ``callbacks.RunState`` (the global step and the steps of the last hook,
            set by ``RunMetrics`` first).
        steps_per_epoch: optimizer steps per epoch.
        every: TensorBoard's step-scalar interval (0: none).
    """

    def __init__(self, state, steps_per_epoch: int, every: int):
        super().__init__()
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.every = every
        self._epoch_train: dict | None = None
        self._supports_tf_logs = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_train = None

    def on_train_batch_end(self, batch, logs=None):
        # RunState.reached: the same decision on every worker, also for hooks of several steps
        # (train.steps_per_execution; Keras ends a call at its epoch's last step).
        last_of_epoch = self.state.reached(self.steps_per_epoch)
        if last_of_epoch or self.state.reached(self.every):
            results = global_results(self.model)
            if logs is not None:
                logs.update(results)  # fit's own dict: its epoch logs start from this step's
            if last_of_epoch:
                self._epoch_train = results

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        # val_*: validation's steps are Keras's own, already over all workers.
        if self._epoch_train is None and not any(k.startswith("val_") for k in logs):
            self._epoch_train = global_results(self.model)  # the epoch ended early: still the train accumulators
        if self._epoch_train is not None:
            logs.update(self._epoch_train)
