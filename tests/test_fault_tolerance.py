"""Failure, preemption and stopping with real worker processes: exact resume after a SIGKILL,
SIGUSR1 preemption, early stopping agreed across workers, a dead peer fails fast, NaN ends the
run, and no two processes ever write the same path."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (DISTRAIN, backup_step, files_written, free_ports, run_distrain, tf_config, worker_env,
                      write_job)
from distrain.errors import EXIT_NAN, EXIT_PEER_LOST, EXIT_PREEMPTED

pytestmark = pytest.mark.multiprocess

# 1150 training digits, 8 per replica x 2 workers: 71 steps/epoch, 284 steps in all.
JOB = """
name: faults
seed: 3
model: {{name: cnn, params: {{filters: 16}}}}
data: {{source: digits, batch_size_per_replica: {per_replica}}}
train: {{epochs: {epochs}, optimizer: adam, learning_rate: 0.002, reference_batch: 16{train_extra}}}
distribute: {{strategy: {strategy}, collective_timeout_s: {timeout}{distribute_extra}}}
checkpoint: {{every_epochs: 1, keep: 2, backup_every_steps: 10}}
logging: {{tensorboard: false, verbose: 0}}
"""


def job(tmp_path, *, per_replica=8, epochs=4, strategy="multi_worker", timeout=20, train_extra="", distribute_extra="",
        name="job.yaml"):
    return write_job(tmp_path / name, JOB.format(per_replica=per_replica, epochs=epochs, strategy=strategy,
                                                 timeout=timeout, train_extra=train_extra,
                                                 distribute_extra=distribute_extra))


def start_pair(workers_factory, job_file, run_dir, ports=None, log_dir=None, python_code=None):
    ports = ports or free_ports(2)
    if python_code:
        cmd = [sys.executable, "-c", python_code, str(job_file), str(run_dir)]
    else:
        cmd = [*DISTRAIN, "train", str(job_file), "--run-dir", str(run_dir)]
    return workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)], log_dir)


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def assert_checkpoints_load(run_dir):
    """Every checkpoint file left behind is complete: the backup restores, every .h5 loads."""
    import distrain  # noqa: F401
    import tensorflow as tf

    from distrain.models import build_model

    reader = tf.train.load_checkpoint(str(run_dir / "backup"))
    assert reader.get_variable_to_shape_map()
    for weights in sorted((run_dir / "checkpoints").glob("*.weights.h5")):
        model = build_model("cnn", (8, 8, 1), 10, filters=16)
        model.load_weights(str(weights))
    assert not list(run_dir.rglob(".tmp*")), "a temporary file was left behind"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    from conftest import Workers

    ports = free_ports(2)
    w = Workers([[*DISTRAIN, "train", str(job(tmp)), "--run-dir", str(tmp / "run")]] * 2,
                [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)], tmp / "logs")
    request.addfinalizer(w.kill)
    assert w.wait(timeout=240) == [0, 0], w.output()
    return summary(tmp / "run")


@pytest.mark.timeout(420)
def test_sigkill_mid_epoch_then_restart_completes_with_exact_steps(tmp_path, workers_factory, uninterrupted):
    run_dir = tmp_path / "run"
    first = start_pair(workers_factory, job(tmp_path), run_dir, log_dir=tmp_path / "logs1")
    wait_for(lambda: backup_step(run_dir) >= 90, 180, "a backup past the first epoch")
    os.kill(first.procs[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    codes = first.wait(timeout=90)
    # The survivor notices the lost peer within the collective timeout (20 s) plus slack.
    assert codes[1] == -signal.SIGKILL
    assert codes[0] == EXIT_PEER_LOST, first.output()
    assert time.monotonic() - killed_at < 60
    assert "lost" in first.logs[0].read_text()
    resumed_from = backup_step(run_dir)
    assert 0 < resumed_from < 284

    second = start_pair(workers_factory, job(tmp_path), run_dir, log_dir=tmp_path / "logs2")
    assert second.wait(timeout=240) == [0, 0], second.output()
    result = summary(run_dir)
    assert result["steps"] == uninterrupted["steps"] == 284
    assert result["resumed_from_step"] == resumed_from
    assert result["epochs_completed"] == 4
    # Within noise of the uninterrupted run (same data, same steps; only the interruption differs).
    assert abs(result["test"]["accuracy"] - uninterrupted["test"]["accuracy"]) < 0.05
    assert result["test"]["accuracy"] > 0.85
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history] == [1, 2, 3, 4]
    assert_checkpoints_load(run_dir)


@pytest.mark.timeout(420)
def test_sigusr1_preemption_writes_backup_exits_75_and_resumes(tmp_path, workers_factory, uninterrupted):
    # Agreed once per epoch (71 steps), so the stop falls on an epoch's last step: the epoch's end
    # (validation, its row) comes before the backup the rerun resumes from, or the row is lost.
    run_dir = tmp_path / "run"
    job_file = job(tmp_path, distribute_extra=", preemption_check_every: 71")
    first = start_pair(workers_factory, job_file, run_dir, log_dir=tmp_path / "logs1")
    wait_for(lambda: backup_step(run_dir) >= 30, 180, "the first backups")
    for p in first.procs:
        os.kill(p.pid, signal.SIGUSR1)  # what SLURM's --signal=USR1@90 sends to every task
    assert first.wait(timeout=90) == [EXIT_PREEMPTED, EXIT_PREEMPTED], first.output()
    stopped_at = backup_step(run_dir)
    log0 = first.logs[0].read_text()
    m = re.search(r"preempted \(SIGUSR1\) at step (\d+)", log0)
    assert m, log0[-2000:]
    assert int(m.group(1)) == stopped_at, "the backup is of the step where the workers agreed to stop"
    assert f"at step {stopped_at}" in first.logs[1].read_text(), "both workers stopped at the same step"
    assert stopped_at in (71, 142, 213)
    rows = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in rows] == list(range(1, stopped_at // 71 + 1))

    second = start_pair(workers_factory, job_file, run_dir, log_dir=tmp_path / "logs2")
    assert second.wait(timeout=240) == [0, 0], second.output()
    result = summary(run_dir)
    assert result["resumed_from_step"] == stopped_at
    assert result["steps"] == uninterrupted["steps"] == 284
    assert [e["epoch"] for e in json.loads((run_dir / "history.json").read_text())] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):  # stopped at an epoch's end: every row exact
        assert result["history"][key] == uninterrupted["history"][key], key
    assert_checkpoints_load(run_dir)


STOP_ON_RANK1 = """
import sys
from pathlib import Path
import distrain
import tensorflow as tf
from distrain.spec import load_spec
from distrain.run import train

