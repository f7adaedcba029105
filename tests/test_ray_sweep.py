"""``distrain ray JOB --sweep``: a sweep's trials as Ray Tune trials on a local Ray head.

The pure functions first (flags, ASHA's epochs, what Tune is given), then bad input (exit 2, one
line, before Ray is asked for anything), then one real sweep on the local head
(``tests/ray_cluster.py``, 3 logical CPUs: 2 trials of 1 worker at once) that every test after it
reads: 4 trials of a tiny quickstart, ASHA on the training loss, ``--max-failures 1``; a worker
of trial 0 is SIGKILLed mid-run (it resumes) and trial 3's worker twice (its failures are used up:
it fails alone). The sweep is then run again (it trains trial 3 only) and a third time (nothing).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import types
from pathlib import Path

import pytest

from conftest import DISTRAIN, REPO, backup_step, run_distrain, worker_env
from distrain.errors import EXIT_FAILED, EXIT_NAN, EXIT_OK, EXIT_USAGE, UsageError
from distrain.launch import ray as ray_launch
from distrain.launch import ray_tune
from distrain.rundir import RunDir
from distrain.sweeps import state as sweep_state
from ray_cluster import ray_head_fixture, skip_unless_ray

ray_head = ray_head_fixture(num_cpus=3)

QUICKSTART = REPO / "jobs" / "quickstart.yaml"
EPOCHS, STEPS = 4, 6
SETS = [f"train.epochs={EPOCHS}", f"train.steps_per_epoch={STEPS}", "model.params.filters=4", "logging.verbose=0",
        "checkpoint.every_epochs=0", "checkpoint.backup_every_steps=2", "sweep.metric=loss"]
# Trial 0 learns, trial 1 learns slowly, 2 and 3 not at all. The grid runs in order, 2 at once,
# so trial 2 starts after trial 0 or 1 has passed epoch 1: ASHA has a good loss to compare it to.
GRID = "train.learning_rate=0.01,0.001,1e-6,1e-7"


def _sets(extra=()) -> list[str]:
    return [a for s in [*SETS, *extra] for a in ("--set", s)]


# ----------------------------------------------------------------------------- pure functions

def _flags(**kwargs) -> ray_tune.TuneRequest:
    return ray_tune.check_sweep_flags(**{"sweep": "/shared/sweep", "storage_path": None, "name": None,
                                         "parallel": None, "scheduler": None, "grace_epochs": None,
                                         "reduction_factor": None, **kwargs})


@pytest.mark.timeout(30)
def test_sweep_flags_defaults():
    assert _flags() == ray_tune.TuneRequest(Path("/shared/sweep"), None, "none", 1, 2.0)
    assert _flags(scheduler="asha", grace_epochs=2, reduction_factor=3, parallel=4) == ray_tune.TuneRequest(
        Path("/shared/sweep"), 4, "asha", 2, 3.0)
    assert _flags(sweep="~/s").sweep_dir == Path(os.path.expanduser("~/s"))
    assert _flags().tune_storage == Path("/shared/sweep/ray-tune")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kwargs,message", [
    ({"sweep": "runs/s"}, r"^--sweep: expected an absolute path"),
    ({"storage_path": "/x"}, r"^--storage-path: not with --sweep"),
    ({"name": "n"}, r"^--name: not with --sweep"),
    ({"parallel": 0}, r"^--parallel: expected a positive integer, got 0"),
    ({"scheduler": "hyperband"}, r"^--scheduler: expected asha or none, got 'hyperband'"),
    ({"grace_epochs": 2}, r"^--grace-epochs: only with --scheduler asha"),
    ({"scheduler": "asha", "grace_epochs": 0}, r"^--grace-epochs: expected a positive integer, got 0"),
    ({"scheduler": "asha", "reduction_factor": 1.5}, r"^--reduction-factor: expected a number >= 2"),
])
def test_sweep_flags_rejected(kwargs, message):
    with pytest.raises(UsageError, match=message):
        _flags(**kwargs)


@pytest.mark.timeout(30)
def test_asha_compares_before_the_last_epoch():
    asha = _flags(scheduler="asha", grace_epochs=1, reduction_factor=2)
    assert ray_tune.scheduler_arguments(asha, "loss", "min", [4, 4]) == {
        "time_attr": "epoch", "metric": "loss", "mode": "min", "max_t": 3, "grace_period": 1,
        "reduction_factor": 2.0, "stop_last_trials": False}
    assert ray_tune.scheduler_arguments(_flags(), "loss", "min", [4]) is None
    ray_tune.check_asha(asha, [2, 5])  # the longest trial decides
    with pytest.raises(UsageError, match=r"^--grace-epochs 4: expected 1 to 3: .* train 4 \(train.epochs\)"):
        ray_tune.check_asha(_flags(scheduler="asha", grace_epochs=4), [4])
    with pytest.raises(UsageError, match=r"^--scheduler asha: the trials train 1 epoch \(train.epochs\)"):
        ray_tune.check_asha(asha, [1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("grace,factor,epochs", [(1, 2, 4), (1, 2, 9), (2, 3, 20), (1, 2.5, 8), (3, 2, 4)])
def test_comparison_epochs_are_the_rungs_of_rays_asha(grace, factor, epochs):
    """What distrain prints and documents is what Ray's own bracket compares at."""
    skip_unless_ray()
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket = _Bracket(grace, ray_tune.last_comparison([epochs]), factor, 0, stop_last_trials=False)
    assert sorted(milestone for milestone, _ in bracket._rungs) == ray_tune.comparison_epochs(grace, factor, epochs)
    assert all(m < epochs for m in ray_tune.comparison_epochs(grace, factor, epochs))


