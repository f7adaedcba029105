"""The Horovod backend (``distrain/backends/horovod.py``) with real processes on 127.0.0.1:

- ``horovodrun -np 2 --gloo`` trains the same weights as one process with the same global batch,
  its epoch and test metrics are those over both ranks, and only rank 0 writes the run's files;
- a rank SIGKILLed after a backup ends the job; the rerun resumes from the backup and ends with
  the uninterrupted run's step count and weights;
- under ``srun`` (a fake SLURM environment, no SLURM needed) rank 0 serves Gloo's rendezvous
  and the same training runs without horovodrun;
- the pure parts: the SLURM → Horovod rank layout, metric reduction, the optimizer check.

Without Horovod (``scripts/install-horovod.sh``) the process tests are skipped, unless
``DISTRAIN_REQUIRE_HOROVOD`` is set: then they fail (conftest's ``needs_horovod``).
Run: ``pytest tests/test_horovod.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest

from conftest import (DISTRAIN, Forked, Workers, assert_same_weights, backup_step, files_written, free_ports,
                      horovodrun, model_weights, run_distrain, worker_env, write_job)
from distrain.backends import horovod as hvd_backend
from distrain.errors import UsageError
from distrain.backends.factory import choose_strategy
from distrain.world import World, detect

pytestmark = [pytest.mark.horovod, pytest.mark.multiprocess]

# 2 epochs x 4 steps; backups at steps 3, 4 (epoch end), 6 and 8. No dropout, no augmentation.
STEPS = 8
JOB = """
name: hvd
seed: 7
model: {{name: cnn, params: {{filters: 8}}}}
data: {{source: digits, batch_size_per_replica: {per_replica}}}
train: {{epochs: 2, steps_per_epoch: 4, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none}}
distribute: {{strategy: {strategy}}}
checkpoint: {{every_epochs: 1, keep: 2, backup_every_steps: 3}}
logging: {{tensorboard: {tensorboard}, verbose: 0}}
"""
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def job(path: Path, *, per_replica=16, strategy="horovod", tensorboard=False) -> Path:
    return write_job(path, JOB.format(per_replica=per_replica, strategy=strategy,
                                      tensorboard=str(tensorboard).lower()))


def start(commands: list[list[str]], envs: list[dict], log_dir: Path, request) -> Workers:
    workers = Workers(commands, envs, log_dir)
    request.addfinalizer(workers.kill)  # kills each process group, even when an assert fails
    return workers


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, one replica of 32 (the 2 ranks below have 16 each)."""
    tmp = tmp_path_factory.mktemp("single")
    result = run_distrain(["train", str(job(tmp / "job.yaml", per_replica=32, strategy="one_device")),
                           "--run-dir", str(tmp / "run")], timeout=180, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (summary(tmp / "run")["steps"], summary(tmp / "run")["global_batch"]) == (STEPS, 32)
    return tmp / "run"


@pytest.fixture(scope="module")
def horovod_run(needs_horovod, tmp_path_factory, request):
    """horovodrun with 2 ranks; each rank runs under strace, which records what it writes."""
    tmp = tmp_path_factory.mktemp("horovod")
    command = [*DISTRAIN, "train", str(job(tmp / "job.yaml", tensorboard=True)), "--run-dir", str(tmp / "run")]
    if shutil.which("strace"):
        # --seccomp-bpf: only the traced calls stop the rank (without it every call does: seconds slower).
        trace = ("exec strace -f --seccomp-bpf -qq -e trace=open,openat,rename,renameat,renameat2 "
                 "-o \"$0.$HOROVOD_RANK\" \"$@\"")
        command = ["sh", "-c", trace, str(tmp / "trace"), *command]
    workers = start([horovodrun(command)], [worker_env()], tmp / "logs", request)
    assert workers.wait(timeout=240) == [0], workers.output()
    return tmp


# ----------------------------------------------------------------------------- horovodrun

@pytest.mark.timeout(420)
def test_two_ranks_train_the_same_weights_as_one_process(horovod_run, single_run):
    run_dir = horovod_run / "run"
    result = summary(run_dir)
    assert (result["launcher"], result["strategy"], result["world_size"], result["replicas"], result["global_batch"],
            result["steps"]) == ("horovod", "horovod", 2, 2, 32, STEPS)
    assert_same_weights(model_weights(run_dir), model_weights(single_run))
    assert "rank 1/2" in (run_dir / "logs" / "rank1.log").read_text()
    # Saved with the plain optimizer class: model.keras compiles again without Horovod.
    from distrain.models import load_trained_model

    assert type(load_trained_model(run_dir / "model.keras", compile=True).optimizer).__module__.startswith("tf_keras.")


@pytest.mark.timeout(420)
def test_epoch_and_test_metrics_are_over_both_ranks(horovod_run, single_run):
    # Each rank trains on and validates its own half. Without the reduction the chief's history
    # would hold its half's loss; with it, the metrics of one process seeing every example.
    run_dir = horovod_run / "run"
    ranks, one = history(run_dir), history(single_run)
    assert [e["epoch"] for e in ranks] == [1, 2]
    for epoch_ranks, epoch_one in zip(ranks, one):
        for key in METRICS:
            assert epoch_ranks[key] == pytest.approx(epoch_one[key], rel=1e-5, abs=1e-6), key
    # 359 test examples: rank 0 evaluates 180, rank 1 179; weighted by examples, not by rank.
    test, test_one = summary(run_dir)["test"], summary(single_run)["test"]
    assert test["accuracy"] == pytest.approx(test_one["accuracy"], abs=1e-6)
    assert test["loss"] == pytest.approx(test_one["loss"], rel=1e-5)
    # EarlyStopping and best-checkpoint decisions read the same reduced values.
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["value"] == pytest.approx(max(e["val_accuracy"] for e in ranks), abs=1e-9)


@pytest.mark.timeout(420)
def test_only_rank_0_writes_the_run_dir(horovod_run):
    run_dir = horovod_run / "run"
    names = {p.name for p in run_dir.iterdir()}
    assert {"summary.json", "history.json", "model.keras", "job.yaml", "checkpoints", "backup", "tensorboard",
            "logs"} <= names
    assert ".workertemp" not in names, "a rank left its scratch dir"
    assert not list(run_dir.rglob(".tmp*")), "a temporary file was left behind"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.json", "best.weights.h5", "epoch-0001.weights.h5", "epoch-0002.weights.h5", "index.json"]
    assert backup_step(run_dir) == STEPS
    if not shutil.which("strace"):
        pytest.fail("strace is needed to audit each rank's writes (scripts/test.sh installs it)")
    rank0 = files_written(horovod_run / "trace.0", under=run_dir)
    rank1 = files_written(horovod_run / "trace.1", under=run_dir)
    assert {"summary.json", "model.keras", "checkpoints/best.weights.h5", "backup/checkpoint"} <= rank0
    assert any(p.startswith("tensorboard/") for p in rank0)
    # Rank 1 saved every checkpoint too, into its own scratch dir, and wrote nothing else but its log.
    assert any(p.startswith(".workertemp/rank1/") for p in rank1)
    assert all(p == "logs/rank1.log" or p.startswith(".workertemp/rank1/") for p in rank1), sorted(rank1)
    assert not rank0 & rank1


KILL_RANK_1 = """
import os, signal, sys
from pathlib import Path
import distrain
import tensorflow as tf
from distrain.run import train
from distrain.spec import load_spec

class KillRank1(tf.keras.callbacks.Callback):
    # After the backup of step 6 (every 3 steps) rank 1 dies at step 7, mid-epoch 2.
    def on_train_batch_end(self, batch, logs=None):
        if os.environ["HOROVOD_RANK"] == "1" and int(self.model.optimizer.iterations.numpy()) == 7:
            os.kill(os.getpid(), signal.SIGKILL)

train(load_spec(sys.argv[1]), Path(sys.argv[2]), extra_callbacks=[KillRank1()])
"""


@pytest.mark.timeout(420)
def test_a_killed_rank_ends_the_job_and_the_rerun_resumes_exactly(needs_horovod, tmp_path, request, single_run):
    job_file, run_dir = job(tmp_path / "job.yaml"), tmp_path / "run"
    first = start([horovodrun([sys.executable, "-c", KILL_RANK_1, str(job_file), str(run_dir)])], [worker_env()],
                  tmp_path / "logs1", request)
    (code,) = first.wait(timeout=180)
    assert code != 0, first.output()
    assert "Process 1 exit with status code 137" in first.logs[0].read_text(), first.output()  # 128 + SIGKILL
    assert not (run_dir / "summary.json").exists()
    assert backup_step(run_dir) == 6

    second = start([horovodrun([*DISTRAIN, "train", str(job_file), "--run-dir", str(run_dir)])], [worker_env()],
                   tmp_path / "logs2", request)
    assert second.wait(timeout=240) == [0], second.output()
    result = summary(run_dir)
    assert result["resumed_from_step"] == 6
    assert result["steps"] == summary(single_run)["steps"] == STEPS
    assert result["epochs_completed"] == 2
    assert [e["epoch"] for e in history(run_dir)] == [1, 2]
    # An exact resume: the same weights as the uninterrupted runs.
    assert_same_weights(model_weights(run_dir), model_weights(single_run))
    assert not (run_dir / ".workertemp").exists()


# ----------------------------------------------------------------------------- srun, no horovodrun

FAKE_SCONTROL = """#!/bin/sh
# `scontrol -o show node n1,n2` of a cluster whose two nodes both live at 127.0.0.1
echo "NodeName=n1 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=n1 State=IDLE"
echo "NodeName=n2 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=n2 State=IDLE"
"""


def srun_env(procid: int, port: int, bin_dir: Path) -> dict:
    """What srun gives task ``procid`` of ``srun -N2 --ntasks-per-node=1`` (as in test_world.slurm_env)."""
    return worker_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID=procid, SLURM_NTASKS=2,
                      SLURM_STEP_NUM_TASKS=2, SLURM_STEP_NODELIST="n[1-2]", SLURM_JOB_NODELIST="n[1-2]",
                      SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_NODEID=procid, SLURM_LOCALID=0,
                      DISTRAIN_PORT=port, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.timeout(300)
def test_srun_tasks_bootstrap_gloo_without_horovodrun(needs_horovod, tmp_path, request, single_run):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    job_file, run_dir = job(tmp_path / "job.yaml"), tmp_path / "run"
    (port,) = free_ports(1)
    # Forked (conftest.Forked): the bootstrap is the point, not a process's start-up; Horovod is
    # imported and initialised in each task, after the fork.
    args = ["train", job_file, "--run-dir", run_dir]
    pair = [Forked(args, tmp_path / f"task{i}.log", env=srun_env(i, port, bin_dir)) for i in range(2)]
    for task in pair:
        request.addfinalizer(task.kill)
    done = [task.wait(timeout=240) for task in pair]
    assert [task.returncode for task in done] == [0, 0], "\n".join(task.stdout[-3000:] for task in done)
    result = summary(run_dir)
    assert (result["launcher"], result["strategy"], result["world_size"], result["steps"]) == (
        "slurm", "horovod", 2, STEPS)
    assert_same_weights(model_weights(run_dir), model_weights(single_run))
    assert f"Horovod rendezvous on 127.0.0.1:{port} for 2 processes" in (run_dir / "logs" / "rank0.log").read_text()


# ----------------------------------------------------------------------------- pure functions

@pytest.mark.timeout(30)
def test_slots_follow_horovodrun_for_the_block_layout(needs_horovod):
    from horovod.runner.common.util.hosts import HostInfo, get_host_assignments

    for nodes, tasks in ((["a", "b"], [2, 2]), (["a", "b", "c"], [2, 1, 3]), (["a"], [4]), (["a", "b"], [1, 1])):
        expected = get_host_assignments([HostInfo(n, t) for n, t in zip(nodes, tasks)], sum(tasks))
        assert [tuple(s) for s in hvd_backend.slots(nodes, tasks)] == [
            (e.hostname, e.rank, e.local_rank, e.cross_rank, e.size, e.local_size, e.cross_size) for e in expected]


@pytest.mark.timeout(30)
def test_gloo_env_is_what_horovodrun_sets():
    (slot, _) = hvd_backend.slots(["n1"], [2])
    env = hvd_backend.gloo_env(slot, ("10.0.0.1", 23456), "ib0")
    assert env == {"HOROVOD_HOSTNAME": "n1", "HOROVOD_RANK": "0", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "0",
                   "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CROSS_RANK": "0", "HOROVOD_CROSS_SIZE": "1",
                   "HOROVOD_GLOO_RENDEZVOUS_ADDR": "10.0.0.1", "HOROVOD_GLOO_RENDEZVOUS_PORT": "23456",
                   "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "ib0"}
    assert hvd_backend.interface_of("127.0.0.1") == "lo"


@pytest.mark.timeout(30)
def test_srun_world_has_the_layout_and_may_use_horovod():
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "3",
           "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1",
           "SLURM_LOCALID": "0", "DISTRAIN_PORT": "25000"}
    world = detect(env, resolve=lambda nodes: ["127.0.0.1"] * len(nodes))
    assert (world.nodes, world.tasks_per_node, world.worker_addresses[0]) == (("n1", "n2"), (2, 1), "127.0.0.1:25000")
    assert choose_strategy("horovod", world, 0) == "horovod"
    assert choose_strategy("auto", world, 0) == "multi_worker"
    with pytest.raises(UsageError, match="horovodrun, mpirun or srun"):
        choose_strategy("horovod", World(launcher="tf_config", world_size=2), 0)


def _two_ranks(values, phases):
    """reduce_metrics as ranks 0 and 1 see it, with a sum over the two (each list is one rank's)."""
    sent = []
    for v, p in zip(values, phases):
        hvd_backend.reduce_metrics(v, p, lambda local: sent.append(local) or local)
    total = [a + b for a, b in zip(*sent)]
    return [hvd_backend.reduce_metrics(v, p, lambda local: total) for v, p in zip(values, phases)]


@pytest.mark.timeout(30)
def test_metrics_are_weighted_by_examples_not_by_rank():
    # Rank 0 saw 3 examples (2 right), rank 1 saw 1 (wrong): accuracy 2/4, not mean(2/3, 0).
    accs = [{"loss": (3.0, 3.0), "accuracy": (2.0, 3.0)}, {"loss": (4.0, 1.0), "accuracy": (0.0, 1.0)}]
    values = [{"loss": 1.0, "accuracy": 2 / 3, "lr": 0.1, "auc": 0.5},
              {"loss": 4.0, "accuracy": 0.0, "lr": 0.1, "auc": 0.9}]
    phases = [{k: (k, a) for k in ("loss", "accuracy", "auc")} for a in accs]
    out = _two_ranks(values, phases)
    assert out[0] == out[1]
    assert out[0]["accuracy"] == pytest.approx(0.5)
    assert out[0]["loss"] == pytest.approx(7.0 / 4)
    assert out[0]["auc"] == pytest.approx((0.5 * 3 + 0.9 * 1) / 4)  # no accumulators: weighted by examples
    assert out[0]["lr"] == 0.1  # not a metric: untouched


@pytest.mark.timeout(60)
def test_a_keras_3_optimizer_is_refused():
    import keras

    import distrain  # noqa: F401

    two_ranks = types.SimpleNamespace(size=lambda: 2)  # the only thing the constructor asks of hvd
    dist = hvd_backend.HorovodDistribution(World(launcher="horovod", world_size=2), two_ranks)
    with pytest.raises(TypeError, match="tf-keras optimizer, got keras"):
        dist.wrap_optimizer(keras.optimizers.SGD(0.1))
