"""``train.steps_per_execution: K`` (docs/precision.md): K optimizer steps per call of the compiled
step, and every callback counts the steps a batch hook covers.

In process: the rule (``callbacks.crossed``), Keras's calls (shortened at an epoch's end and after
a resume mid-epoch) driving distrain's callbacks, and the input wait of a call. Then real runs of
the CNN on digits, 10 steps per epoch (not a multiple of 4): K = 4 ends at the planned step with
the weights of K = 1, with backups, checkpoints, step lines and TensorBoard's step scalars where
the docs say; so does K = 4 with gradient accumulation, with XLA, mirrored, on 2 worker processes
and on 2 Horovod ranks; a K = 4 run killed with SIGKILL and resumed ends with the test loss of the
uninterrupted K = 4 run, bit for bit.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from conftest import (DISTRAIN, Forked, Workers, assert_same_weights, free_ports, horovodrun, model_weights,
                      tf_config, worker_env)

from distrain.callbacks import crossed
from distrain.errors import EXIT_NAN, EXIT_PREEMPTED, UsageError
from distrain.spec import spec_from_dict

# ----------------------------------------------------------------------------- the rule


def test_crossed_is_whether_the_hooks_steps_hold_a_multiple():
    for every in range(1, 8):
        for steps in range(1, 6):
            for step in range(steps, 40):
                covered = range(step - steps + 1, step + 1)
                assert crossed(step, steps, every) == any(s % every == 0 for s in covered), (step, steps, every)
    assert [crossed(step, 1, 5) for step in (4, 5, 6)] == [False, True, False]  # K = 1: step % every == 0
    assert not crossed(12, 4, 0)  # every 0: never
    assert crossed(8, 4, 7) and not crossed(12, 4, 7)  # 7 is in steps 5-8, in none of 9-12
    assert crossed(8, 8, 3)  # 3 and 6 in one hook: one decision, at step 8


@pytest.mark.parametrize("value, shown", [(0, "0"), (-1, "-1"), ("auto", '"auto"'), (1.5, "1.5"), (True, "True")])
def test_a_bad_steps_per_execution_is_a_one_line_usage_error(value, shown):
    assert spec_from_dict({}).train.steps_per_execution == 1
    assert spec_from_dict({"train": {"steps_per_execution": 4}}).train.steps_per_execution == 4
    with pytest.raises(UsageError) as err:
        spec_from_dict({"train": {"steps_per_execution": value}}, source="job.yaml")
    assert str(err.value) == f"job.yaml: train.steps_per_execution: expected a positive integer, got {shown}"


# ----------------------------------------------------------------------------- Keras's calls, in process

class FakeBackup:
    def __init__(self, state):
        self.state = state
        self.saved_at: list[int] = []

    def save(self):
        if not self.saved_at or self.saved_at[-1] != self.state.step:  # as checkpoint.Backup: once a step
            self.saved_at.append(self.state.step)


class FakeCheckpoints:
    def __init__(self):
        self.saved: list[str] = []

    def save_periodic(self, name):
        self.saved.append(name)


def fit(*, k, start_step=0, steps_per_epoch=10, epochs=2, backup_every=7, checkpoint_every=6, agree_every=10,
        signal=False, nan_from_step=None):
    """A tiny model fit as ``run.fit_and_evaluate`` fits (a resume starts at ``start_step`` through the
    same counters hook) with distrain's step-counting callbacks.

    Returns:
        (hooks: per batch hook (first batch, last batch, RunState.step, RunState.hook_steps, the
        optimizer's step), the backup's saves, the checkpoints' names, the TrainingStopped or None).
    """
    import numpy as np
    import tensorflow as tf

    from distrain.backends.distribution import Distribution
    from distrain.callbacks import Agreement, BackupEvery, Checkpoints, RunMetrics, RunState
    from distrain.errors import TrainingStopped
    from distrain.lr import LRPlan
    from distrain.world import World

    spec = spec_from_dict({"train": {"epochs": epochs, "steps_per_execution": k}})
    plan = LRPlan.from_spec(spec.train, global_batch=4, per_replica_batch=4, steps_per_epoch=steps_per_epoch)
    ctx = types.SimpleNamespace(start_step=start_step, steps_per_epoch=steps_per_epoch, plan=plan, spec=spec,
                                global_batch=4, total_steps=epochs * steps_per_epoch)
    state = RunState(ctx)
    backup, checkpoints = FakeBackup(state), FakeCheckpoints()
    dist = Distribution("one_device", None, World(launcher="local", rank=0, world_size=1), replicas=1,
                        local_replicas=1)
    hooks = []

    class Record(tf.keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.first = batch

        def on_train_batch_end(self, batch, logs=None):
            hooks.append((self.first, batch, state.step, state.hook_steps,
                          int(self.model.optimizer.iterations.numpy())))

    tf.keras.utils.set_random_seed(1)
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    model.compile(tf.keras.optimizers.SGD(0.01), "mse", steps_per_execution=k)
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(start_step)  # as the backup's restore leaves it
    model._maybe_load_initial_counters_from_ckpt = lambda *_: (start_step // steps_per_epoch,
                                                               start_step % steps_per_epoch)
    # Batch i feeds optimizer step i + 1 (a resumed pipeline starts at the start step).
    x = np.ones((epochs * steps_per_epoch, 4, 2), np.float32)
    if nan_from_step is not None:
        x[nan_from_step - 1] = np.nan
    data = tf.data.Dataset.from_tensor_slices((x[start_step:], np.zeros((len(x) - start_step, 4, 1), np.float32)))
    state.signal_received = "SIGUSR1" if signal else None
    callbacks = [RunMetrics(state), BackupEvery(state, backup, backup_every),
                 Checkpoints(checkpoints, state, every_epochs=0, every_steps=checkpoint_every, save_best=False),
                 Record(), Agreement(dist, state, backup, every=agree_every, terminate_on_nan=True)]
    stopped = None
    try:
        model.fit(data, epochs=epochs, steps_per_epoch=steps_per_epoch, initial_epoch=start_step // steps_per_epoch,
                  callbacks=callbacks, verbose=0)
    except TrainingStopped as err:
        stopped = err
    return hooks, backup.saved_at, checkpoints.saved, stopped


def test_keras_shortens_an_epochs_last_call_and_every_callback_counts_its_steps():
    hooks, backups, checkpoints, stopped = fit(k=4)
    # 10 steps per epoch in calls of 4: Keras's last call of an epoch runs the 2 left.
    assert [(first, last) for first, last, *_ in hooks] == [(0, 3), (4, 7), (8, 9)] * 2
    assert [(step, steps) for _, _, step, steps, _ in hooks] == [(4, 4), (8, 4), (10, 2), (14, 4), (18, 4), (20, 2)]
    assert all(step == optimizer_step for _, _, step, _, optimizer_step in hooks)  # RunState.step, no device read
    assert stopped is None and hooks[-1][-1] == 20  # the planned step count
    # Every 7 steps: 7 is taken by the call ending at 8, 14 by the one ending at 14; and every epoch end.
    assert backups == [8, 10, 14, 20]
    assert checkpoints == ["step-000008", "step-000014", "step-000018"]  # multiples of 6: 6, 12, 18


def test_a_run_resumed_mid_epoch_starts_with_a_short_call_and_ends_at_the_planned_step():
    hooks, backups, _, _ = fit(k=4, start_step=14)  # the 5th step of epoch 2
    assert [(first, last, step, steps, optimizer_step) for first, last, step, steps, optimizer_step in hooks] == [
        (4, 7, 18, 4, 18), (8, 9, 20, 2, 20)]
    assert backups == [20]  # 21 would be the next multiple of 7; the epoch's end saves at 20
    hooks, _, _, _ = fit(k=4, start_step=16)  # not on a call boundary of an uninterrupted run
    assert [(first, last, step, steps) for first, last, step, steps, _ in hooks] == [(6, 9, 20, 4)]


def test_k_larger_than_an_epoch_is_one_call_per_epoch():
    hooks, backups, _, _ = fit(k=32)
    assert [(first, last, step, steps) for first, last, step, steps, _ in hooks] == [(0, 9, 10, 10), (0, 9, 20, 10)]
    assert backups == [10, 20]


def test_a_preemption_stops_at_the_end_of_the_call_that_reached_the_agreement_step():
    hooks, backups, _, stopped = fit(k=4, agree_every=3, signal=True)
    assert stopped is not None and stopped.exit_code == EXIT_PREEMPTED
    assert "at step 4;" in str(stopped) and backups == [4] and hooks[-1][-1] == 4


def test_a_nan_inside_a_call_stops_the_run_at_that_calls_end_without_a_backup():
    # The loss is NaN from step 6 on (inside the call of steps 5-8): the agreement every 4 steps sees
    # it at the call's end, step 8; the backup every 7 steps (also at 8) keeps no NaN weights.
    hooks, backups, _, stopped = fit(k=4, agree_every=4, nan_from_step=6)
    assert stopped is not None and stopped.exit_code == EXIT_NAN
    assert "at step 8;" in str(stopped) and backups == [] and hooks[-1][-1] == 8


def test_a_calls_input_wait_is_the_time_its_steps_stood_still():
    from distrain.data.inputwatch import call_wait, wait_time

    assert call_wait(10.0, 11.0, [10.25]) == wait_time(10.0, [10.25]) == 0.25  # one step: how late its batch was
    # 4 steps of 1 s; batches 3 and 4 were made while steps 1-2 ran (a prefetch buffer shallower
    # than the call): no wait, though they were ready after the call began.
    assert call_wait(0.0, 4.0, [0.0, 0.5, 1.5, 2.5]) == pytest.approx(0.0, abs=1e-6)
    # Input-bound: steps of 0.5 s, each waiting for its batch (1 s, then 0.5, 0.5 and 0 s).
    assert call_wait(0.0, 4.0, [1.0, 2.0, 3.0, 3.5]) == pytest.approx(2.0, abs=1e-6)
    assert call_wait(0.0, 4.0, [4.0, 4.0]) == 4.0  # ready only at the end: the whole call waited


def test_input_watch_takes_every_batch_of_a_call():
    import time

    import tensorflow as tf

    from distrain.data.inputwatch import InputWatch

    def slow(x, y):
        def sleep(a):
            time.sleep(0.03)
            return a
        return tf.numpy_function(sleep, [x], tf.float32, stateful=True), y

    watch = InputWatch(threshold=0.5)
    data = tf.data.Dataset.range(100).map(lambda i: (tf.zeros([4, 2]), tf.zeros([4, 1]))).map(slow)
    data = watch.stamp(tf, data).prefetch(2)
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    model.compile("sgd", "mse", steps_per_execution=4)
    history = model.fit(data, epochs=2, steps_per_epoch=10, callbacks=[watch], verbose=0).history
    # Taking one batch per call, as before K, would pair later calls with batches made long before
    # them: no wait seen. Every batch of every call taken, the slow pipeline shows.
    assert min(history["input_wait_fraction"]) > 0.6


# ----------------------------------------------------------------------------- real runs

# 1150 training digits, global batch 16, 10 steps per epoch, 3 epochs: 30 steps in calls of 4:
# 1-4 5-8 9-10 | 11-14 15-18 19-20 | 21-24 25-28 29-30.
STEPS = 30
JOB = """
name: spe
seed: 13
model: {{name: cnn, params: {{filters: 8}}}}
data: {{source: digits, batch_size_per_replica: {per_replica}}}
train: {{epochs: 3, steps_per_epoch: 10, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none,
        steps_per_execution: {k}, accumulation_steps: {accumulation}, jit_compile: {jit}}}
distribute: {{strategy: {strategy}, cpu_devices: {cpu_devices}, collective_timeout_s: 120}}
checkpoint: {{every_epochs: 0, every_steps: 6, keep: 10, save_best: false, backup_every_steps: 7}}
logging: {{tensorboard: true, update_every_steps: 5, verbose: 0}}
"""
# Where the docs say each action lands with K = 4 (docs/precision.md): at the end of the call that
# took a multiple of N, on the call's last step.
BACKUPS_K4 = [8, 10, 14, 20, 24, 28, 30]  # multiples of 7 (7, 14, 21, 28) and the epoch ends
CHECKPOINTS_K4 = [8, 14, 18, 24, 30]  # multiples of 6
STEP_POINTS_K4 = [8, 10, 18, 20, 28, 30]  # multiples of 5: step lines and TensorBoard's step scalars

RUN = """
import json, os, signal, sys
from pathlib import Path
import distrain
import tensorflow as tf
from distrain.rundir import RunDir
from distrain.run import train
from distrain.spec import load_spec

run_dir, out, kill_at = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])

