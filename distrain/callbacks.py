"""The callbacks of a run, in the order they must run, and agreement across workers.

Keras calls callbacks in list order for every hook, so ``build_callbacks`` fixes the order:

1. ``RunMetrics`` puts the applied LR and the throughput into the logs, for everything after it,
   and ``InputWatch`` the fraction of the epoch spent waiting for input; the backend's callbacks
   (``dist.callbacks()``: Horovod's metric averaging; multi_worker's heartbeat and
   ``stepmetrics.GlobalLogs``) follow them, so everything after them sees the metrics over all
   workers at the epoch's end and at TensorBoard's step points; then, under mixed_float16,
   ``lossscale.LossScaleLogs`` (the loss scale and the skipped steps).
2. ``EarlyStopping`` (if asked for) decides from the metrics in the logs.
3. ``Checkpoints`` save the user's checkpoints (every worker calls; only the chief's files stay).
4. ``HistoryFiles`` (history.json, history.csv), ``StepLog`` (a line in the run's log every
   ``logging.update_every_steps``) and TensorBoard: chief only.
5. ``BackupEvery`` saves the resume state (every worker calls), after everything an epoch's end
   writes: a backup is the commit point of the steps before it. A run resumed from the backup of
   an epoch's last step never runs that epoch's end again, so the backup is taken only once the
   epoch's row, checkpoints and scalars are written; one killed before it resumes from the backup
   before and writes them again (``HistoryFiles`` replaces a row it already had).
6. Extra callbacks (Ray's reporting, a user's): after the files and the backup, so an epoch they
   hear of is already saved, but before ``Agreement``.
7. ``Agreement``, last, so that it sees every callback's ``stop_training``, the extra ones'
   included: one decision for all workers to stop early, for NaN or for a preemption signal. A
   worker that stopped alone would hang the others in their next collective. A preemption agreed
   at an epoch's last step stops at the end of that epoch (validation, files, backup), for the
   reason above.

Steps per hook. With ``train.steps_per_execution: K`` Keras runs up to K optimizer steps per call
of its compiled step and calls the batch hooks once per call, with ``batch`` the index of the
call's last step in its epoch (a call never crosses an epoch's end: the last one of an epoch, or
the first after a resume mid-epoch, may be shorter). ``RunMetrics`` sets ``RunState.step`` from
that index and ``RunState.hook_steps`` to the steps the call took; every "every N steps" action
(backups, checkpoints, the agreement, step lines, TensorBoard's step scalars, multi_worker's
global logs) asks ``RunState.reached(N)``: whether the call reached or passed a multiple of N
(``crossed``). So each acts at the end of the call that took the multiple's step, on the step
the call ended at (the first step at or after the multiple where Python runs), once per call
even when a call passes several multiples, and every worker decides alike from the same numbers.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from typing import Iterator, Optional, TextIO

import tensorflow as tf

from distrain.checkpoint import monitor_mode
from distrain.errors import EXIT_NAN, EXIT_PREEMPTED, TrainingStopped
from distrain.lossscale import LOSS_SCALE_KEYS
from distrain.lr import lr_at
from distrain.rundir import RunDir, write_atomically

log = logging.getLogger("distrain")


class RunState:
    """What the run's callbacks share as it trains: the global step, the preemption request, the
    time spent training. The run's fixed numbers (global batch, LR plan, start step) are the
    context's (``ctx``).

    ``step`` is the optimizer's step count kept in Python (``RunMetrics``, the first callback,
    advances it): reading ``optimizer.iterations`` at every step would make Python wait for each
    step to finish before Keras can queue the next one.
    """

    def __init__(self, ctx):
        self.ctx = ctx
        self.step = ctx.start_step
        self.hook_steps = 1  # optimizer steps the last batch hook covered (train.steps_per_execution)
        self.signal_received: Optional[str] = None
        self.train_time_s = 0.0  # epochs' wall time in this process, validation included

    def reached(self, every: int) -> bool:
        """Whether the steps of the last batch hook reached or passed a multiple of ``every``
        (``crossed``); False for ``every`` 0 (never)."""
        return crossed(self.step, self.hook_steps, every)

    def at_epoch_end(self) -> bool:
        """Whether the last batch hook ended on its epoch's last step (then Keras's epoch end, with
        validation, follows: a call of several steps never crosses an epoch's end)."""
        return self.step % self.ctx.steps_per_epoch == 0

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """Within it, SIGTERM and SIGUSR1 (SLURM's ``--signal=USR1@90``) ask for a stop at the next
        agreed step; on leaving, the handlers before it are back."""
        if threading.current_thread() is not threading.main_thread():
            # Ray Train V2 runs the training function in a thread, where signal.signal raises
            # ValueError; there Ray's FailureConfig handles lost and preempted workers.
            log.info("not in the main thread: SIGTERM/SIGUSR1 are left to the launcher")
            yield
            return

        def handler(signum, _frame):
            self.signal_received = signal.Signals(signum).name
            log.warning("received %s: stopping at the next agreed step boundary", self.signal_received)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def crossed(step: int, steps: int, every: int) -> bool:
    """Whether steps ``step - steps + 1`` .. ``step`` (those one batch hook covered) hold a multiple
    of ``every``: the one rule by which every "every N steps" action decides, the same on every
    worker. With one step per hook it is ``step % every == 0``; ``every`` 0 means never.

    Example:
        >>> crossed(8, 4, 6), crossed(12, 4, 6), crossed(10, 2, 6), crossed(12, 4, 0)
        (True, True, False, False)
    """
    return every > 0 and steps > 0 and step // every > (step - steps) // every


