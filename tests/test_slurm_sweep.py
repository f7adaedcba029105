"""A sweep as a SLURM job array: ``distrain slurm render --sweep`` (golden file, MaxArraySize, bad
input), the launcher's sweep path with a fake ``srun``, and one real job array on the local 2-node
SLURM that every test after it reads: 4 trials of a tiny quickstart, 2 at once; trial 1 is preempted
with SIGUSR1 while it trains (its task alone is requeued and resumes the trial), then the same
script is submitted again (it trains nothing).

Run: cluster/slurm-local.sh install   (once, as root)
     .venv/bin/python -m pytest tests/test_slurm_sweep.py -q
After a deliberate change of the rendered text:
     DISTRAIN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_slurm_sweep.py -k golden
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from conftest import REPO, backup_step, run_distrain

from distrain import startup
from distrain.cli import build_parser, main
from distrain.errors import EXIT_NAN, EXIT_USAGE, UsageError
from distrain.launch.slurm import (array_spec, check_array_size, parse_max_array_size, render_from_args, render_sbatch,
                                   trial_sets)
from distrain.rundir import RunDir
from distrain.sweeps import state as sweep_state
from distrain.sweeps.plan import plan

GOLDEN = Path(__file__).parent / "golden" / "sweep"
UPDATE = bool(os.environ.get("DISTRAIN_UPDATE_GOLDEN"))
VENV_DISTRAIN = str(Path(sys.executable).with_name("distrain"))
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
STEPS = 6  # per epoch
# Tiny trials that back up every 2 steps and stop at the next step when preempted.
SETS = [f"train.steps_per_epoch={STEPS}", "model.params.filters=4", "logging.verbose=0", "checkpoint.every_epochs=0",
        "checkpoint.backup_every_steps=2", "distribute.preemption_check_every=1"]
# Trials 0-3: (0.002, 2 epochs), (0.002, 8), (0.01, 2), (0.01, 8). Trial 1, long, is preempted.
GRID = ["train.learning_rate=0.002,0.01", "train.epochs=2,8"]
PREEMPTED = 1
TASK_ENV = {"TF_NUM_INTRAOP_THREADS": 1, "TF_NUM_INTEROP_THREADS": 1, "TF_CPP_MIN_LOG_LEVEL": 3,
            "CUDA_VISIBLE_DEVICES": -1}



def render(argv: list[str]) -> str:
    """``distrain slurm render ARGV`` through the real parser (no scontrol asked, nothing written)."""
    return render_from_args(build_parser().parse_args(["slurm", "render", *argv]))


def _sets(sets) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _grid() -> list[str]:
    return [a for g in GRID for a in ("--grid", g)]


# --------------------------------------------------------------------------------------------
# render (no SLURM needed)
# --------------------------------------------------------------------------------------------

GOLDEN_CASE = ["jobs/quickstart.yaml", "--nodes", "2", "--gpus-per-node", "4", "--time", "02:00:00", "--sweep",
               "runs/lr-sweep", "--grid", "train.learning_rate=0.001,0.003,0.01", "--grid", "model.params.filters=16,32",
               "--set", "train.epochs=3", "--parallel", "2", "--max-array-size", "1001"]


@pytest.mark.timeout(60)
def test_sweep_render_matches_golden_file(monkeypatch):
    monkeypatch.chdir(REPO)  # the job path, and the launcher found beside the script, as in the checkout
    text = render(GOLDEN_CASE)
    path = GOLDEN / "lr-sweep-two-nodes.sh"
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; create it with DISTRAIN_UPDATE_GOLDEN=1"
    assert text == path.read_text(), "render changed; if intended: DISTRAIN_UPDATE_GOLDEN=1 pytest -k golden"
    assert sorted(p.name for p in GOLDEN.iterdir()) == [path.name]


@pytest.mark.timeout(60)
def test_sweep_render_is_an_array_of_whole_runs(needs_shellcheck, monkeypatch):
    monkeypatch.chdir(REPO)
    text = (GOLDEN / "lr-sweep-two-nodes.sh").read_text()
    sbatch = re.findall(r"^#SBATCH (\S+)$", text, re.MULTILINE)
    assert sbatch[:4] == ["--job-name=quickstart", "--array=0-5%2", "--nodes=2", "--ntasks-per-node=1"]
    assert "--output=slurm-%x-%A_%a.out" in sbatch and "--requeue" in sbatch and "--signal=USR1@90" in sbatch
    assert "6 trials as a job array (2 at once); each trial 2 nodes x 1 task, 4 GPUs per node, strategy " \
           "multi_worker (auto)" in text
    assert "#     trial-005  train.learning_rate=0.01 model.params.filters=32\n" in text
    assert "#   sbatch --array=1,3 SCRIPT " in text and "# MaxArraySize: 1001; 6 trials (array indices 0-5) fit." in text
    settings = text.split("\nJOB=", 1)[1]
    assert "\nSWEEP=runs/lr-sweep " in settings and "\nTRIALS= " in settings and "RUNS_DIR" not in settings
    assert "\nGRID=('train.learning_rate=0.001,0.003,0.01' 'model.params.filters=16,32') " in settings
    assert subprocess.run(["bash", "-n", "-c", text], capture_output=True).returncode == 0
    done = subprocess.run(["shellcheck", "-x", "-P", str(REPO), "-s", "bash", "-"], input=text, capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout
    # Without --max-array-size and without a cluster, the header says it was not checked.
    unchecked = render(GOLDEN_CASE[:-2])
    assert "# MaxArraySize: not checked (no cluster to ask when rendered); 6 trials need it above 5" in unchecked
    # The plain render of the same layout is untouched by the sweep's options.
    plain = render(GOLDEN_CASE[:GOLDEN_CASE.index("--sweep")])
    assert "--array" not in plain and "#SBATCH --output=slurm-%x-%j.out" in plain and "SWEEP=" not in plain


@pytest.mark.timeout(60)
def test_array_spec_and_max_array_size():
    assert [array_spec(1, None), array_spec(4, None), array_spec(8, 3)] == ["0", "0-3", "0-7%3"]
    check_array_size(1001, 1001)  # indices 0-1000 are below 1001
    check_array_size(5000, None)  # not known: not checked
    with pytest.raises(UsageError, match=r"^--sweep/--trials: 1002 trials need array indices 0-1001, but the "
                                         r"cluster's MaxArraySize is 1001 \(array indices must be below 1001\): "
                                         r"raise MaxArraySize in slurm.conf"):
        check_array_size(1002, 1001)
    with pytest.raises(UsageError, match=r"MaxArraySize is 0 \(job arrays are disabled\)"):
        check_array_size(1, 0)
    config = "MailType                = (null)\nMaxArraySize            = 1001\nMaxBatchRequeue         = 5\n"
    assert parse_max_array_size(config) == 1001 and parse_max_array_size("MaxJobCount = 10000\n") is None


@pytest.mark.timeout(60)
def test_more_trials_than_max_array_size_render_nothing():
    """The pure render refuses them; so does ``cmd_render`` with the MaxArraySize of the ``scontrol`` on PATH."""
    with pytest.raises(UsageError) as refused:
        render_sbatch(str(QUICKSTART), nodes=1, gpus_per_node=0, sweep="runs/s", max_array_size=3,
                      grid=["train.learning_rate=0.001,0.002,0.003,0.004"])
    assert str(refused.value).startswith("--sweep/--trials: 4 trials need array indices 0-3, but the cluster's "
                                         "MaxArraySize is 3 (array indices must be below 3)")
    assert render_sbatch(str(QUICKSTART), nodes=1, gpus_per_node=0, sweep="runs/s", max_array_size=3,
                         grid=["train.learning_rate=0.001,0.002,0.003"]).count("#SBATCH --array=0-2\n") == 1


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A ``scontrol`` first on PATH whose ``show config`` prints ``MaxArraySize = 3``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[[ "$*" == "show config" ]] || exit 1\n'
                                      'printf "MaxArraySize            = 3\\nMaxJobCount             = 10000\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.timeout(60)
def test_render_reads_max_array_size_from_scontrol(fake_scontrol, tmp_path, capsys):
    script = tmp_path / "s.sh"
    argv = ["slurm", "render", str(QUICKSTART), "--nodes", "1", "--gpus-per-node", "0", "--sweep",
            str(tmp_path / "sweep"), "--output", str(script)]
    assert main([*argv, "--grid", "train.learning_rate=0.001,0.002,0.003,0.004"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and not script.exists(), err
    assert err.startswith("distrain: error: --sweep/--trials: 4 trials need array indices 0-3, but the cluster's "
                          "MaxArraySize is 3"), err
    assert main([*argv, "--grid", "train.learning_rate=0.001,0.002,0.003"]) == 0
    assert "# MaxArraySize: 3; 3 trials (array indices 0-2) fit.\n" in script.read_text()
    # --max-array-size, for a render off the cluster, is believed over scontrol.
    assert main([*argv, "--grid", "train.learning_rate=0.001,0.002,0.003,0.004", "--max-array-size", "4"]) == 0
    assert not (tmp_path / "sweep").exists()  # rendering writes nothing into the sweep dir


def _another_sweep(root: Path) -> None:
    """``root`` holds a sweep of other learning rates (as a first submission leaves it, untrained)."""
    sweep_state.open_sweep(root, plan(str(QUICKSTART), [], grid=["train.learning_rate=0.5,0.6"]), flag="--sweep")


def _a_run(root: Path) -> None:
    (root / "logs").mkdir(parents=True)
    (root / RunDir.JOB).write_text("name: quickstart\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, prepare, message", [
    (["--parallel", "0"], None, "--parallel: expected a positive integer, got 0"),
    (["--bench"], None, "--sweep: not with --bench: a benchmark measures the job's layout on synthetic data"),
    (["--runs-dir", "runs"], None, "--runs-dir: not with --sweep: trial k's run dir is SWEEP_DIR/trial-NNN"),
    (["--grid", "train.learnin_rate=0.1,0.2"], None, "--grid train.learnin_rate: not a job key"),
    ([], _a_run, "--sweep: {dir} holds a run, not a sweep: give a new directory for the sweep"),
    ([], _another_sweep, "{dir}/sweep.yaml: another sweep ran here (its trial 0 is train.learning_rate=0.5, this "
                         "sweep's train.learning_rate=0.002"),
])
def test_bad_sweep_renders_exit_2_with_one_line_and_no_script(tmp_path, capsys, argv, prepare, message):
    sweep_dir, script = tmp_path / "sweep", tmp_path / "s.sh"
    if prepare:
        prepare(sweep_dir)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["slurm", "render", str(QUICKSTART), "--nodes", "1", "--gpus-per-node", "0", "--sweep", str(sweep_dir),
                 *_grid(), "--max-array-size", "1001", "--output", str(script), *argv])
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE and out == "" and err.count("\n") == 1, err
    assert err.startswith("distrain: error: ") and message.format(dir=sweep_dir) in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no script, nothing in the sweep dir


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", [["--grid", "train.epochs=1,2"], ["--parallel", "2"], ["--max-array-size", "9"]])
def test_sweep_flags_need_sweep(flag, capsys):
    assert main(["slurm", "render", str(QUICKSTART), "--nodes", "1", "--gpus-per-node", "0", *flag]) == EXIT_USAGE
    assert capsys.readouterr().err == f"distrain: error: {flag[0]}: only with --sweep SWEEP_DIR" + (
        "" if flag[0] == "--max-array-size" else " (a job array of the job's sweep)") + "\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("trial, prepare, message", [
    ("4", None, "--trial 4: the sweep has 4 trials, 0 to 3: its array is --array=0-3"),
    ("-1", None, "--trial -1: the sweep has 4 trials, 0 to 3"),
    ("0", _a_run, "--sweep: {dir} holds a run, not a sweep"),
    ("0", _another_sweep, "{dir}/sweep.yaml: another sweep ran here (its trial 0 is train.learning_rate=0.5"),
])
def test_check_refuses_a_trial_it_cannot_train_before_marking_it(tmp_path, capsys, trial, prepare, message):
    sweep_dir = tmp_path / "sweep"
    if prepare:
        prepare(sweep_dir)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code = main(["slurm", "check", str(QUICKSTART), "--nodes", "1", "--tasks", "1", "--sweep", str(sweep_dir),
                 "--trial", trial, *_grid(), *_sets(SETS)])
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE and out == "" and err.count("\n") == 1, err
    assert message.format(dir=sweep_dir) in err, err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


@pytest.mark.timeout(60)
def test_trial_sets_make_distrain_train_train_the_trial():
    """The job's SET then ``trial_sets``, as the array task passes them to ``distrain train``, load
    the trial's own job: with the sweep section of --grid (the swept keys its run logs)."""
    in_job = [*SETS, "sweep.grid={train.learning_rate: [0.002, 0.01]}"]  # the job's own sweep section
    for job_sets, grid, section in ((SETS, GRID, True), (in_job, [], False)):
        sweep = plan(str(QUICKSTART), job_sets, grid=grid)
        for trial in sweep.trials:
            sets = trial_sets(sweep, trial, section=section)
            assert sets[-len(trial.sets):] == trial.sets and len(sets) == len(trial.sets) + section
            assert startup.check(str(QUICKSTART), [*job_sets, *sets]) == trial.spec