class Record(tf.keras.callbacks.Callback):
    # After distrain's saving callbacks: the optimizer step at each batch hook and epoch end, and
    # the backup's step then.
    def __init__(self):
        super().__init__()
        self.seen = {"batch": [], "epoch": []}
    def _note(self, hook):
        step = int(self.model.optimizer.iterations.numpy())
        self.seen[hook].append([step, RunDir(run_dir).backup_step()])
        return step
    def on_train_batch_end(self, batch, logs=None):
        if self._note("batch") == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    def on_epoch_end(self, epoch, logs=None):
        self._note("epoch")

record = Record()
train(load_spec(sys.argv[1]), run_dir, extra_callbacks=[record])
out.write_text(json.dumps(record.seen))
"""


def job(directory: Path, *, k, per_replica=16, accumulation=1, jit=False, strategy="one_device",
        cpu_devices=0) -> Path:
    path = directory / "job.yaml"
    path.write_text(JOB.format(k=k, per_replica=per_replica, accumulation=accumulation,
                               jit="true" if jit else "false", strategy=strategy, cpu_devices=cpu_devices))
    return path


def one_process(directory: Path, *, kill_at=0, **settings) -> Forked:
    """Starts training ``job(directory, **settings)`` into ``directory/run`` in one process (forked:
    conftest's ``Forked``), recording its hooks in ``directory/hooks.json`` (and killing itself at
    step ``kill_at``); its output goes to ``directory/output.log``."""
    directory.mkdir(parents=True, exist_ok=True)
    job_file = job(directory, **settings) if settings else directory / "job.yaml"
    return Forked([str(job_file), str(directory / "run"), str(directory / "hooks.json"), str(kill_at)],
                  directory / "output.log", code=RUN)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The runs the tests compare, started together (each is small; together they share the cores):
    one process with K = 1 and K = 4, K = 4 with 2 micro-batches of 8, K = 4 with XLA, K = 4 mirrored
    over 2 logical CPUs of 8 each, and 2 worker processes of 8 per replica with K = 4: every one has
    the global batch 16."""
    root = tmp_path_factory.mktemp("steps-per-execution")
    settings = {"k1": dict(k=1), "k4": dict(k=4), "k4-accumulated": dict(k=4, per_replica=8, accumulation=2),
                "k4-xla": dict(k=4, jit=True), "k4-mirrored": dict(k=4, per_replica=8, strategy="mirrored",
                                                                   cpu_devices=2)}
    singles = [one_process(root / name, **s) for name, s in settings.items()]
    (root / "k4-two-workers").mkdir()
    two = job(root / "k4-two-workers", k=4, per_replica=8, strategy="multi_worker")
    worker = [*DISTRAIN, "train", str(two), "--run-dir", str(root / "k4-two-workers" / "run")]
    ports = free_ports(2)
    workers = Workers([worker, worker], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)], root / "logs")
    try:
        for single in singles:
            done = single.wait(timeout=400)
            assert done.returncode == 0, done.stdout[-3000:]
        assert workers.wait(timeout=400) == [0, 0], workers.output()
    finally:
        workers.kill()
        for single in singles:
            single.kill()
    return {name: root / name / "run" for name in [*settings, "k4-two-workers"]}


