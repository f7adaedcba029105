"""``distrain doctor`` (distrain/doctor.py), slurm/doctor.sh, and conftest's ``gpu`` marker rule.

One real run of the doctor on this machine's CPU (``--json``, a few steps); the rest are the pure
pieces (tolerance, table, exit code) with hand-made reports, and the command's flags in-process.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_distrain, tensorflow_sees_a_gpu, worker_env
from distrain import cli, doctor
from distrain.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def _report(gpu_visible: bool = False) -> dict:
    """A report as ``doctor.run`` returns it, every check passed (no TensorFlow needed)."""
    rows = [{"precision": p, "max_relative_difference": 1e-7 if p == "float32" else 3e-3, "weights_moved": 0.05,
             "tolerance": doctor.tolerance(p), "passed": True, "error": None} for p in doctor.PRECISIONS]
    speed = [{"name": n, "precision": p, "jit_compile": j, "images_per_s": 1000.0 * (i + 1), "vs_float32": i + 1.0,
              "error": None} for i, (n, p, j) in enumerate(doctor.SPEED_RUNS)]
    gpus = [{"device": "/physical_device:GPU:0", "name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}]
    return {"host": "node1", "gpu_visible": gpu_visible, "notice": None if gpu_visible else doctor.NO_GPU.format(n=2),
            "machine": {"tensorflow": "2.21.0", "tf_keras": "2.21.0", "gpus": gpus if gpu_visible else [],
                        "cuda_visible_devices": "0", "cuda": "12.5.1", "cudnn": "9", "memory_growth": "on",
                        "tf32": "off", "tf32_on": False, "nccl": "not checked: one GPU, nothing to all-reduce",
                        "cpus": "2 usable of 2"},
            "equivalence": {"replicas": 2, "devices": "MirroredStrategy over 2 logical CPUs", "global_batch": 16,
                            "steps": 4, "rows": rows},
            "speed": {"model": "cnn", "input_shape": [28, 28, 1], "batch": 64, "steps": 3, "warmup": 1,
                      "device": "/CPU:0", "rows": speed, "note": None},
            "failed": [], "exit_code": 0, "verdict": None}


def _failing(report: dict) -> dict:
    """``report`` with mixed_float16's equivalence out of tolerance."""
    bad = copy.deepcopy(report)
    row = bad["equivalence"]["rows"][1]
    row["max_relative_difference"], row["passed"] = 0.3, False
    return bad


# ----------------------------------------------------------------------------- the real run here

@pytest.fixture(scope="module")
def cpu_run() -> dict:
    """``distrain doctor --json`` on this machine's CPU, with few timed steps (about 20 s)."""
    # worker_env hides any GPU (CUDA_VISIBLE_DEVICES=-1): the CPU part, also on a GPU node.
    done = run_distrain(["doctor", "--steps", "3", "--warmup", "1", "--json"], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.timeout(300)
def test_the_doctor_runs_on_cpu_and_says_there_is_no_gpu(cpu_run):
    m = cpu_run["machine"]
    assert cpu_run["gpu_visible"] is False
    assert cpu_run["notice"].startswith("no GPU visible to TensorFlow") and "\n" not in cpu_run["notice"]
    assert m["tensorflow"] == importlib.metadata.version("tensorflow")
    assert m["tf_keras"] == importlib.metadata.version("tf-keras")
    assert m["gpus"] == [] and m["memory_growth"] == "no GPU" and m["nccl"].startswith("not checked: no GPU")
    assert m["cuda"] and m["cudnn"] and m["cpus"].endswith(f"of {os.cpu_count()}")
    assert cpu_run["failed"] == [] and cpu_run["exit_code"] == 0 and cpu_run["verdict"] is None


@pytest.mark.timeout(300)
def test_two_logical_cpus_train_the_numbers_of_one_in_every_precision(cpu_run):
    eq = cpu_run["equivalence"]
    assert eq["replicas"] == 2 and eq["global_batch"] == 2 * doctor.EQUIVALENCE_BATCH_PER_REPLICA
    assert [r["precision"] for r in eq["rows"]] == list(doctor.PRECISIONS)
    for row in eq["rows"]:
        assert row["passed"] and row["error"] is None, row
        assert row["max_relative_difference"] <= doctor.TOLERANCE[row["precision"]]
        # The check can see a mistake of the size of one update: the weights move well past the tolerance.
        assert row["weights_moved"] > 2 * row["tolerance"], row


@pytest.mark.timeout(300)
def test_the_speed_rows_cover_each_precision_and_xla_against_float32(cpu_run):
    sp = cpu_run["speed"]
    assert [(r["name"], r["precision"], r["jit_compile"]) for r in sp["rows"]] == list(doctor.SPEED_RUNS)
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in sp["rows"]), sp["rows"]
    assert sp["rows"][0]["vs_float32"] == 1.0
    for row in sp["rows"][1:]:
        assert math.isclose(row["vs_float32"], row["images_per_s"] / sp["rows"][0]["images_per_s"])
    assert sp["model"] == "cnn" and sp["steps"] == 3 and sp["warmup"] == 1
    assert "say nothing about a GPU" in sp["note"] and "tensorflow#45441" in sp["note"]
    table = doctor.format_report(cpu_run)  # the table of this very run
    assert table.splitlines()[1] == cpu_run["notice"]
    assert "mixed_bfloat16" in table and "float32 + XLA" in table and "CUDA (built with)" in table


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_the_doctor_passes_on_a_gpu_node():
    done = run_distrain(["doctor", "--steps", "10", "--json", "--require-gpu"], timeout=580, env=dict(os.environ))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["gpu_visible"] and report["machine"]["gpus"] and report["notice"] is None
    assert report["machine"]["memory_growth"] == "on" and report["machine"]["cuda"] != "none"
    assert all(r["passed"] for r in report["equivalence"]["rows"])
    assert all(r["images_per_s"] for r in report["speed"]["rows"]) and report["speed"]["note"] is None


