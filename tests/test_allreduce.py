"""How gradients are summed (``distrain/backends/allreduce.py``): ``distribute.gradient_all_reduce``
(collectives resolved once, or MultiWorkerMirroredStrategy's own), ``distribute.gradient_compression:
fp16`` (tf.distribute and Horovod) and ``distribute.all_reduce_pack_bytes`` (packs).

Resolving once and packing change only how the gradients travel, so 2 workers still train the
weights of one process within 1e-5 (``test_equivalence.py`` runs the default, resolved once). fp16
rounds each summed gradient to float16: the weights stay within ``FP16_TOLERANCE`` of one process's
(the measured difference is in docs/performance.md), and they do differ, which shows the
compression is applied rather than ignored.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import (DISTRAIN, REPO, Forked, free_ports, horovodrun, model_weights, run_distrain, tf_config,
                      worker_env, write_job)
from distrain.backends.allreduce import INSTANCE_KEY_BASE, pack_by_size
from distrain.errors import UsageError
from distrain.spec import spec_from_dict
from distrain.backends.factory import gradient_all_reduce

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
distribute: {{strategy: {strategy}, cpu_devices: {cpu_devices}, gradient_compression: {compression}, all_reduce_pack_bytes: {pack}, gradient_all_reduce: {all_reduce}}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 0}}
logging: {{tensorboard: false, verbose: 0}}
"""


def _job(path: Path, *, per_replica=16, strategy="one_device", cpu_devices=0, compression="none", pack=0,
         all_reduce="setup_once") -> Path:
    return write_job(path, JOB.format(per_replica=per_replica, strategy=strategy, cpu_devices=cpu_devices,
                                      compression=compression, pack=pack, all_reduce=all_reduce))


def _relative_differences(a: list, b: list) -> list[float]:
    return [float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)) for x, y in zip(a, b)]


def test_spec_accepts_the_options_and_names_a_bad_value():
    d = spec_from_dict({"distribute": {"gradient_compression": "fp16", "all_reduce_pack_bytes": 4 << 20}}).distribute
    assert (d.gradient_compression, d.all_reduce_pack_bytes) == ("fp16", 4 << 20)
    with pytest.raises(UsageError, match="distribute.gradient_compression"):
        spec_from_dict({"distribute": {"gradient_compression": "int8"}})
    with pytest.raises(UsageError, match="distribute.all_reduce_pack_bytes"):
        spec_from_dict({"distribute": {"all_reduce_pack_bytes": -1}})
    assert spec_from_dict({}).distribute.gradient_all_reduce == "auto"
    assert spec_from_dict({"distribute": {"gradient_all_reduce": "tensorflow"}}).distribute.gradient_all_reduce == "tensorflow"
    with pytest.raises(UsageError, match="distribute.gradient_all_reduce"):
        spec_from_dict({"distribute": {"gradient_all_reduce": "v1"}})


def test_the_old_name_resolved_once_still_works_with_a_notice(caplog):
    with caplog.at_level("WARNING", logger="distrain"):
        spec = spec_from_dict({"distribute": {"gradient_all_reduce": "resolved_once"}})
    assert spec.distribute.gradient_all_reduce == "setup_once"
    assert [r.getMessage() for r in caplog.records] == [
        "distribute.gradient_all_reduce: resolved_once is now called setup_once; the old name still works, for now"]


def test_auto_resolves_once_on_cpu_workers_and_leaves_gpus_to_tensorflow():
    assert gradient_all_reduce("auto", gpus=False) == "setup_once"
    assert gradient_all_reduce("auto", gpus=True) == "tensorflow"
    for requested in ("setup_once", "tensorflow"):
        assert gradient_all_reduce(requested, gpus=True) == gradient_all_reduce(requested, gpus=False) == requested


def test_pack_by_size_keeps_order_and_fills_each_pack_to_the_size():
    sizes = {0: 4, 1: 4, 2: 8, 3: 2}
    assert pack_by_size([0, 1, 2, 3], sizes, 8) == [[0, 1], [2], [3]]
    assert pack_by_size([3, 2, 1, 0], sizes, 8) == [[3, 2], [1, 0]]
    assert pack_by_size([0, 1, 2, 3], sizes, 1) == [[0], [1], [2], [3]]
    assert pack_by_size([0, 1, 2, 3], sizes, 1 << 20) == [[0, 1, 2, 3]]
    assert pack_by_size([], sizes, 8) == []