def _loss_is_finite(logs) -> bool:
    """False after a NaN/Inf step: such weights must never become a backup or checkpoint.

    Reads the loss (a tensor in batch hooks), so call it only at steps that act anyway."""
    loss = (logs or {}).get("loss")
    return loss is None or math.isfinite(float(loss))


class StepCallback(tf.keras.callbacks.Callback):
    """A callback that leaves Keras's step logs as tensors and counts steps from ``RunState``.

    With every batch-hook callback declaring ``_supports_tf_logs``, Keras does not convert the
    logs to numbers after each step, so it can queue step k+1 while step k runs; a callback reads
    a value (``float(logs["loss"])``) only at the steps where it acts.
    """

    def __init__(self, state: RunState):
        super().__init__()
        self.state = state
        self._supports_tf_logs = True


class RunMetrics(StepCallback):
    """Advances ``state.step`` (and ``state.hook_steps``) and adds ``lr`` (the LR applied at the
    last step taken) and, per epoch, ``images_per_s`` / ``step_time_s`` to the logs.

    The step comes from Keras's ``batch``, the index in its epoch of the last step the hook covers
    (fit starts a resumed run's first epoch at the restored step: ``run.fit_and_evaluate``), so it
    counts every step of a call of several (``train.steps_per_execution``) without a device read.
    """

    def __init__(self, state: RunState):
        super().__init__(state)
        self._epoch_start = 0.0
        self._epoch = 0
        self._steps = 0

    def _lr(self) -> float:
        # The schedule's own formula for the step just applied (optimizer step `step - 1`): the
        # optimizer's ScheduledLR computes the same value (tests/test_lr.py), without a device read.
        return lr_at(self.state.ctx.plan, self.state.step - 1)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._epoch = epoch
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        step = self._epoch * self.state.ctx.steps_per_epoch + batch + 1
        self.state.hook_steps = step - self.state.step
        self.state.step = step
        self._steps += self.state.hook_steps
        if logs is not None:
            logs["lr"] = self._lr()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._epoch_start
        self.state.train_time_s += elapsed
        if logs is not None and self._steps:
            logs["lr"] = self._lr()
            # Includes validation time; the step-level rate in TensorBoard excludes it.
            logs["images_per_s"] = self._steps * self.state.ctx.global_batch / elapsed
            logs["step_time_s"] = elapsed / self._steps


class Agreement(StepCallback):
    """One decision for all workers about stopping, taken at the same step on each.

    Every ``every`` steps (at the end of the batch hook that reached a multiple: ``RunState.reached``),
    the workers all-reduce two flags: a preemption signal arrived, the loss is NaN/Inf (the epoch's
    running mean: a NaN at any step of a hook of several is still NaN at its end). At epoch end they
    all-reduce ``stop_training`` (set by EarlyStopping on any of them). Preemption writes the
    backup at that step and raises ``TrainingStopped``; agreed at an epoch's last step, it does so
    at the epoch's end, after the epoch's validation, row and backup (the module's docstring says
    why).
    """

    def __init__(self, dist, state: RunState, backup, *, every: int, terminate_on_nan: bool):
        super().__init__(state)
        self.dist = dist
        self.backup = backup
        self.every = every
        self.terminate_on_nan = terminate_on_nan
        self._preempted_at_epoch_end: Optional[str] = None

    def on_train_batch_end(self, batch, logs=None):
        step = self.state.step
        if not self.state.reached(self.every):
            return  # decided by the global step, so every worker skips the collective together
        mine = self.terminate_on_nan and not _loss_is_finite(logs)
        preempt, nan = self.dist.agree([self.state.signal_received is not None, mine])
        if nan:
            where = f"the loss became {(logs or {}).get('loss')}" if mine else "a peer's loss became NaN or Inf"
            raise TrainingStopped(f"{where} at step {step}; the last good checkpoint is kept "
                                  "(lower the learning rate or check the data)", EXIT_NAN)
        if preempt:
            message = (f"preempted ({self.state.signal_received or 'signal on a peer'}) at step {step}; backup "
                       "written, run again with the same run dir to resume")
            if self.state.at_epoch_end():
                self._preempted_at_epoch_end = message
                return
            self.backup.save()
            raise TrainingStopped(message, EXIT_PREEMPTED)

    def on_epoch_end(self, epoch, logs=None):
        (stop,) = self.dist.agree([bool(self.model.stop_training)])
        if stop and not self.model.stop_training:
            log.info("a peer stopped early at epoch %d; stopping here too", epoch + 1)
        self.model.stop_training = stop
        if self._preempted_at_epoch_end:
            self.backup.save()  # BackupEvery saved this step already, unless the epoch's loss was NaN
            raise TrainingStopped(self._preempted_at_epoch_end, EXIT_PREEMPTED)


