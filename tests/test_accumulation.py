"""Gradient accumulation and resuming on another world size: the global batch is the unit.

1 process with k = 2 micro-batches trains the same weights as 2 worker processes with k = 1 (with
and without BatchNorm); mirrored and Horovod accumulate too; a 2-worker run killed mid-epoch and
resumed by 1 worker ends where the uninterrupted 2-worker run ends; the LR at every optimizer step
is the plan's; a world that cannot make the recorded global batch is refused with exit 2.
"""
import json
import sys

import pytest

from conftest import (DISTRAIN, assert_same_weights, backup_step, free_ports, horovodrun, model_weights,
                      run_distrain, tf_config, worker_env, write_job)
from distrain.accumulation import accumulation_for
from distrain.errors import EXIT_PEER_LOST, UsageError

# 1150 training digits; global batch 16 = 8 per replica x replicas x k; 2 epochs of 6 steps.
STEPS = 12
JOB = """
name: accumulation
seed: 11
model: {{name: {model}, params: {params}}}
data: {{source: digits, batch_size_per_replica: 8}}
train: {{epochs: 2, steps_per_epoch: 6, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none,
        accumulation_steps: {k}}}
distribute: {{strategy: {strategy}, cpu_devices: {cpu_devices}, collective_timeout_s: 15}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 3}}
logging: {{tensorboard: false, verbose: 0}}
"""
CNN = ("cnn", "{filters: 8}")
RESIDUAL = ("residual", "{width: 8, blocks: 1}")  # BatchNorm after every convolution


def job(tmp_path, *, k, strategy, model=CNN, cpu_devices=0, name="job.yaml"):
    return write_job(tmp_path / name, JOB.format(model=model[0], params=model[1], k=k, strategy=strategy,
                                                 cpu_devices=cpu_devices))


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def trainable_weights(run_dir):
    """The trainable weights of model.keras (BatchNorm's moving statistics left out: see below)."""
    import distrain  # noqa: F401
    import tensorflow as tf

    model = tf.keras.models.load_model(str(run_dir / "model.keras"), safe_mode=True, compile=False)
    return [w.numpy() for w in model.trainable_weights]


def one_process(tmp_path, *, k, model=CNN, strategy="one_device", cpu_devices=0):
    job_file = job(tmp_path, k=k, strategy=strategy, model=model, cpu_devices=cpu_devices)
    result = run_distrain(["train", str(job_file), "--run-dir", str(tmp_path / "run")], timeout=300, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "run"


def two_workers(tmp_path, workers_factory, *, k, model=CNN, command=None):
    job_file = job(tmp_path, k=k, strategy="multi_worker", model=model)
    ports = free_ports(2)
    run_dir = tmp_path / "run"
    cmd = command or [*DISTRAIN, "train", str(job_file), "--run-dir", str(run_dir)]
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)],
                              tmp_path / "logs")
    return workers, job_file, run_dir


# --------------------------------------------------------------------------------------------
# the arithmetic
# --------------------------------------------------------------------------------------------

def test_accumulation_for_keeps_the_global_batch():
    assert accumulation_for(64, 8, 1) == 8 and accumulation_for(64, 8, 2) == 4 and accumulation_for(64, 8, 8) == 1
    with pytest.raises(UsageError) as err:
        accumulation_for(16, 8, 3)
    message = str(err.value)
    assert "\n" not in message and "global batch is 16" in message and "3 replicas x 8 per replica" in message
    assert "replica counts that keep it with 8 per replica: 1, 2" in message
    with pytest.raises(UsageError, match="not a multiple of 8"):
        accumulation_for(20, 8, 1)


def test_accumulation_steps_is_validated():
    from distrain.spec import spec_from_dict

    assert spec_from_dict({}).train.accumulation_steps == 1
    with pytest.raises(UsageError, match="train.accumulation_steps: expected a positive integer, got 0"):
        spec_from_dict({"train": {"accumulation_steps": 0}})