# ----------------------------------------------------------------------------- the pure pieces

def test_tolerance_per_precision_and_under_tf32():
    assert doctor.tolerance("float32") == 1e-5
    assert doctor.tolerance("float32", tf32=True) == doctor.tolerance("mixed_float16")
    assert doctor.tolerance("mixed_bfloat16", tf32=True) == doctor.TOLERANCE["mixed_bfloat16"]
    assert doctor.within(9e-6, 1e-5) and doctor.within(1e-5, 1e-5)
    assert not doctor.within(2e-5, 1e-5)
    assert not doctor.within(float("nan"), 1e-5) and not doctor.within(float("inf"), 1) and not doctor.within(None, 1)


def test_relative_difference_is_the_worst_tensor():
    assert doctor.relative_difference([[1.0, 0.0], [3.0, 4.0]], [[1.0, 0.0], [3.0, 4.0]]) == 0.0
    assert math.isclose(doctor.relative_difference([[1.0, 0.0], [3.0, 4.5]], [[1.0, 0.0], [3.0, 4.0]]), 0.1)
    with pytest.raises(ValueError):  # a different model is not "equivalent"
        doctor.relative_difference([[1.0]], [[1.0], [2.0]])


def test_format_table_aligns_columns_and_numbers_right():
    lines = doctor.format_table(["run", "images/s", "vs float32"],
                                [["float32", "812.5", "1.00x"], ["float32 + XLA", "1234.0", "1.52x"]]).splitlines()
    assert lines == ["  run            images/s  vs float32",
                     "  float32           812.5       1.00x",
                     "  float32 + XLA    1234.0       1.52x"]


def test_the_table_has_every_row_and_the_no_gpu_line_first():
    text = doctor.format_report(_report())
    lines = text.splitlines()
    assert lines[0] == "distrain doctor on node1" and lines[1].startswith("no GPU visible to TensorFlow")
    for item in ("TensorFlow", "tf-keras", "GPUs", "CUDA (built with)", "cuDNN (built with)", "memory growth",
                 "NCCL", "CPUs"):
        assert any(line.startswith(f"  {item}  ") for line in lines), item
    assert "  GPUs                  none" in lines
    eq = next(i for i, line in enumerate(lines) if line.startswith("equivalence: 2 replicas"))
    assert lines[eq + 1].split() == ["precision", "max", "rel.", "diff", "tolerance", "weights", "moved", "result"]
    assert lines[eq + 3].split() == ["mixed_float16", "3.0e-03", "1e-02", "5.0%", "pass"]
    gpu = doctor.format_report(_report(gpu_visible=True)).splitlines()
    assert gpu[1] == "" and "  GPUs                  1: NVIDIA A100-SXM4-40GB (compute capability 8.0)" in gpu


def test_a_failed_check_on_a_gpu_node_exits_1_with_one_line_naming_it():
    bad = _failing(_report(gpu_visible=True))
    failed = doctor.failed_checks(bad)
    assert failed == ["equivalence mixed_float16: max relative difference 3.0e-01 > tolerance 1e-02"]
    code, line = doctor.decide(True, failed)
    assert code == EXIT_FAILED and line.startswith("failed: equivalence mixed_float16") and "\n" not in line
    assert doctor.decide(True, []) == (EXIT_OK, None)