class BackupEvery(StepCallback):
    """Saves the resume state every N steps (at the hook that reached a multiple of N, on its last
    step) and at every epoch end; a multiple at an epoch's last step waits for the epoch's end, so
    that its backup follows the epoch's files (the module's docstring says why)."""

    def __init__(self, state: RunState, backup, every_steps: int):
        super().__init__(state)
        self.backup = backup
        self.every_steps = every_steps

    def on_train_batch_end(self, batch, logs=None):
        if self.state.reached(self.every_steps) and not self.state.at_epoch_end() and _loss_is_finite(logs):
            self.backup.save()

    def on_epoch_end(self, epoch, logs=None):
        if _loss_is_finite(logs):
            self.backup.save()


class Checkpoints(StepCallback):
    """Periodic and best-by-metric weights (see ``distrain.checkpoint.UserCheckpoints``)."""

    def __init__(self, checkpoints, state: RunState, *, every_epochs: int, every_steps: int, save_best: bool):
        super().__init__(state)
        self.checkpoints = checkpoints
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.save_best = save_best

    def on_train_batch_end(self, batch, logs=None):
        step = self.state.step
        if self.state.reached(self.every_steps) and _loss_is_finite(logs):
            self.checkpoints.save_periodic(f"step-{step:06d}")  # the step saved, maybe past the multiple

    def on_epoch_end(self, epoch, logs=None):
        if not _loss_is_finite(logs):
            return
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            self.checkpoints.save_periodic(f"epoch-{epoch + 1:04d}")
        if self.save_best:
            self.checkpoints.consider_best(logs or {}, epoch + 1, self.state.step)


class HistoryFiles(StepCallback):
    """``history.json`` and ``history.csv`` in the run dir, continued across resumes (chief only)."""

    def __init__(self, state: RunState, run_dir: RunDir):
        super().__init__(state)
        self.path = run_dir.history
        self.csv = run_dir.history_csv
        self.epochs: list[dict] = json.loads(self.path.read_text()) if self.path.exists() else []

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, "step": self.state.step,
               **{k: float(v) for k, v in (logs or {}).items()}}
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch + 1] + [row]
        write_atomically(self.path, json.dumps(self.epochs, indent=1))
        keys = sorted({k for e in self.epochs for k in e} - {"epoch", "step"})
        lines = [",".join(["epoch", "step", *keys])]
        lines += [",".join(str(e.get(k, "")) for k in ["epoch", "step", *keys]) for e in self.epochs]
        write_atomically(self.csv, "\n".join(lines) + "\n")


