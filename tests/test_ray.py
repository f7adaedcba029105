"""``distrain ray``: the pure request/config functions, the ``ray up`` configs, real
``ray job submit`` runs on a local Ray head (bad submissions, 2 workers, a worker killed mid-run),
and ``cluster/ray/ray-on-slurm.sh`` on the two-node local SLURM.

The Ray tests start one head for the module (``tests/ray_cluster.py``); without Ray installed they
are skipped unless ``DISTRAIN_REQUIRE_RAY`` is set. Run them alone with
``pytest tests/test_ray.py -m ray``.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, backup_step, free_port_block, run_distrain, write_job
from distrain.errors import EXIT_FAILED, EXIT_PEER_LOST, EXIT_USAGE, TrainingStopped, UsageError
from distrain.launch import ray as ray_launch
from distrain.spec import spec_from_dict
from ray_cluster import BIN, ray_head_fixture, skip_unless_ray

# 2 logical CPUs: the 2 train workers. The job driver, Ray's job supervisor and the Train
# controller reserve none.
ray_head = ray_head_fixture(num_cpus=2)

JOB = """
name: rayjob
seed: 3
model: {{name: cnn, params: {{filters: 8}}}}
data: {{source: digits, batch_size_per_replica: 16}}
train: {{epochs: {epochs}, steps_per_epoch: {steps}, optimizer: adam, learning_rate: 0.002}}
distribute: {{collective_timeout_s: 20}}
checkpoint: {{every_epochs: 0, backup_every_steps: 5}}
logging: {{tensorboard: false, verbose: 0}}
"""
NOW = datetime.datetime(2026, 11, 27, 10, 15, 0)


# ----------------------------------------------------------------------------- pure functions

@pytest.mark.timeout(30)
def test_make_request_defaults():
    request = ray_launch.make_request(workers=2, spec_name="quickstart", now=NOW)
    assert request == ray_launch.RayRequest(workers=2, name="quickstart-20261127-101500",
                                            storage_path=os.path.expanduser("~/ray_results"))
    assert request.run_dir == Path(os.path.expanduser("~/ray_results")) / "quickstart-20261127-101500" / "run"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kwargs,flag", [
    ({"workers": 0}, "--workers"),
    ({"gpus_per_worker": -1}, "--gpus-per-worker"),
    ({"cpus_per_worker": 0}, "--cpus-per-worker"),
    ({"cpus_per_worker": float("inf")}, "--cpus-per-worker"),
    ({"max_failures": -2}, "--max-failures"),
    ({"storage_path": "runs"}, "--storage-path"),
    ({"name": "a/b"}, "--name"),
    ({"name": ".hidden"}, "--name"),
])
def test_make_request_rejects(kwargs, flag):
    with pytest.raises(UsageError, match=f"^{flag}"):
        ray_launch.make_request(**{"workers": 2, "spec_name": "job", **kwargs})


@pytest.mark.timeout(30)
def test_trainer_arguments_cpu():
    request = ray_launch.make_request(workers=2, spec_name="job", storage_path="/shared/runs", name="a",
                                      max_failures=3)
    args = ray_launch.trainer_arguments(request, keep_checkpoints=3, env={})
    assert args == {
        "scaling": {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1.0}},
        "failure": {"max_failures": 3},
        "checkpoint": {"num_to_keep": 3},
        "run": {"name": "a", "storage_path": "/shared/runs",
                "worker_runtime_env": {"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}}},
        "init": {},
    }


@pytest.mark.timeout(30)
def test_trainer_arguments_gpu_and_log_level():
    request = ray_launch.make_request(workers=4, spec_name="job", gpus_per_worker=2, cpus_per_worker=8,
                                      max_failures=-1, storage_path="~/x", name="b")
    args = ray_launch.trainer_arguments(request, env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert args["scaling"] == {"num_workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 8.0, "GPU": 2}}
    assert args["failure"] == {"max_failures": -1}
    assert args["run"]["storage_path"] == os.path.expanduser("~/x")
    assert args["run"]["worker_runtime_env"]["env_vars"]["TF_CPP_MIN_LOG_LEVEL"] == "0"


@pytest.mark.timeout(60)
def test_trainer_arguments_build_ray_configs():
    """The keyword arguments are the ones Ray 2.60's Train V2 config classes take."""
    skip_unless_ray()
    import ray.train

    request = ray_launch.make_request(workers=2, spec_name="job", gpus_per_worker=1, storage_path="/tmp/x", name="c")
    args = ray_launch.trainer_arguments(request, keep_checkpoints=2)
    scaling = ray.train.ScalingConfig(**args["scaling"])
    run = ray.train.RunConfig(failure_config=ray.train.FailureConfig(**args["failure"]),
                              checkpoint_config=ray.train.CheckpointConfig(**args["checkpoint"]), **args["run"])
    assert scaling.num_workers == 2 and scaling.use_gpu and scaling.resources_per_worker == {"CPU": 1.0, "GPU": 1}
    assert (run.name, run.storage_path, run.failure_config.max_failures) == ("c", "/tmp/x", 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config", ["aws-gpu.yaml", "onprem.yaml"])
def test_ray_up_configs_pass_rays_schema(config):
    """What ``ray up`` checks first: Ray's defaults merged in, then its JSON schema."""
    skip_unless_ray()
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(yaml.safe_load((REPO / "cluster" / "ray" / config).read_text()))
    validate_config(prepared)
    assert any("--dashboard-host=127.0.0.1" in c for c in prepared["head_start_ray_commands"])
    assert any('pip install -q -e "$HOME/distrain[ray]"' in c for c in prepared["setup_commands"])
    assert prepared["file_mounts"] == {"~/distrain": "."}


def _request(workers, gpus=0, cpus=1.0):
    return ray_launch.make_request(workers=workers, spec_name="job", gpus_per_worker=gpus, cpus_per_worker=cpus,
                                   storage_path="/tmp/x", name="n")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("request_args,nodes", [
    ((2,), [{"CPU": 2.0}]),
    ((2, 1), [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]),
    ((4, 2, 4), [{"CPU": 16.0, "GPU": 8.0}]),
    ((3, 0, 0.5), [{"CPU": 1.0}, {"CPU": 0.5}]),
])
def test_check_resources_fits(request_args, nodes):
    ray_launch.check_resources(_request(*request_args), nodes)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("request_args,nodes,message", [
    ((2, 1), [{"CPU": 2.0}], r"^--gpus-per-worker 1: --workers 2 x 1 GPU = 2 GPUs, but the Ray cluster has 0"),
    ((3,), [{"CPU": 2.0}], r"^--workers 3 x --cpus-per-worker 1 = 3 CPUs, but the Ray cluster has 2"),
    ((1, 2), [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], r"^--gpus-per-worker: no node .* 2 GPU"),
    ((1, 0, 4), [{"CPU": 2.0}, {"CPU": 2.0}], r"^--cpus-per-worker: no node .* 4 CPUs"),
    ((3, 1, 2), [{"CPU": 2.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}], r"^--workers 3: only 2 worker"),
])
def test_check_resources_rejects(request_args, nodes, message):
    with pytest.raises(UsageError, match=message):
        ray_launch.check_resources(_request(*request_args), nodes)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("strategy", ["one_device", "mirrored", "horovod"])
def test_check_strategy_rejects_single_process_and_horovod(strategy):
    spec = spec_from_dict({"distribute": {"strategy": strategy}})
    with pytest.raises(UsageError, match="^distribute.strategy"):
        ray_launch.check_strategy(spec, _request(2))
    ray_launch.check_strategy(spec_from_dict({"distribute": {"strategy": "multi_worker"}}), _request(2))


class _Wrapped(Exception):
    """Stands in for Ray's UserExceptionWithTraceback (the user's exception in ``_base_exc``)."""

    def __init__(self, exc):
        super().__init__(str(exc))
        self._base_exc = exc


class _WorkerGroupError(Exception):
    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


@pytest.mark.timeout(30)
def test_failure_exit_code():
    stopped = _WorkerGroupError({0: _Wrapped(RuntimeError("x")), 1: _Wrapped(TrainingStopped("lost", EXIT_PEER_LOST))})
    assert ray_launch.failure_exit_code(stopped) == (EXIT_PEER_LOST, "worker 1: lost")
    assert ray_launch.failure_exit_code(_WorkerGroupError({1: _Wrapped(UsageError("data.x: bad"))}))[0] == EXIT_USAGE
    code, message = ray_launch.failure_exit_code(_WorkerGroupError({0: _Wrapped(RuntimeError("boom\nlast line"))}))
    assert (code, message) == (EXIT_FAILED, "worker 0: RuntimeError: last line")
    assert ray_launch.failure_exit_code(RuntimeError("controller died"))[0] == EXIT_FAILED


@pytest.mark.timeout(60)
def test_unknown_job_file_exits_2_without_ray(tmp_path):
    started = time.monotonic()
    result = run_distrain(["ray", str(tmp_path / "nope.yaml"), "--workers", "2", "--storage-path", str(tmp_path)],
                          timeout=60)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.strip().splitlines() == [f"distrain: error: {tmp_path / 'nope.yaml'}: no such job file"]
    assert time.monotonic() - started < 20


@pytest.mark.timeout(60)
def test_relative_storage_path_exits_2(tmp_path):
    job = write_job(tmp_path / "job.yaml", JOB.format(epochs=1, steps=2))
    result = run_distrain(["ray", str(job), "--workers", "2", "--storage-path", "runs"], timeout=60)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == "distrain: error: --storage-path: expected an absolute path (shared by every node), got runs"


# ----------------------------------------------------------------------------- Ray inside SLURM
# The two-node SLURM is conftest's, one for the session.


@pytest.mark.slurm
@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_ray_on_slurm_two_nodes(slurm_two_nodes, tmp_path):
    """cluster/ray/ray-on-slurm.sh: a head on n1, a Ray node on n2, one train worker on each."""
    skip_unless_ray()
    job = write_job(tmp_path / "job.yaml", JOB.format(epochs=1, steps=6))
    storage = tmp_path / "storage"
    # sbatch_wait passes no script arguments: a wrapper gives them (and the venv) to the script.
    wrapper = tmp_path / "ray-job.sh"
    script, q = REPO / "cluster" / "ray" / "ray-on-slurm.sh", shlex.quote
    wrapper.write_text(f"""#!/usr/bin/env bash
export PATH={q(str(BIN))}:"$PATH" TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 CUDA_VISIBLE_DEVICES=-1
export RAY_PORT={free_port_block(3)} RAY_NODE_TIMEOUT=90
exec bash {q(str(script))} {q(str(job))} --storage-path {q(str(storage))} --name slurm
""")
    result = slurm_two_nodes.sbatch_wait(wrapper, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                                         timeout=200, cwd=REPO)
    job_id = result.job_id
    leftovers = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if f"/tmp/ray-{job_id}".encode() in _cmdline(pid)]
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, result.output[-6000:]
    assert re.search(r"ray-on-slurm: \S+ 2 node\(s\) up: 2 CPUs", result.output), result.output[-6000:]
    assert "--workers 2" in result.output  # the default: one worker per node without GPUs
    assert not leftovers, f"Ray processes of job {job_id} outlived it: {leftovers}"
    assert not Path(f"/tmp/ray-{job_id}").exists()
    summary = json.loads((storage / "slurm" / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"], summary["launcher"]) == (2, 6, "ray")
    assert not list(Path.home().joinpath(".ray").glob(f"distrain-slurm-{job_id}.token"))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# ----------------------------------------------------------------------------- a real Ray head

def _entrypoint(*args) -> list[str]:
    return [sys.executable, "-m", "distrain.cli", "ray", *map(str, args)]


def _result(storage: Path, name: str) -> dict:
    return json.loads((storage / name / ray_launch.RESULT_FILE).read_text())


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_bad_submissions_fail_fast(ray_head, tmp_path):
    job = write_job(tmp_path / "job.yaml", JOB.format(epochs=1, steps=2))
    storage = tmp_path / "storage"
    # Directly, as on a node of the cluster: exit 2, one line, before any trainer starts.
    for extra, message in ((["--gpus-per-worker", "1"], "--gpus-per-worker 1: --workers 2 x 1 GPU = 2 GPUs, "
                                                        "but the Ray cluster has 0 (ray.cluster_resources())"),
                           (["--workers", "3"], "--workers 3 x --cpus-per-worker 1 = 3 CPUs, but the Ray cluster has 2")):
        started = time.monotonic()
        result = run_distrain(["ray", str(job), "--workers", "2", "--storage-path", str(storage), *extra],
                              timeout=60, env=ray_head.client_env())
        assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1].startswith(f"distrain: error: {message}"), result.stderr[-3000:]
        assert time.monotonic() - started < 45  # seconds, even on a loaded machine; Ray would wait forever
    # Through ray job submit: the job fails with distrain's exit code 2 and its message.
    started = time.monotonic()
    result = ray_head.submit(_entrypoint(job, "--workers", 2, "--gpus-per-worker", 1, "--storage-path", storage),
                             timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "failed with exit code 2" in output and "distrain: error: --gpus-per-worker 1" in output, output[-3000:]
    assert time.monotonic() - started < 60
    assert not storage.exists()  # nothing started, nothing written


RAY_USER_MODEL = """
import tensorflow as tf


def build(input_shape, num_classes, *, units=8):
    inputs = tf.keras.Input(shape=input_shape)
    x = tf.keras.layers.Dense(units, activation="relu")(tf.keras.layers.Flatten()(inputs))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes, activation="softmax")(x), name="ray_user_net")
"""
EPOCHS, STEPS = 3, 20


@dataclass
class Submitted:
    client: subprocess.Popen  # ray job submit, ended
    output: str
    storage: Path
    run_dir: Path
    model_file: Path
    killed: int  # the pid of the rank 1 killed
    killed_at: int  # the backup step it was killed after


@pytest.fixture(scope="module")
def submitted(ray_head, tmp_path_factory) -> Submitted:
    """One ``ray job submit`` of 2 workers training a model file of the user's (outside the working
    dir), with rank 1 SIGKILLed (no handler, no goodbye) once a backup exists, well before the end:
    the three tests below read it (one submission, not three)."""
    tmp = tmp_path_factory.mktemp("submitted")
    model_file = tmp / "code" / "ray_user_net.py"
    model_file.parent.mkdir()
    model_file.write_text(RAY_USER_MODEL)
    job = write_job(tmp / "job.yaml", JOB.format(epochs=EPOCHS, steps=STEPS).replace(
        "model: {name: cnn, params: {filters: 8}}", "model: {name: code/ray_user_net.py:build, params: {units: 6}}"))
    storage = tmp / "storage"
    run_dir = storage / "fault" / "run"
    submission = f"distrain-test-{uuid.uuid4().hex[:8]}"
    command = ray_head.submit_command(_entrypoint(job, "--workers", 2, "--storage-path", storage, "--name", "fault",
                                                  "--max-failures", 1), submission_id=submission)
    log = tmp / "submit.log"
    with open(log, "w") as out:
        client = subprocess.Popen(command, env=ray_head.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        killed = killed_at = None
        while killed is None and time.monotonic() < deadline and client.poll() is None:
            pid_file = run_dir / ".ray-worker-1.pid"
            if backup_step(run_dir) >= 5 and pid_file.exists():
                killed = int(pid_file.read_text())
                killed_at = backup_step(run_dir)
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        assert killed is not None, "no backup appeared in time\n" + log.read_text()[-5000:]
        client.wait(timeout=max(1.0, deadline + 40 - time.monotonic()))
    except BaseException:
        ray_head.stop_job(submission)
        client.kill()
        raise
    return Submitted(client, log.read_text(), storage, run_dir, model_file, killed, killed_at)


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_submit_trains_with_two_workers(submitted):
    assert submitted.client.returncode == 0 and "succeeded" in submitted.output, submitted.output[-6000:]
    run_dir = submitted.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["strategy"], summary["launcher"], summary["steps"]) == (
        2, "multi_worker", "ray", EPOCHS * STEPS)
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    assert "rank 1/2" in (run_dir / "logs" / "rank1.log").read_text()
    # Ray's Result: the last report's metrics (per epoch + test) and a pointer checkpoint.
    ray_result = _result(submitted.storage, "fault")
    assert ray_result["error"] is None and ray_result["exit_code"] == 0
    metrics = ray_result["metrics"]
    assert {"loss", "accuracy", "val_accuracy", "test_accuracy", "lr"} <= set(metrics)
    assert (metrics["step"], metrics["epoch"], metrics["done"]) == (EPOCHS * STEPS, EPOCHS, True)
    assert metrics["test_accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert ray_result["checkpoint"] is not None
    pointer = json.loads((Path(ray_result["checkpoint"]) / ray_launch.POINTER_FILE).read_text())
    assert pointer == {"run_dir": str(run_dir), "backup": str(run_dir / "backup"), "step": EPOCHS * STEPS,
                       "epoch": EPOCHS}
    assert ray_result["summary"]["steps"] == EPOCHS * STEPS  # rank 0's return value


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_submit_with_a_user_model_file(submitted):
    """The model file (outside the working dir) goes to the workers with py_modules, the restarted
    ones too; the run dir's job.yaml keeps the reference."""
    assert submitted.client.returncode == 0 and "succeeded" in submitted.output, submitted.output[-6000:]
    summary = json.loads((submitted.run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["launcher"], summary["steps"]) == (2, "ray", EPOCHS * STEPS)
    assert f"name: {submitted.model_file}:build" in (submitted.run_dir / "job.yaml").read_text()


@pytest.mark.timeout(30)
def test_trainer_arguments_ship_the_users_code(tmp_path):
    model_file = tmp_path / "net.py"
    model_file.write_text("def build(input_shape, num_classes):\n    pass\n")
    spec = spec_from_dict({"model": {"name": "net.py:build"}}, base_dir=tmp_path)
    from distrain.user_code import code_to_ship

    shipped = code_to_ship(spec)
    assert shipped == {str(model_file): "net"}
    request = ray_launch.make_request(workers=2, spec_name="job", storage_path="/shared/runs", name="a")
    # Ray uploads local code only for the whole job (ray.init); the train workers inherit it.
    assert ray_launch.trainer_arguments(request, py_modules=list(shipped))["init"] == {
        "runtime_env": {"py_modules": [str(model_file)]}}
    assert ray_launch.trainer_arguments(request)["init"] == {}
    # Installed packages and distrain itself are not shipped.
    assert code_to_ship(spec_from_dict({"data": {"source": "numpy.random:default_rng"}})) == {}


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_killed_worker_is_restarted_from_the_backup(submitted):
    run_dir = submitted.run_dir
    assert submitted.killed_at < EPOCHS * STEPS
    assert submitted.client.returncode == 0 and "succeeded" in submitted.output, submitted.output[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == EPOCHS * STEPS  # exact: the restart resumed at the backup's step
    assert 0 < summary["resumed_from_step"] < EPOCHS * STEPS
    assert int((run_dir / ".ray-worker-1.pid").read_text()) != submitted.killed  # a new worker took rank 1
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history] == list(range(1, EPOCHS + 1))
    ray_result = _result(submitted.storage, "fault")
    assert ray_result["metrics"]["step"] == EPOCHS * STEPS and ray_result["checkpoint"] is not None