# Two MultiWorkerMirroredStrategy workers: what each way of summing puts in the traced step, which
# keys each worker chose, and that it sums. Worker i's gradients are (i + 1) x (1, 2, 3), so the sum
# over both is 3 x that. Each worker traces the functions in a different order, so keys that agree
# cannot come from counting.
TRACE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from distrain.tf_startup import import_tensorflow
    tf = import_tensorflow()
    from distrain.backends.allreduce import sum_gradients
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = strategy.cluster_resolver.task_id
    with strategy.scope():
        variables = [tf.Variable(tf.zeros([3])), tf.Variable(tf.zeros([2, 2])), tf.Variable(tf.zeros([], tf.float64)),
                     tf.Variable(tf.zeros([4, 2]))]
    report = {"group_key": strategy.extended._cross_device_ops._launchers[0]._group_key}
    modes = [("tensorflow", 0), ("setup_once", 0), ("setup_once", 16)]
    steps = {}
    for mode, pack_bytes in modes if rank == 0 else [modes[0], modes[2], modes[1]]:
        with strategy.scope():
            optimizer = sum_gradients(tf.keras.optimizers.SGD(1.0), strategy,
                                      setup_once=mode == "setup_once", pack_bytes=pack_bytes)
        def make(optimizer, mode):
            @tf.function
            def step():
                def replica():
                    grads = [tf.ones([3]), tf.fill([2, 2], 2.0), tf.constant(3.0, tf.float64)]
                    pairs = list(zip([g * (rank + 1) for g in grads], variables))
                    # An embedding's gradient: row 1 of the table, (rank + 1) x 4.
                    rows = tf.IndexedSlices(tf.fill([1, 2], 4.0 * (rank + 1)), tf.constant([1]), tf.constant([4, 2]))
                    # TensorFlow's own packing concatenates dtypes it cannot mix: float32 only there.
                    optimizer.apply_gradients(pairs[:2] if mode == "tensorflow" else [*pairs, (rows, variables[3])])
                strategy.run(replica)
            return step
        steps[f"{mode}/{pack_bytes}"] = make(optimizer, mode)
        steps[f"{mode}/{pack_bytes}"].get_concrete_function()  # trace in this worker's order
    for name in [f"{m}/{p}" for m, p in modes]:  # run in the same order on both
        before = [v.numpy() for v in variables]
        for _ in range(2):
            steps[name]()
        ops = steps[name].get_concrete_function().graph.get_operations()
        collect = lambda kind: sorted([op.get_attr("group_key"), op.get_attr("instance_key"),
                                       op.get_attr("group_size"), op.device] for op in ops if op.type == kind)
        report[name] = {"v1": collect("CollectiveReduce"), "v2": sum(op.type == "CollectiveReduceV2" for op in ops),
                        "moved": [(b - v.numpy()).ravel().tolist() for b, v in zip(before, variables)]}
    print(json.dumps(report))