# --------------------------------------------------------------------------------------------
# N workers x k == 1 worker x N k
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_workers_k1(tmp_path_factory):
    """The uninterrupted 2-worker, k = 1 run (global batch 16), shared by the tests below."""
    from conftest import Workers

    tmp = tmp_path_factory.mktemp("two-workers")
    job_file = job(tmp, k=1, strategy="multi_worker")
    ports = free_ports(2)
    cmd = [*DISTRAIN, "train", str(job_file), "--run-dir", str(tmp / "run")]
    workers = Workers([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)], tmp / "logs")
    try:
        assert workers.wait(timeout=240) == [0, 0], workers.output()
    finally:
        workers.kill()
    return tmp / "run"


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_one_process_with_two_micro_batches_equals_two_workers(two_workers_k1, tmp_path):
    run_dir = one_process(tmp_path, k=2)
    s, t = summary(run_dir), summary(two_workers_k1)
    assert (s["replicas"], s["accumulation_steps"], s["global_batch"], s["steps"]) == (1, 2, 16, STEPS)
    assert (t["replicas"], t["accumulation_steps"], t["global_batch"], t["steps"]) == (2, 1, 16, STEPS)
    assert_same_weights(model_weights(run_dir), model_weights(two_workers_k1))
    # Metrics cover every example of a step, whichever way it was split.
    assert s["history"]["loss"] == pytest.approx(t["history"]["loss"], rel=1e-4)
    assert s["test"]["accuracy"] == pytest.approx(t["test"]["accuracy"], abs=1e-6)


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
def test_with_batchnorm_the_trainable_weights_agree(tmp_path, workers_factory):
    """Micro-batch = per-replica batch, dealt by stride: BatchNorm sees the same batch statistics.

    Its moving statistics differ (k sequential updates vs the replicas' averaged update, see
    distrain/accumulation.py and docs/distributed.md), so only the trainable weights must agree;
    the moving statistics are checked to differ, as the docs say they do."""
    (tmp_path / "one").mkdir()
    single = one_process(tmp_path / "one", k=2, model=RESIDUAL)
    (tmp_path / "two").mkdir()
    workers, _, run_dir = two_workers(tmp_path / "two", workers_factory, k=1, model=RESIDUAL)
    assert workers.wait(timeout=300) == [0, 0], workers.output()
    assert_same_weights(trainable_weights(single), trainable_weights(run_dir))
    import numpy as np

    everything_single, everything_two = model_weights(single), model_weights(run_dir)
    assert len(everything_single) > len(trainable_weights(single))  # the model has moving statistics
    differs = [np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12) for a, b in zip(everything_single, everything_two)]
    assert all(np.isfinite(w).all() for w in everything_single)
    assert max(differs) > 1e-3, "BatchNorm's moving statistics agree: update docs/distributed.md's table"


@pytest.fixture(scope="module")
def one_device_k4(tmp_path_factory):
    """1 device x k = 4 (global batch 32): what 2 replicas, mirrored or Horovod ranks, with k = 2 must equal."""
    return one_process(tmp_path_factory.mktemp("one-device-k4"), k=4)


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_mirrored_accumulates_like_more_workers(two_workers_k1, one_device_k4, tmp_path):
    """2 logical CPUs x k = 1 (global batch 16) against 1 device x k = 2: both equal the 2 workers."""
    (tmp_path / "mirrored").mkdir()
    mirrored = one_process(tmp_path / "mirrored", k=1, strategy="mirrored", cpu_devices=2)
    s = summary(mirrored)
    assert (s["strategy"], s["replicas"], s["accumulation_steps"], s["global_batch"]) == ("mirrored", 2, 1, 16)
    assert_same_weights(model_weights(mirrored), model_weights(two_workers_k1))
    # Mirrored with k = 2 over 2 replicas: global batch 32, so compare with one device at k = 4.
    (tmp_path / "mirrored-k2").mkdir()
    mirrored_k2 = one_process(tmp_path / "mirrored-k2", k=2, strategy="mirrored", cpu_devices=2)
    assert summary(mirrored_k2)["global_batch"] == 32
    assert_same_weights(model_weights(mirrored_k2), model_weights(one_device_k4))


# --------------------------------------------------------------------------------------------
# resume on another world size
# --------------------------------------------------------------------------------------------

