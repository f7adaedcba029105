"""Dynamic loss scaling under mixed_float16 (distrain/lossscale.py): skipped steps are counted and
logged, the scale and the count resume from the backup (a kill -9 and resume ends bit-equal), and a
step whose gradients overflow on one worker only is skipped by every worker, whose scales halve alike
(multi_worker and Horovod)."""
import json
import re
import signal
import sys

import numpy as np
import pytest

import distrain  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any TensorFlow import here)
from conftest import (backup_step, free_ports, horovodrun, run_distrain, run_python, tf_config, worker_env,
                      write_job)
from distrain.errors import EXIT_NAN
from helpers import accumulate, scalars

# A model whose float16 gradients overflow FACTOR times sooner than they would: the amplifier is the
# identity forward, and backward multiplies the incoming gradient by FACTOR in float16 (where it
# overflows) and divides it again in float32, so a finite gradient is unchanged. With the initial
# scale 2**15, FACTOR 4096 overflows the first steps of this job; the scale then halves until the
# scaled gradients fit. AMPLIFY in the environment overrides the factor (per worker).
AMP_MODEL = '''
import os
import tensorflow as tf


class GradientAmplifier(tf.keras.layers.Layer):
    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = float(factor)

    def call(self, x):
        factor = self.factor

        @tf.custom_gradient
        def amplify(x):
            def grad(dy):
                amplified = dy * tf.cast(factor, dy.dtype)  # float16 under mixed_float16: may overflow
                return tf.cast(tf.cast(amplified, tf.float32) / factor, dy.dtype)
            return tf.identity(x), grad

        return amplify(x)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def build(input_shape, num_classes, *, factor=1.0):
    factor = float(os.environ.get("AMPLIFY", factor))
    inputs = tf.keras.Input(shape=input_shape)
    x = tf.keras.layers.Flatten()(inputs)
    x = tf.keras.layers.Dense(32, activation="relu")(x)
    x = GradientAmplifier(factor)(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes, activation="softmax", dtype="float32")(x))
'''

# digits: 1150 training examples, 32 per step: 35 steps per epoch (the last partial batch is dropped
# by the pipelines), 2 epochs = 70 steps; a backup every 5 steps.
JOB = """
name: loss-scale
seed: 5
model: {{name: {model}:build, params: {{factor: {factor}}}}}
data: {{source: digits, batch_size_per_replica: {per_replica}}}
train: {{epochs: {epochs}, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none,
         precision: mixed_float16, jit_compile: {jit}}}
distribute: {{strategy: {strategy}, collective_timeout_s: 60}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 5}}
logging: {{tensorboard: {tensorboard}, verbose: 0, update_every_steps: 5}}
"""


def write_amp_job(tmp_path, *, factor=4096, per_replica=32, epochs=2, strategy="one_device", jit=False,
                  tensorboard=False, name="job.yaml"):
    model = tmp_path / "amp_model.py"
    model.write_text(AMP_MODEL)
    return write_job(tmp_path / name, JOB.format(model=model, factor=factor, per_replica=per_replica, epochs=epochs,
                                                 strategy=strategy, jit=jit, tensorboard=tensorboard))


# ----------------------------------------------------------------------------- in one process

def _compiled(precision: str, factor: float):
    import tensorflow as tf

    from distrain.backends.factory import precision_policy

    namespace: dict = {}
    exec(AMP_MODEL, namespace)  # noqa: S102  (the test's own model source)
    with precision_policy(precision):
        tf.keras.utils.set_random_seed(1)
        model = namespace["build"]((4,), 3, factor=factor)
        model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model


def test_only_mixed_float16_has_a_dynamic_loss_scale():
    from distrain.lossscale import count_skipped_steps, dynamic_loss_scale, loss_scale_callbacks

    for precision in ("float32", "mixed_bfloat16"):
        model = _compiled(precision, 1.0)
        assert dynamic_loss_scale(model.optimizer) is None
        assert count_skipped_steps(model.optimizer) is None and loss_scale_callbacks(model.optimizer) == []
    model = _compiled("mixed_float16", 1.0)
    assert float(dynamic_loss_scale(model.optimizer).current_loss_scale.numpy()) == 2.0 ** 15
    assert len(loss_scale_callbacks(model.optimizer)) == 1


def test_an_overflowing_step_is_skipped_counted_and_resumed_with_the_scale(tmp_path):
    """An overflow leaves the weights as they were, halves the scale, advances the step count and
    counts one skipped step; a finite step trains; the backup's checkpoint restores scale and count."""
    import tensorflow as tf

    from distrain.lossscale import count_skipped_steps, dynamic_loss_scale

    model = _compiled("mixed_float16", 2.0 ** 14)
    skipped = count_skipped_steps(model.optimizer)
    assert count_skipped_steps(model.optimizer) is skipped  # once per optimizer
    x, y = np.full((8, 4), 3.0, "float32"), np.arange(8) % 3
    before = [w.copy() for w in model.get_weights()]
    model.train_on_batch(x, y)
    state = dynamic_loss_scale(model.optimizer)
    assert (int(skipped.numpy()), float(state.current_loss_scale.numpy())) == (1, 2.0 ** 14)
    assert int(model.optimizer.iterations.numpy()) == 1
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    while int(skipped.numpy()) == int(model.optimizer.iterations.numpy()):  # halves until the gradients fit
        model.train_on_batch(x, y)
    finite_at = int(model.optimizer.iterations.numpy())
    assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert float(state.current_loss_scale.numpy()) == 2.0 ** 15 / 2 ** int(skipped.numpy())

    # What Backup saves (checkpoint.Backup: model and inner optimizer) holds the scale and the count.
    saved = tf.train.Checkpoint(model=model, optimizer=model.optimizer.inner_optimizer).save(str(tmp_path / "b"))
    other = _compiled("mixed_float16", 1.0)
    other_skipped = count_skipped_steps(other.optimizer)
    tf.train.Checkpoint(model=other, optimizer=other.optimizer.inner_optimizer).restore(saved).expect_partial()
    assert int(other_skipped.numpy()) == finite_at - 1
    assert float(dynamic_loss_scale(other.optimizer).current_loss_scale.numpy()) == 2.0 ** 15 / 2 ** (finite_at - 1)


# ----------------------------------------------------------------------------- kill -9 and resume

# Kills its own process (SIGKILL: no handler, no backup) after global step 23, in epoch 1; the latest
# backup is at step 20, after the scale has settled from the overflows of the first steps.
KILL_AT_STEP_23 = """
import os, signal, sys
from pathlib import Path
import distrain
import tensorflow as tf
from distrain.run import train
from distrain.spec import load_spec

class KillAtStep23(tf.keras.callbacks.Callback):
    steps = 0
    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == 23:
            os.kill(os.getpid(), signal.SIGKILL)

train(load_spec(Path(sys.argv[1])), Path(sys.argv[2]), extra_callbacks=[KillAtStep23()])
"""


