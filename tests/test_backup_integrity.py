"""Backups that can be trusted on read, and a full disk.

A backup counts once its commit marker is written (after its files are on disk) and is verified on
read; a resume takes the newest backup that verifies and names in one line each one it skipped; a
run dir whose every backup is bad stops with exit 2 and one line; the user's checkpoints are
verified the same way. A write on a full disk (a real small tmpfs as the run dir, mounted here as
root) stops the run with exit 74 and one line, and leaves the previous backup usable.

In-process tests use a tiny Keras model; the runs (one process, digits, 8 steps) compare with one
uninterrupted run: a resume from an older backup ends bit for bit where it would have.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import distrain  # noqa: F401  (tf-keras for tf.keras)
import tensorflow as tf

from conftest import run_distrain, run_python, small_disk, write_job
from distrain.checkpoint import Backup, UserCheckpoints, WorkerFiles
from distrain.errors import EXIT_USAGE, EXIT_WRITE_FAILED, UsageError, WriteFailed
from distrain.rundir import RunDir

# ----------------------------------------------------------------------------- a small tmpfs (conftest: needs_tmpfs, small_disk)


def fill(disk: Path, leave: int = 0) -> Path:
    """Writes a filler file on ``disk`` until the next write of more than ``leave`` bytes fails."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(4096))
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


# ----------------------------------------------------------------------------- in process

def tiny_model():
    model = tf.keras.Sequential([tf.keras.Input((40,)), tf.keras.layers.Dense(200), tf.keras.layers.Dense(10)])
    optimizer = tf.keras.optimizers.SGD(0.1, momentum=0.9)
    model.compile(optimizer=optimizer, loss="mse")
    return model, optimizer


def backup_of(run_dir: RunDir, *, rank: int = 0):
    model, optimizer = tiny_model()
    return Backup(model, optimizer, run_dir, WorkerFiles(run_dir, rank, rank == 0)), model, optimizer


def save_at(backup: Backup, model, step: int) -> None:
    """A backup at ``step`` whose weights all equal ``step``: a restore tells which one it read."""
    model.set_weights([np.full(w.shape, float(step), np.float32) for w in model.get_weights()])
    backup.optimizer.iterations.assign(step)
    backup.save()


def restored(run_dir: RunDir) -> tuple[int, float]:
    """(step, weight value) a fresh Backup restores from ``run_dir``."""
    backup, model, _ = backup_of(run_dir)
    step = backup.restore()
    values = {float(v) for w in model.get_weights() for v in np.ravel(w)}
    return step, values.pop() if len(values) == 1 else float("nan")


def cut_short(path: Path) -> tuple[int, int]:
    """Truncates a file to half its size; returns (its size before, after)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return size, size // 2


def data_file(run_dir: RunDir, step: int) -> Path:
    return next(p for p in run_dir.backup_files(step) if ".data-" in p.name)


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    return RunDir(tmp_path / "run")


def test_a_backup_is_committed_last_rotated_after_and_verified(run_dir):
    backup, model, _ = backup_of(run_dir)
    for step in (10, 20, 30):
        save_at(backup, model, step)
    assert run_dir.committed_backups() == [20, 30]  # two kept; 10 removed only after 30 committed
    assert sorted(p.name for p in run_dir.backup.iterdir()) == [
        "checkpoint", "ckpt-20.commit", "ckpt-20.data-00000-of-00001", "ckpt-20.index",
        "ckpt-30.commit", "ckpt-30.data-00000-of-00001", "ckpt-30.index"]
    marker = json.loads(run_dir.backup_commit(30).read_text())
    assert marker["step"] == 30 and set(marker["files"]) == {"ckpt-30.index", "ckpt-30.data-00000-of-00001"}
    assert marker["files"]["ckpt-30.index"]["size"] == run_dir.backup_prefix(30).with_suffix(".index").stat().st_size
    # TensorFlow's own index names the newest committed backup.
    assert tf.train.latest_checkpoint(str(run_dir.backup)) == str(run_dir.backup_prefix(30))
    assert run_dir.verify_backup(30) is None and run_dir.backup_step() == 30
    assert restored(run_dir) == (30, 30.0)


def test_the_newest_backup_cut_short_is_skipped_in_one_line_and_removed(run_dir):
    backup, model, _ = backup_of(run_dir)
    for step in (10, 20):
        save_at(backup, model, step)
    written, left = cut_short(data_file(run_dir, 20))
    choice = run_dir.choose_backup()
    assert (choice.step, choice.stale) == (10, (20,))
    assert choice.skipped == ((20, f"ckpt-20.data-00000-of-00001 has {left} bytes, {written} were written (cut "
                                   "short or overwritten)"),)
    assert restored(run_dir) == (10, 10.0)
    # The chief removed the bad one: a new save of step 20 cannot meet it, and 10 stays one of two.
    assert run_dir.committed_backups() == [10] and not run_dir.backup_files(20)
    assert tf.train.latest_checkpoint(str(run_dir.backup)) == str(run_dir.backup_prefix(10))


def test_a_changed_byte_and_an_unfinished_save_are_skipped_too(run_dir):
    backup, model, _ = backup_of(run_dir)
    for step in (10, 20):
        save_at(backup, model, step)
    with open(data_file(run_dir, 20), "r+b") as f:  # same size, other bytes: only the checksum sees it
        f.seek(8)
        f.write(b"\xff\xfe")
    assert run_dir.choose_backup().skipped == ((20, "ckpt-20.data-00000-of-00001 does not match the checksum of "
                                                    "what was written (its bytes changed)"),)
    run_dir.remove_backup(20)
    # A save that died before its commit: files without a marker (and TensorFlow's temporary).
    (run_dir.backup / "ckpt-30_temp").mkdir()
    for name in ("ckpt-30.index", "ckpt-30.data-00000-of-00001"):
        (run_dir.backup / name).write_bytes(b"x")
    choice = run_dir.choose_backup()
    assert (choice.step, choice.skipped, choice.stale) == (
        10, ((30, "no commit marker: its save did not finish"),), (30,))


def test_every_backup_bad_is_one_usage_error_naming_each(run_dir):
    backup, model, _ = backup_of(run_dir)
    for step in (10, 20):
        save_at(backup, model, step)
    cut_short(data_file(run_dir, 20))
    run_dir.backup_commit(10).write_text("{not json")
    with pytest.raises(UsageError) as err:
        run_dir.choose_backup()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{run_dir.backup}: no backup verifies, so the run cannot resume: ckpt-20: "
                              "ckpt-20.data-00000-of-00001 has ")
    assert "; ckpt-10: its commit marker ckpt-10.commit cannot be read (" in message
    assert message.endswith(f"Restore the files, or move {run_dir.backup} away to start again from step 0")


def test_nothing_committed_starts_from_step_0(run_dir):
    run_dir.backup.mkdir(parents=True)
    (run_dir.backup / "ckpt-5.data-00000-of-00001").write_bytes(b"partial")
    choice = run_dir.choose_backup()
    assert (choice.step, choice.prefix, choice.stale) == (0, None, (5,))
    assert restored(run_dir)[0] == 0
    assert list(run_dir.backup.iterdir()) == []


def test_a_backup_from_before_commit_markers_is_restored_unverified_or_refused_in_one_line(run_dir):
    model, optimizer = tiny_model()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=optimizer), str(run_dir.backup),
                                         max_to_keep=2, checkpoint_name=RunDir.BACKUP_PREFIX)
    for step in (10, 20):  # what distrain wrote before commit markers
        model.set_weights([np.full(w.shape, float(step), np.float32) for w in model.get_weights()])
        optimizer.iterations.assign(step)
        manager.save(checkpoint_number=step)
    choice = run_dir.choose_backup()
    assert (choice.step, choice.verified, choice.stale) == (20, False, ())
    assert restored(run_dir) == (20, 20.0)
    cut_short(data_file(run_dir, 20))
    with pytest.raises(UsageError) as err:
        restored(run_dir)
    assert str(err.value) == (
        f"{run_dir.backup_prefix(20)}: cannot be restored (IndexError: Read less bytes than requested); it was written "
        f"before commit markers, unverified, and may be cut short: remove {run_dir.backup_prefix(20)}.* to resume from "
        f"an older backup, or move {run_dir.backup} away to start again from step 0")


def test_a_non_chief_worker_saves_alike_but_leaves_nothing(run_dir):
    backup, model, _ = backup_of(run_dir, rank=1)
    save_at(backup, model, 10)
    assert not run_dir.backup.exists() and not any(run_dir.scratch(1).iterdir())


# ----------------------------------------------------------------------------- the user's checkpoints

def user_checkpoints(run_dir: RunDir, model, rank: int = 0) -> UserCheckpoints:
    return UserCheckpoints(model, run_dir, WorkerFiles(run_dir, rank, rank == 0), keep=3, monitor="val_loss",
                           mode="auto")


def test_user_checkpoints_are_verified_on_resume(run_dir, caplog):
    model, _ = tiny_model()
    first = user_checkpoints(run_dir, model)
    for epoch in (1, 2, 3):
        first.save_periodic(f"epoch-{epoch:04d}")
    assert first.consider_best({"val_loss": 0.5}, epoch=3, step=30)
    meta = json.loads(run_dir.best_meta.read_text())
    assert meta["weights"]["size"] == run_dir.best_weights.stat().st_size

    cut_short(run_dir.checkpoint_weights("epoch-0002"))
    run_dir.checkpoint_index.write_text('{"kept": ["epoch-0001", "epo')  # cut short too
    with caplog.at_level("WARNING", logger="distrain"):
        resumed = user_checkpoints(run_dir, model)
    # index.json unreadable: the files present are taken, each verified; the best comes from best.json.
    assert (resumed.kept, resumed.best) == (["epoch-0001", "epoch-0003"], 0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(f"{run_dir.checkpoint_index}: skipped: cannot be read (")
    assert lines[1].startswith(f"{run_dir.checkpoint_weights('epoch-0002')}: skipped: HDF5 cannot read it whole (")
    assert lines[1].endswith("; it is removed and left out of the kept checkpoints") and len(lines) == 2
    assert not run_dir.checkpoint_weights("epoch-0002").exists()

    # best.json that does not describe best.weights.h5: index.json's value stands.
    resumed.save_periodic("epoch-0004")  # index.json rewritten: best 0.5
    run_dir.best_meta.write_text(json.dumps({**meta, "value": 0.1, "weights": {"size": 1, "crc32": 0}}))
    assert user_checkpoints(run_dir, model).best == 0.5
    # best.weights.h5 cut short: no best to beat; the chief removes both files.
    cut_short(run_dir.best_weights)
    assert user_checkpoints(run_dir, model).best is None
    assert not run_dir.best_weights.exists() and not run_dir.best_meta.exists()


# ----------------------------------------------------------------------------- a full disk, in process

@pytest.mark.timeout(120)
def test_a_backup_on_a_full_disk_stops_in_one_line_and_keeps_the_previous_one(tmp_path, needs_tmpfs):
    with small_disk(tmp_path / "disk", "512k") as disk:
        run_dir = RunDir(disk / "run")
        backup, model, _ = backup_of(run_dir)
        save_at(backup, model, 10)
        checkpoints = user_checkpoints(run_dir, model)
        checkpoints.save_periodic("epoch-0001")
        fill(disk)
        with pytest.raises(WriteFailed) as err:
            save_at(backup, model, 20)
        assert err.value.exit_code == EXIT_WRITE_FAILED == 74
        assert str(err.value) == (
            f"{run_dir.backup_prefix(20)}: backup of step 20 not written: No space left on device (ENOSPC); nothing "
            "of it counts and the backup of step 10 is intact and a rerun resumes from it. Free space on the run "
            "dir's file system (or raise the quota, or repair the disk), then run again with the same run dir")
        assert isinstance(err.value.__cause__, tf.errors.ResourceExhaustedError)
        # Nothing of step 20 is left, not even TensorFlow's temporary directory; 10 verifies.
        assert sorted(p.name for p in run_dir.backup.iterdir()) == [
            "checkpoint", "ckpt-10.commit", "ckpt-10.data-00000-of-00001", "ckpt-10.index"]
        assert run_dir.choose_backup().skipped == () and restored(run_dir) == (10, 10.0)

        with pytest.raises(WriteFailed) as err:
            checkpoints.save_periodic("epoch-0002")
        path = run_dir.checkpoint_weights("epoch-0002")
        assert str(err.value).startswith(f"{path}: not written: No space left on device (ENOSPC); {path.name} as it "
                                         "was before is unchanged. Free space")
        assert sorted(p.name for p in run_dir.checkpoints.iterdir()) == ["epoch-0001.weights.h5", "index.json"]
        assert user_checkpoints(run_dir, model).kept == ["epoch-0001"]


def test_write_failure_reasons():
    from distrain.errors import write_failure

    assert write_failure(OSError(errno.EDQUOT, "Disk quota exceeded")) == "Disk quota exceeded (EDQUOT)"
    assert write_failure(tf.errors.UnknownError(None, None, "/r/x; Input/output error")) == "Input/output error (EIO)"
    assert write_failure(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")) is None


# ----------------------------------------------------------------------------- whole runs

# 8 steps (2 epochs of 4), a backup every 3 steps and at epoch ends: 3, 4, 6, 8 (two kept).
JOB = """
name: integrity
seed: 11
model: {name: mlp, params: {dropout: 0.0}}
data: {source: digits, batch_size_per_replica: 16}
train: {epochs: 2, steps_per_epoch: 4, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none}
checkpoint: {every_epochs: 1, keep: 2, backup_every_steps: 3}
logging: {tensorboard: false, verbose: 0}
"""
STEPS = 8

# `distrain train JOB --run-dir RUN_DIR` that, after global step AT, either kills its own process
# (SIGKILL: no handler, no backup; the newest backup is then step 6) or fills the run dir's disk but
# for 12 KiB, so that the backup of step 6 (about 80 KB) finds no room.
STOP_AT = """
import contextlib, os, signal, sys
from pathlib import Path
import distrain
import tensorflow as tf
from distrain import cli

job, run_dir, at, how = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

class Stop(tf.keras.callbacks.Callback):
    steps = 0
    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps != at:
            return
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        with open(run_dir / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(4096))
        os.truncate(run_dir / "filler", os.path.getsize(run_dir / "filler") - 12 * 1024)

real_train = cli.train
cli.train = lambda spec, run_dir, **kwargs: real_train(spec, run_dir, extra_callbacks=[Stop()], **kwargs)
sys.exit(cli.main(["train", job, "--run-dir", str(run_dir)]))
"""


def stopped_run(tmp_path: Path, run_dir: Path, how: str, at: int = 5) -> subprocess.CompletedProcess:
    job_file = write_job(tmp_path / "job.yaml", JOB)
    return run_python(STOP_AT, [str(job_file), str(run_dir), str(at), how], timeout=300)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = run_distrain(["train", str(write_job(tmp / "job.yaml", JOB)), "--run-dir", str(tmp / "run")], timeout=300,
                          forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(tmp / "run")["steps"] == STEPS
    return tmp / "run"


def assert_ends_exact(run_dir: Path, uninterrupted: Path, resumed_from: int) -> None:
    """The resumed run ends at the planned step with the uninterrupted run's test loss, bit for bit."""
    done, reference = summary(run_dir), summary(uninterrupted)
    assert (done["steps"], done["resumed_from_step"]) == (STEPS, resumed_from)
    assert done["test"]["loss"] == reference["test"]["loss"]
    assert done["test"]["accuracy"] == reference["test"]["accuracy"]


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_a_torn_newest_backup_resumes_from_the_previous_one_and_ends_exact(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    killed = stopped_run(tmp_path, run_dir, "kill", at=7)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert RunDir(run_dir).committed_backups() == [4, 6]
    torn = data_file(RunDir(run_dir), 6)
    written, left = cut_short(torn)  # what a node crash leaves of a file still in the page cache

    result = run_distrain(["train", "--resume", str(run_dir)], timeout=300, forked=True)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].endswith(
        f"{run_dir}/backup/ckpt-6: skipped: {torn.name} has {left} bytes, {written} were written (cut short or "
        "overwritten); resuming from ckpt-4 (step 4)"), result.stderr[-3000:]
    assert_ends_exact(run_dir, uninterrupted, resumed_from=4)
    assert RunDir(run_dir).committed_backups() == [6, 8] and RunDir(run_dir).backup_step() == STEPS


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_run_dir_whose_every_backup_is_bad_stops_with_exit_2_and_one_line(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "summary.json").unlink()
    for step in RunDir(run_dir).committed_backups():
        cut_short(data_file(RunDir(run_dir), step))
    result = run_distrain(["train", "--resume", str(run_dir)], timeout=300, forked=True)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"distrain: error: {run_dir}/backup: no backup verifies, so the run cannot resume: ckpt-8: "
                           "ckpt-8.data-00000-of-00001 has "), result.stderr[-3000:]
    assert "; ckpt-6: ckpt-6.data-00000-of-00001 has " in last


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_a_full_disk_stops_with_exit_74_keeps_the_previous_backup_and_the_resume_ends_exact(tmp_path, uninterrupted,
                                                                                            needs_tmpfs):
    with small_disk(tmp_path / "disk", "2m") as disk:
        run_dir = disk / "run"
        run_dir.mkdir()
        full = stopped_run(tmp_path, run_dir, "fill", at=5)
        assert full.returncode == EXIT_WRITE_FAILED, full.stderr[-3000:]
        assert "Traceback" not in full.stderr
        assert full.stderr.strip().splitlines()[-1] == (
            f"distrain: {run_dir}/backup/ckpt-6: backup of step 6 not written: No space left on device (ENOSPC); "
            "nothing of it counts and the backup of step 4 is intact and a rerun resumes from it. Free space on the "
            "run dir's file system (or raise the quota, or repair the disk), then run again with the same run dir")
        backups = RunDir(run_dir)
        assert backups.committed_backups() == [3, 4] and backups.choose_backup().skipped == ()
        assert not [p.name for p in backups.backup.iterdir() if p.name.startswith("ckpt-6")]

        (run_dir / "filler").unlink()
        result = run_distrain(["train", "--resume", str(run_dir)], timeout=300, forked=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_ends_exact(run_dir, uninterrupted, resumed_from=4)