KILL_RANK_1_AT_STEP_7 = """
import json, os, signal, sys
from pathlib import Path
import distrain
import distrain.errors
import tensorflow as tf
from distrain.run import train
from distrain.spec import load_spec

class KillRank1(tf.keras.callbacks.Callback):
    # After the backup of step 6 (every 3 steps) worker 1 dies at step 7, mid-epoch 2.
    def on_train_batch_end(self, batch, logs=None):
        rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        if rank == 1 and int(self.model.optimizer.iterations.numpy()) == 7:
            os.kill(os.getpid(), signal.SIGKILL)

try:
    train(load_spec(sys.argv[1]), Path(sys.argv[2]), extra_callbacks=[KillRank1()])
except distrain.errors.TrainingStopped as err:  # what `distrain train` does with it
    print(err, file=sys.stderr)
    sys.exit(err.exit_code)
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(500)
def test_two_workers_killed_then_resumed_by_one_worker_end_with_the_same_weights(two_workers_k1, tmp_path,
                                                                                  workers_factory):
    job_file = job(tmp_path, k=1, strategy="multi_worker")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-c", KILL_RANK_1_AT_STEP_7, str(job_file), str(run_dir)]
    ports = free_ports(2)
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)],
                              tmp_path / "logs")
    codes = workers.wait(timeout=240)
    assert codes[0] == EXIT_PEER_LOST and codes[1] == -9, workers.output()
    assert backup_step(run_dir) == 6

    # One worker now, as after a requeue onto one node: the same job, its run dir, no peer.
    resumed = run_distrain(["train", "--resume", str(run_dir)], timeout=300, forked=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    s = summary(run_dir)
    assert (s["steps"], s["resumed_from_step"], s["replicas"], s["accumulation_steps"], s["global_batch"]) == (
        STEPS, 6, 1, 2, 16)
    assert [(g["start_step"], g["workers"], g["replicas"], g["accumulation_steps"], g["global_batch"])
            for g in s["segments"]] == [(0, 2, 2, 1, 16), (6, 1, 1, 2, 16)]
    assert "2 micro-batch(es) per step keep the global batch 16" in resumed.stderr
    assert_same_weights(model_weights(run_dir), model_weights(two_workers_k1))


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_world_that_cannot_make_the_global_batch_is_refused(two_workers_k1, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(two_workers_k1 / "backup", run_dir / "backup")
    shutil.copy(two_workers_k1 / "segments.json", run_dir / "segments.json")
    shutil.copy(two_workers_k1 / "job.yaml", run_dir / "job.yaml")
    # 3 logical CPUs x 8 per replica cannot make 16: refused while the run is resolved, before the
    # backup's step is looked at (so also before "already complete").
    result = run_distrain(["train", "--resume", str(run_dir), "--set", "distribute.strategy=mirrored",
                           "--set", "distribute.cpu_devices=3"], timeout=200, forked=True)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("distrain: error: train.accumulation_steps: the run's global batch is 16"), line
    assert "replica counts that keep it with 8 per replica: 1, 2" in line
    assert not (run_dir / "summary.json").exists()


# --------------------------------------------------------------------------------------------
# the LR counts optimizer steps
# --------------------------------------------------------------------------------------------

RECORD_LR = """
import json, sys
from pathlib import Path
import distrain
import tensorflow as tf
from distrain.run import train
from distrain.spec import load_spec

class RecordLR(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []
    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        # After a step: iterations counts it, learning_rate is the value it applied (tf-keras keeps it).
        self.seen.append([int(opt.iterations.numpy()) - 1, float(opt.learning_rate.numpy())])

record = RecordLR()
summary = train(load_spec(sys.argv[1]), Path(sys.argv[2]), extra_callbacks=[record])
Path(sys.argv[3]).write_text(json.dumps({"seen": record.seen, "steps": summary["steps"]}))
"""


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_lr_at_every_step_of_an_accumulated_run_is_the_plans(tmp_path):
    import math
    import subprocess

    # 8 per replica x 1 x k 4 = global batch 32; lr 0.05 given for batch 8, linearly scaled to 0.2;
    # 3 warmup steps from 0.05, then cosine down to 0.2 x 0.1 over the remaining 9 steps.
    text = JOB.format(model="cnn", params="{filters: 8}", k=4, strategy="one_device", cpu_devices=0)
    text = text.replace("lr_scaling: none", "lr_scaling: linear, reference_batch: 8, warmup_steps: 3, "
                                            "schedule: {name: cosine, min_factor: 0.1}")
    job_file = write_job(tmp_path / "job.yaml", text)
    out = tmp_path / "lr.json"
    done = subprocess.run([sys.executable, "-c", RECORD_LR, str(job_file), str(tmp_path / "run"), str(out)],
                          capture_output=True, text=True, timeout=280, env=worker_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(out.read_text())

    def formula(step):
        if step < 3:
            return 0.05 + (0.2 - 0.05) * step / 3
        return 0.2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 3) / 9)))

    assert seen["steps"] == STEPS
    assert [s for s, _ in seen["seen"]] == list(range(STEPS))  # one optimizer step per Keras step
    assert [lr for _, lr in seen["seen"]] == pytest.approx([formula(s) for s in range(STEPS)], rel=1e-6)


@pytest.mark.multiprocess
@pytest.mark.horovod
@pytest.mark.timeout(400)
def test_horovod_accumulates_like_more_ranks(needs_horovod, one_device_k4, tmp_path, workers_factory):
    """2 Horovod ranks x k = 2 (global batch 32) against 1 device x k = 4."""
    job_file = job(tmp_path, k=2, strategy="horovod")
    command = [*DISTRAIN, "train", str(job_file), "--run-dir", str(tmp_path / "run")]
    workers = workers_factory([horovodrun(command)], [worker_env()], tmp_path / "logs")
    assert workers.wait(timeout=300) == [0], workers.output()
    s = summary(tmp_path / "run")
    assert (s["strategy"], s["replicas"], s["accumulation_steps"], s["global_batch"], s["steps"]) == (
        "horovod", 2, 2, 32, STEPS)
    assert_same_weights(model_weights(tmp_path / "run"), model_weights(one_device_k4))
