"""``distrain.checkpoint.UserCheckpoints``: the periodic checkpoints rotate (the ``keep`` newest stay,
older files are deleted, a resumed run continues the rotation), ``mode: auto`` picks min or max from
the monitor's name, and ``best.weights.h5``/``best.json`` follow only improvements; a non-chief
worker leaves no file behind. One process, a tiny model, no training."""
from __future__ import annotations

import json

import numpy as np
import pytest

import distrain  # noqa: F401  (tf-keras for tf.keras)
import tensorflow as tf

from distrain.checkpoint import UserCheckpoints, WorkerFiles
from distrain.rundir import RunDir, file_record


def tiny_model():
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    set_weights(model, 0.0)
    return model


def set_weights(model, value: float) -> None:
    """Every weight of ``model`` becomes ``value``: a file tells which save it came from."""
    model.set_weights([np.full(w.shape, value, np.float32) for w in model.get_weights()])


def weights_in(path) -> float:
    """The one value of every weight in a weights file saved from a ``tiny_model``."""
    model = tiny_model()
    model.load_weights(str(path))
    values = {float(v) for w in model.get_weights() for v in np.ravel(w)}
    assert len(values) == 1, values
    return values.pop()


def checkpoints(run_dir: RunDir, model, *, keep=2, monitor="val_loss", mode="auto", rank=0, is_chief=True):
    return UserCheckpoints(model, run_dir, WorkerFiles(run_dir, rank, is_chief), keep=keep, monitor=monitor,
                           mode=mode)


def files(run_dir: RunDir) -> list[str]:
    """What is in checkpoints/ (sorted; temporary files included, so a leftover one shows)."""
    return sorted(p.name for p in run_dir.checkpoints.iterdir()) if run_dir.checkpoints.exists() else []


def index(run_dir: RunDir) -> dict:
    return json.loads(run_dir.checkpoint_index.read_text())


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    return RunDir(tmp_path / "run")


# ----------------------------------------------------------------------------- rotation

def test_rotation_keeps_the_keep_newest_and_deletes_older_files(run_dir):
    model = tiny_model()
    ckpt = checkpoints(run_dir, model, keep=2)
    for epoch in range(1, 5):
        set_weights(model, float(epoch))
        ckpt.save_periodic(f"epoch-{epoch:04d}")
    assert files(run_dir) == ["epoch-0003.weights.h5", "epoch-0004.weights.h5", "index.json"]
    assert index(run_dir) == {"kept": ["epoch-0003", "epoch-0004"], "best": None}
    assert ckpt.kept == ["epoch-0003", "epoch-0004"]
    # Each kept file holds the weights of its own save.
    assert weights_in(run_dir.checkpoint_weights("epoch-0003")) == 3.0
    assert weights_in(run_dir.checkpoint_weights("epoch-0004")) == 4.0


def test_saving_a_kept_name_again_replaces_it_and_makes_it_the_newest(run_dir):
    model = tiny_model()
    ckpt = checkpoints(run_dir, model, keep=2)
    for value, name in ((1.0, "step-000010"), (2.0, "step-000020"), (3.0, "step-000010"), (4.0, "step-000030")):
        set_weights(model, value)
        ckpt.save_periodic(name)
    # step-000010 was saved again after step-000020, so step-000020 is the oldest and goes.
    assert index(run_dir)["kept"] == ["step-000010", "step-000030"]
    assert files(run_dir) == ["index.json", "step-000010.weights.h5", "step-000030.weights.h5"]
    assert weights_in(run_dir.checkpoint_weights("step-000010")) == 3.0


def test_a_resumed_run_continues_the_rotation_and_the_best_value(run_dir):
    model = tiny_model()
    first = checkpoints(run_dir, model, keep=2)
    first.save_periodic("epoch-0001")
    first.save_periodic("epoch-0002")
    assert first.consider_best({"val_loss": 0.5}, epoch=2, step=20) is True

    resumed = checkpoints(run_dir, model, keep=2)
    assert (resumed.kept, resumed.best) == (["epoch-0001", "epoch-0002"], 0.5)
    resumed.save_periodic("epoch-0003")
    assert files(run_dir) == ["best.json", "best.weights.h5", "epoch-0002.weights.h5", "epoch-0003.weights.h5",
                              "index.json"]
    assert index(run_dir) == {"kept": ["epoch-0002", "epoch-0003"], "best": 0.5}
    # The best value read back still decides: 0.6 is no improvement on 0.5.
    assert resumed.consider_best({"val_loss": 0.6}, epoch=3, step=30) is False


# ----------------------------------------------------------------------------- mode

@pytest.mark.parametrize("monitor, mode", [
    ("val_loss", "min"), ("loss", "min"), ("val_mae", "min"), ("val_mean_squared_error", "min"),
    ("val_accuracy", "max"), ("accuracy", "max"), ("val_sparse_categorical_accuracy", "max"), ("val_acc", "max"),
    ("val_auc", "max"), ("val_precision", "max"), ("val_recall", "max"),
])
def test_auto_mode_is_max_for_accuracy_like_monitors_else_min(run_dir, monitor, mode):
    assert checkpoints(run_dir, tiny_model(), monitor=monitor, mode="auto").mode == mode


@pytest.mark.parametrize("monitor, mode", [("val_accuracy", "min"), ("val_loss", "max")])
def test_an_explicit_mode_is_kept_whatever_the_name(run_dir, monitor, mode):
    assert checkpoints(run_dir, tiny_model(), monitor=monitor, mode=mode).mode == mode