def hook_steps(run_dir: Path) -> list[int]:
    """The optimizer step at each batch hook of the run's last start."""
    return [step for step, _ in json.loads((run_dir.parent / "hooks.json").read_text())["batch"]]


def step_lines(run_dir: Path) -> list[int]:
    """The steps of the chief's step lines (``callbacks.StepLog``)."""
    lines = (run_dir / "logs" / "rank0.log").read_text().splitlines()
    return [int(line.split(" INFO step ")[1].split("/")[0]) for line in lines if " INFO step " in line]


def backups(run_dir: Path) -> list[int]:
    """The steps the run's last start saved backups at (seen after each hook and epoch end)."""
    seen = json.loads((run_dir.parent / "hooks.json").read_text())
    return sorted({backup for _, backup in seen["batch"] + seen["epoch"]} - {0})


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
def test_k4_ends_at_the_planned_step_with_the_weights_of_k1(runs):
    k1, k4 = runs["k1"], runs["k4"]
    assert summary(k1)["steps"] == summary(k4)["steps"] == STEPS
    assert_same_weights(model_weights(k4), model_weights(k1))
    assert summary(k4)["test"]["loss"] == pytest.approx(summary(k1)["test"]["loss"], rel=1e-5)
    assert hook_steps(k4) == [4, 8, 10, 14, 18, 20, 24, 28, 30]
    assert hook_steps(k1) == list(range(1, STEPS + 1))


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
def test_every_n_steps_actions_land_where_the_docs_say(runs):
    from helpers import accumulate, scalars

    k4 = runs["k4"]
    assert backups(k4) == BACKUPS_K4
    assert sorted(int(p.name[5:11]) for p in (k4 / "checkpoints").glob("step-*.weights.h5")) == CHECKPOINTS_K4
    assert step_lines(k4) == STEP_POINTS_K4
    assert sorted(scalars(accumulate(k4 / "tensorboard" / "train"), "batch_loss")) == STEP_POINTS_K4
    # K = 1 keeps the multiples themselves.
    assert backups(runs["k1"]) == [7, 10, 14, 20, 21, 28, 30]


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
def test_k4_with_accumulation_and_with_xla_trains_the_weights_of_k1(runs):
    k1 = model_weights(runs["k1"])
    assert hook_steps(runs["k4-accumulated"]) == hook_steps(runs["k4-xla"]) == hook_steps(runs["k4"])
    accumulated = summary(runs["k4-accumulated"])
    assert (accumulated["accumulation_steps"], accumulated["global_batch"], accumulated["steps"]) == (2, 16, STEPS)
    assert_same_weights(model_weights(runs["k4-accumulated"]), k1)
    xla = summary(runs["k4-xla"])
    assert xla["jit_compile"] is True and xla["steps"] == STEPS
    assert_same_weights(model_weights(runs["k4-xla"]), k1)


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
def test_mirrored_with_k4_trains_the_weights_of_one_process_with_k1(runs):
    mirrored = summary(runs["k4-mirrored"])
    assert (mirrored["strategy"], mirrored["replicas"], mirrored["global_batch"], mirrored["steps"]) == (
        "mirrored", 2, 16, STEPS)
    assert hook_steps(runs["k4-mirrored"]) == hook_steps(runs["k4"])
    assert_same_weights(model_weights(runs["k4-mirrored"]), model_weights(runs["k1"]))


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
def test_two_workers_with_k4_train_the_weights_of_one_process_with_k1(runs):
    two = summary(runs["k4-two-workers"])
    assert (two["strategy"], two["replicas"], two["global_batch"], two["steps"]) == ("multi_worker", 2, 16, STEPS)
    from helpers import accumulate, scalars

    assert step_lines(runs["k4-two-workers"]) == STEP_POINTS_K4  # its calls were of 4 steps too
    # multi_worker's step metrics are read over both workers at those points (stepmetrics.GlobalLogs):
    # the step scalars are one process's, not the chief's own half.
    two_losses, one_losses = (scalars(accumulate(runs[name] / "tensorboard" / "train"), "batch_loss")
                              for name in ("k4-two-workers", "k4"))
    assert sorted(two_losses) == STEP_POINTS_K4
    assert [two_losses[s] for s in STEP_POINTS_K4] == pytest.approx([one_losses[s] for s in STEP_POINTS_K4], rel=1e-5)
    assert_same_weights(model_weights(runs["k4-two-workers"]), model_weights(runs["k1"]))
    assert two["test"]["loss"] == pytest.approx(summary(runs["k1"])["test"]["loss"], rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.horovod
@pytest.mark.timeout(500)
def test_two_horovod_ranks_with_k4_train_the_weights_of_one_process_with_k1(needs_horovod, runs, tmp_path,
                                                                            workers_factory):
    job_file = job(tmp_path, k=4, per_replica=8, strategy="horovod")
    command = [*DISTRAIN, "train", str(job_file), "--run-dir", str(tmp_path / "run")]
    ranks = workers_factory([horovodrun(command)], [worker_env()], tmp_path / "logs")
    assert ranks.wait(timeout=400) == [0], ranks.output()
    s = summary(tmp_path / "run")
    assert (s["strategy"], s["replicas"], s["global_batch"], s["steps"]) == ("horovod", 2, 16, STEPS)
    assert step_lines(tmp_path / "run") == STEP_POINTS_K4
    assert_same_weights(model_weights(tmp_path / "run"), model_weights(runs["k1"]))


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
def test_a_k4_run_killed_and_resumed_ends_with_the_uninterrupted_test_loss(runs, tmp_path):
    # Killed at the end of the call of steps 15-18: the last backup is step 14's, so the resumed
    # run retakes steps 15-18 and 19-20, then epoch 3.
    directory = tmp_path / "killed"
    killed = one_process(directory, kill_at=18, k=4).wait(timeout=300)
    assert killed.returncode == -9, killed.stdout[-3000:]
    run_dir = directory / "run"
    from distrain.rundir import RunDir

    assert RunDir(run_dir).backup_step() == 14
    resumed = one_process(directory).wait(timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    s, uninterrupted = summary(run_dir), summary(runs["k4"])
    assert (s["resumed_from_step"], s["steps"]) == (14, STEPS)
    assert hook_steps(run_dir) == [18, 20, 24, 28, 30]
    assert s["test"]["loss"] == uninterrupted["test"]["loss"]  # bit for bit
    assert s["test"]["accuracy"] == uninterrupted["test"]["accuracy"]
