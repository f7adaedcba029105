"""``distrain.callbacks.Agreement``: how the workers agree to stop. A preemption signal or a NaN
loss on one worker stops every worker at the same agreed step with the same exit code, and an
early stop decided on one worker ends the epoch loop on all.

No worker processes: two workers are two threads, each with its own ``Agreement`` over a fake
``Distribution`` whose ``sum`` is a real (in-process) collective: it returns only once both
workers called it, with the element-wise sum of what they gave. ``Distribution.agree`` itself
is the real one.

Also ``StepLog`` (a step line in the run's log every N steps) and ``fit_verbosity`` (Keras's
progress bar only where it can redraw itself).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import sys
import threading
import types
from typing import Optional, Sequence

import pytest

from distrain.backends.distribution import Distribution
from distrain.callbacks import Agreement, RunState, StepLog, fit_verbosity, interactive
from distrain.errors import EXIT_NAN, EXIT_PREEMPTED, TrainingStopped
from distrain.world import World


class Collective:
    """An all-reduce (sum) over ``size`` threads; records what each rank gave at each call."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)
        self.given: dict[int, list[float]] = {}
        self.calls: list[dict[int, list[float]]] = []  # one per collective: rank -> values

    def sum(self, rank: int, values: Sequence[float]) -> list[float]:
        self.given[rank] = list(values)
        if self.barrier.wait() == 0:
            self.calls.append(dict(self.given))
        total = [sum(column) for column in zip(*(self.given[r] for r in range(self.size)))]
        self.barrier.wait()  # nobody gives the next call's values before everyone read these
        return total


class FakeDistribution(Distribution):
    def __init__(self, collective: Optional[Collective], rank: int, world_size: int):
        super().__init__("fake", None, World(launcher="tf_config", rank=rank, world_size=world_size),
                         replicas=world_size, local_replicas=1)
        self.collective = collective

    def sum(self, values):
        if self.collective is None:
            raise AssertionError("a single worker must not run a collective")
        return self.collective.sum(self.world.rank, values)


class FakeBackup:
    def __init__(self, state: RunState):
        self.state = state
        self.saved_at: list[int] = []

    def save(self):
        self.saved_at.append(self.state.step)


