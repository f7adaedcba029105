"""The Python API, ``distrain.train(job, model=..., data=...)``, in this process: a notebook's
functions (and a lambda) as the model and data, the ``tf.data`` contract, loss and metrics, and
``import distrain`` staying cheap."""
import json
import subprocess
import sys

import numpy as np
import pytest

import distrain
from conftest import REPO
from distrain.errors import UsageError

JOB = {
    "name": "api",
    "seed": 3,
    "data": {"batch_size_per_replica": 16},
    "train": {"epochs": 1, "steps_per_epoch": 3},
    "checkpoint": {"every_epochs": 0, "save_best": False, "backup_every_steps": 0},
    "logging": {"tensorboard": False, "verbose": 0},
}


def notebook_model(input_shape, num_classes, units=8):
    """As written in a course notebook cell: plain tf.keras, ending in logits."""
    import tensorflow as tf

    inputs = tf.keras.Input(shape=input_shape)
    x = tf.keras.layers.Flatten()(inputs)
    x = tf.keras.layers.Dense(units, activation="relu")(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes)(x))


def notebook_data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images * 16).astype(np.uint8)
    return (x[:1400], digits.target[:1400]), (x[1400:], digits.target[1400:])


def digits_dataset(input_context, split):
    """The tf.data contract: unbatched (image, label) examples, sharded by the input context."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images.astype(np.float32) / 16, digits.target.astype(np.int64)
    part = {"train": slice(0, 1200), "validation": slice(1200, 1500), "test": slice(1500, None)}[split]
    ds = tf.data.Dataset.from_tensor_slices((x[part], y[part]))
    return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


@pytest.mark.timeout(30)
def test_import_distrain_is_cheap_and_sets_legacy_keras():
    code = ("import os, sys, distrain; assert 'tensorflow' not in sys.modules; "
            "assert os.environ['TF_USE_LEGACY_KERAS'] == '1'; assert callable(distrain.train); "
            "assert 'tensorflow' not in sys.modules, 'distrain.train imported tensorflow'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=25, cwd=REPO)


@pytest.mark.timeout(300)
def test_notebook_functions_train_in_process_and_return_the_summary(tmp_path):
    summary = distrain.train({**JOB, "train": {**JOB["train"], "from_logits": True,
                                               "metrics": ["accuracy", "sparse_top_k_categorical_accuracy"]}},
                             model=notebook_model, data=notebook_data, overrides=["model.params={units: 12}"],
                             run_dir=tmp_path / "run")
    assert (summary["steps"], summary["replicas"], summary["world_size"]) == (3, 1, 1)
    assert set(summary["test"]) == {"loss", "accuracy", "sparse_top_k_categorical_accuracy"}
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    saved = (tmp_path / "run" / "job.yaml").read_text()
    assert f"name: {__name__}:notebook_model" in saved and f"source: {__name__}:notebook_data" in saved
    import tensorflow as tf

    model = tf.keras.models.load_model(str(tmp_path / "run" / "model.keras"), compile=False)
    assert model.layers[2].units == 12  # model.params reached the function


@pytest.mark.timeout(300)
def test_tf_data_contract_and_a_lambda(tmp_path):
    summary = distrain.train(dict(JOB), model=lambda shape, classes: notebook_model(shape, classes, units=4),
                             data=digits_dataset, overrides=["train.from_logits=true"], run_dir=tmp_path / "run")
    assert summary["steps"] == 3 and summary["global_batch"] == 16
    saved = (tmp_path / "run" / "job.yaml").read_text()
    assert "name: distrain_callables:lambda_" in saved  # a lambda has no reference of its own
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert "val_accuracy" in history[-1]


@pytest.mark.timeout(120)
def test_unsharded_dataset_fails_with_one_line(tmp_path):
    def unsharded(input_context, split):
        return digits_dataset(type(input_context)(1, 0, 1), split)

    # Under mirrored a single pipeline is right; the check needs two pipelines, so call it directly.
    import tensorflow as tf

    from distrain.data.user import load_datasets
    from distrain.spec import spec_from_dict

    source = load_datasets(spec_from_dict({}).data, unsharded, "nb:unsharded")
    assert (source.train_size, source.val_size, source.test_size, source.num_classes) == (1200, 300, 297, 10)
    pipes = source.pipelines(32, 3, 0, source.input_shape, None)
    with pytest.raises(UsageError, match=r"^data.source: nb:unsharded: split 'test' of input pipeline 1 of 2 has "
                                         r"297 examples, expected 148 of 297; shard it with ds.shard"):
        pipes.evaluation(tf.distribute.InputContext(2, 1, 2), "test")


@pytest.mark.timeout(60)
def test_api_rejects_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="^distrain.train: model: expected a function or an import reference, got int"):
        distrain.train(dict(JOB), model=3)
    with pytest.raises(UsageError, match=r"^distrain.train\(job=dict\): model.name: no_such_mod:build: no module named"):
        distrain.train(dict(JOB), model="no_such_mod:build", run_dir=tmp_path / "run")
    with pytest.raises(UsageError, match="no such job file"):
        distrain.train(tmp_path / "missing.yaml")
    assert not (tmp_path / "run").exists()


USER_SCRIPT = """\
import distrain
import numpy as np
import tensorflow as tf  # a notebook's first cell: after distrain, before any of distrain's own imports


def model(input_shape, num_classes):
    inputs = tf.keras.Input(shape=input_shape)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes)(tf.keras.layers.Flatten()(inputs)))


def data():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (96, 8, 8, 1), dtype=np.uint8), np.arange(96) % 3
    return (x[:64], y[:64]), (x[64:], y[64:])


job = {"name": "script", "data": {"batch_size_per_replica": 16}, "train": {"epochs": 1, "steps_per_epoch": 2},
       "checkpoint": {"every_epochs": 0, "save_best": False, "backup_every_steps": 0},
       "logging": {"tensorboard": False}}
summary = distrain.train(job, model=model, data=data, run_dir=RUN_DIR)
print("steps", summary["steps"])
"""


@pytest.mark.timeout(120)
def test_a_users_script_shows_no_tensorflow_startup_lines_and_no_progress_bar_fragments(tmp_path):
    """The user's `import tensorflow` and distrain's training print none of TensorFlow's start-up lines
    (the E0000 cuInit line among them); output that is not a terminal gets one line per epoch."""
    from conftest import worker_env
    from distrain.tf_startup import is_startup_notice

    script = tmp_path / "train_mine.py"
    script.write_text(USER_SCRIPT.replace("RUN_DIR", repr(str(tmp_path / "run"))))
    env = {k: v for k, v in worker_env().items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "DISTRAIN_TF_LOG")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "steps 2" in done.stdout
    assert not [line for line in done.stderr.splitlines() if is_startup_notice(line)], done.stderr
    assert "\r" not in done.stdout and "\b" not in done.stdout, done.stdout  # Keras's verbose 2, not its bar
    assert done.stdout.startswith("2/2 - "), done.stdout