# ----------------------------------------------------------------------------- best

def test_best_follows_only_improvements_of_a_loss(run_dir):
    model = tiny_model()
    ckpt = checkpoints(run_dir, model, monitor="val_loss")  # auto: min
    decisions = []
    for epoch, value in enumerate([0.5, 0.7, 0.4, 0.4, 0.45], start=1):
        set_weights(model, float(epoch))
        decisions.append(ckpt.consider_best({"val_loss": value, "loss": 9.0}, epoch=epoch, step=10 * epoch))
    assert decisions == [True, False, True, False, False]  # an equal value is no improvement
    assert ckpt.best == 0.4
    meta = json.loads(run_dir.best_meta.read_text())
    assert meta == {"epoch": 3, "step": 30, "monitor": "val_loss", "value": 0.4,
                    "weights": file_record(run_dir.best_weights)}
    assert weights_in(run_dir.best_weights) == 3.0
    assert index(run_dir) == {"kept": [], "best": 0.4}
    assert files(run_dir) == ["best.json", "best.weights.h5", "index.json"]


def test_best_follows_only_improvements_of_an_accuracy(run_dir):
    model = tiny_model()
    ckpt = checkpoints(run_dir, model, monitor="val_accuracy")  # auto: max
    decisions = []
    for epoch, value in enumerate([0.5, 0.6, 0.55, 0.9], start=1):
        set_weights(model, float(epoch))
        decisions.append(ckpt.consider_best({"val_accuracy": np.float32(value)}, epoch=epoch, step=epoch))
    assert decisions == [True, True, False, True]
    meta = json.loads(run_dir.best_meta.read_text())
    assert (meta["epoch"], meta["step"], meta["monitor"]) == (4, 4, "val_accuracy")
    assert meta["value"] == pytest.approx(0.9) and index(run_dir)["best"] == pytest.approx(0.9)
    assert weights_in(run_dir.best_weights) == 4.0


def test_best_without_the_monitor_in_the_logs_saves_nothing(run_dir):
    ckpt = checkpoints(run_dir, tiny_model(), monitor="val_loss")
    assert ckpt.consider_best({"loss": 0.1}, epoch=1, step=10) is False
    assert ckpt.best is None
    assert files(run_dir) == []


def test_best_is_independent_of_the_rotation(run_dir):
    model = tiny_model()
    ckpt = checkpoints(run_dir, model, keep=1, monitor="val_loss")
    set_weights(model, 1.0)
    ckpt.save_periodic("epoch-0001")
    ckpt.consider_best({"val_loss": 0.1}, epoch=1, step=10)
    set_weights(model, 2.0)
    ckpt.save_periodic("epoch-0002")
    ckpt.consider_best({"val_loss": 0.2}, epoch=2, step=20)
    assert files(run_dir) == ["best.json", "best.weights.h5", "epoch-0002.weights.h5", "index.json"]
    assert index(run_dir) == {"kept": ["epoch-0002"], "best": 0.1}
    assert weights_in(run_dir.best_weights) == 1.0


# ----------------------------------------------------------------------------- non-chief

def test_a_non_chief_worker_takes_part_but_leaves_no_file(run_dir):
    model = tiny_model()
    ckpt = checkpoints(run_dir, model, keep=1, rank=1, is_chief=False)
    ckpt.save_periodic("epoch-0001")
    ckpt.save_periodic("epoch-0002")
    # It decides like the chief (every worker must save best at the same epochs)...
    assert [ckpt.consider_best({"val_loss": v}, epoch=e, step=e) for e, v in ((1, 0.5), (2, 0.6), (3, 0.4))] == [
        True, False, True]
    assert ckpt.best == 0.4
    # ...but keeps no list and writes nothing a user sees; its scratch holds nothing either.
    assert ckpt.kept == []
    assert files(run_dir) == []
    assert list(run_dir.scratch(1).iterdir()) == []
    ckpt.files.cleanup()
    assert not run_dir.scratch_root.exists()


def test_a_nan_metric_never_becomes_the_best(run_dir):
    model = tiny_model()
    ckpt = checkpoints(run_dir, model, monitor="val_loss")
    assert [ckpt.consider_best({"val_loss": v}, epoch=e, step=e) for e, v in enumerate([float("nan"), 0.5, 0.3], 1)] \
        == [False, True, True]
    assert ckpt.best == 0.3


@pytest.mark.parametrize("monitor, expected", [("val_precision", "max"), ("val_recall", "max"), ("val_acc", "max"),
                                               ("val_loss", "min")])
def test_early_stopping_uses_the_checkpoints_auto_mode(monitor, expected):
    from types import SimpleNamespace

    from distrain.callbacks import RunState, build_callbacks
    from distrain.spec import spec_from_dict

    spec = spec_from_dict({"train": {"early_stopping": {"monitor": monitor}}})
    ctx = SimpleNamespace(spec=spec, start_step=0, is_chief=False, steps_per_epoch=10,
                          dist=SimpleNamespace(callbacks=lambda *a: []))
    stoppers = [c for c in build_callbacks(ctx, RunState(ctx), None, None) if isinstance(c, tf.keras.callbacks.EarlyStopping)]
    assert len(stoppers) == 1
    assert stoppers[0].monitor_op is (np.greater if expected == "max" else np.less)