def _history(run_dir):
    return json.loads((run_dir / "history.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loss-scale-uninterrupted")
    result = run_distrain(["train", str(write_amp_job(tmp, tensorboard=True)), "--run-dir", str(tmp / "run")],
                          timeout=280, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_the_scale_and_skips_are_logged(uninterrupted):
    history = _history(uninterrupted)
    skipped = [e["skipped_steps"] for e in history]
    scales = [e["loss_scale"] for e in history]
    assert skipped[0] >= 1 and skipped == sorted(skipped), skipped  # overflows at the start, counted over the run
    assert scales[-1] == 2.0 ** 15 / 2 ** skipped[-1]  # each skip halved it; 70 steps never double it
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["precision"] == "mixed_float16" and summary["steps"] == 70
    step_lines = [line for line in (uninterrupted / "logs" / "rank0.log").read_text().splitlines() if "step 5/70" in line]
    assert step_lines and "loss_scale " in step_lines[0] and "skipped_steps " in step_lines[0], step_lines
    train = accumulate(uninterrupted / "tensorboard" / "train")
    assert scalars(train, "epoch_skipped_steps") == {1: skipped[0], 2: skipped[1]}
    assert scalars(train, "epoch_loss_scale") == {1: scales[0], 2: scales[1]}
    per_step = scalars(train, "batch_skipped_steps")
    assert sorted(per_step) == list(range(5, 71, 5)) and per_step[70] == skipped[-1]
    assert set(scalars(train, "batch_loss_scale")) == set(per_step)


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_kill_9_and_resume_in_mixed_float16_is_bit_equal(uninterrupted, tmp_path):
    """The backup at step 20 holds a scale below 2**15 (the first steps overflowed): a resume that
    started again from 2**15 would skip steps the uninterrupted run took, and end elsewhere."""
    job_file, run_dir = write_amp_job(tmp_path), tmp_path / "run"
    killed = run_python(KILL_AT_STEP_23, [str(job_file), str(run_dir)], timeout=280)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert backup_step(run_dir) == 20

    resumed = run_distrain(["train", str(job_file), "--run-dir", str(run_dir)], timeout=280, forked=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((uninterrupted / "summary.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"]) == (20, 70)
    assert summary["test"]["loss"] == expected["test"]["loss"]
    assert [(e["loss_scale"], e["skipped_steps"]) for e in _history(run_dir)] == \
        [(e["loss_scale"], e["skipped_steps"]) for e in _history(uninterrupted)]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_nan_loss_still_ends_a_mixed_float16_run_with_exit_77(tmp_path):
    """Skipped steps are loss scaling at work; a NaN loss is not: inputs beyond float16's range (65504)
    make the loss NaN from the first step, and train.terminate_on_nan ends the run as in float32."""
    job_file = write_job(tmp_path / "nan.yaml", """
name: nan16
model: {name: mlp, params: {dropout: 0.0}}
data: {source: digits, batch_size_per_replica: 32, rescale: 1.0e+30}
train: {epochs: 2, optimizer: sgd, learning_rate: 0.01, precision: mixed_float16}
checkpoint: {every_epochs: 1, backup_every_steps: 5}
logging: {tensorboard: false, verbose: 0}
""")
    result = run_distrain(["train", str(job_file), "--run-dir", str(tmp_path / "run")], timeout=110, forked=True)
    assert result.returncode == EXIT_NAN, result.stderr[-2000:]
    assert re.search(r"the loss became (nan|inf) at step \d+", result.stderr)
    assert not (tmp_path / "run" / "summary.json").exists()


# ----------------------------------------------------------------------------- one worker overflows

# Records, after every step on every worker, the scale, the skipped count and a weight checksum.
RECORD_STEPS = """
import json, sys
from pathlib import Path
import distrain
import tensorflow as tf
from distrain.lossscale import dynamic_loss_scale, count_skipped_steps
from distrain.run import train
from distrain.spec import load_spec
from distrain.world import detect

class Record(tf.keras.callbacks.Callback):
    rows = []
    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.rows.append([float(dynamic_loss_scale(optimizer).current_loss_scale.numpy()),
                          int(count_skipped_steps(optimizer).numpy()),
                          float(sum(float(tf.reduce_sum(w)) for w in self.model.trainable_weights))])

train(load_spec(Path(sys.argv[1])), Path(sys.argv[2]), extra_callbacks=[Record()])
Path(sys.argv[2], f"steps-rank{detect().rank}.json").write_text(json.dumps(Record.rows))
"""


def _overflow_job(tmp_path, strategy, *, jit=False):
    # 16 per replica x 2 = 32: the one-process job's global batch; one epoch (35 steps).
    return write_amp_job(tmp_path, factor=1, per_replica=16, epochs=1, strategy=strategy, jit=jit)


def _assert_every_worker_skipped_alike(run_dir):
    ranks = [json.loads((run_dir / f"steps-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the same scale, skip count and weights after every step
    first_scale, first_skipped, _ = ranks[0][0]
    # Rank 1's gradients overflowed at the first step; rank 0's alone did not (see the test below):
    # both skipped it and both halved their scale.
    assert (first_scale, first_skipped) == (2.0 ** 14, 1)
    assert ranks[0][-1][1] >= 1 and ranks[0][-1][0] == 2.0 ** 15 / 2 ** ranks[0][-1][1]


@pytest.fixture(scope="module")
def rank0_alone(tmp_path_factory):
    """Rank 0's model (factor 1) alone on 16 examples per step: its gradients never overflow, so in
    the two-worker runs only rank 1's (factor 4096) can."""
    tmp = tmp_path_factory.mktemp("loss-scale-rank0")
    job_file = write_amp_job(tmp, factor=1, per_replica=16, epochs=1)
    result = run_python(RECORD_STEPS, [str(job_file), str(tmp / "run")], timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp / "run" / "steps-rank0.json").read_text())


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_one_worker_overflowing_makes_every_multi_worker_skip(rank0_alone, tmp_path, workers_factory):
    assert {row[1] for row in rank0_alone} == {0}  # factor 1: no overflow, ever
    job_file, run_dir = _overflow_job(tmp_path, "multi_worker"), tmp_path / "run"
    ports = free_ports(2)
    cmd = [sys.executable, "-c", RECORD_STEPS, str(job_file), str(run_dir)]
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, r), AMPLIFY=str(a))
                                           for r, a in ((0, 1), (1, 4096))])
    assert workers.wait(timeout=380) == [0, 0], workers.output()
    _assert_every_worker_skipped_alike(run_dir)


@pytest.mark.multiprocess
@pytest.mark.horovod
@pytest.mark.timeout(420)
def test_one_rank_overflowing_makes_every_horovod_rank_skip(needs_horovod, rank0_alone, tmp_path, workers_factory):
    """With each rank's pass XLA-compiled (train.jit_compile): the loss scaling inside the compiled
    pass, Horovod's allreduce and the finite check outside it."""
    job_file, run_dir = _overflow_job(tmp_path, "horovod", jit=True), tmp_path / "run"
    # horovodrun passes the environment on to both ranks: the rank picks its factor.
    script = RECORD_STEPS.replace("import json, sys", "import json, os, sys\n"
                                  "os.environ['AMPLIFY'] = '4096' if os.environ['HOROVOD_RANK'] == '1' else '1'")
    cmd = horovodrun([sys.executable, "-c", script, str(job_file), str(run_dir)])
    workers = workers_factory([cmd], [worker_env()])
    assert workers.wait(timeout=380) == [0], workers.output()
    _assert_every_worker_skipped_alike(run_dir)
