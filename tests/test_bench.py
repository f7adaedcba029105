"""``distrain bench``: the job turned into a benchmark, the arithmetic, the CLI's JSON, 2 workers, bad input."""
from __future__ import annotations

import json
import math

import pytest

from conftest import DISTRAIN, REPO, free_ports, run_distrain, tf_config, worker_env, write_job
from distrain import bench
from distrain.errors import UsageError
from distrain.spec import load_spec, spec_from_dict
from distrain.world import World

TINY = """
name: tiny
model: {name: cnn, params: {filters: 4}}
data: {source: digits, batch_size_per_replica: 16}
train: {epochs: 1}
"""


def test_data_shape_of_each_source_without_loading_it(tmp_path):
    assert bench.data_shape(spec_from_dict({"data": {"source": "fashion_mnist"}})) == ((28, 28, 1), 10)
    assert bench.data_shape(spec_from_dict({"data": {"source": "cifar100"}})) == ((32, 32, 3), 100)
    assert bench.data_shape(spec_from_dict({"data": {"source": "synthetic", "synthetic": {"shape": [5, 6], "classes": 3}}})) \
        == ((5, 6, 1), 3)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    folder = {"source": "image_folder", "path": str(tmp_path), "image_size": [40, 30]}
    # Decoded with the model's channels, as training decodes them.
    assert bench.data_shape(spec_from_dict({"data": folder, "model": {"name": "mobilenet_v2"}})) == ((40, 30, 3), 3)
    assert bench.data_shape(spec_from_dict({"data": folder, "model": {"name": "cnn"}})) == ((40, 30, 1), 3)
    assert bench.data_shape(spec_from_dict({"data": folder, "model": {"name": "cnn", "num_classes": 7}}))[1] == 7


def test_image_folder_without_classes_is_a_usage_error(tmp_path):
    spec = spec_from_dict({"data": {"source": "image_folder", "path": str(tmp_path)}})
    with pytest.raises(UsageError, match="model.num_classes"):
        bench.data_shape(spec)


def test_bench_spec_keeps_the_model_and_batch_and_drops_everything_else():
    spec = load_spec(REPO / "jobs" / "mobilenet.yaml")
    b = bench.bench_spec(spec, steps=30, warmup=5, replicas=4)
    assert (b.model, b.data.batch_size_per_replica, b.train.optimizer, b.data.augment) == \
        (spec.model, spec.data.batch_size_per_replica, spec.train.optimizer, spec.data.augment)
    assert b.data.source == "synthetic" and b.data.synthetic.shape == [32, 32, 3] and b.data.synthetic.classes == 10
    assert b.data.validation_split == 0 and not b.logging.tensorboard and b.train.early_stopping is None
    assert b.logging.update_every_steps == 0  # no step lines: they would wait for a step inside the timing
    assert (b.checkpoint.every_epochs, b.checkpoint.backup_every_steps, b.checkpoint.save_best) == (0, 0, False)
    # The training split holds whole global batches for one epoch's steps, the test split one batch.
    global_batch = 64 * 4
    test = round(b.data.synthetic.examples * b.data.test_split)
    assert test == global_batch
    assert (b.data.synthetic.examples - test) == b.train.steps_per_epoch * global_batch
    assert b.train.epochs * b.train.steps_per_epoch >= 35


def test_bench_layout_cycles_over_a_bounded_amount_of_data():
    per_epoch, epochs = bench.bench_layout(100, 10, 1024, 224 * 224 * 3)
    assert per_epoch * 1024 * 224 * 224 * 3 <= bench.DATA_BUDGET_BYTES or per_epoch == bench.MIN_STEPS_PER_EPOCH
    assert per_epoch * epochs >= 110
    assert bench.bench_layout(3, 0, 8, 64) == (bench.MIN_STEPS_PER_EPOCH, 1)


