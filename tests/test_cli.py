"""The command line end to end: the offline quickstart, save → load, `models`, `env`, resume, and a
2-task run under a fake SLURM environment (variables only)."""
import json

import numpy as np
import pytest

from conftest import DISTRAIN, REPO, free_port_block, run_distrain, worker_env, write_job


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_distrain(["train", "jobs/quickstart.yaml", "--run-dir", str(run_dir)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.mark.timeout(300)
def test_quickstart_reaches_its_accuracy_floor(quickstart_run):
    run_dir, result = quickstart_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.9
    assert f"test accuracy: {summary['test']['accuracy']:.4f}" in result.stdout
    assert summary["steps"] == summary["steps_per_epoch"] * 10 and summary["world_size"] == 1
    for name in ("job.yaml", "history.json", "history.csv", "curves.png", "model.keras", "summary.json",
                 "checkpoints/best.weights.h5", "checkpoints/epoch-0010.weights.h5", "logs/rank0.log"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history] == list(range(1, 11))
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "images_per_s"} <= set(history[0])


@pytest.mark.timeout(120)
def test_saved_model_loads_in_safe_mode_and_predicts_the_same(quickstart_run, tmp_path):
    run_dir, _ = quickstart_run
    import distrain  # noqa: F401
    import tensorflow as tf

    from distrain.data import sources
    from distrain.models import load_trained_model
    from distrain.spec import load_spec

    spec = load_spec(run_dir / "job.yaml")
    splits = sources.load(spec.data, spec.seed)
    x = splits.x_test[:64] * splits.rescale
    model = load_trained_model(run_dir / "model.keras")
    first = model.predict(x, verbose=0)
    assert model.optimizer is not None
    resaved = tmp_path / "again.keras"
    model.save(str(resaved))
    again = tf.keras.models.load_model(str(resaved), safe_mode=True, compile=False)
    np.testing.assert_allclose(again.predict(x, verbose=0), first, rtol=1e-6, atol=1e-7)
    accuracy = float(np.mean(np.argmax(first, axis=1) == splits.y_test[:64]))
    assert accuracy > 0.8


@pytest.mark.timeout(300)
def test_resume_of_a_complete_run_does_no_more_steps(quickstart_run):
    run_dir, _ = quickstart_run
    before = json.loads((run_dir / "summary.json").read_text())
    result = run_distrain(["train", "--resume", str(run_dir)], timeout=300, forked=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == before["steps"]


@pytest.mark.timeout(300)
def test_resume_continues_with_more_epochs(tmp_path):
    job = write_job(tmp_path / "job.yaml", "name: grow\nmodel: {name: mlp}\ndata: {batch_size_per_replica: 64}\n"
                    "train: {epochs: 2}\nlogging: {tensorboard: false, verbose: 0}\n")
    run_dir = tmp_path / "run"
    assert run_distrain(["train", str(job), "--run-dir", str(run_dir)], forked=True).returncode == 0
    steps = json.loads((run_dir / "summary.json").read_text())["steps_per_epoch"]
    result = run_distrain(["train", "--resume", str(run_dir), "--set", "train.epochs=3"], forked=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"]) == (2 * steps, 3 * steps)
    assert [e["epoch"] for e in json.loads((run_dir / "history.json").read_text())] == [1, 2, 3]


@pytest.mark.timeout(120)
def test_models_lists_every_model_with_its_parameter_count():
    result = run_distrain(["models", "--json"], timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"mlp", "cnn", "residual", "inception", "mobilenet_v2"}
    assert rows["mlp"]["params"] == 101_770 and rows["mlp"]["input_shape"] == [28, 28, 1]


def test_usage_errors_exit_2_before_tensorflow(tmp_path):
    for args, message in ((["train"], "give a job file"), (["train", "nope.yaml"], "nope.yaml: no such job file"),
                          (["train", "--resume", str(tmp_path / "none")], "--resume: no such run dir")):
        result = run_distrain(args, timeout=60, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


# --- distrain validate: what training checks before its first step ---------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout,message", [
    ("loose", "holds 3 images but no class folders; expected one folder per class, {root}/<class_name>/<image>"),
    ("one", "has one class folder (ant, 3 images); training needs at least two classes"),
])
def test_validate_refuses_a_folder_training_refuses_in_one_line(tmp_path, layout, message):
    from helpers import solid_folder

    root = solid_folder(tmp_path / "imgs", count=3, classes=("ant",), size=(4, 4))
    if layout == "loose":
        for f in (root / "ant").iterdir():
            f.rename(root / f.name)
        (root / "ant").rmdir()
    job = write_job(tmp_path / "job.yaml", f"name: x\nmodel: {{name: mlp}}\n"
                                           f"data: {{source: image_folder, path: {root}, image_size: [4, 4]}}\n")
    result = run_distrain(["validate", str(job)], timeout=50, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"distrain: error: data.path: {root} {message.format(root=root)}")
    assert result.stderr.count("\n") == 1, result.stderr


LABELS = """import numpy as np

def load(first={first}, test_extra={extra}):
    x = np.zeros((40, 4, 4), np.uint8)
    y = np.arange(40) % 3 + first
    return (x, y), (x[:10], np.append(y[:9], 2 + first + test_extra))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first,extra,sets,code,line", [
    (0, 0, ["model.num_classes=2"], 2, "13 train labels outside 0 .. 1 (2 classes, from model.num_classes): 2 (13 "
                                       "labels); set model.num_classes to at least 3, or remove it to take the data's "
                                       "count"),
    (1, 0, ["model.num_classes=3"], 2, "13 train labels outside 0 .. 2 (3 classes, from model.num_classes): 3 (13 "
                                       "labels); labels numbered from 1? number them from 0 (y - 1)"),
    (1, 0, [], 0, "WARNING data.source: {ref}: class 0 has no training example (4 classes, from the training labels "
                  "(largest 3)); labels numbered from 1? number them from 0 (y - 1)"),
    (0, 1, [], 2, "1 test label outside 0 .. 2 (3 classes, from the training labels (largest 2)): 3 (1 label); a "
                  "class no training example has; set model.num_classes: 4 if it is meant to exist, or move its "
                  "examples into the training data"),
])
def test_validate_checks_the_users_labels_as_training_does(tmp_path, capsys, first, extra, sets, code, line):
    from distrain.cli import main

    module = tmp_path / f"labels_{first}_{extra}_{len(sets)}.py"  # one module name per case: imported in-process
    module.write_text(LABELS.format(first=first, extra=extra))
    ref = f"{module}:load"
    job = write_job(tmp_path / "job.yaml", f"name: x\nmodel: {{name: mlp}}\n"
                                           f"data: {{source: {ref}, batch_size_per_replica: 4}}\n")
    args = ["validate", str(job), "--quiet"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == code
    err = capsys.readouterr().err
    if code:
        assert err == f"distrain: error: data.source: {ref}: load ({module}:3) returned labels: {line}\n"
    else:
        assert line.format(ref=ref) in err.splitlines()


def test_a_bad_malloc_setting_exits_2_naming_the_variable(tmp_path):
    result = run_distrain(["train", str(REPO / "jobs" / "quickstart.yaml")], env=worker_env(DISTRAIN_MALLOC="fast"),
                          timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "DISTRAIN_MALLOC='fast': expected tuned (the default) or system" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_several_workers_need_a_shared_run_dir(tmp_path):
    env = worker_env(TF_CONFIG=json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                          "task": {"type": "worker", "index": 0}}))
    result = run_distrain(["train", str(REPO / "jobs" / "quickstart.yaml")], env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "--run-dir: required with several workers" in result.stderr


def fake_slurm_env(procid: int, port: int, **extra) -> dict:
    # What srun gives two tasks of one step on one node; `scontrol` is not reachable here, so
    # distrain falls back to the node name as its address.
    return worker_env(SLURM_JOB_ID="900", SLURM_STEP_ID="0", SLURM_PROCID=procid, SLURM_LOCALID=procid,
                      SLURM_NODEID=0, SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2, SLURM_STEP_NODELIST="localhost",
                      SLURM_JOB_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE="2",
                      DISTRAIN_PORT=port, **extra)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_two_tasks_under_a_fake_slurm_environment_train_with_world_size_2(tmp_path, workers_factory):
    job = write_job(tmp_path / "job.yaml", "name: fake-slurm\nmodel: {name: cnn, params: {filters: 8}}\n"
                    f"output_dir: {tmp_path / 'runs'}\ndata: {{batch_size_per_replica: 16}}\n"
                    "train: {epochs: 1, steps_per_epoch: 5}\nlogging: {tensorboard: false, verbose: 0}\n")
    port = free_port_block(2)
    cmd = [*DISTRAIN, "train", str(job)]
    pair = workers_factory([cmd, cmd], [fake_slurm_env(i, port) for i in range(2)])
    assert pair.wait(timeout=240) == [0, 0], pair.output()
    run_dir = tmp_path / "runs" / "fake-slurm" / "slurm-900"  # the run dir is keyed by the job id
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["launcher"], summary["world_size"], summary["strategy"], summary["steps"]) == ("slurm", 2, "multi_worker", 5)


@pytest.mark.timeout(120)
def test_env_json_under_fake_slurm():
    result = run_distrain(["env", "--json"], env=fake_slurm_env(1, 23456), timeout=120)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["rank"], info["world_size"], info["local_rank"], info["is_chief"], info["num_workers"],
            info["strategy"]) == (1, 2, 1, False, 2, "multi_worker")
    assert info["tf_config"] == {"cluster": {"worker": ["localhost:23456", "localhost:23457"]},
                                 "task": {"type": "worker", "index": 1}}
    assert any("CPU" in d for d in info["devices"])


@pytest.mark.timeout(300)
def test_mixed_precision_trains(tmp_path):
    job = write_job(tmp_path / "job.yaml", "name: mixed\nmodel: {name: cnn, params: {filters: 16}}\n"
                    "train: {epochs: 3}\ndistribute: {mixed_precision: true}\nlogging: {tensorboard: false, verbose: 0}\n")
    result = run_distrain(["train", str(job), "--run-dir", str(tmp_path / "run")], forked=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test"]["accuracy"] > 0.7
    import distrain  # noqa: F401
    import tensorflow as tf

    model = tf.keras.models.load_model(str(tmp_path / "run" / "model.keras"), safe_mode=True, compile=False)
    assert model.layers[1].dtype_policy.name == "mixed_float16"  # the first Conv2D computes in float16