# --------------------------------------------------------------------------------------------
# the launcher's sweep path, with a fake srun and scontrol (no SLURM needed)
# --------------------------------------------------------------------------------------------

FAKE = """#!/bin/bash
[[ $1 == show ]] && exit 0   # scontrol show job: the launcher lookup
printf '%s\\n' "$*" >> "$FAKE_LOG.$(basename "$0")"
[[ $(basename "$0") == srun ]] && exit "${FAKE_SRUN_RC:-0}"
exit 0
"""


def run_fake_task(tmp_path: Path, script: Path, *, srun_rc: int, extra_env: dict | None = None):
    """The batch script of array task 2, with a fake srun exiting SRUN_RC; (result, calls by command)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("srun", "scontrol"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update({"PATH": f"{bin_dir}:{env['PATH']}", "FAKE_LOG": str(tmp_path / "calls"), "FAKE_SRUN_RC": str(srun_rc),
                "SLURM_JOB_ID": "4244", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1",
                **{k: str(v) for k, v in TASK_ENV.items()}, **(extra_env or {})})
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=200, cwd=tmp_path, env=env)
    calls = {n: (tmp_path / f"calls.{n}").read_text().splitlines() if (tmp_path / f"calls.{n}").exists() else []
             for n in ("srun", "scontrol")}
    return done, calls


@pytest.fixture
def fake_sweep_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # rendered outside the checkout: the script names the checkout's launcher
    script = tmp_path / "sweep.sh"
    script.write_text(render([str(QUICKSTART), "--nodes", "1", "--gpus-per-node", "0", "--sweep", "sweep", *_grid(),
                              *_sets(SETS), "--distrain", VENV_DISTRAIN]))
    return script


@pytest.mark.timeout(240)
def test_a_nan_loss_is_recorded_and_ends_the_task_with_0(tmp_path, fake_sweep_script):
    done, calls = run_fake_task(tmp_path, fake_sweep_script, srun_rc=EXIT_NAN)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = tmp_path / "sweep"
    lines = done.stdout.splitlines()
    assert lines[:3] == [
        f"distrain-launch: job 4242_2 (id 4244): {QUICKSTART}, 1 task(s) on n1, strategy one_device",
        f"distrain-launch: trial-002 train.learning_rate=0.01 train.epochs=2 of the sweep in {sweep_dir}",
        f"distrain-launch: run dir {sweep_dir}/trial-002"], done.stdout
    assert f"distrain-launch:   on LOGIN_NODE: tensorboard --logdir {sweep_dir} --host 127.0.0.1" in done.stdout
    (srun,) = calls["srun"]
    section = trial_sets(plan(str(QUICKSTART), SETS, grid=GRID), plan(str(QUICKSTART), SETS, grid=GRID).trials[2],
                         section=True)[0]
    assert srun.endswith(f"distrain-task {VENV_DISTRAIN} train {QUICKSTART} --run-dir {sweep_dir}/trial-002 "
                         + " ".join(_sets(SETS)) + f" --set {section} --set train.learning_rate=0.01 "
                         "--set train.epochs=2"), srun
    assert lines[-2:] == ["distrain-launch: trial-002 failed: NaN loss (exit 77)",
                          "distrain-launch: a NaN loss is the trial's result (its hyperparameters diverge), recorded; "
                          "the task ends with 0"]
    assert calls["scontrol"] == []  # not requeued
    record = sweep_state.load(sweep_dir).trials[2]
    assert (record.state, record.exit_code) == (sweep_state.FAILED, EXIT_NAN)
    assert not record.to_run  # a resubmission leaves it as it is
    assert list((sweep_dir / "tensorboard").glob("events.out.tfevents.*"))  # the sweep's HParams config


@pytest.mark.timeout(60)
def test_a_sweep_script_outside_a_job_array_stops_with_one_line(tmp_path, fake_sweep_script):
    done, calls = run_fake_task(tmp_path, fake_sweep_script, srun_rc=0, extra_env={"SLURM_ARRAY_TASK_ID": ""})
    assert done.returncode == EXIT_USAGE and calls["srun"] == [] and not (tmp_path / "sweep").exists()
    assert done.stderr == ("distrain-launch: SWEEP=sweep, but this is no task of a job array (SLURM_ARRAY_TASK_ID is "
                           "unset); submit the script with sbatch, whose #SBATCH --array line makes one task per trial\n")


# --------------------------------------------------------------------------------------------
# a real job array (cluster/slurm-local.sh, 2 nodes of 1 CPU: 2 trials at once)
# --------------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict:
    """Every file under ``root`` (hidden ones too): size, modification time and content hash."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def sbatch_wait(cluster, script: Path, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    exports = "--export=ALL," + ",".join(f"{k}={v}" for k, v in TASK_ENV.items())
    return subprocess.run(["sbatch", "--wait", "--parsable", exports, str(script)], env=cluster.env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def outputs(where: Path, array_id: str) -> dict[int, str]:
    """Each array task's output file (the script's ``--output=slurm-%x-%A_%a.out``), by trial."""
    return {int(p.name.rsplit("_", 1)[1].split(".")[0]): p.read_text(errors="replace")
            for p in where.glob(f"slurm-quickstart-{array_id}_*.out")}


@pytest.fixture(scope="module")
def swept(slurm_two_nodes, tmp_path_factory):
    """The job array submitted, trial 1 preempted while it trains, then the script submitted again."""
    cluster, where = slurm_two_nodes, tmp_path_factory.mktemp("sweep-array")
    script, sweep_dir = where / "sweep.sh", where / "sweep"
    # Rendered where sbatch runs, with the cluster's scontrol: MaxArraySize is read from it.
    rendered = subprocess.run([VENV_DISTRAIN, "slurm", "render", str(QUICKSTART), "--nodes", "1", "--gpus-per-node",
                               "0", "--time", "00:15:00", "--sweep", "sweep", *_grid(), "--parallel", "2",
                               *_sets(SETS), "--distrain", VENV_DISTRAIN, "--output", str(script)],
                              env=cluster.env, cwd=where, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    box = {}
    waiter = threading.Thread(target=lambda: box.update(first=sbatch_wait(cluster, script, where, 900)), daemon=True)
    waiter.start()
    trial_dir, deadline, started = sweep_dir / f"trial-{PREEMPTED:03d}", time.monotonic() + 600, None
    while time.monotonic() < deadline and waiter.is_alive():
        if backup_step(trial_dir) > 0:
            (out,) = where.glob(f"slurm-quickstart-*_{PREEMPTED}.out")
            started = re.match(r"distrain-launch: job (\d+)_\d+ \(id (\d+)\)", out.read_text())
            break
        time.sleep(0.1)
    assert started, f"trial {PREEMPTED} wrote no backup in time: {box}"
    array_id, task_job_id = started.groups()
    # What --signal=USR1@90 sends before the time limit, to the array task's training step (step 0 of
    # its own job id). Not to the task (4_1, or its job id, which scancel turns into 4_1): while tasks
    # of the array are pending, SLURM 22.05 answers that with "Job can not be altered now" though it
    # signalled the task, and scancel signals it again every few seconds (docs/slurm.md).
    subprocess.run(["scancel", "--signal=USR1", f"{task_job_id}.0"], env=cluster.env, check=True, timeout=30)
    waiter.join(timeout=900)
    first = box["first"]
    assert first.stdout.strip() == array_id, first.stdout
    before = snapshot(sweep_dir)
    again = sbatch_wait(cluster, script, where, 600)
    return types.SimpleNamespace(
        where=where, script=script, sweep_dir=sweep_dir, first=first, first_out=outputs(where, array_id),
        again=again, again_out=outputs(where, again.stdout.strip()), before=before, after=snapshot(sweep_dir))


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
def test_the_job_array_trains_every_trial(swept):
    assert swept.first.returncode == 0, swept.first.stderr + "\n".join(swept.first_out.values())
    assert "# MaxArraySize: 1001; 4 trials (array indices 0-3) fit." in swept.script.read_text()
    assert sorted(swept.first_out) == [0, 1, 2, 3]
    state = sweep_state.load(swept.sweep_dir)
    assert [t.state for t in state.trials] == [sweep_state.FINISHED] * 4
    for record in state.trials:
        out = swept.first_out[record.index]
        assert f"distrain-launch: {record.name} finished (val_accuracy {record.result:.4f})" in out, out
        summary = json.loads((swept.sweep_dir / record.name / RunDir.SUMMARY).read_text())
        epochs = record.overrides["train.epochs"]
        assert summary["steps"] == epochs * STEPS and summary["epochs_completed"] == epochs
        assert summary["history"]["val_accuracy"][-1] == record.result
        assert (summary["world_size"], summary["launcher"], summary["strategy"]) == (1, "slurm", "one_device")
    assert list((swept.sweep_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
def test_the_preempted_task_alone_is_requeued_and_resumes_its_trial(swept):
    out = swept.first_out[PREEMPTED]
    stopped = re.search(r"preempted \(SIGUSR1\) at step (\d+); backup written", out)
    assert stopped, out
    starts = re.findall(r"^distrain-launch: job (\d+)_(\d) \(id (\d+)(, restart \d)?\):", out, re.MULTILINE)
    # `scontrol requeue $SLURM_JOB_ID` in the task: the same array task (its index, its own job id) again.
    assert len(starts) == 2 and starts[0][:3] == starts[1][:3] and starts[1][3] == ", restart 1", starts
    assert starts[0][1] == str(PREEMPTED)
    assert f"trial-{PREEMPTED:03d} stopped: preempted (exit 75); resumes from its backup" in out
    assert f"requeueing job {starts[0][2]}: it resumes from" in out
    assert f"distrain-launch: resuming from {swept.sweep_dir}/trial-{PREEMPTED:03d}/backup" in out
    for index, other in swept.first_out.items():  # every other task ran once
        if index != PREEMPTED:
            assert other.count("distrain-launch: job ") == 1 and "restart" not in other, other
    run_dir = swept.sweep_dir / f"trial-{PREEMPTED:03d}"
    summary = json.loads((run_dir / RunDir.SUMMARY).read_text())
    assert summary["steps"] == 8 * STEPS and summary["resumed_from_step"] == int(stopped.group(1)) > 0
    segments = json.loads((run_dir / RunDir.SEGMENTS).read_text())
    assert [s["start_step"] for s in segments] == [0, int(stopped.group(1))]


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
def test_submitting_the_script_again_trains_nothing(swept):
    assert swept.again.returncode == 0, swept.again.stderr
    assert sorted(swept.again_out) == [0, 1, 2, 3]
    state = sweep_state.load(swept.sweep_dir)
    for record in state.trials:
        out = swept.again_out[record.index]
        assert out.splitlines()[-1] == (f"distrain-launch: {record.name} finished already (val_accuracy "
                                        f"{record.result:.4f}): nothing to train"), out
        assert "srun" not in out and "run dir" not in out
    assert swept.after == swept.before  # no file of the sweep dir written again, none added
    assert "sweep.yaml" in swept.before and "trial-003/summary.json" in swept.before


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
def test_the_preempted_trial_is_distrain_train_with_its_overrides_bit_for_bit(swept, tmp_path):
    trial = sweep_state.load(swept.sweep_dir).trials[PREEMPTED]
    plain = tmp_path / "plain"
    done = run_distrain(["train", str(QUICKSTART), "--run-dir", str(plain), *_sets([*SETS, *trial.sets])], timeout=600,
                        forked=True)
    assert done.returncode == 0, done.stderr[-3000:]
    swept_summary = json.loads((swept.sweep_dir / trial.name / RunDir.SUMMARY).read_text())
    alone = json.loads((plain / RunDir.SUMMARY).read_text())
    assert swept_summary["test"]["loss"] == alone["test"]["loss"] and swept_summary["test"] == alone["test"]
    # Every epoch has its row (also when the stop fell on an epoch's last step) and validates the same
    # weights as the plain run's. The training loss of the epoch the preemption cut is Keras's mean
    # over its steps after the resume only; every later one is the same.
    swept_history = swept_summary["history"]
    later = 8 - (swept_summary["resumed_from_step"] // STEPS + 1)
    assert len(swept_history["val_loss"]) == 8 and later >= 1 and alone["steps"] == 8 * STEPS
    for key in ("val_loss", "val_accuracy"):
        assert swept_history[key] == alone["history"][key]
    assert swept_history["loss"][-later:] == alone["history"]["loss"][-later:]


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(1500)
def test_the_report_ranks_the_trials(swept, capsys):
    assert main(["report", str(swept.sweep_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["rank", "trial", "train.learning_rate", "train.epochs", "val_accuracy"]
    best_first = sorted(sweep_state.load(swept.sweep_dir).trials, key=lambda t: (-t.result, t.index))
    rows = [line.split() for line in table[1:5]]
    assert [r[1] for r in rows] == [t.name for t in best_first] and [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert [float(r[4]) for r in rows] == [pytest.approx(t.result, abs=5e-5) for t in best_first]
