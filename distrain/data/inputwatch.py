"""Is the model waiting for its input? ``InputWatch`` measures it per epoch.

The training pipeline notes the moment each batch is ready (a marker at its end, before the
prefetch buffer). A step that starts before its batch is ready waits for input; the wait is the
difference (with ``train.steps_per_execution`` > 1 Keras's hooks see only whole calls of several
steps: ``call_wait``). The first call of ``fit`` is left out (it is tracing). Per epoch,
``input_wait_fraction`` (waits / training time) goes into the epoch logs,
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


def call_wait(started: float, ended: float, ready: list[float]) -> float:
    """Seconds a call of ``len(ready)`` training steps, run from ``started`` to ``ended``, waited for
    input; ``ready[j]``: when step j's input was ready.

    One step: how late its input was (``wait_time``). Several (``train.steps_per_execution``):
    Python sees only the call, so its steps are taken to run back to back, each starting when the
    one before ended and its input is ready, each computing for the same time c; c is the one
    that ends that schedule at ``ended`` (found by bisection: the end grows with c), and the wait
    is the rest of the call. A batch made while earlier steps ran is then no wait.

    Example:
        >>> round(call_wait(0.0, 4.0, [0.0, 0.5, 1.5, 2.5]), 6), round(call_wait(0.0, 4.0, [1.0, 2.0, 3.0, 3.5]), 6)
        (0.0, 2.0)
    """
    if len(ready) <= 1:
        return wait_time(started, ready)
    span = max(0.0, ended - started)

    def end(compute: float) -> float:
        t = started
        for r in ready:
            t = max(t, r) + compute
        return t

    low, high = 0.0, span / len(ready)
    if end(low) >= ended:
        return span
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if end(middle) < ended else (low, middle)
    return max(0.0, span - len(ready) * (low + high) / 2)


class InputWatch(_Callback):
    """Keras callback measuring the time training steps wait for their input.

    Args:
        batches_per_step: batches this process's pipeline gives each step (its local replicas).
        threshold: the wait fraction above which an epoch logs an input-bound warning.
    """

    def __init__(self, batches_per_step: int = 1, threshold: float = 0.2) -> None:
        super().__init__()
        # It reads no step logs: without this, Keras converts every step's logs to numbers for all
        # callbacks, and Python waits for each step before it queues the next (callbacks.StepCallback).
        self._supports_tf_logs = True
        self.batches_per_step = batches_per_step
        self.threshold = threshold
        self._ready: collections.deque = collections.deque()
        self._tracing = True
        self._first_batch = 0
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
        self._first_batch = batch  # the call's first step; on_train_batch_end gets its last

    def on_train_begin(self, logs=None):
        self._tracing = True

    def on_train_batch_end(self, batch, logs=None):
        ended = time.perf_counter()
        steps = max(1, batch - self._first_batch + 1)  # several with train.steps_per_execution
        ready = []
        for _ in range(steps):
            batches = [self._ready.popleft() for _ in range(min(self.batches_per_step, len(self._ready)))]
            if batches:
                ready.append(max(batches))
        if self._tracing:
            # The first step of fit() traces the training function and only then asks for its
            # batch: its "wait" is tracing time. Measure from the end of it.
            self._tracing = False
            self._first = None
            return
        if self._first is None:
            self._first = self._started
        self._waited += call_wait(self._started, ended, ready)
        self._last = ended

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
