"""Your own model, data and loss (``distrain.user_code``, ``distrain.user_data``): references, their
checks, and every bad input of issue 12 ending in exit 2 with one line naming the reference, the
file (with the line for import errors) and what was expected, before any training step.

The bad inputs run through ``distrain.cli.main`` in this process (the exit code and stderr are what
the command gives); one runs as a real ``distrain train`` process to pin the exit code end to end.
Every user file has a name of its own: a file is imported once per process, as Python imports a
module once.
"""
from __future__ import annotations

import re
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

import distrain  # noqa: F401  (tf-keras before anything imports TensorFlow)
from conftest import REPO, run_distrain, write_job
from distrain import user_code
from distrain.data import user as user_data
from distrain.cli import main
from distrain.errors import EXIT_USAGE, UsageError
from distrain.spec import dump_spec, load_spec, spec_from_dict

MODEL = """
import tensorflow as tf

def build(input_shape, num_classes, *, units=16, kernel_regularizer=None):
    inputs = tf.keras.Input(shape=input_shape)
    x = tf.keras.layers.Flatten()(inputs)
    x = tf.keras.layers.Dense(units, activation="relu", kernel_regularizer=kernel_regularizer)(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes, activation="softmax")(x))
"""

JOB = """
name: user
model: {{name: {model}}}
data: {{source: {source}, batch_size_per_replica: 16}}
train: {{epochs: 1, steps_per_epoch: 2}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 0}}
logging: {{tensorboard: false, verbose: 0}}
"""


def unique(stem: str) -> str:
    return f"{stem}_{uuid.uuid4().hex[:8]}"


def user_file(tmp_path: Path, stem: str, code: str) -> Path:
    path = tmp_path / f"{unique(stem)}.py"
    path.write_text(textwrap.dedent(code).lstrip())
    return path


def job_with(tmp_path: Path, model: str = "mlp", source: str = "digits", extra: str = "") -> Path:
    return write_job(tmp_path / f"{unique('job')}.yaml", JOB.format(model=model, source=source) + extra)


