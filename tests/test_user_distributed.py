"""Your own model and data at every scale: the course's Inception module (a user file) on a user
loader of NumPy files (jobs/examples/), with one device, 2 logical-CPU replicas (mirrored) and 2
worker processes (multi_worker), and N replicas train the same weights as one, as the built-in
models do (tests/test_equivalence.py)."""
import json
import sys

import pytest

from conftest import DISTRAIN, REPO, assert_same_weights, free_ports, model_weights, run_distrain, tf_config, worker_env, write_job

pytestmark = pytest.mark.multiprocess

STEPS = 4
# limit 256: every evaluation batch splits evenly over the replicas. With an uneven last batch one
# replica gets an empty one, and tf 2.21's CPU Conv2D fails on it after a first convolution
# ("input depth must be evenly divisible by filter depth: 1 vs 8"), for any model with two stacked
# convolutions under mirrored (reported to the lead; not specific to user models).
EXAMPLES = REPO / "jobs" / "examples"
JOB = f"""
name: user-equivalence
seed: 5
model: {{{{name: {EXAMPLES / 'inception_module.py'}:build, params: {{{{filters: 4, modules: 1}}}}}}}}
data: {{{{source: {EXAMPLES / 'npy_folder.py'}:load_data, batch_size_per_replica: {{per_replica}}, limit: 256}}}}
train: {{{{epochs: 2, steps_per_epoch: 2, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none}}}}
distribute: {{{{strategy: {{strategy}}, cpu_devices: {{cpu_devices}}}}}}
checkpoint: {{{{every_epochs: 0, save_best: false, backup_every_steps: 0}}}}
logging: {{{{tensorboard: false, verbose: 0}}}}
"""


@pytest.fixture(scope="module")
def npy_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("npy")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import npy_folder
    finally:
        sys.path.remove(str(EXAMPLES))
    npy_folder.write_digits(folder)
    return {"NPY_DATA_DIR": str(folder)}


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, npy_env):
    tmp = tmp_path_factory.mktemp("single")
    job = write_job(tmp / "job.yaml", JOB.format(per_replica=32, strategy="one_device", cpu_devices=0))
    result = run_distrain(["train", str(job), "--run-dir", str(tmp / "run")], timeout=300, env=worker_env(**npy_env),
                          forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert (summary["steps"], summary["replicas"], summary["global_batch"]) == (STEPS, 1, 32)
    saved = (tmp / "run" / "job.yaml").read_text()
    assert f"name: {EXAMPLES / 'inception_module.py'}:build" in saved  # the run dir keeps the references
    assert f"source: {EXAMPLES / 'npy_folder.py'}:load_data" in saved
    return tmp / "run"


@pytest.mark.timeout(300)
def test_user_model_and_data_mirrored_two_logical_cpus_equal_one_device(single_device_run, tmp_path, npy_env):
    job = write_job(tmp_path / "job.yaml", JOB.format(per_replica=16, strategy="mirrored", cpu_devices=2))
    result = run_distrain(["train", str(job), "--run-dir", str(tmp_path / "run")], timeout=300,
                          env=worker_env(**npy_env), forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["strategy"], summary["replicas"], summary["global_batch"], summary["steps"]) == ("mirrored", 2, 32, STEPS)
    assert_same_weights(model_weights(tmp_path / "run"), model_weights(single_device_run))


@pytest.mark.timeout(300)
def test_user_model_and_data_two_worker_processes_equal_one_process(single_device_run, tmp_path, workers_factory, npy_env):
    job = write_job(tmp_path / "job.yaml", JOB.format(per_replica=16, strategy="multi_worker", cpu_devices=0))
    ports = free_ports(2)
    run_dir = tmp_path / "run"
    cmd = [*DISTRAIN, "train", str(job), "--run-dir", str(run_dir)]
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i), **npy_env) for i in range(2)])
    assert workers.wait(timeout=240) == [0, 0], workers.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"], summary["replicas"], summary["global_batch"],
            summary["steps"]) == ("multi_worker", 2, 2, 32, STEPS)
    assert_same_weights(model_weights(run_dir), model_weights(single_device_run))
    single = json.loads((single_device_run / "summary.json").read_text())
    assert summary["test"]["accuracy"] == pytest.approx(single["test"]["accuracy"], abs=1e-6)


@pytest.mark.timeout(200)
def test_resume_finds_the_users_code_through_the_run_dirs_job_yaml(single_device_run, npy_env, tmp_path):
    # From another directory: the run dir's job.yaml names the files absolutely.
    result = run_distrain(["train", "--resume", str(single_device_run)], timeout=180, env=worker_env(**npy_env),
                          cwd=tmp_path, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run already complete at step 4" in result.stderr


DATASET_FN = '''
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits


def digits(input_context, split):
    """Unbatched (image, label) examples, sharded by position: what docs/own-model-and-data.md asks."""
    d = load_digits()
    x, y = d.images.astype(np.float32) / 16, d.target.astype(np.int64)
    part = {"train": slice(0, 1200), "validation": slice(1200, 1520), "test": slice(1520, 1776)}[split]
    ds = tf.data.Dataset.from_tensor_slices((x[part], y[part]))
    return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
'''


@pytest.mark.timeout(300)
def test_tf_data_source_sharded_by_position_two_workers_equal_one(tmp_path, workers_factory):
    """The tf.data contract: with position sharding and a training split of an even size, 2 worker
    processes train the weights of one (the guarantee the docs state for it)."""
    (tmp_path / "user_digits_ds.py").write_text(DATASET_FN)
    text = JOB.replace(f"{EXAMPLES / 'npy_folder.py'}:load_data", f"{tmp_path / 'user_digits_ds.py'}:digits").replace(
        ", limit: 256", "")
    one = write_job(tmp_path / "one.yaml", text.format(per_replica=32, strategy="one_device", cpu_devices=0))
    result = run_distrain(["train", str(one), "--run-dir", str(tmp_path / "one")], timeout=240, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    two = write_job(tmp_path / "two.yaml", text.format(per_replica=16, strategy="multi_worker", cpu_devices=0))
    ports = free_ports(2)
    cmd = [*DISTRAIN, "train", str(two), "--run-dir", str(tmp_path / "two")]
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)])
    assert workers.wait(timeout=240) == [0, 0], workers.output()
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
    assert [(s["world_size"], s["global_batch"], s["steps"]) for s in summaries] == [(1, 32, STEPS), (2, 32, STEPS)]
    assert_same_weights(model_weights(tmp_path / "two"), model_weights(tmp_path / "one"))
    assert summaries[1]["test"]["accuracy"] == pytest.approx(summaries[0]["test"]["accuracy"], abs=1e-6)