@pytest.mark.timeout(30)
def test_concurrency_queues_what_does_not_fit():
    assert ray_tune.concurrency(None, 2, 4) == (2, None)
    assert ray_tune.concurrency(None, 8, 3) == (3, None)
    at_once, note = ray_tune.concurrency(4, 2, 6)
    assert at_once == 2 and note.startswith("--parallel 4: 2 trial(s) of this size fit")
    request = ray_launch.make_request(workers=2, spec_name="j", storage_path="/s", name="n", gpus_per_worker=1)
    assert ray_tune.trials_at_once(request, [{"CPU": 8, "GPU": 3}, {"CPU": 8, "GPU": 2}]) == 2  # 5 workers


@pytest.mark.timeout(30)
def test_tune_metrics_and_exit_code():
    assert ray_tune.tune_metrics({"loss": 1.0, "epoch": 2, "done": True}) == {"loss": 1.0, "epoch": 2, "finished": True}
    record = sweep_state.TrialRecord(0, {}, "x")
    ok = [record.__class__(**{**record.__dict__, "state": s}) for s in ("finished", "pruned")]
    nan = record.__class__(**{**record.__dict__, "state": "failed", "exit_code": EXIT_NAN})
    assert ray_tune.exit_code([*ok, nan]) == EXIT_OK
    for state in ("failed", "stopped", "running", "pending"):
        assert ray_tune.exit_code([*ok, record.__class__(**{**record.__dict__, "state": state})]) == EXIT_FAILED


# ----------------------------------------------------------------------------- bad input, no Ray needed

@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra,line", [
    (["--sweep", "runs/s"], "--sweep: expected an absolute path (shared by every node), got runs/s"),
    (["--sweep", "{dir}", "--name", "a"], "--name: not with --sweep: each trial's run dir is SWEEP_DIR/trial-NNN "
                                         "and Ray's files go to SWEEP_DIR/ray-tune"),
    (["--sweep", "{dir}", "--storage-path", "/tmp"], "--storage-path: not with --sweep: each trial's run dir is "
                                                     "SWEEP_DIR/trial-NNN and Ray's files go to SWEEP_DIR/ray-tune"),
    (["--sweep", "{dir}", "--scheduler", "pbt"], "--scheduler: expected asha or none, got 'pbt'"),
    (["--sweep", "{dir}", "--scheduler", "asha", "--grace-epochs", "0"],
     "--grace-epochs: expected a positive integer, got 0"),
    (["--sweep", "{dir}", "--scheduler", "asha", "--grace-epochs", "5"],
     "--grace-epochs 5: expected 1 to 3: ASHA compares trials at epochs before their last, and the trials train "
     "4 (train.epochs)"),
    (["--sweep", "{dir}", "--scheduler", "asha", "--reduction-factor", "1"],
     "--reduction-factor: expected a number >= 2 (ASHA keeps 1 in that many trials at each comparison), got 1"),
    (["--sweep", "{dir}", "--parallel", "0"], "--parallel: expected a positive integer, got 0"),
    (["--sweep", "{dir}", "--set", "sweep.metric=val_auc"],
     f"{QUICKSTART}: sweep.metric: no run logs 'val_auc': an epoch logs loss, accuracy and, with a validation "
     "split, val_loss, val_accuracy"),
    (["--parallel", "2"], "--grid: only with --sweep SWEEP_DIR"),  # the first of the sweep's flags given
])
def test_bad_input_exits_2_with_one_line(tmp_path, extra, line):
    sweep_dir = tmp_path / "sweep"
    args = [a.replace("{dir}", str(sweep_dir)) for a in extra]
    result = run_distrain(["ray", str(QUICKSTART), "--workers", "1", *_sets(), "--grid", GRID, *args], timeout=100)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [f"distrain: error: {line}"]
    assert not sweep_dir.exists()


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_a_request_the_cluster_cannot_hold_exits_2_before_tune(ray_head, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_distrain(["ray", str(QUICKSTART), "--workers", "1", "--gpus-per-worker", "1", *_sets(),
                           "--grid", GRID, "--sweep", str(sweep_dir)], timeout=120, env=ray_head.client_env())
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "distrain: error: --gpus-per-worker 1: --workers 1 x 1 GPU = 1 GPUs, but the Ray cluster has 0 "
        "(ray.cluster_resources())")
    assert not sweep_dir.exists()


