"""RunContext: the run's arithmetic resolved once, without TensorFlow."""
import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, worker_env
from distrain.context import image_channels, input_shape, resolve
from distrain.errors import UsageError
from distrain.rundir import RunDir
from distrain.spec import spec_from_dict
from distrain.world import World


def _dist(replicas, local_replicas=None, name="multi_worker"):
    return SimpleNamespace(name=name, replicas=replicas, local_replicas=local_replicas or replicas)


def _data(train=1000, shape=(8, 8, 1), classes=10):
    return SimpleNamespace(train_size=train, input_shape=shape, num_classes=classes)


def test_resolve_batch_steps_and_plan(tmp_path):
    spec = spec_from_dict({"data": {"batch_size_per_replica": 16}, "train": {
        "epochs": 3, "learning_rate": 0.1, "optimizer": "sgd", "lr_scaling": "linear", "warmup_epochs": 1}})
    world = World(launcher="tf_config", rank=1, world_size=4)
    ctx = resolve(spec, world, _dist(4, 1), _data(1000), RunDir(tmp_path))
    assert (ctx.global_batch, ctx.per_replica_batch, ctx.replicas, ctx.local_replicas) == (64, 16, 4, 1)
    assert (ctx.steps_per_epoch, ctx.total_steps, ctx.start_step) == (15, 45, 0)
    assert not ctx.is_chief and ctx.input_shape == (8, 8, 1) and ctx.num_classes == 10
    assert ctx.plan.peak_lr == pytest.approx(0.1 * 64 / 16) and ctx.plan.warmup_steps == 15
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.global_batch = 1


def _committed_backup(run: RunDir, step: int) -> None:
    run.backup.mkdir(parents=True, exist_ok=True)
    for suffix in (".index", ".data-00000-of-00001"):
        run.backup.joinpath(f"ckpt-{step}{suffix}").write_bytes(b"tensors")
    run.commit_backup(step)


def test_start_step_comes_from_the_newest_backup_that_verifies(tmp_path, caplog):
    run = RunDir(tmp_path)
    _committed_backup(run, 37)
    spec = spec_from_dict({"data": {"batch_size_per_replica": 10}, "train": {"epochs": 2}})
    ctx = resolve(spec, World(launcher="local"), _dist(1, name="one_device"), _data(200), run)
    assert (ctx.start_step, ctx.start_epoch, ctx.step_in_start_epoch, ctx.is_complete) == (37, 1, 17, False)
    _committed_backup(run, 40)
    assert resolve(spec, World(launcher="local"), _dist(1, name="one_device"), _data(200), run).is_complete
    run.backup.joinpath("ckpt-40.index").write_bytes(b"cut")
    with caplog.at_level("WARNING", logger="distrain"):
        assert resolve(spec, World(launcher="local"), _dist(1, name="one_device"), _data(200), run).start_step == 37
    assert [r.getMessage() for r in caplog.records] == [
        f"{run.backup}/ckpt-40: skipped: ckpt-40.index has 3 bytes, 7 were written (cut short or overwritten); "
        "resuming from ckpt-37 (step 37)"]


def test_global_batch_larger_than_the_data_is_a_usage_error(tmp_path):
    spec = spec_from_dict({"data": {"batch_size_per_replica": 64}})
    with pytest.raises(UsageError, match="data.batch_size_per_replica: the global batch \\(256\\)"):
        resolve(spec, World(launcher="local"), _dist(4), _data(200), RunDir(tmp_path))


def test_input_shape_and_channels():
    assert input_shape(spec_from_dict({}), (8, 8, 1)) == (8, 8, 1)
    assert input_shape(spec_from_dict({"model": {"input_shape": [32, 32]}}), (8, 8, 3)) == (32, 32, 3)
    with pytest.raises(UsageError, match="model.input_shape: \\[32, 32, 3\\] has 3 channels, the data has 1"):
        input_shape(spec_from_dict({"model": {"input_shape": [32, 32, 3]}}), (8, 8, 1))
    assert image_channels(spec_from_dict({}), (28, 28, 1)) == 1
    assert image_channels(spec_from_dict({"model": {"input_shape": [64, 64, 3]}}), (28, 28, 1)) == 3
    assert image_channels(spec_from_dict({}), None) == 3


def test_context_imports_no_tensorflow():
    code = "import sys, distrain.context\nassert 'tensorflow' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=worker_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr
