"""The run dir's layout lives in RunDir; the shell launcher, report and Ray agree with it."""
import datetime
import os
import re
from pathlib import Path

import pytest

from conftest import REPO
from distrain.errors import UsageError
from distrain.rundir import RunDir, replacing, write_atomically


def test_paths():
    run = RunDir("/runs/cnn/slurm-7")
    assert run.job == run.root / "job.yaml" and run.summary == run.root / "summary.json"
    assert run.history.name == "history.json" and run.history_csv.name == "history.csv"
    assert run.backup_index == run.root / "backup" / "checkpoint"
    assert run.tensorboard == run.root / "tensorboard" and run.log_file(3) == run.root / "logs" / "rank3.log"
    assert run.scratch(2) == run.root / ".workertemp" / "rank2"
    assert os.fspath(run) == "/runs/cnn/slurm-7" and run == RunDir("/runs/cnn/slurm-7")


def fake_backup(run: RunDir, step: int, *, commit: bool = True) -> None:
    """The files of a backup at ``step`` (what TensorFlow writes), committed unless told otherwise."""
    run.backup.mkdir(parents=True, exist_ok=True)
    for suffix in (".index", ".data-00000-of-00001"):
        run.backup_prefix(step).with_name(f"ckpt-{step}{suffix}").write_bytes(bytes(range(step % 256)) * 3)
    if commit:
        run.commit_backup(step)


def test_backup_step_is_the_newest_committed_backup(tmp_path):
    run = RunDir(tmp_path)
    assert run.backup_step() == 0 and not run.has_backup()
    fake_backup(run, 100)
    fake_backup(run, 120)
    fake_backup(run, 130, commit=False)  # a save that did not finish does not count
    assert run.backup_step() == 120 and run.has_backup()


def test_backup_step_of_a_backup_from_before_commit_markers_reads_the_index(tmp_path):
    run = RunDir(tmp_path)
    fake_backup(run, 120, commit=False)
    run.backup_index.write_text('model_checkpoint_path: "ckpt-120"\nall_model_checkpoint_paths: "ckpt-100"\n'
                                'all_model_checkpoint_paths: "ckpt-120"\n')
    assert run.backup_step() == 120 and not run.choose_backup().verified