class StopOnRank1(tf.keras.callbacks.Callback):
    # Only worker 1 wants to stop (as if its local data had converged) at the end of epoch 2.
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1 and int(__import__('json').loads(__import__('os').environ['TF_CONFIG'])['task']['index']) == 1:
            self.model.stop_training = True

result = train(load_spec(sys.argv[1]), Path(sys.argv[2]), extra_callbacks=[StopOnRank1()])
print("EPOCHS_COMPLETED", result["epochs_completed"], "STEPS", result["steps"])
"""


@pytest.mark.timeout(300)
def test_a_stop_decided_on_one_worker_stops_every_worker_at_the_same_epoch(tmp_path, workers_factory):
    run_dir = tmp_path / "run"
    pair = start_pair(workers_factory, job(tmp_path, epochs=5, per_replica=32), run_dir, python_code=STOP_ON_RANK1)
    # Without agreement worker 0 would start epoch 3 alone and hang in its first collective.
    assert pair.wait(timeout=180) == [0, 0], pair.output()
    for log in pair.logs:
        assert "EPOCHS_COMPLETED 2 STEPS 34" in log.read_text()


@pytest.mark.timeout(300)
def test_early_stopping_from_the_job_spec_stops_both_workers(tmp_path, workers_factory):
    run_dir = tmp_path / "run"
    extra = ", early_stopping: {monitor: val_loss, patience: 0, min_delta: 10.0}"
    pair = start_pair(workers_factory, job(tmp_path, epochs=6, per_replica=32, train_extra=extra), run_dir)
    assert pair.wait(timeout=180) == [0, 0], pair.output()
    assert summary(run_dir)["epochs_completed"] == 2  # no epoch improves val_loss by 10


@pytest.mark.timeout(300)
def test_dead_peer_makes_the_survivor_exit_within_the_timeout(tmp_path, workers_factory):
    run_dir = tmp_path / "run"
    pair = start_pair(workers_factory, job(tmp_path, epochs=50, timeout=10), run_dir)
    wait_for(lambda: backup_step(run_dir) >= 20, 180, "training to start")
    pair.procs[0].send_signal(signal.SIGKILL)  # the chief dies; the worker must not wait forever
    killed = time.monotonic()
    pair.procs[1].wait(timeout=120)
    elapsed = time.monotonic() - killed
    assert pair.procs[1].returncode == EXIT_PEER_LOST, pair.output()
    assert elapsed < 10 + 30, f"survivor took {elapsed:.0f}s to give up"
    out = pair.logs[1].read_text()
    assert re.search(r"lost (worker 0 \(127\.0\.0\.1:\d+\)|a peer)", out), out[-2000:]


NAN_JOB = """
name: nan
model: {name: mlp, params: {dropout: 0.0}}
data: {source: digits, batch_size_per_replica: 32, rescale: 1.0e+30}
train: {epochs: 3, optimizer: sgd, learning_rate: 1.0e+10}
checkpoint: {every_epochs: 1, backup_every_steps: 5}
logging: {tensorboard: false, verbose: 0}
"""


@pytest.mark.timeout(120)
def test_nan_loss_ends_the_run_with_exit_77_and_a_clear_message(tmp_path):
    job_file = write_job(tmp_path / "nan.yaml", NAN_JOB)
    result = run_distrain(["train", str(job_file), "--run-dir", str(tmp_path / "run")], timeout=120, forked=True)
    assert result.returncode == EXIT_NAN, result.stderr[-2000:]
    assert re.search(r"the loss became (nan|inf) at step \d+", result.stderr)
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.timeout(300)
def test_no_two_processes_write_the_same_path(tmp_path, workers_factory):
    if subprocess.run(["strace", "-V"], capture_output=True).returncode != 0:
        pytest.fail("strace is needed (scripts/test.sh installs it)")
    run_dir = tmp_path / "run"
    job_file = job(tmp_path, epochs=2, per_replica=32)
    ports = free_ports(2)
    # --seccomp-bpf: only the traced calls stop the workers (without it every call does: seconds slower).
    cmds = [["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=open,openat,rename,renameat,renameat2", "-o",
             str(tmp_path / f"trace{i}"), *DISTRAIN, "train", str(job_file), "--run-dir", str(run_dir)] for i in range(2)]
    pair = workers_factory(cmds, [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)])
    assert pair.wait(timeout=240) == [0, 0], pair.output()
    chief, worker = (files_written(tmp_path / f"trace{i}", under=run_dir) for i in range(2))
    assert chief and worker
    assert not chief & worker, f"both processes wrote {sorted(chief & worker)}"
    # The worker wrote only its log and its own scratch dir, which is gone.
    assert all(p == "logs/rank1.log" or p.startswith(".workertemp/rank1/") for p in worker), sorted(worker)
    assert not (run_dir / ".workertemp").exists()
    assert {"summary.json", "model.keras", "history.json", "job.yaml"} <= {p.name for p in run_dir.iterdir()}