class Worker:
    """One worker's ``Agreement`` with the state, backup and model it acts on."""

    def __init__(self, collective: Optional[Collective], rank: int, world_size: int, *, every: int,
                 terminate_on_nan: bool = True, steps_per_epoch: int = 1000):
        self.state = RunState(types.SimpleNamespace(start_step=0, steps_per_epoch=steps_per_epoch))
        self.steps_per_epoch = steps_per_epoch
        self.epochs_ended: list[int] = []  # the epochs whose end the callbacks before Agreement ran
        self.backup = FakeBackup(self.state)
        self.model = types.SimpleNamespace(stop_training=False)
        self.agreement = Agreement(FakeDistribution(collective, rank, world_size), self.state, self.backup,
                                   every=every, terminate_on_nan=terminate_on_nan)
        self.agreement.set_model(self.model)
        self.steps_done = 0
        self.stopped: Optional[TrainingStopped] = None
        self.error: Optional[BaseException] = None  # anything else, e.g. the collective timing out

    def train(self, steps: int, *, signal_at: Optional[int] = None, nan_at: Optional[int] = None) -> None:
        """Steps 1..``steps`` as RunMetrics and Keras would drive them; stops at a TrainingStopped."""
        try:
            for step in range(1, steps + 1):
                self.state.step = step  # RunMetrics, the first callback, advances it
                if step == signal_at:
                    self.state.signal_received = "SIGUSR1"
                self.agreement.on_train_batch_end(step - 1, {"loss": math.nan if step == nan_at else 0.25})
                self.steps_done = step
                if step % self.steps_per_epoch == 0:
                    self.epochs_ended.append(step // self.steps_per_epoch)
                    self.agreement.on_epoch_end(step // self.steps_per_epoch - 1, {"loss": 0.25})
        except TrainingStopped as stop:
            self.stopped = stop
        except BaseException as err:  # reported by the test, not lost in the thread
            self.error = err


def run_pair(every: int, steps: int, steps_per_epoch: int = 1000, **rank1) -> tuple[list[Worker], Collective]:
    """Two workers training ``steps`` steps; ``rank1``: what happens on worker 1 only."""
    collective = Collective(2)
    workers = [Worker(collective, rank, 2, every=every, steps_per_epoch=steps_per_epoch) for rank in range(2)]
    threads = [threading.Thread(target=w.train, args=(steps,), kwargs=rank1 if rank == 1 else {})
               for rank, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a worker is stuck in the collective"
    assert [w.error for w in workers] == [None, None], "a worker failed outside the agreement (left the other waiting?)"
    return workers, collective


def test_a_signal_on_one_worker_stops_both_at_the_next_agreed_step_with_exit_75():
    workers, collective = run_pair(every=4, steps=20, signal_at=5)
    # The collective runs at steps 4 and 8 only (every 4 global steps), the same on both workers.
    assert collective.calls == [{0: [0.0, 0.0], 1: [0.0, 0.0]}, {0: [0.0, 0.0], 1: [1.0, 0.0]}]
    for w in workers:
        assert w.steps_done == 7  # step 8 raised
        assert w.state.step == 8
        assert w.stopped is not None and w.stopped.exit_code == EXIT_PREEMPTED == 75
        assert w.backup.saved_at == [8]  # every worker takes part in the backup at the agreed step
    assert str(workers[1].stopped) == ("preempted (SIGUSR1) at step 8; backup written, run again with the same run dir "
                                       "to resume")
    assert str(workers[0].stopped) == ("preempted (signal on a peer) at step 8; backup written, run again with the "
                                       "same run dir to resume")


def test_a_signal_agreed_at_an_epochs_last_step_stops_both_after_that_epochs_end():
    # 4 steps per epoch, agreed every 2 steps: the signal at step 3 is agreed at step 4, the epoch's
    # last. A backup taken there, before the epoch's end, would be resumed from past that end: the
    # epoch's validation and history row would never be written.
    workers, collective = run_pair(every=2, steps=12, steps_per_epoch=4, signal_at=3)
    # steps 2 and 4, then the epoch end's stop_training: the signal is not agreed twice
    assert [sorted(c) for c in collective.calls] == [[0, 1]] * 3 and collective.calls[1][1] == [1.0, 0.0]
    for w in workers:
        assert w.epochs_ended == [1] and w.steps_done == 4
        assert w.stopped is not None and w.stopped.exit_code == EXIT_PREEMPTED
        assert w.backup.saved_at == [4]
    assert str(workers[1].stopped).startswith("preempted (SIGUSR1) at step 4; backup written")
    assert str(workers[0].stopped).startswith("preempted (signal on a peer) at step 4; backup written")


def test_a_nan_loss_on_one_worker_stops_both_at_the_agreed_step_with_exit_77_and_no_backup():
    workers, collective = run_pair(every=2, steps=20, nan_at=6)
    assert [c[1] for c in collective.calls] == [[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]]  # steps 2, 4, 6
    assert [c[0] for c in collective.calls] == [[0.0, 0.0]] * 3
    for w in workers:
        assert (w.steps_done, w.stopped.exit_code) == (5, EXIT_NAN)
        assert w.backup.saved_at == []  # NaN weights never become a backup
    assert str(workers[1].stopped) == ("the loss became nan at step 6; the last good checkpoint is kept (lower the "
                                       "learning rate or check the data)")
    # Worker 0's own loss was finite: it reports the agreed stop with its own loss.
    assert str(workers[0].stopped).startswith("a peer's loss became NaN or Inf at step 6;")


def test_a_nan_between_agreement_steps_is_seen_only_at_one():
    # The loss is read at agreement steps only: a NaN at step 5 that is gone by step 6 stops nothing.
    workers, collective = run_pair(every=2, steps=8, nan_at=5)
    assert len(collective.calls) == 4 and all(w.stopped is None and w.steps_done == 8 for w in workers)


def test_without_terminate_on_nan_a_nan_loss_stops_nothing():
    collective = Collective(2)
    workers = [Worker(collective, rank, 2, every=2, terminate_on_nan=False) for rank in range(2)]
    threads = [threading.Thread(target=w.train, args=(6,), kwargs={"nan_at": 4}) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [w.error for w in workers] == [None, None]
    assert [w.stopped for w in workers] == [None, None] and [w.steps_done for w in workers] == [6, 6]
    assert collective.calls == [{0: [0.0, 0.0], 1: [0.0, 0.0]}] * 3


@pytest.mark.parametrize("stops", [(False, True), (True, False), (True, True), (False, False)])
def test_an_early_stop_on_any_worker_ends_training_on_all(stops):
    collective = Collective(2)
    workers = [Worker(collective, rank, 2, every=4) for rank in range(2)]
    for w, stop in zip(workers, stops):
        w.model.stop_training = stop  # as EarlyStopping leaves it on that worker
    threads = [threading.Thread(target=w.agreement.on_epoch_end, args=(0, {})) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [w.model.stop_training for w in workers] == [any(stops)] * 2
    assert collective.calls == [{0: [1.0 if stops[0] else 0.0], 1: [1.0 if stops[1] else 0.0]}]


def test_a_single_worker_agrees_with_itself_without_a_collective():
    worker = Worker(None, 0, 1, every=3)
    worker.train(10, signal_at=2)
    assert (worker.steps_done, worker.stopped.exit_code, worker.backup.saved_at) == (2, EXIT_PREEMPTED, [3])
    worker.model.stop_training = True
    worker.agreement.on_epoch_end(0, {})
    assert worker.model.stop_training is True


def test_agree_is_true_where_any_worker_said_true():
    collective = Collective(3)
    flags = {0: [False, False, True], 1: [True, False, False], 2: [False, False, True]}
    results: dict[int, list[bool]] = {}

    def agree(rank):
        results[rank] = FakeDistribution(collective, rank, 3).agree(flags[rank])

    threads = [threading.Thread(target=agree, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {r: [True, False, True] for r in range(3)}


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("to_terminal", [True, False])
def test_step_log_writes_a_line_every_n_steps_with_the_running_metrics(to_terminal):
    import tensorflow as tf

    ctx = types.SimpleNamespace(start_step=0, total_steps=12, global_batch=32,
                                spec=types.SimpleNamespace(train=types.SimpleNamespace(epochs=2)))
    state = RunState(ctx)
    step_log = StepLog(state, 4, to_terminal=to_terminal)
    step_log.set_model(types.SimpleNamespace(metrics_names=["loss", "accuracy"]))
    records = Records()
    log = logging.getLogger("distrain")
    log.addHandler(records)
    level = log.level
    log.setLevel(logging.INFO)  # (setLevel, not .level: the logger caches isEnabledFor)
    try:
        for epoch in range(2):
            step_log.on_epoch_begin(epoch)
            for batch in range(6):
                state.step += 1  # RunMetrics, the first callback, advances it
                # Keras's step logs stay tensors (StepCallback); lr is RunMetrics' float.
                logs = {"loss": tf.constant(1.0 / state.step), "accuracy": tf.constant(0.5), "lr": 0.002,
                        "unrelated": tf.zeros((2, 2))}
                step_log.on_train_batch_end(batch, logs)
    finally:
        log.removeHandler(records)
        log.setLevel(level)
    lines = [r.getMessage() for r in records.records]
    assert [line.split(",")[0] for line in lines] == ["step 4/12 (epoch 1/2): loss 0.2500",
                                                      "step 8/12 (epoch 2/2): loss 0.1250",
                                                      "step 12/12 (epoch 2/2): loss 0.0833"]
    assert all(re.fullmatch(r"step .*: loss [\d.]+, accuracy 0\.5000, lr 0\.002, \d+ images/s", line) for line in lines)
    assert {r.levelno for r in records.records} == {logging.INFO}
    assert {r.terminal for r in records.records} == {to_terminal}


def test_fit_verbosity_shows_the_progress_bar_only_where_it_can_redraw():
    assert [fit_verbosity(None, is_interactive=i) for i in (True, False)] == [1, 2]
    assert [fit_verbosity(v, is_interactive=False) for v in (0, 1, 2)] == [0, 1, 2]  # the job's, as set
    assert interactive(io.StringIO()) is ("ipykernel" in sys.modules)
    with open(os.devnull, "w") as devnull:
        assert not interactive(devnull) or "ipykernel" in sys.modules


def test_every_batch_hook_of_a_run_leaves_the_step_logs_as_tensors(tmp_path):
    """Keras converts every step's logs to numbers, and so waits for each step before it queues the
    next, unless every callback with batch hooks declares ``_supports_tf_logs`` (StepCallback). One
    that does not (InputWatch did not) costs that for the whole run: the chief's full list, with the
    backend's, the loss scale's and TensorBoard's batch-hook callbacks, must not have one."""
    import tensorflow as tf

    from distrain.backends.factory import precision_policy
    from distrain.backends.stepmetrics import GlobalLogs
    from distrain.backends.watchdog import Watchdog, heartbeat
    from distrain.callbacks import build_callbacks
    from distrain.data.inputwatch import InputWatch
    from distrain.lossscale import loss_scale_callbacks
    from distrain.rundir import RunDir
    from distrain.spec import spec_from_dict
    from distrain.tensorboard_log import Profiler, StepScalars, Writers

    spec = spec_from_dict({"logging": {"update_every_steps": 5}, "checkpoint": {"backup_every_steps": 5}})
    ctx = types.SimpleNamespace(spec=spec, start_step=0, is_chief=True, steps_per_epoch=10, run_dir=RunDir(tmp_path),
                                dist=None)
    state = RunState(ctx)
    ctx.dist = types.SimpleNamespace(callbacks=lambda *a: [heartbeat(Watchdog(60, lambda m: None)),
                                                           GlobalLogs(state, 10, 5)])
    with precision_policy("mixed_float16"):
        model = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(3,))])
        model.compile(optimizer="sgd", loss="mse")
    writers = Writers(tmp_path / "tb")
    callbacks = build_callbacks(ctx, state, None, None, input_watch=InputWatch(),
                                loss_scale=loss_scale_callbacks(model.optimizer),
                                tensorboard=lambda: [StepScalars(state, writers, 5, 1),
                                                     Profiler(state, tmp_path / "tb", 2, 3)])
    batch_hooks = [c for c in callbacks if c._implements_train_batch_hooks()]
    assert {type(c).__name__ for c in batch_hooks} >= {"RunMetrics", "InputWatch", "Heartbeat", "GlobalLogs",
                                                      "LossScaleLogs", "BackupEvery", "Checkpoints", "StepLog",
                                                      "StepScalars", "Profiler", "Agreement"}
    assert [type(c).__name__ for c in batch_hooks if not getattr(c, "_supports_tf_logs", False)] == []
    assert tf.keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=False)._batch_hooks_support_tf_logs
    writers.close()


class RowsAtSave:
    """A backup recording, at each save, the step and the epochs ``history.json`` holds by then."""

    def __init__(self, state: RunState, history):
        self.state, self.history = state, history
        self.saves: list[tuple[int, list[int]]] = []

    def save(self):
        rows = json.loads(self.history.read_text()) if self.history.exists() else []
        if not self.saves or self.saves[-1][0] != self.state.step:  # Backup.save skips a step it saved
            self.saves.append((self.state.step, [r["epoch"] for r in rows]))


def drive(callbacks, model, steps_per_epoch: int, epochs: int, signal_at: Optional[int] = None,
          state: Optional[RunState] = None) -> Optional[TrainingStopped]:
    """The hooks Keras's fit calls, in its order, for ``epochs`` epochs; returns the stop, if any."""
    import tensorflow as tf

    hooks = tf.keras.callbacks.CallbackList(callbacks, model=model)
    try:
        for epoch in range(epochs):
            hooks.on_epoch_begin(epoch)
            for batch in range(steps_per_epoch):
                if epoch * steps_per_epoch + batch + 1 == signal_at:
                    state.signal_received = "SIGUSR1"
                hooks.on_train_batch_begin(batch)
                hooks.on_train_batch_end(batch, {"loss": 0.5})
            hooks.on_epoch_end(epoch, {"loss": 0.5, "val_loss": 0.25})
    except TrainingStopped as stop:
        return stop
    return None


@pytest.mark.parametrize("signal_at", [None, 7])
def test_the_backup_of_an_epochs_last_step_is_taken_after_the_epochs_row(tmp_path, signal_at):
    """A backup commits every step before it; a run resumed from the backup of an epoch's last step
    never runs that epoch's end again. So the chief's full list writes the epoch's row first: also
    when ``backup_every_steps`` (2) or an agreed preemption (agreed every 4: the signal at step 7 is
    agreed at step 8) falls on the epoch's last step (4 steps per epoch)."""
    import tensorflow as tf

    from distrain.callbacks import build_callbacks
    from distrain.lr import LRPlan
    from distrain.rundir import RunDir
    from distrain.spec import spec_from_dict

    spec = spec_from_dict({"train": {"epochs": 3},
                           "checkpoint": {"backup_every_steps": 2, "save_best": False, "every_epochs": 0},
                           "distribute": {"preemption_check_every": 4}, "logging": {"tensorboard": False}})
    ctx = types.SimpleNamespace(spec=spec, start_step=0, is_chief=True, steps_per_epoch=4, total_steps=12,
                                run_dir=RunDir(tmp_path),
                                global_batch=8, plan=LRPlan(base_lr=0.1, peak_lr=0.1, steps_per_epoch=4, total_steps=12),
                                dist=types.SimpleNamespace(callbacks=lambda *a: [], **{
                                    "agree": FakeDistribution(None, 0, 1).agree}))
    state = RunState(ctx)
    backup = RowsAtSave(state, ctx.run_dir.history)
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
    stopped = drive(build_callbacks(ctx, state, backup, None), model, 4, 3, signal_at, state)
    if signal_at is None:
        assert stopped is None
        assert backup.saves == [(2, []), (4, [1]), (6, [1]), (8, [1, 2]), (10, [1, 2]), (12, [1, 2, 3])]
    else:
        assert stopped is not None and stopped.exit_code == EXIT_PREEMPTED
        assert str(stopped).startswith("preempted (SIGUSR1) at step 8;")
        assert backup.saves == [(2, []), (4, [1]), (6, [1]), (8, [1, 2])]