def one_error_line(capsys) -> str:
    """The error line; the run's own log lines (``HH:MM:SS [rank 0] ...``) may come before it."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not re.match(r"^\d\d:\d\d:\d\d \[rank \d+\] ", line)]
    assert len(lines) == 1 and lines[0].startswith("distrain: error: "), err
    return lines[0].removeprefix("distrain: error: ")


def train_exit(capsys, job: Path, tmp_path: Path) -> tuple[int, str]:
    code = main(["train", str(job), "--run-dir", str(tmp_path / unique("run"))])
    return code, one_error_line(capsys) if code == EXIT_USAGE else capsys.readouterr().err


# ----------------------------------------------------------------------------- references

@pytest.mark.timeout(30)
@pytest.mark.parametrize("text,module,file,attr", [
    ("pkg.models:build", "pkg.models", None, "build"),
    ("models/net.py:build", None, "models/net.py", "build"),
    ("/abs/net.py:Net.create", None, "/abs/net.py", "Net.create"),
    ("net.py:build", None, "net.py", "build"),
])
def test_parse(text, module, file, attr):
    ref = user_code.parse(text)
    assert (ref.module, ref.file, ref.attr) == (module, file, attr)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text", ["pkg.models:", ":build", "pkg models:build", "models/net:build",
                                  "pkg.models:build:x", "pkg-x:build", "a.py:1x"])
def test_parse_rejects(text):
    with pytest.raises(ValueError, match="expected"):
        user_code.parse(text)


@pytest.mark.timeout(30)
def test_relative_file_is_made_absolute_against_the_job_and_kept_in_job_yaml(tmp_path):
    model = user_file(tmp_path, "net", MODEL)
    (tmp_path / "jobs").mkdir()
    job = write_job(tmp_path / "jobs" / "j.yaml", JOB.format(model=f"../{model.name}:build", source="digits"))
    spec = load_spec(job)
    assert spec.model.name == f"{model}:build"
    # The run dir's job.yaml names the same file, from wherever it is read (--resume).
    again = spec_from_dict(__import__("yaml").safe_load(dump_spec(spec)), base_dir="/")
    assert again.model.name == f"{model}:build"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key,value,message", [
    ("model.name", "nosuch", "model.name: expected one of mlp, cnn, residual, inception, mobilenet_v2, or your "
                             "model as package.module:function or path/to/file.py:function, got \"nosuch\""),
    ("model.name", "net:", "model.name: expected package.module:function or path/to/file.py:function, got \"net:\""),
    ("model.name", "missing.py:build", "model.name: {dir}/missing.py:build: no such file {dir}/missing.py "
                                       "(a relative path is relative to the job file)"),
    ("data.source", "nosuch", "data.source: expected one of digits, mnist"),
    ("data.source", "data/loader.txt:load", "data.source: expected a .py file before the colon"),
])
def test_spec_rejects_bad_references_without_importing(tmp_path, key, value, message):
    section, name = key.split(".")
    job = write_job(tmp_path / "job.yaml", f"{section}: {{{name}: '{value}'}}\n")
    with pytest.raises(UsageError) as err:
        load_spec(job)
    assert str(err.value).startswith(f"{job}: " + message.format(dir=tmp_path)), str(err.value)


# ----------------------------------------------------------------------------- bad input, exit 2

@pytest.mark.timeout(60)
def test_module_that_does_not_resolve(tmp_path, capsys):
    job = job_with(tmp_path, model="no_such_package_xyz.models:build")
    assert main(["validate", str(job)]) == EXIT_USAGE
    assert one_error_line(capsys) == (
        f"{job}: model.name: no_such_package_xyz.models:build: no module named no_such_package_xyz on sys.path; "
        "expected package.module:function or path/to/file.py:function (install the package, or add its "
        "directory to PYTHONPATH)")


@pytest.mark.timeout(60)
def test_function_that_does_not_exist(tmp_path, capsys):
    model = user_file(tmp_path, "net", MODEL)
    job = job_with(tmp_path, model=f"{model.name}:buidl")
    assert main(["validate", str(job)]) == EXIT_USAGE
    assert one_error_line(capsys) == f"{job}: model.name: {model}:buidl: {model} has no buidl; it defines: build"


@pytest.mark.timeout(60)
def test_syntax_error_names_file_and_line(tmp_path, capsys):
    model = user_file(tmp_path, "broken", "import tensorflow as tf\n\ndef build(input_shape, num_classes)\n    pass\n")
    job = job_with(tmp_path, model=f"{model.name}:build")
    assert main(["validate", str(job)]) == EXIT_USAGE
    line = one_error_line(capsys)
    assert line.startswith(f"{job}: model.name: {model}:build: importing it failed at {model}:3: SyntaxError: "), line


@pytest.mark.timeout(60)
def test_missing_dependency_names_file_and_line(tmp_path, capsys):
    model = user_file(tmp_path, "needs", "import numpy\nimport not_installed_dep_xyz\n\ndef build(a, b):\n    pass\n")
    job = job_with(tmp_path, model=f"{model.name}:build")
    assert main(["validate", str(job)]) == EXIT_USAGE
    assert one_error_line(capsys) == (f"{job}: model.name: {model}:build: importing it failed at {model}:2: "
                                      "ModuleNotFoundError: No module named 'not_installed_dep_xyz'")


@pytest.mark.timeout(60)
def test_error_raised_while_importing_names_the_line(tmp_path, capsys):
    model = user_file(tmp_path, "raises", "X = 1\nY = {}['key']\n")
    job = job_with(tmp_path, model=f"{model.name}:build")
    assert main(["validate", str(job)]) == EXIT_USAGE
    assert one_error_line(capsys) == f"{job}: model.name: {model}:build: importing it failed at {model}:2: KeyError: 'key'"


@pytest.mark.timeout(60)
def test_wrong_signature(tmp_path, capsys):
    model = user_file(tmp_path, "onearg", "def build(input_shape):\n    pass\n")
    job = job_with(tmp_path, model=f"{model.name}:build")
    assert main(["validate", str(job)]) == EXIT_USAGE
    line = one_error_line(capsys)
    assert line.startswith(f"{job}: model.name: {model}:build: build(input_shape) at {model}:1 cannot be called "
                           "as fn(input_shape, num_classes) (too many positional arguments)"), line


@pytest.mark.timeout(60)
def test_unknown_model_param(tmp_path, capsys):
    model = user_file(tmp_path, "net", MODEL)
    job = job_with(tmp_path, model=f"{model.name}:build", extra="")
    assert main(["validate", str(job), "--set", "model.params={width: 3}"]) == EXIT_USAGE
    line = one_error_line(capsys)
    assert "cannot be called as fn(input_shape, num_classes, width=...)" in line and "'width'" in line, line


@pytest.mark.timeout(60)
def test_l2_needs_a_kernel_regularizer_argument(tmp_path, capsys):
    model = user_file(tmp_path, "noreg", "def build(input_shape, num_classes):\n    pass\n")
    job = job_with(tmp_path, model=f"{model.name}:build")
    assert main(["validate", str(job), "--set", "train.l2=0.001"]) == EXIT_USAGE
    assert one_error_line(capsys).startswith(f"{job}: train.l2: set, but model.name {model}:build ({model}:1) "
                                             "takes no kernel_regularizer argument")


@pytest.mark.timeout(60)
def test_data_function_with_wrong_signature(tmp_path, capsys):
    data = user_file(tmp_path, "loader", "def load(a, b, c):\n    pass\n")
    job = job_with(tmp_path, source=f"{data.name}:load")
    assert main(["validate", str(job)]) == EXIT_USAGE
    line = one_error_line(capsys)
    assert line.startswith(f"{job}: data.source: {data}:load: load(a, b, c) at {data}:1 cannot be called as fn() "
                           "returning (x_train, y_train), (x_test, y_test), or fn(input_context, split)"), line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra,message", [
    ("  loss: not_a_loss\n", "train.loss: unknown Keras loss 'not_a_loss'"),
    ("  metrics: [accuracy, not_a_metric]\n", "train.metrics[1]: unknown Keras metric 'not_a_metric'"),
    ("  from_logits: true\n  loss: mean_squared_error\n", "train.from_logits: only for the crossentropy losses"),
    ("  loss: categorical_crossentropy\n", "train.loss: categorical_crossentropy takes one-hot labels, but "
                                          "distrain's labels are integer classes; use sparse_categorical_crossentropy"),
])
def test_bad_loss_and_metrics(tmp_path, capsys, extra, message):
    job = write_job(tmp_path / "job.yaml", "train:\n" + extra)
    assert main(["validate", str(job)]) == EXIT_USAGE
    assert one_error_line(capsys).startswith(f"{job}: {message}")


@pytest.mark.timeout(120)
def test_model_that_is_not_a_keras_model(tmp_path, capsys):
    model = user_file(tmp_path, "notmodel", "def build(input_shape, num_classes):\n    return [input_shape]\n")
    code, line = train_exit(capsys, job_with(tmp_path, model=f"{model.name}:build"), tmp_path)
    assert code == EXIT_USAGE
    assert line == (f"model.name: {model}:build: build ({model}:1) returned builtins.list, expected an uncompiled "
                    "tf.keras.Model")


@pytest.mark.timeout(120)
def test_model_output_size_must_match_the_classes(tmp_path, capsys):
    model = user_file(tmp_path, "seven", MODEL.replace("Dense(num_classes", "Dense(7"))
    code, line = train_exit(capsys, job_with(tmp_path, model=f"{model.name}:build"), tmp_path)
    assert code == EXIT_USAGE
    assert line == (f"model.name: {model}:build: build ({model}:3) returned a model with output shape (None, 7); "
                    "expected (batch, 10): one score for each of the 10 classes per image for "
                    "sparse_categorical_crossentropy (the last Dense needs num_classes units, 10 here, not 7)")


UNPOOLED = """
import tensorflow as tf