# ----------------------------------------------------------------------------- one real sweep

def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _pid(run_dir: Path):
    try:
        return int(RunDir(run_dir).ray_worker_pid(0).read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def sweep(ray_head, tmp_path_factory):
    """The sweep run three times; what each run left."""
    root = tmp_path_factory.mktemp("ray-sweep") / "sweep"
    # Ray Train's controller looks at its workers every 2 s by default; 0.2 s here makes reports
    # reach Tune (and ASHA's stops reach the trials) within a fraction of an epoch.
    env = ray_head.client_env(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    command = [*DISTRAIN, "ray", str(QUICKSTART), "--workers", "1", *_sets(), "--grid", GRID, "--sweep", str(root),
               "--parallel", "2", "--scheduler", "asha", "--grace-epochs", "1", "--reduction-factor", "2",
               "--max-failures", "1"]
    log = root.parent / "first.log"
    trial0, trial3 = sweep_state.trial_dir(root, 0), sweep_state.trial_dir(root, 3)
    started = time.monotonic()
    with open(log, "w") as out:
        first = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                 start_new_session=True)
    killed0, killed0_at, killed3 = None, None, []
    try:
        deadline = time.monotonic() + 360
        while first.poll() is None and time.monotonic() < deadline:
            # Trial 0: once, after its first backup (it resumes from it). Trial 3: as soon as its
            # worker exists, and its replacement too (--max-failures 1 is then used up).
            pid = _pid(trial0)
            if killed0 is None and pid and backup_step(trial0) >= 2 and _kill(pid):
                killed0, killed0_at = pid, backup_step(trial0)
            pid = _pid(trial3)
            if pid and pid not in killed3 and len(killed3) < 2 and _kill(pid):
                killed3.append(pid)
            time.sleep(0.05)
        first.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    first_time = time.monotonic() - started
    after_first = sweep_state.load(root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("trial-00[012]/**/*") if p.is_file()}
    second_started = time.monotonic()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    second_time = time.monotonic() - second_started
    after_second = sweep_state.load(root)
    yaml_text = (root / sweep_state.SWEEP_FILE).read_text()
    tune_runs = sorted(p.name for p in (root / "ray-tune").iterdir())
    third_started = time.monotonic()
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    return types.SimpleNamespace(
        root=root, first=first.returncode, first_output=log.read_text(), first_time=first_time,
        killed0=killed0, killed0_at=killed0_at, killed3=killed3, after_first=after_first, mtimes=mtimes,
        second=second, second_time=second_time, after_second=after_second, yaml_text=yaml_text, tune_runs=tune_runs, third=third,
        third_time=time.monotonic() - third_started)


def _summary(root: Path, index: int) -> dict:
    return json.loads((sweep_state.trial_dir(root, index) / RunDir.SUMMARY).read_text())


def _history(root: Path, index: int) -> list:
    return json.loads((sweep_state.trial_dir(root, index) / RunDir.HISTORY).read_text())


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_asha_stops_the_learning_rates_that_do_not_learn(sweep):
    first = sweep.after_first.trials
    output = sweep.first_output
    assert first[2].state == "pruned", output[-6000:]
    assert first[0].state == "finished", output[-6000:]
    assert "ASHA on loss (min) at epochs 1, 2" in output
    # Stopped early: fewer epochs than planned, no summary; its result is its loss at the last
    # epoch Tune heard of, one of the epochs it trained.
    pruned = _history(sweep.root, 2)
    assert len(pruned) < EPOCHS and not (sweep_state.trial_dir(sweep.root, 2) / RunDir.SUMMARY).exists()
    assert first[2].result in [e["loss"] for e in pruned]
    assert first[2].error.startswith("stopped by ASHA at epoch ")
    assert "trial-002 pruned (loss " in output
    # The best trial ran every epoch, and nothing pruned beat it.
    best = _summary(sweep.root, 0)
    assert best["epochs_completed"] == EPOCHS and best["steps"] == EPOCHS * STEPS
    assert first[0].result < min(r.result for r in first if r.state == "pruned")
    assert first[1].state in ("finished", "pruned")  # which of 0 and 1 reached epoch 1 first decides


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_a_lost_worker_loses_only_its_own_trial(sweep):
    first = sweep.after_first.trials
    output = sweep.first_output
    assert sweep.killed0 is not None and len(sweep.killed3) == 2, output[-6000:]
    # Trial 0 (--max-failures 1): Ray Train restarted its worker, which resumed from the backup.
    summary = _summary(sweep.root, 0)
    assert 0 < summary["resumed_from_step"] <= sweep.killed0_at < EPOCHS * STEPS
    assert _pid(sweep_state.trial_dir(sweep.root, 0)) != sweep.killed0
    # Trial 3: killed again after the restart, so it failed; the sweep says so and exits 1.
    assert first[3].state == "failed" and first[3].exit_code == EXIT_FAILED, output[-6000:]
    assert sweep.first == EXIT_FAILED
    assert "distrain ray: trial-003 failed" in output
    assert "4 trial(s): " in output and "1 failed" in output
    # The other trials went on: none failed or was left running.
    assert all(r.state in ("finished", "pruned") for r in first[:3])


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_running_the_sweep_again_trains_only_what_did_not_end(sweep):
    second = sweep.second
    assert second.returncode == EXIT_OK, (second.stdout + second.stderr)[-6000:]
    assert "; 1 to run as Ray Tune trials" in second.stderr
    again = sweep.after_second.trials
    assert again[3].state == "finished" and _summary(sweep.root, 3)["steps"] == EPOCHS * STEPS
    assert [r.state for r in again[:3]] == [r.state for r in sweep.after_first.trials[:3]]
    assert [r.result for r in again[:3]] == [r.result for r in sweep.after_first.trials[:3]]
    # Nothing of trials 0-2 was written again (a pruned trial is not resumed either).
    assert sweep.mtimes and not [str(p) for p, t in sweep.mtimes.items() if p.stat().st_mtime_ns != t]
    # A third run has nothing left: no Tune experiment, sweep.yaml as it was, in seconds.
    third = sweep.third
    assert third.returncode == EXIT_OK, third.stderr[-3000:]
    assert "nothing to run" in third.stderr and "Ray Tune trials" not in third.stderr
    assert (sweep.root / sweep_state.SWEEP_FILE).read_text() == sweep.yaml_text
    assert sorted(p.name for p in (sweep.root / "ray-tune").iterdir()) == sweep.tune_runs
    assert len(sweep.tune_runs) == 2
    print(f"the sweep's runs took {sweep.first_time:.0f} s, {sweep.second_time:.0f} s and {sweep.third_time:.1f} s")


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_trial_0_is_distrain_train_with_its_overrides_bit_for_bit(sweep, tmp_path):
    """Trial 0 lost its worker and resumed; it still ends as the plain run (1 worker, outside Ray)."""
    trial = sweep.after_second.trials[0]
    plain = tmp_path / "plain"
    done = run_distrain(["train", str(QUICKSTART), "--run-dir", str(plain), *_sets(trial.sets)], timeout=300,
                        env=worker_env(), forked=True)
    assert done.returncode == 0, done.stderr[-3000:]
    swept, alone = _summary(sweep.root, 0), json.loads((plain / RunDir.SUMMARY).read_text())
    assert swept["launcher"] == "ray" and swept["world_size"] == alone["world_size"] == 1
    assert swept["test"]["loss"] == alone["test"]["loss"] and swept["test"] == alone["test"]
    assert swept["steps"] == alone["steps"] == EPOCHS * STEPS
    # The epoch the kill cut into logs the mean loss of its steps after the resume only (Keras's
    # running mean starts again); every later epoch, and the sweep's result, are the plain run's.
    # Every epoch has its row, whenever the kill came (also between an epoch's last step and its end).
    later = swept["resumed_from_step"] // STEPS + 1
    assert 0 < later <= EPOCHS and swept["history"]["loss"][later:] == alone["history"]["loss"][later:]
    assert len(swept["history"]["loss"]) == EPOCHS
    assert {k: v for k, v in swept["history"].items() if k.startswith("val_")} == \
        {k: v for k, v in alone["history"].items() if k.startswith("val_")}
    assert trial.result == alone["history"]["loss"][-1]


@pytest.mark.ray
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_report_ranks_the_trials(sweep):
    result = run_distrain(["report", str(sweep.root)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if "trial-00" in line]
    assert len(rows) == 4, result.stdout
    finished = sorted((r for r in sweep.after_second.trials if r.state == "finished"), key=lambda r: r.result)
    assert finished[0].index == 0 and finished[0].name in rows[0] and "finished" in rows[0]
    pruned_rows = [row for row in rows if "pruned" in row]
    assert any("trial-002" in row for row in pruned_rows)