def test_write_atomically_replaces_and_never_leaves_a_temporary(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    write_atomically(target, "one")
    write_atomically(target, "two", mode=0o640)
    assert target.read_text() == "two" and (target.stat().st_mode & 0o777) == 0o640
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["summary.json"]


def test_replacing_keeps_the_suffix(tmp_path):
    with replacing(RunDir(tmp_path).model) as tmp:
        assert tmp.suffix == ".keras" and tmp.parent == tmp_path
        tmp.write_text("model")
    assert RunDir(tmp_path).model.read_text() == "model"


def test_shell_launcher_paths_are_run_dir_paths():
    """Every ``$run_dir/<path>`` of slurm/distrain-launch.sh is a path RunDir defines."""
    script = (REPO / "slurm" / "distrain-launch.sh").read_text()
    used = set(re.findall(r"\$run_dir/([\w./-]+)", script))
    assert used, "the launcher names no run-dir path any more: update this test"
    run = RunDir("/r")
    known = {str(p.relative_to(run.root)) for p in (
        run.job, run.summary, run.history, run.history_csv, run.curves, run.model, run.checkpoints,
        run.backup, run.backup_index, run.tensorboard, run.logs, run.scratch_root)}
    assert used <= known, f"paths the shell launcher uses that RunDir does not define: {used - known}"


def _run_dir_names() -> list[str]:
    """Every file and directory name RunDir owns (its string class attributes)."""
    return sorted({v for k, v in vars(RunDir).items() if k.isupper() and isinstance(v, str)})


def test_no_run_dir_name_is_a_literal_outside_rundir():
    """distrain/ and benchmarks/ name run-dir files through RunDir. A name with a dot (``summary.json``,
    ``.weights.h5``) may not end a string literal (``"summary.json"``, ``f"{name}.weights.h5"``); a bare
    word (``backup``, ``train``, also a split's name) may not be a path component: ``/ "backup"``,
    ``"backup/..."`` or ``".../backup"``."""
    names = _run_dir_names()
    assert {"index.json", "best.json", ".weights.h5", "ckpt", "checkpoint", "segments.json"} <= set(names)
    dotted = [n for n in names if "." in n]
    words = [n for n in names if "." not in n]
    alternatives = "|".join(map(re.escape, words))
    path_use = re.compile(r"""/\s*f?["'](%s)["'/]|["'](%s)/|/(%s)["']""" % ((alternatives,) * 3))
    dotted_use = re.compile(r"""(?<!["'])["'](?:[^"'\s]*[/}])?(%s)["']""" % "|".join(map(re.escape, dotted)))
    offenders = []
    for path in [*(REPO / "distrain").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]:
        if path.name == "rundir.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if dotted_use.search(code) or path_use.search(code):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_training_run_dir_is_the_one_every_worker_computes():
    now = datetime.datetime(2026, 12, 4, 1, 2, 3)
    assert RunDir.for_training("runs", "cnn", run_dir="/given", world_size=4, env={}) == Path("/given")
    assert RunDir.for_training("runs", "cnn", run_id="a", env={"DISTRAIN_RUN_ID": "b"}) == Path("runs/cnn/a")
    assert RunDir.for_training("out", "cnn", world_size=2, env={"DISTRAIN_RUN_ID": "b", "SLURM_JOB_ID": "7"}) == \
        Path("out/cnn/b")
    assert RunDir.for_training("runs", "cnn", world_size=2, env={"SLURM_JOB_ID": "7"}) == Path("runs/cnn/slurm-7")
    assert RunDir.for_training("runs", "cnn", env={}, now=now) == Path("runs/cnn/20261204-010203")
    with pytest.raises(UsageError, match="--run-dir: required with several workers outside SLURM"):
        RunDir.for_training("runs", "cnn", world_size=2, env={}, now=now)


def test_a_benchmark_run_dir_is_shared_by_its_workers_and_never_holds_a_backup(tmp_path):
    with pytest.raises(UsageError, match="--run-dir: required with several workers outside SLURM"):
        RunDir.for_bench("runs", "b", world_size=2, env={})
    assert RunDir.for_bench("runs", "b", world_size=2, env={"DISTRAIN_SECRET_FILE": "/s"}) is None
    assert RunDir.for_bench("runs", "b", world_size=1, env={}) is None
    assert RunDir.for_bench("runs", "b", world_size=2, env={"SLURM_JOB_ID": "81", "SLURM_STEP_ID": "2"}) == \
        Path("runs/b/bench-slurm-81.2")
    used = tmp_path / "used"
    (used / "backup").mkdir(parents=True)
    (used / "backup" / "checkpoint").write_text('model_checkpoint_path: "ckpt-8"\n')
    with pytest.raises(UsageError, match="holds a run's backup"):
        RunDir.for_bench("runs", "b", run_dir=used, world_size=2, env={})


def test_the_slurm_launcher_and_ray_run_dirs():
    env = {"SLURM_JOB_ID": "812"}
    assert RunDir.for_slurm_launcher("runs", "cnn", bench=False, env=env, cwd="/home/u") == \
        Path("/home/u/runs/cnn/slurm-812")
    assert RunDir.for_slurm_launcher("/scratch", "cnn", bench=True, env=env) == Path("/scratch/cnn/bench-slurm-812")
    assert RunDir.for_slurm_launcher("runs", "cnn", bench=False, env={**env, "DISTRAIN_RUN_DIR": "r/x"},
                                     cwd="/w") == Path("/w/r/x")
    assert RunDir.for_ray("/storage/cnn-a") == Path("/storage/cnn-a/run")