def build(input_shape, num_classes):
    inputs = tf.keras.Input(shape=input_shape)
    x = tf.keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    return tf.keras.Model(inputs, {last})
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("last,shape,hint", [
    # Keras would fail ~60 lines deep in fit, ending in "logits.shape=(576, 3)".
    ("tf.keras.layers.Dense(num_classes, activation='softmax')(x)", "(None, 6, 6, 3)",
     "add a GlobalAveragePooling2D or Flatten before the last Dense"),
    ("tf.keras.layers.Dense(1)(tf.keras.layers.Flatten()(x))", "(None, 1)",
     "the last Dense needs num_classes units, 3 here, not 1"),
])
def test_model_output_must_be_batch_by_classes(tmp_path, capsys, last, shape, hint):
    model = user_file(tmp_path, "unpooled", UNPOOLED.format(last=last))
    data = user_file(tmp_path, "threeclasses", LOADER.format(change="pass"))
    code, line = train_exit(capsys, job_with(tmp_path, model=f"{model.name}:build", source=f"{data.name}:load"),
                            tmp_path)
    assert code == EXIT_USAGE
    assert line == (f"model.name: {model}:build: build ({model}:3) returned a model with output shape {shape}; "
                    "expected (batch, 3): one score for each of the 3 classes per image for "
                    f"sparse_categorical_crossentropy ({hint})")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shapes,classes,loss,problem", [
    ([(None, 3)], 3, "sparse_categorical_crossentropy", None),
    ([(32, 3)], 3, "sparse_categorical_crossentropy", None),  # a fixed batch size is the model's business
    ([(None, 10)], 10, "/home/ada/loss.py:my_loss", None),
    ([(None, 1)], 2, "binary_crossentropy", None),
    ([(None, 46, 46, 3)], 3, "sparse_categorical_crossentropy", "output shape (None, 46, 46, 3); expected (batch, 3)"),
    ([(None, 46, 46, 3)], 3, "/home/ada/loss.py:my_loss", "(batch, 3): one score for each of the 3 classes per image "
                                                          "(add a GlobalAveragePooling2D"),
    ([(None, 1)], 3, "sparse_categorical_crossentropy", "output shape (None, 1); expected (batch, 3)"),
    ([(None, 1)], 2, "sparse_categorical_crossentropy", "or set train.loss: binary_crossentropy for one sigmoid"),
    ([(None, 2)], 2, "binary_crossentropy", "expected (batch, 1): one probability of class 1 per image for "
                                            "binary_crossentropy (end the model with Dense(1, activation=\"sigmoid\"))"),
    ([(None, 1)], 3, "binary_crossentropy", "takes labels 0 and 1, but this job has 3 classes"),
    ([(None,)], 3, "sparse_categorical_crossentropy", "output shape (None,); expected (batch, 3)"),
    ([(None, 3), (None, 3)], 3, "sparse_categorical_crossentropy", "returned a model with 2 outputs; expected one"),
])
def test_output_problem(shapes, classes, loss, problem):
    found = user_code.output_problem(shapes, classes, loss)
    assert (found is None) if problem is None else (problem in (found or "")), found