def test_errors_and_nccl_failures_are_failed_checks():
    report = _report(gpu_visible=True)
    report["speed"]["rows"][2].update(images_per_s=None, vs_float32=None, error="InternalError: no bf16 kernel")
    report["machine"]["nccl"] = "failed: UnavailableError: NCCL not found"
    assert doctor.failed_checks(report) == ["NCCL failed: UnavailableError: NCCL not found",
                                            "speed mixed_bfloat16: InternalError: no bf16 kernel"]
    assert "ERROR: InternalError: no bf16 kernel" in doctor.format_report(report)


def test_without_a_gpu_the_exit_is_0_unless_a_gpu_is_required():
    failed = doctor.failed_checks(_failing(_report()))
    code, line = doctor.decide(False, failed)
    assert code == EXIT_OK and line.startswith("a CPU check failed (not an error without a GPU)")
    assert doctor.decide(False, []) == (EXIT_OK, None)
    assert doctor.decide(False, [], require_gpu=True) == (
        EXIT_FAILED, "failed: no GPU visible to TensorFlow, and --require-gpu was given")


# ----------------------------------------------------------------------------- the command

@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "distrain: error: --steps: expected a positive integer, got 0"),
    (["--warmup", "0"], "distrain: error: --warmup: expected an integer >= 1 (the first step traces), got 0"),
])
def test_bad_flags_exit_2_with_one_line_before_tensorflow(flags, message, capsys, monkeypatch):
    monkeypatch.setattr(doctor, "run", lambda *a, **k: pytest.fail("the doctor ran"))
    assert cli.main(["doctor", *flags]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == message


def test_an_unknown_model_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["doctor", "--model", "resnet50"])
    assert exit_.value.code == EXIT_USAGE and "--model: invalid choice: 'resnet50'" in capsys.readouterr().err


def test_the_command_prints_the_table_and_exits_by_the_verdict(capsys, monkeypatch):
    bad = _failing(_report(gpu_visible=True))
    bad["failed"] = doctor.failed_checks(bad)
    bad["exit_code"], bad["verdict"] = doctor.decide(True, bad["failed"])
    seen = []

    def fake_run(*args):
        seen.append(args)
        return bad

    monkeypatch.setattr(doctor, "run", fake_run)
    assert cli.main(["doctor", "--steps", "7", "--model", "mlp"]) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert seen == [(7, doctor.DEFAULT_WARMUP, "mlp", False)]
    assert out.startswith("distrain doctor on node1\n") and "FAIL" in out
    assert err.splitlines()[-1] == ("distrain doctor: failed: equivalence mixed_float16: max relative difference "
                                    "3.0e-01 > tolerance 1e-02")
    monkeypatch.setattr(doctor, "run", lambda *a: _report())
    assert cli.main(["doctor", "--json"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert json.loads(out)["gpu_visible"] is False and err == ""


# ----------------------------------------------------------------------------- slurm/doctor.sh

@pytest.mark.timeout(30)
def test_slurm_doctor_passes_shellcheck_and_refuses_to_run_outside_slurm(needs_shellcheck):
    script = REPO / "slurm" / "doctor.sh"
    done = subprocess.run(["shellcheck", "-x", "-P", str(REPO), str(script)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=20)
    assert done.returncode == 2 and done.stderr.startswith("doctor.sh: not inside a SLURM job")
    text = script.read_text()
    assert "--ntasks-per-node=1" in text and '"$DISTRAIN" doctor "${ARGS[@]}"' in text


# ----------------------------------------------------------------------------- conftest's gpu rule

GPU_RULE_TESTS = """
import pytest

@pytest.mark.gpu
def test_needs_a_gpu():
    pass

def test_runs_anywhere():
    pass
"""


@pytest.mark.timeout(120)
def test_gpu_marked_tests_are_deselected_not_skipped_without_a_gpu(tmp_path):
    (tmp_path / "test_rule.py").write_text(GPU_RULE_TESTS)
    # tests/conftest.py as a plugin: the rule under test, on a file outside tests/.
    env = {**worker_env(), "PYTHONPATH": str(REPO / "tests")}
    env.pop("CUDA_VISIBLE_DEVICES")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA",
                           "-o", "markers=gpu: needs a GPU", "--strict-markers", "test_rule.py"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    if tensorflow_sees_a_gpu():
        assert "2 passed" in summary, summary
    else:
        assert "1 passed, 1 deselected" in summary and "skipped" not in summary, summary
        assert "test_needs_a_gpu" not in done.stdout  # not collected, not reported