def test_replicas_guess():
    spec = spec_from_dict({})
    assert bench.replicas_guess(spec, World(launcher="tf_config", rank=0, world_size=3)) == 3
    assert bench.replicas_guess(spec, World(launcher="slurm", rank=0, world_size=2, gpus=("0", "1"))) == 4
    assert bench.replicas_guess(spec_from_dict({"distribute": {"cpu_devices": 2}}), World(launcher="local")) == 2


def test_summarize_arithmetic():
    times = [1.0, 1.0, 0.1, 0.1, 0.2, 0.2]  # two warm-up steps, then 0.6 s for 4 steps of 40 images
    base = bench.Baseline(images_per_s=100.0, step_time_s=0.1, source="given")
    r = bench.summarize(times, warmup=2, global_batch=40, replicas=2, baseline=base)
    assert r["steps"] == 4 and math.isclose(r["images_per_s"], 160 / 0.6)
    assert math.isclose(r["images_per_s_per_replica"], 80 / 0.6)
    assert math.isclose(r["efficiency"], (160 / 0.6) / 200)
    assert math.isclose(r["compute_s_per_step"], 0.1) and math.isclose(r["communication_s_per_step"], 0.05)
    no_base = bench.summarize(times, warmup=2, global_batch=40, replicas=2, baseline=None)
    assert no_base["efficiency"] is None and no_base["communication_s_per_step"] is None
    with pytest.raises(RuntimeError, match="warm-up"):
        bench.summarize(times, warmup=6, global_batch=40, replicas=2, baseline=None)


def test_parse_baseline(tmp_path):
    assert bench.parse_baseline("auto") == "auto" and bench.parse_baseline("none") is None
    assert bench.parse_baseline("250.5") == bench.Baseline(250.5, None, "given")
    earlier = tmp_path / "one.json"
    earlier.write_text(json.dumps({"images_per_s_per_replica": 99.0, "step_time_s": {"median": 0.5}}))
    assert bench.parse_baseline(str(earlier)) == bench.Baseline(99.0, 0.5, "given")
    for bad in ("-3", "0", "inf", "fast", str(tmp_path / "missing.json")):
        with pytest.raises(UsageError, match="--baseline"):
            bench.parse_baseline(bad)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("signal_name", ["SIGABRT", "SIGSEGV"])
def test_a_baseline_killed_by_a_signal_names_it_and_the_troubleshooting_page(monkeypatch, signal_name):
    """As when TensorFlow's oneDNN crash kills the baseline: one line naming the signal and the fix."""
    import sys

    suicide = f"import os, signal; print('munmap_chunk(): invalid pointer'); os.kill(os.getpid(), signal.{signal_name})"
    monkeypatch.setattr(bench, "baseline_command", lambda *args: [sys.executable, "-c", suicide])
    with pytest.raises(RuntimeError) as raised:
        bench.measure_baseline("job.yaml", (), steps=1, warmup=1, timeout=20)
    first = str(raised.value).splitlines()[0]
    assert first.startswith(f"distrain bench: the 1-replica baseline died by {signal_name} (exit -"), first
    assert "TF_ENABLE_ONEDNN_OPTS=0" in first and first.endswith("see docs/troubleshooting.md#a-run-dies-by-a-signal:")


def test_exit_codes_of_a_signal():
    from distrain.errors import killed_by, signal_death

    assert [killed_by(c) for c in (-11, -6, 139, 134, 137, 143)] == [
        "SIGSEGV", "SIGABRT", "SIGSEGV", "SIGABRT", "SIGKILL", "SIGTERM"]
    assert [killed_by(c) for c in (0, 1, 2, 75, 76, 77, 128, 255)] == [None] * 8  # distrain's own, and no signal
    assert signal_death("worker 1", 1) is None
    assert "out of memory" in signal_death("worker 1", -9) and "oneDNN" not in signal_death("worker 1", -9)


def test_single_process_env_drops_every_launcher_variable():
    env = {"TF_CONFIG": "{}", "SLURM_PROCID": "1", "HOROVOD_RANK": "1", "OMPI_COMM_WORLD_RANK": "1",
           "PMI_RANK": "1", "CUDA_VISIBLE_DEVICES": "2,3", "PATH": "/bin"}
    assert bench.single_process_env(env) == {"CUDA_VISIBLE_DEVICES": "2", "PATH": "/bin"}


