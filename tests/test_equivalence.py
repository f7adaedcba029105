"""N replicas train the same numbers as one: MirroredStrategy over 2 logical CPUs and
MultiWorkerMirroredStrategy with 2 real processes, each against one device with the same global
batch, the same initial weights and no randomness (no dropout, no augmentation)."""
import json
from pathlib import Path

import pytest

from conftest import (DISTRAIN, assert_same_weights, free_ports, model_weights, run_distrain, tf_config,
                      worker_env, write_job)
from helpers import accumulate, scalars

pytestmark = pytest.mark.multiprocess

STEPS = 6
JOB = """
name: equivalence
seed: 7
model: {{name: cnn, params: {{filters: 8}}}}
data: {{source: digits, batch_size_per_replica: {per_replica}}}
train: {{epochs: 2, steps_per_epoch: 3, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none,
         jit_compile: {jit}}}
distribute: {{strategy: {strategy}, cpu_devices: {cpu_devices}}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 0}}
logging: {{tensorboard: true, update_every_steps: 1, verbose: 0}}
"""
METRICS = ("loss", "accuracy")


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    job = write_job(tmp / "job.yaml", JOB.format(per_replica=32, strategy="one_device", cpu_devices=0, jit=False))
    result = run_distrain(["train", str(job), "--run-dir", str(tmp / "run")], timeout=300, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["replicas"] == 1 and summary["global_batch"] == 32
    return tmp / "run"


XLA_GRADIENTS = "each replica's forward and backward pass"  # summary.json's "xla" (run.XLA_GRADIENTS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("jit", [False, True], ids=["plain", "xla"])
def test_mirrored_two_logical_cpus_equals_one_device(single_device_run, tmp_path, jit):
    """With ``train.jit_compile`` each replica's forward and backward pass is XLA-compiled
    (distrain.trainstep), the all-reduce and the update stay outside XLA: still the weights of one
    device without XLA (the CNN has BatchNorm, whose per-replica moving statistics are updated
    inside the compiled pass)."""
    job = write_job(tmp_path / "job.yaml", JOB.format(per_replica=16, strategy="mirrored", cpu_devices=2, jit=jit))
    result = run_distrain(["train", str(job), "--run-dir", str(tmp_path / "run")], timeout=300, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["strategy"], summary["replicas"], summary["global_batch"], summary["steps"]) == ("mirrored", 2, 32, STEPS)
    assert summary["xla"] == (XLA_GRADIENTS if jit else None)
    assert_same_weights(model_weights(tmp_path / "run"), model_weights(single_device_run))


def two_workers(tmp_path, workers_factory, *, jit: bool) -> Path:
    """Trains the job as 2 multi_worker processes; returns the run dir."""
    job = write_job(tmp_path / "job.yaml", JOB.format(per_replica=16, strategy="multi_worker", cpu_devices=0, jit=jit))
    ports = free_ports(2)
    run_dir = tmp_path / "run"
    cmd = [*DISTRAIN, "train", str(job), "--run-dir", str(run_dir)]
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)])
    assert workers.wait(timeout=240) == [0, 0], workers.output()
    return run_dir


@pytest.mark.timeout(300)
def test_two_worker_processes_equal_one_process(single_device_run, tmp_path, workers_factory):
    run_dir = two_workers(tmp_path, workers_factory, jit=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"], summary["replicas"], summary["global_batch"],
            summary["steps"]) == ("multi_worker", 2, 2, 32, STEPS)
    assert_same_weights(model_weights(run_dir), model_weights(single_device_run))
    # Test metrics are aggregated over both workers' shards: equal to one process's.
    single = json.loads((single_device_run / "summary.json").read_text())
    assert summary["test"]["accuracy"] == pytest.approx(single["test"]["accuracy"], abs=1e-6)
    assert summary["test"]["loss"] == pytest.approx(single["test"]["loss"], rel=1e-4)
    # Each worker's steps return its own running metrics (stepmetrics.py); what is kept is over both:
    # every epoch's train and validation metrics, and TensorBoard's per-step scalars.
    history, single_history = (json.loads((d / "history.json").read_text()) for d in (run_dir, single_device_run))
    for key in (*METRICS, *(f"val_{m}" for m in METRICS)):
        assert [e[key] for e in history] == pytest.approx([e[key] for e in single_history], rel=1e-5), key
    train, single_train = (accumulate(d / "tensorboard" / "train") for d in (run_dir, single_device_run))
    for metric in METRICS:
        per_step = scalars(train, f"batch_{metric}")
        assert sorted(per_step) == list(range(1, STEPS + 1))
        assert per_step == pytest.approx(scalars(single_train, f"batch_{metric}"), rel=1e-5), metric
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == ["rank0.log", "rank1.log"]
    assert "rank 1/2" in (run_dir / "logs" / "rank1.log").read_text()


@pytest.mark.timeout(300)
def test_mirrored_evaluates_a_partial_last_step_with_stacked_convolutions(tmp_path):
    """359 test digits over 2 replicas x 16: the last step's 7 examples go 4 + 3. Batched by 16 alone,
    the second replica got an empty batch, on which oneDNN's CPU convolution after inception's 1x1
    reduce fails ("input depth must be evenly divisible by filter depth")."""
    job = write_job(tmp_path / "job.yaml", """
name: inception-mirrored
model: {name: inception}
data: {source: digits, batch_size_per_replica: 16}
train: {epochs: 1, steps_per_epoch: 2}
distribute: {strategy: mirrored, cpu_devices: 2}
checkpoint: {every_epochs: 0, save_best: false}
logging: {tensorboard: false, verbose: 0}
""")
    result = run_distrain(["train", str(job), "--run-dir", str(tmp_path / "run")], timeout=280, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["replicas"] == 2 and 0.0 <= summary["test"]["accuracy"] <= 1.0


@pytest.mark.timeout(300)
def test_two_worker_processes_with_xla_equal_one_process_without(single_device_run, tmp_path, workers_factory):
    run_dir = two_workers(tmp_path, workers_factory, jit=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["jit_compile"], summary["xla"]) == (STEPS, True, XLA_GRADIENTS)
    assert_same_weights(model_weights(run_dir), model_weights(single_device_run))
