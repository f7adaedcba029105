"""Is the model waiting for its input? ``InputWatch`` measures it per epoch.

The training pipeline notes the moment each batch is ready (a marker at its end, before the
prefetch buffer). A step that starts before its batch is ready waits for input; the wait is the
difference. The first step of ``fit`` is left out (it is tracing). Per epoch, ``input_wait_fraction`` (waits / training time) goes into the epoch logs,
so ``history.json`` and TensorBoard's ``train/epoch_input_wait_fraction`` show it, and a warning
is logged when it passes ``threshold``. The markers cost a Python call per batch, not per image.
"""
from __future__ import annotations

import collections
import logging
import time

import numpy as np

log = logging.getLogger("distrain")

try:  # a Keras callback when TensorFlow is loaded (always, in a run); importable without it
    import tensorflow as _tf
    _Callback = _tf.keras.callbacks.Callback
except ImportError:  # pragma: no cover
    _Callback = object


def wait_time(step_started: float, ready: list[float]) -> float:
    """Seconds a step that started at ``step_started`` waited for the last of its ``ready`` batches."""
    return max(0.0, max(ready) - step_started) if ready else 0.0


class InputWatch(_Callback):
    """Keras callback measuring the time training steps wait for their input.

    Args:
        batches_per_step: batches this process's pipeline gives each step (its local replicas).
        threshold: the wait fraction above which an epoch logs an input-bound warning.
    """

    def __init__(self, batches_per_step: int = 1, threshold: float = 0.2) -> None:
        super().__init__()
        self.batches_per_step = batches_per_step
        self.threshold = threshold
        self._ready: collections.deque = collections.deque()
        self._tracing = True
        self._reset()

    def _reset(self) -> None:
        self._waited = 0.0
        self._first = self._last = None
        self._started = 0.0

    def stamp(self, tf, ds):
        """``ds`` (batches) with a marker noting when each batch is ready; apply before ``prefetch``."""
        def note():
            self._ready.append(time.perf_counter())
            return np.int64(0)

        def marked(*batch):
            done = tf.numpy_function(note, [], tf.int64, stateful=True)
            with tf.control_dependencies([done]):
                return tuple(tf.identity(t) for t in batch)
        # Sequential on purpose: the markers must come in the order the batches are consumed.
        return ds.map(marked)

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()

    def on_train_begin(self, logs=None):
        self._tracing = True

    def on_train_batch_end(self, batch, logs=None):
        ready = [self._ready.popleft() for _ in range(min(self.batches_per_step, len(self._ready)))]
        if self._tracing:
            # The first step of fit() traces the training function and only then asks for its
            # batch: its "wait" is tracing time. Measure from the end of it.
            self._tracing = False
            self._first = None
            return
        if self._first is None:
            self._first = self._started
        self._waited += wait_time(self._started, ready)
        self._last = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._reset()

    def on_epoch_end(self, epoch, logs=None):
        if self._first is None or self._last is None or logs is None:
            return
        fraction = self._waited / max(self._last - self._first, 1e-9)
        logs["input_wait_fraction"] = fraction
        if fraction > self.threshold:
            log.warning("input-bound: training steps waited for input %.0f%% of epoch %d; try data.cache, TFRecord "
                        "shards (`distrain data pack`), a smaller data.image_size, or more CPU cores per worker",
                        100 * fraction, epoch + 1)

    def on_train_end(self, logs=None):
        self._ready.clear()
