"""A deadline on the collectives between workers (multi_worker, Horovod) that costs nothing per step.

TensorFlow can time out each collective itself (``CommunicationOptions(timeout_seconds=T)``), but
each collective launched with a timeout starts threads that sleep for the whole of T before they
end (2 per all-reduce, TensorFlow 2.21 on CPU). A training step launches several, so a run keeps
about steps/s x collectives per step x 2 x T threads alive, until thread creation fails
(``std::system_error: Resource temporarily unavailable``) after a few thousand steps; the thread
starts also cost part of each step (both measured in docs/performance-log.md).

So distrain builds MultiWorkerMirroredStrategy without a timeout and keeps one watchdog thread per
process: ``fit`` and ``evaluate`` beat it at every batch and epoch boundary (``Heartbeat``), and when
it has not been beaten for ``distribute.collective_timeout_s`` while armed, it aborts this
process's collectives (``abort_collective_ops``, which is what TensorFlow's own peer health check
calls). The collective that waits then fails with ``UnavailableError``, and the run exits 76
(``run.fit_and_evaluate``). A dead peer is usually noticed sooner, by TensorFlow's coordination
service; the watchdog bounds what it does not notice: a peer that is alive but stalled.

The deadline counts time without a finished step, so it includes the first step's tracing.

Horovod has no abort: its backend's ``expire`` shuts Horovod down instead, which fails every op
that waits, on every rank (``backends.horovod.HorovodDistribution``).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator


class Watchdog:
    """Calls ``expire(message)`` once when armed and not beaten for ``timeout_s`` seconds.

    Args:
        timeout_s: the longest time without a beat while armed.
        expire: what to do then (abort the collectives); called from the watchdog's thread.
        clock: seconds, monotonic (tests pass a fake).
    """

    def __init__(self, timeout_s: float, expire: Callable[[str], None], *, clock: Callable[[], float] = time.monotonic):
        self.timeout_s = timeout_s
        self._expire = expire
        self._clock = clock
        self._lock = threading.Lock()
        self._last = clock()
        self._armed = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.expired = False

    def beat(self) -> None:
        """Progress: the deadline starts again."""
        self._last = self._clock()  # one float store: cheaper than the lock, and atomic under the GIL

    @contextlib.contextmanager
    def armed(self) -> Iterator["Watchdog"]:
        """While inside, the deadline applies (nests: ``fit``'s validation inside ``fit``).

        Leaving it after the deadline expired waits until ``expire`` has returned: what follows
        (a process's exit) must not run beside it. Horovod's own shutdown at exit, started while
        the watchdog's was still joining Horovod's thread, joined that thread a second time and
        waited forever (seen in tests/test_silent_peer.py).
        """
        with self._lock:
            self._armed += 1
            self._last = self._clock()
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="distrain-watchdog", daemon=True)
                self._thread.start()
        try:
            yield self
        finally:
            with self._lock:
                self._armed -= 1
                expired = self.expired
            if expired and self._thread is not threading.current_thread():
                # Bounded: an abort returns at once, Horovod's shutdown within Gloo's timeout.
                self._thread.join()

    def _watch(self) -> None:
        poll = min(1.0, max(0.01, self.timeout_s / 20))
        while not self._wake.wait(poll):
            with self._lock:
                late = self._armed > 0 and self._clock() - self._last > self.timeout_s
                self.expired = late  # under the lock: whoever disarms after this waits for the expiry
            if late:
                self._expire(f"no step finished for {self.timeout_s:g} s (distribute.collective_timeout_s): "
                             "a peer is lost or stalled")
                return

    def close(self) -> None:
        """Stops the thread (it is a daemon: a process may also just exit)."""
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def abort_collectives(message: str) -> None:
    """Makes every collective of this process that waits, and every later one, fail with
    ``UnavailableError: message``."""
    import tensorflow as tf
    from tensorflow.python.eager import context

    context.context().abort_collective_ops(tf.errors.UNAVAILABLE, message)


def heartbeat(watchdog: Watchdog):
    """A Keras callback that beats ``watchdog`` at every batch and epoch boundary of fit,
    evaluate and predict."""
    import tensorflow as tf

    class Heartbeat(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True  # it reads no logs

        def _beat(self, *_args, **_kwargs):
            watchdog.beat()

        on_train_begin = on_train_end = on_test_begin = on_test_end = on_predict_begin = on_predict_end = _beat
        on_epoch_begin = on_epoch_end = _beat
        on_train_batch_begin = on_train_batch_end = on_test_batch_begin = on_test_batch_end = _beat
        on_predict_batch_begin = on_predict_batch_end = _beat

    return Heartbeat()