@pytest.mark.timeout(120)
def test_course_models_pass_the_output_check_as_user_models():
    """The course builders take the user contract, so a reference to each must pass the same check."""
    from distrain.models import MODELS

    for name, entry in MODELS.items():
        shape = (8, 8, 1) if name in ("mlp", "cnn") else (32, 32, 3)
        model = user_code.build_user_model(f"distrain.models:{entry.builder.__name__}", shape, 4)
        assert tuple(model.outputs[0].shape) == (None, 4), name


LOADER = """
import numpy as np

def load():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(100, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, size=100)
    {change}
    return (x[:80], y[:80]), (x[80:], y[80:])
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("change,message", [
    ("x = x[:, :, 0]", "returned x_train of shape 80x8: images must be N x H x W or N x H x W x C (C 1 to 4)"),
    ("y = np.eye(3)[y]", "returned y_train of shape 80x3: labels must be one integer class per image (N or N x 1)"),
    ("y = y.astype(str)", "returned y_train of dtype <U21: labels must be integer classes 0 .. classes-1"),
    ("y[5] = -1", "returned labels: 1 train label outside 0 .. 2 (3 classes, from the training labels (largest 2)): "
                  "-1 (1 label); labels are class numbers 0 .. classes-1"),
    ("y = y[:70]", "returned 80 x_train images but 70 y_train labels"),
    ("return x, y", "returned a tuple of 2; expected (x_train, y_train), (x_test, y_test) of NumPy arrays"),
])
def test_loader_with_wrong_shapes_or_labels(tmp_path, capsys, change, message):
    data = user_file(tmp_path, "badloader", LOADER.format(change=change))
    code, line = train_exit(capsys, job_with(tmp_path, source=f"{data.name}:load"), tmp_path)
    assert code == EXIT_USAGE
    assert line.startswith(f"data.source: {data}:load: load ({data}:3) {message}"), line


@pytest.mark.timeout(30)
def test_arrays_are_normalised_and_labels_checked_against_model_num_classes():
    arrays = ((np.zeros((4, 2, 2), np.uint8), np.arange(4).reshape(4, 1)), (np.zeros((1, 2, 2), np.uint8), np.zeros(1, int)))
    x_train, y_train, x_test, y_test, classes = user_data.check_arrays("ref", "load", arrays)
    assert x_train.shape == (4, 2, 2, 1) and y_train.shape == (4,) and y_train.dtype == np.int32 and classes.count == 4
    with pytest.raises(UsageError, match=r"^data.source: ref: load returned labels: 2 train labels outside 0 .. 1 "
                                         r"\(2 classes, from model.num_classes\): 2 \(1 label\), 3 \(1 label\); "):
        user_data.check_arrays("ref", "load", arrays, num_classes=2)


@pytest.mark.timeout(120)
def test_users_exception_during_training_keeps_its_traceback(tmp_path):
    """Not a usage error: the user's own code failed, so its traceback is shown (exit 1)."""
    data = user_file(tmp_path, "failing", "def load():\n    return helper()\n\ndef helper():\n    raise RuntimeError('disk on fire')\n")
    job = job_with(tmp_path, source=f"{data.name}:load")
    result = run_distrain(["train", str(job), "--run-dir", str(tmp_path / "run")], timeout=110, forked=True)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert f'File "{data}", line 5, in helper' in result.stderr and "RuntimeError: disk on fire" in result.stderr


