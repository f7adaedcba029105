"""Whole runs on streamed data with real processes: two workers on an image folder train the same
weights as one process, and a run killed with SIGKILL mid-epoch resumes to the same weights as an
uninterrupted one, for an image folder and for TFRecord shards."""
import json
import sys

import pytest

from conftest import (DISTRAIN, assert_same_weights, backup_step, free_ports, model_weights, run_distrain, tf_config,
                      worker_env, write_job)
from helpers import solid_folder

pytestmark = pytest.mark.multiprocess

# 100 images: 64 training = 4 global batches of 16; 2 epochs = 8 steps; a backup every 3 steps.
JOB = """
name: streaming
seed: 7
model: {{name: cnn, params: {{filters: 8}}}}
data: {{source: {source}, path: {path}, image_size: [8, 8], batch_size_per_replica: {per_replica}}}
train: {{epochs: 2, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none}}
distribute: {{strategy: {strategy}}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 3}}
logging: {{tensorboard: false, verbose: 0}}
"""
STEPS = 8

# Kills its own process (SIGKILL: no handler, no backup) after global step 7, mid-epoch 2; the
# latest backup is at step 6 (every 3 steps and at the end of epoch 1, step 4), 2 steps into epoch 2.
KILL_AT_STEP_7 = """
import os, signal, sys
from pathlib import Path
import distrain
import tensorflow as tf
from distrain.run import train
from distrain.spec import load_spec

class KillAtStep7(tf.keras.callbacks.Callback):
    steps = 0
    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == 7:
            os.kill(os.getpid(), signal.SIGKILL)

train(load_spec(sys.argv[1]), Path(sys.argv[2]), extra_callbacks=[KillAtStep7()])
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming-data")
    folder = solid_folder(tmp / "imgs")
    from distrain.data import tfrecord

    tfrecord.pack(str(folder), str(tmp / "tfr"), shards=4, seed=7, progress=False)
    return {"image_folder": folder, "tfrecord": tmp / "tfr"}


def job(tmp_path, sources, source, strategy="one_device", per_replica=16):
    return write_job(tmp_path / f"{source}-{strategy}.yaml",
                     JOB.format(source=source, path=sources[source], strategy=strategy, per_replica=per_replica))


def train_once(tmp_path, job_file):
    result = run_distrain(["train", str(job_file), "--run-dir", str(tmp_path / "run")], timeout=300, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["global_batch"] == 16
    return tmp_path / "run"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, sources):
    runs = {}
    for source in sources:
        tmp = tmp_path_factory.mktemp(f"one-{source}")
        runs[source] = train_once(tmp, job(tmp, sources, source))
    return runs


@pytest.mark.timeout(420)
def test_two_workers_on_a_streamed_folder_equal_one_process(one_process, sources, tmp_path, workers_factory):
    job_file = job(tmp_path, sources, "image_folder", strategy="multi_worker", per_replica=8)
    ports, run_dir = free_ports(2), tmp_path / "run"
    cmd = [*DISTRAIN, "train", str(job_file), "--run-dir", str(run_dir)]
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)])
    assert workers.wait(timeout=300) == [0, 0], workers.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["steps"]) == (2, 16, STEPS)
    assert_same_weights(model_weights(run_dir), model_weights(one_process["image_folder"]))
    single = json.loads((one_process["image_folder"] / "summary.json").read_text())
    assert summary["test"]["accuracy"] == pytest.approx(single["test"]["accuracy"], abs=1e-6)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("source", ["image_folder", "tfrecord"])
def test_sigkill_mid_epoch_resumes_to_the_uninterrupted_weights(one_process, sources, source, tmp_path, workers_factory):
    job_file, run_dir = job(tmp_path, sources, source), tmp_path / "run"
    killed = workers_factory([[sys.executable, "-c", KILL_AT_STEP_7, str(job_file), str(run_dir)]], [worker_env()])
    assert killed.wait(timeout=300) == [-9], killed.output()
    assert backup_step(run_dir) == 6 and not (run_dir / "summary.json").exists()
    result = run_distrain(["train", "--resume", str(run_dir)], timeout=300, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_from_step"]) == (STEPS, 6)
    assert_same_weights(model_weights(run_dir), model_weights(one_process[source]))