def interactive(stream: Optional[TextIO] = None) -> bool:
    """Whether Keras's progress bar can redraw itself where ``stream`` (default stdout) goes: a
    terminal, or a notebook (whose output streams are not TTYs but render carriage returns)."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def fit_verbosity(setting: Optional[int], *, is_interactive: Optional[bool] = None) -> int:
    """Keras's ``fit(verbose=)`` for ``logging.verbose``: as set, else (null) the progress bar (1) on a
    terminal or in a notebook and one line per epoch (2) elsewhere.

    Elsewhere is a SLURM ``.out`` file, a Ray worker's log or output piped to a file, where each
    redraw of the bar would be kept: thousands of carriage-return fragments on one line.

    Example:
        >>> fit_verbosity(None, is_interactive=False), fit_verbosity(1, is_interactive=False)
        (2, 1)
    """
    if setting is not None:
        return setting
    return 1 if (interactive() if is_interactive is None else is_interactive) else 2


class StepLog(StepCallback):
    """Every ``every`` global steps, one line in the run's log (chief): the step, the epoch, the
    running metrics, the LR applied and images/s since the last line.

    The line also goes to the terminal when ``to_terminal`` (no progress bar: ``verbose`` 2), so a
    SLURM ``.out`` file shows progress inside long epochs; beside a progress bar it would break
    the bar, so it goes to ``logs/rank0.log`` only.
    """

    def __init__(self, state: RunState, every: int, *, to_terminal: bool):
        super().__init__(state)
        self.every = every
        self.to_terminal = to_terminal
        self._epoch = 0
        self._since = 0.0
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1
        self._since, self._steps = time.perf_counter(), 0  # not the validation and saves between epochs

    def on_train_batch_end(self, batch, logs=None):
        self._steps += self.state.hook_steps
        if not self.state.reached(self.every):
            return
        elapsed = time.perf_counter() - self._since
        logs = logs or {}
        # The step logs are global (run.py sets distribute_reduction_method "first"); read only here.
        values = {k: float(logs[k]) for k in [*self.model.metrics_names, "lr", *LOSS_SCALE_KEYS] if k in logs}
        ctx = self.state.ctx
        rate = self._steps * ctx.global_batch / elapsed if elapsed > 0 else None
        line = step_line(self.state.step, ctx.total_steps, self._epoch, ctx.spec.train.epochs, values, rate)
        log.info("%s", line, extra={"terminal": self.to_terminal})
        self._since, self._steps = time.perf_counter(), 0


def step_line(step: int, steps: int, epoch: int, epochs: int, values: dict, images_per_s: Optional[float]) -> str:
    """One line of ``StepLog``.

    Example:
        >>> step_line(20, 60, 1, 3, {"loss": 2.10341, "accuracy": 0.3125, "lr": 0.002}, 1234.4)
        'step 20/60 (epoch 1/3): loss 2.1034, accuracy 0.3125, lr 0.002, 1234 images/s'
        >>> step_line(5, 60, 1, 3, {"loss": 2.5, "loss_scale": 4096.0, "skipped_steps": 3.0}, None)
        'step 5/60 (epoch 1/3): loss 2.5000, loss_scale 4096, skipped_steps 3'
    """
    def number(name: str, value: float) -> str:
        if name == "lr":
            return f"{value:.4g}"
        return f"{value:g}" if name in LOSS_SCALE_KEYS else f"{value:.4f}"

    parts = [f"{name} {number(name, value)}" for name, value in values.items()]
    if images_per_s is not None:
        parts.append(f"{images_per_s:.0f} images/s")
    return f"step {step}/{steps} (epoch {epoch}/{epochs}): " + ", ".join(parts)


def build_callbacks(ctx, state: RunState, backup, checkpoints, *, input_watch=None, tensorboard=None,
                    loss_scale=(), extra=()) -> list:
    """The run's callback list, in the order documented at the top of this module.

    Args:
        ctx: the ``context.RunContext``.
        state: the run's shared state (the global step, the preemption request).
        backup: the ``checkpoint.Backup``.
        checkpoints: the ``checkpoint.UserCheckpoints``.
        input_watch: the ``inputwatch.InputWatch`` of the training pipeline (adds
            ``input_wait_fraction`` to the epoch logs, so it runs before what logs them).
        tensorboard: makes the TensorBoard callbacks (``tensorboard_log.tensorboard_callbacks``);
            called on the chief only, which writes the files a user sees.
        loss_scale: ``lossscale.loss_scale_callbacks`` of the run's optimizer (mixed_float16 puts
            ``loss_scale`` and ``skipped_steps`` into the logs for what follows).
        extra: more callbacks (Ray's reporting, a user's), run before ``Agreement``.
    """
    spec = ctx.spec
    callbacks: list = [RunMetrics(state), *([input_watch] if input_watch is not None else []),
                       *ctx.dist.callbacks(state, ctx.steps_per_epoch, spec.logging.step_scalars_every),
                       *loss_scale]
    es = spec.train.early_stopping
    if es is not None:
        callbacks.append(tf.keras.callbacks.EarlyStopping(
            monitor=es.monitor, patience=es.patience, min_delta=es.min_delta, mode=monitor_mode(es.monitor, es.mode),
            restore_best_weights=es.restore_best_weights))
    c = spec.checkpoint
    callbacks.append(Checkpoints(checkpoints, state, every_epochs=c.every_epochs, every_steps=c.every_steps,
                                 save_best=c.save_best))
    if ctx.is_chief:
        callbacks.append(HistoryFiles(state, ctx.run_dir))
        if spec.logging.update_every_steps:
            callbacks.append(StepLog(state, spec.logging.update_every_steps,
                                     to_terminal=fit_verbosity(spec.logging.verbose) == 2))
        callbacks.extend(tensorboard() if tensorboard else ())
    callbacks.append(BackupEvery(state, backup, spec.checkpoint.backup_every_steps))
    callbacks.extend(extra)
    callbacks.append(Agreement(ctx.dist, state, backup, every=spec.distribute.preemption_check_every,
                               terminate_on_nan=spec.train.terminate_on_nan))
    return callbacks