@pytest.mark.timeout(120)
def test_bad_reference_exits_2_from_a_real_process_before_training(tmp_path):
    model = user_file(tmp_path, "notmodel", "def build(input_shape, num_classes):\n    return None\n")
    job = job_with(tmp_path, model=f"{model.name}:build")
    result = run_distrain(["train", str(job), "--run-dir", str(tmp_path / "run")], timeout=110, forked=True)
    assert result.returncode == EXIT_USAGE, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"distrain: error: model.name: {model}:build: build ({model}:1) returned builtins.NoneType, expected an "
        "uncompiled tf.keras.Model")
    assert not (tmp_path / "run" / "backup").exists() and not (tmp_path / "run" / "history.json").exists()


# ----------------------------------------------------------------------------- describe, loss, shipping

@pytest.mark.timeout(120)
@pytest.mark.parametrize("job", ["inception.yaml", "npy_folder.yaml"])
def test_example_jobs_validate(job, capsys, tmp_path, monkeypatch):
    # validate loads the data as training does: npy_folder's files, written as its docstring says.
    user_code.resolve(f"{REPO / 'jobs' / 'examples' / 'npy_folder.py'}:write_digits", "test")(tmp_path)
    monkeypatch.setenv("NPY_DATA_DIR", str(tmp_path))
    assert main(["validate", str(REPO / "jobs" / "examples" / job), "--quiet"]) == 0, capsys.readouterr().err


@pytest.mark.timeout(120)
def test_models_describe_a_reference(tmp_path, capsys):
    assert main(["models", "--describe", str(REPO / "jobs/examples/inception_module.py") + ":build",
                 "--input-shape", "8,8,1", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["input_shape"] == [8, 8, 1] and info["classes"] == 10 and info["params"] > 1000
    assert info["parameters"] == {"filters": 16, "modules": 2, "dropout": 0.0}
    assert info["defined_at"] == f"{REPO / 'jobs/examples/inception_module.py'}:34"


@pytest.mark.timeout(60)
def test_compile_args_from_logits_and_references(tmp_path):
    import tensorflow as tf

    losses = user_file(tmp_path, "losses", """
        import tensorflow as tf

        def my_loss(y_true, y_pred):
            return tf.reduce_mean(tf.square(y_pred))

        class MyMetric(tf.keras.metrics.Mean):
            def __init__(self, name="my_metric", **kwargs):
                super().__init__(name=name, **kwargs)
        """)
    spec = spec_from_dict({"train": {"from_logits": True, "metrics": ["accuracy", f"{losses}:MyMetric"]}})
    loss, metrics = user_code.compile_args(spec.train)
    assert isinstance(loss, tf.keras.losses.SparseCategoricalCrossentropy) and loss.get_config()["from_logits"]
    assert metrics[0] == "accuracy" and type(metrics[1]).__name__ == "MyMetric"
    spec = spec_from_dict({"train": {"loss": f"{losses}:my_loss"}})
    loss, metrics = user_code.compile_args(spec.train)
    assert loss.__name__ == "my_loss" and metrics == ["accuracy"]


@pytest.mark.timeout(30)
def test_shipped_file_is_imported_by_module_name_where_the_path_does_not_exist(tmp_path, monkeypatch):
    """Ray's py_modules put the file on the worker's sys.path under its own name, not its path."""
    name = unique("shipped")
    (tmp_path / f"{name}.py").write_text("def build(input_shape, num_classes):\n    return 'from the shipped copy'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    elsewhere = f"/nonexistent/on/this/node/{name}.py"
    with pytest.raises(UsageError, match="no such file"):
        user_code.resolve(f"{elsewhere}:build", "model.name")
    user_code.ship(elsewhere, name)
    assert user_code.resolve(f"{elsewhere}:build", "model.name")((1,), 2) == "from the shipped copy"
    assert spec_from_dict({"model": {"name": f"{elsewhere}:build"}}).model.name == f"{elsewhere}:build"