""")


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_setup_once_uses_v1_collectives_whose_keys_every_worker_derives_alike(tmp_path, workers_factory):
    script = tmp_path / "trace.py"
    script.write_text(TRACE_SCRIPT)
    ports = free_ports(2)
    cmd = [sys.executable, str(script), str(REPO)]
    workers = workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)])
    assert workers.wait(timeout=150) == [0, 0], workers.output()
    reports = [json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])
               for log in workers.logs]
    worker0 = reports[0]
    # TensorFlow's own: V2 ops only (their instance keys are fed at each call).
    assert worker0["tensorflow/0"]["v1"] == [] and worker0["tensorflow/0"]["v2"] > 0
    once, packed = worker0["setup_once/0"], worker0["setup_once/16"]
    # Resolved once: V1 ops on the strategy's group and this worker's CPU, no V2 all-reduce left (the
    # embedding's rows go to TensorFlow's all-gather); one op per dtype, or with 16-byte packs float64
    # alone and float32 in two (the 2x2's 16 B first: last layers first, then the 12 B).
    assert once["v2"] == 0 and packed["v2"] == 0
    device = "/job:worker/replica:0/task:0/device:CPU:0"
    assert [(g, size, d) for g, _, size, d in once["v1"]] == [(worker0["group_key"], 2, device)] * 2
    assert [(g, size, d) for g, _, size, d in packed["v1"]] == [(worker0["group_key"], 2, device)] * 3
    for ops in (once["v1"], packed["v1"]):
        keys = [key for _, key, _, _ in ops]
        assert len(set(keys)) == len(keys) and all(INSTANCE_KEY_BASE <= k < INSTANCE_KEY_BASE * 3 // 2 for k in keys)
    # The float64 scalar is the same collective in both functions: the same key, which TensorFlow
    # accepts because the shape is the one it first saw for it.
    assert len({k for _, k, _, _ in once["v1"]} & {k for _, k, _, _ in packed["v1"]}) == 1
    # Worker 1 traced in another order and chose the same keys.
    for name in ("setup_once/0", "setup_once/16"):
        assert [op[:3] for op in reports[1][name]["v1"]] == [op[:3] for op in worker0[name]["v1"]], name
    # Every way summed both workers' gradients: 2 SGD steps of learning rate 1 moved each variable
    # by 2 x 3 x (1, 2, 3), and the embedding's row 1 by 2 x 3 x 4, on both workers (TensorFlow's
    # own: the float32 dense ones).
    embedding = [0.0, 0.0, 24.0, 24.0, 0.0, 0.0, 0.0, 0.0]
    for report in reports:
        assert report["tensorflow/0"]["moved"] == [[6.0] * 3, [12.0] * 4, [0.0], [0.0] * 8]
        for name in ("setup_once/0", "setup_once/16"):
            assert report[name]["moved"] == [[6.0] * 3, [12.0] * 4, [18.0], embedding], name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    done = run_distrain(["train", str(_job(tmp / "job.yaml", per_replica=32)), "--run-dir", str(tmp / "run")],
                        forked=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


@pytest.mark.timeout(300)
def test_fp16_all_reduce_over_two_replicas_stays_close_to_one_process(one_process, tmp_path):
    job = _job(tmp_path / "job.yaml", strategy="mirrored", cpu_devices=2, compression="fp16")
    done = run_distrain(["train", str(job), "--run-dir", str(tmp_path / "run")], forked=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["replicas"], summary["steps"]) == (2, STEPS)
    diffs = _relative_differences(model_weights(tmp_path / "run"), model_weights(one_process))
    print("fp16 vs one process, relative L2 per weight tensor:", ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) <= FP16_TOLERANCE, diffs
    assert max(diffs) > 1e-7, "fp16 compression changed nothing: is it applied?"


def _two_workers_against_one_process(one_process, tmp_path, workers_factory, label: str, env: dict | None = None,
                                     **job) -> tuple[list[float], list[str]]:
    """Trains the job on 2 multi_worker processes: the relative differences to one process's
    weights, and the workers' logs. Without ``env`` (which must be there before TensorFlow's
    import) they are forked (conftest.Forked): the sums are the point, not a process's start-up."""
    path = _job(tmp_path / "job.yaml", strategy="multi_worker", **job)
    ports = free_ports(2)
    args = ["train", str(path), "--run-dir", str(tmp_path / "run")]
    envs = [worker_env(TF_CONFIG=tf_config(ports, i), **(env or {})) for i in range(2)]
    if env:
        workers = workers_factory([[*DISTRAIN, *args]] * 2, envs)
        assert workers.wait(timeout=240) == [0, 0], workers.output()
        logs = [log.read_text() for log in workers.logs]
    else:
        pair = [Forked(args, tmp_path / f"worker{i}.log", env=envs[i]) for i in range(2)]
        try:
            done = [run.wait(timeout=240) for run in pair]
        finally:
            for run in pair:
                run.kill()
        logs = [run.stdout for run in done]
        assert [run.returncode for run in done] == [0, 0], "\n".join(log[-3000:] for log in logs)
    diffs = _relative_differences(model_weights(tmp_path / "run"), model_weights(one_process))
    print(f"{label} vs one process, relative L2 per weight tensor:", ", ".join(f"{d:.1e}" for d in diffs))
    return diffs, logs


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_packed_all_reduce_over_two_workers_is_exact(one_process, tmp_path, workers_factory):
    # 2 KiB packs split this CNN's gradients (320 B of conv, 5.2 KB of dense) into more than one all-reduce.
    # Grappler's scoped allocator, which logs what it rewrites at this level, must leave them apart
    # (allreduce.keep_collectives_apart): without that it merged them into one.
    verbose = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "scoped_allocator_optimizer=2"}
    diffs, logs = _two_workers_against_one_process(one_process, tmp_path, workers_factory, "packed", env=verbose,
                                                   pack=2048)
    assert max(diffs) <= 1e-5, diffs
    assert all("ScopedAllocatorOptimizer" in log for log in logs), "the optimizer's log is missing: is the level set?"
    assert not any("Rewrite CollectiveReduce" in log for log in logs), [
        line for log in logs for line in log.splitlines() if "Rewrite CollectiveReduce" in line]


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_tensorflows_own_all_reduce_over_two_workers_is_exact(one_process, tmp_path, workers_factory):
    diffs, _ = _two_workers_against_one_process(one_process, tmp_path, workers_factory, "TensorFlow's all-reduce",
                                                all_reduce="tensorflow")
    assert max(diffs) <= 1e-5, diffs


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_fp16_all_reduce_over_two_workers_setup_once_stays_close_to_one_process(one_process, tmp_path,
                                                                                    workers_factory):
    diffs, _ = _two_workers_against_one_process(one_process, tmp_path, workers_factory, "fp16 (2 workers)",
                                                compression="fp16")
    assert max(diffs) <= FP16_TOLERANCE, diffs
    assert max(diffs) > 1e-7, "fp16 compression changed nothing: is it applied?"


@pytest.mark.horovod
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_horovod_fp16_compression_stays_close_to_one_process(needs_horovod, one_process, tmp_path, workers_factory):
    job = _job(tmp_path / "job.yaml", strategy="horovod", compression="fp16")
    workers = workers_factory([horovodrun([*DISTRAIN, "train", str(job), "--run-dir", str(tmp_path / "run")])],
                              [worker_env()])
    assert workers.wait(timeout=240) == [0], workers.output()
    diffs = _relative_differences(model_weights(tmp_path / "run"), model_weights(one_process))
    print("fp16 vs one process, relative L2 per weight tensor:", ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) <= FP16_TOLERANCE, diffs
    assert max(diffs) > 1e-7, "fp16 compression changed nothing: is it applied?"