def test_last_json_reads_the_indented_output():
    assert bench.last_json('noise {\n{\n "a": 1\n}\n') == {"a": 1}


@pytest.mark.parametrize("args, message", [
    (["bench", "missing.yaml"], "missing.yaml"),
    (["bench", "JOB", "--steps", "0"], "--steps"),
    (["bench", "JOB", "--warmup", "-1"], "--warmup"),
    (["bench", "JOB", "--baseline", "fast"], "--baseline"),
    (["bench", "JOB", "--set", "train.nope=1"], "train.nope"),
])
def test_bad_input_exits_2_before_anything_starts(tmp_path, args, message):
    job = write_job(tmp_path / "tiny.yaml", TINY)
    done = run_distrain([str(job) if a == "JOB" else a for a in args], timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_one_process_json_is_its_own_baseline(tmp_path):
    job = write_job(tmp_path / "tiny.yaml", TINY)
    done = run_distrain(["bench", str(job), "--steps", "6", "--warmup", "2", "--json"], timeout=240, forked=True)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert tuple(r) == bench.result_keys()
    assert (r["workers"], r["replicas"], r["global_batch"], r["steps"], r["warmup_steps"]) == (1, 1, 16, 6, 2)
    assert r["input_shape"] == [8, 8, 1] and r["strategy"] == "one_device" and r["baseline"]["source"] == "self"
    assert r["efficiency"] == pytest.approx(1.0) and r["images_per_s"] > 0
    assert set(r["step_time_s"]) == {"median", "mean", "min", "max"}


@pytest.mark.multiprocess
def test_two_workers_measure_a_baseline_and_only_the_chief_prints(tmp_path, workers_factory):
    job = write_job(tmp_path / "tiny.yaml", TINY)
    ports = free_ports(2)
    # The workers share one run dir (the start-up rendezvous keeps its secret there).
    cmd = [*DISTRAIN, "bench", str(job), "--steps", "6", "--warmup", "2", "--json", "--run-dir", str(tmp_path / "run")]
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, r)) for r in range(2)])
    assert workers.wait(timeout=400) == [0, 0], workers.output()
    outputs = [log.read_text() for log in workers.logs]
    r = bench.last_json(outputs[0])
    assert (r["launcher"], r["strategy"], r["workers"], r["replicas"], r["global_batch"]) == \
        ("tf_config", "multi_worker", 2, 2, 32)
    assert r["baseline"]["source"] == "measured" and r["baseline"]["images_per_s"] > 0
    assert r["efficiency"] > 0 and r["compute_s_per_step"] > 0 and r["communication_s_per_step"] >= 0
    assert '"efficiency"' not in outputs[1]  # the other worker prints nothing




def test_a_bad_user_model_exits_2_before_the_baseline_or_any_peer_starts(tmp_path):
    # Worker 0 of 2 under TF_CONFIG: past the start-up checks it would measure its baseline in a
    # child process and then wait at the rendezvous for worker 1, which never comes.
    (tmp_path / "net.py").write_text("def build(input_shape):\n    raise AssertionError('never built')\n")
    job = write_job(tmp_path / "job.yaml", "name: bad\nmodel: {name: net.py:build}\ndata: {source: digits}\n")
    env = worker_env(TF_CONFIG=tf_config(free_ports(2), 0))
    result = run_distrain(["bench", str(job), "--run-dir", str(tmp_path / "run")], env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("distrain: error:")]
    assert len(error) == 1 and "model.name" in error[0] and "net.py:build" in error[0], result.stderr
    assert "baseline" not in result.stderr and not (tmp_path / "run").exists()


def test_every_json_key_is_documented_in_the_bench_page():
    page = (REPO / "docs" / "bench.md").read_text()
    missing = [key for key in bench.result_keys() if f"`{key}`" not in page]
    assert not missing, f"docs/bench.md does not explain {missing}"
