"""Gradient communication options: ``distribute.gradient_compression: fp16`` (tf.distribute and
Horovod) and ``distribute.all_reduce_pack_bytes`` (MultiWorkerMirroredStrategy packs).

Packing changes only how the gradients travel, so 2 workers still train the weights of one process
within 1e-5. fp16 rounds each summed gradient to float16: the weights stay within
``FP16_TOLERANCE`` of one process's (the measured difference is in docs/performance.md), and they
do differ, which shows the compression is applied rather than ignored.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DISTRAIN, free_ports, model_weights, run_distrain, tf_config, worker_env, write_job
from distrain.errors import UsageError
from distrain.spec import spec_from_dict

# Measured 2026-11-29 (these tests, -s): fp16 all-reduce vs one process after 6 SGD steps, largest
# relative L2 over the weight tensors 1.8e-3 (mirrored, 2 replicas) and 2.1e-4 (Horovod, 2 ranks).
FP16_TOLERANCE = 1e-2
STEPS = 6
JOB = """
name: compression
seed: 7
model: {{name: cnn, params: {{filters: 8}}}}
data: {{source: digits, batch_size_per_replica: {per_replica}}}
train: {{epochs: 2, steps_per_epoch: 3, optimizer: sgd, momentum: 0.9, learning_rate: 0.05, lr_scaling: none}}
distribute: {{strategy: {strategy}, cpu_devices: {cpu_devices}, gradient_compression: {compression}, all_reduce_pack_bytes: {pack}}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 0}}
logging: {{tensorboard: false, verbose: 0}}
"""


def _job(path: Path, *, per_replica=16, strategy="one_device", cpu_devices=0, compression="none", pack=0) -> Path:
    return write_job(path, JOB.format(per_replica=per_replica, strategy=strategy, cpu_devices=cpu_devices,
                                      compression=compression, pack=pack))


def _relative_differences(a: list, b: list) -> list[float]:
    return [float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)) for x, y in zip(a, b)]


def test_spec_accepts_the_options_and_names_a_bad_value():
    d = spec_from_dict({"distribute": {"gradient_compression": "fp16", "all_reduce_pack_bytes": 4 << 20}}).distribute
    assert (d.gradient_compression, d.all_reduce_pack_bytes) == ("fp16", 4 << 20)
    with pytest.raises(UsageError, match="distribute.gradient_compression"):
        spec_from_dict({"distribute": {"gradient_compression": "int8"}})
    with pytest.raises(UsageError, match="distribute.all_reduce_pack_bytes"):
        spec_from_dict({"distribute": {"all_reduce_pack_bytes": -1}})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    done = run_distrain(["train", str(_job(tmp / "job.yaml", per_replica=32)), "--run-dir", str(tmp / "run")])
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


@pytest.mark.timeout(300)
def test_fp16_all_reduce_over_two_replicas_stays_close_to_one_process(one_process, tmp_path):
    job = _job(tmp_path / "job.yaml", strategy="mirrored", cpu_devices=2, compression="fp16")
    done = run_distrain(["train", str(job), "--run-dir", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["replicas"], summary["steps"]) == (2, STEPS)
    diffs = _relative_differences(model_weights(tmp_path / "run"), model_weights(one_process))
    print("fp16 vs one process, relative L2 per weight tensor:", ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) <= FP16_TOLERANCE, diffs
    assert max(diffs) > 1e-7, "fp16 compression changed nothing: is it applied?"


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_packed_all_reduce_over_two_workers_is_exact(one_process, tmp_path, workers_factory):
    # 2 KiB packs split this CNN's gradients (320 B of conv, 5.2 KB of dense) into more than one all-reduce.
    job = _job(tmp_path / "job.yaml", strategy="multi_worker", pack=2048)
    ports = free_ports(2)
    cmd = [*DISTRAIN, "train", str(job), "--run-dir", str(tmp_path / "run")]
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)])
    assert workers.wait(timeout=240) == [0, 0], workers.output()
    diffs = _relative_differences(model_weights(tmp_path / "run"), model_weights(one_process))
    print("packed vs one process, relative L2 per weight tensor:", ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) <= 1e-5, diffs


@pytest.mark.horovod
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_horovod_fp16_compression_stays_close_to_one_process(one_process, tmp_path, workers_factory):
    horovodrun = Path(sys.executable).parent / "horovodrun"
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError:
        pytest.skip("Horovod is not installed (scripts/install-horovod.sh)")
    if not shutil.which(str(horovodrun)):
        pytest.skip("horovodrun is not installed")
    job = _job(tmp_path / "job.yaml", strategy="horovod", compression="fp16")
    cmd = [str(horovodrun), "-np", "2", "-H", "localhost:2", "--gloo", "--network-interface", "lo",
           *DISTRAIN, "train", str(job), "--run-dir", str(tmp_path / "run")]
    workers = workers_factory([cmd], [worker_env()])
    assert workers.wait(timeout=240) == [0], workers.output()
    diffs = _relative_differences(model_weights(tmp_path / "run"), model_weights(one_process))
    print("fp16 vs one process, relative L2 per weight tensor:", ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) <= FP16_TOLERANCE, diffs
    assert max(diffs) > 1e-7, "fp16 compression changed nothing: is it applied?"
