"""Job spec: loading, defaults, overrides and every class of validation error, on real files."""
import subprocess
import sys
from pathlib import Path

import pytest

from distrain.errors import UsageError
from distrain.spec import JobSpec, dump_spec, load_spec, reference, spec_from_dict

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# (file text, the one-line error expected after "FILE: ")
MALFORMED = [
    ("train: {epochs: ten}", 'train.epochs: expected a positive integer, got "ten"'),
    ("train: {epochs: 0}", "train.epochs: expected a positive integer, got 0"),
    ("train: {epochs: -3}", "train.epochs: expected a positive integer, got -3"),
    ("train: {epochs: 2.5}", "train.epochs: expected a positive integer, got 2.5"),
    ("train: {epochs: true}", "train.epochs: expected a positive integer, got True"),
    ("train: {learning_rate: 0}", "train.learning_rate: expected a positive number, got 0"),
    ("train: {learning_rate: fast}", 'train.learning_rate: expected a positive number, got "fast"'),
    ("train: {learning_rate: .nan}", "train.learning_rate: expected a positive number, got nan"),
    ("train: {optimizer: adamw}", 'train.optimizer: expected one of adam, sgd, rmsprop, got "adamw"'),
    ("train: {epoch: 3}", "train.epoch: unknown key; valid keys here: epochs,"),
    ("trian: {epochs: 3}", "trian: unknown key; valid keys here: name, seed, model,"),
    ("model: {name: resnet152}", 'model.name: expected one of mlp, cnn, residual, inception, mobilenet_v2, or your '
                                 'model as package.module:function or path/to/file.py:function, got "resnet152"'),
    ("model: {name: cnn, params: {filterz: 3}}", "model.params.filterz: unknown parameter of model cnn; valid: filters=64"),
    ("model: {name: cnn, params: {filters: many}}", 'model.params.filters: expected an integer, got "many"'),
    ("model: {name: mlp, input_shape: [28, 28, 1, 1]}", "model.input_shape: expected [height, width] or [height, width, channels]"),
    ("data: {source: imagenet}", 'data.source: expected one of digits, mnist,'),
    ("data: {batch_size_per_replica: 0}", "data.batch_size_per_replica: expected a positive integer, got 0"),
    ("data: {validation_split: 1.5}", "data.validation_split: expected a number >= 0 and < 1, got 1.5"),
    ("data: {validation_split: 0.6, test_split: 0.5}", "data.validation_split: validation_split + test_split must leave training data"),
    ("data: {source: image_folder}", "data.path: expected a directory of class_name/image files for source image_folder"),
    ("data: {source: image_folder, path: /no/such/dir}", "data.path: no such directory: /no/such/dir"),
    ("data: {source: digits, path: /tmp}", "data.path: only used with source image_folder or tfrecord, got source digits"),
    ("data: {augment: {flip: diagonal}}", 'data.augment.flip: expected one of none, horizontal,'),
    ("data: {augment: {rotation: 2}}", "data.augment.rotation: expected a number >= 0 and <= 1, got 2"),
    ("data: [1, 2]", "data: expected a mapping of keys, got [1, 2]"),
    ("distribute: {strategy: parameter_server}", 'distribute.strategy: expected one of auto, one_device, mirrored, multi_worker, horovod'),
    ("distribute: {port: 80}", "distribute.port: expected an integer >= 1024 and <= 65535, got 80"),
    ("distribute: {strategy: one_device, devices: [/gpu:0]}", "distribute.devices: only used with strategy mirrored"),
    ("train: {warmup_epochs: 1, warmup_steps: 10}", "train.warmup_steps: set warmup_epochs or warmup_steps, not both"),
    ("train: {schedule: {name: step, boundaries: [7, 3]}}", "train.schedule.boundaries: expected increasing epochs, got [7.0, 3.0]"),
    ("train: {schedule: {name: step, boundaries: [3, 7], factors: [1, 0.1]}}", "train.schedule.factors: expected 3 factors (one more than boundaries), got 2"),
    ("train: {schedule: {name: linear}}", 'train.schedule.name: expected one of constant, step, cosine, exponential'),
    ("train: {early_stopping: {patience: -1}}", "train.early_stopping.patience: expected a non-negative integer, got -1"),
    ("logging: {profile_steps: [20, 10]}", "logging.profile_steps: expected [first, last] with first <= last, got [20, 10]"),
    ("checkpoint: {keep: 0}", "checkpoint.keep: expected a positive integer, got 0"),
    ("name: ../escape", 'name: expected a plain name usable as a directory, got "../escape"'),
    ("seed: null", "seed: expected a value, got null"),
    ("[1, 2, 3]", "expected a mapping of keys at the top level, got [1, 2, 3]"),
    ("train: {epochs: 3\n  bad: [", "not valid YAML (line"),
]


@pytest.mark.parametrize("text,expected", MALFORMED, ids=[m[1].split(":")[0] + f"-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_file_gives_one_line_naming_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


def test_missing_job_file(tmp_path):
    with pytest.raises(UsageError, match=r"no_such\.yaml: no such job file"):
        load_spec(tmp_path / "no_such.yaml")


def test_binary_file_is_rejected(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match="job.yaml: "):
        load_spec(path)


def test_yaml_tags_are_not_executed(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_spec(path)


def test_defaults_and_empty_file(tmp_path):
    spec = load_spec(write(tmp_path, ""))
    assert spec == JobSpec()
    assert spec.data.source == "digits" and spec.distribute.strategy == "auto"


def test_float_given_as_exponent_string_is_accepted(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; the course writes LRs that way.
    spec = load_spec(write(tmp_path, "train: {learning_rate: 1e-3}"))
    assert spec.train.learning_rate == pytest.approx(1e-3)


def test_overrides_apply_in_order_and_are_validated(tmp_path):
    path = write(tmp_path, "train: {epochs: 5}\nmodel: {name: cnn}")
    spec = load_spec(path, ["train.epochs=3", "train.epochs=4", "model.params.filters=16",
                            "data.augment.flip=horizontal", "train.schedule={name: step}"])
    assert spec.train.epochs == 4
    assert spec.model.params == {"filters": 16}
    assert spec.data.augment.flip == "horizontal"
    assert spec.train.schedule.name == "step"
    with pytest.raises(UsageError) as info:
        load_spec(path, ["train.epochs=ten"])
    assert str(info.value) == '--set train.epochs: expected a positive integer, got "ten"'
    with pytest.raises(UsageError, match=r"^--set train\.nope: unknown key"):
        load_spec(path, ["train.nope=1"])
    with pytest.raises(UsageError, match="expected key.path=value"):
        load_spec(path, ["train.epochs"])
    with pytest.raises(UsageError, match="train.epochs is not a mapping"):
        load_spec(path, ["train.epochs.x=1"])


def test_resolved_spec_round_trips(tmp_path):
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", ["train.epochs=2"])
    again = load_spec(write(tmp_path, dump_spec(spec)))
    assert again == spec


def test_shipped_jobs_are_valid():
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert {p.stem for p in jobs} >= {"quickstart", "mlp", "cnn", "residual", "inception", "mobilenet"}
    for job in jobs:
        load_spec(job)


def test_reference_lists_every_leaf_key():
    keys = {row[0] for row in reference()}
    assert {"train.epochs", "data.augment.flip", "train.schedule.boundaries", "distribute.strategy",
            "checkpoint.backup_every_steps", "train.early_stopping.patience"} <= keys


def test_docs_reference_is_current():
    doc = (REPO / "docs" / "job-spec.md").read_text()
    missing = [key for key, _, _ in reference() if f"`{key}`" not in doc]
    assert not missing, f"docs/job-spec.md lacks {missing}; regenerate with scripts/gen-job-spec-doc.py"


def test_every_key_has_a_meaning():
    """A key whose only text is its choices or nothing tells a user nothing: say what it does."""
    bare = [key for key, _, doc in reference() if not doc.split("; one of ")[0].strip() or doc.startswith("one of ")]
    assert not bare, f"keys without a meaning (doc= in distrain/spec.py): {bare}"


def test_docs_reference_rows_are_the_specs_own():
    doc = (REPO / "docs" / "job-spec.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    assert rows == [f"| `{key}` | `{default}` | {meaning} |" for key, default, meaning in reference()], \
        "docs/job-spec.md is behind distrain/spec.py: regenerate with scripts/gen-job-spec-doc.py"


def test_validation_does_not_import_tensorflow(tmp_path):
    code = ("import sys; from distrain.spec import load_spec; load_spec(sys.argv[1]); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code, str(REPO / "jobs" / "quickstart.yaml")], check=True, timeout=60)


def test_cli_bad_job_exits_2_with_one_line_and_writes_nothing(tmp_path):
    path = write(tmp_path, "train: {epochs: ten}\noutput_dir: " + str(tmp_path / "runs"))
    result = subprocess.run([sys.executable, "-m", "distrain.cli", "train", str(path)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f'distrain: error: {path}: train.epochs: expected a positive integer, got "ten"']
    assert not (tmp_path / "runs").exists()


def test_spec_from_dict_names_the_source():
    with pytest.raises(UsageError, match=r"^ray job: train.epochs"):
        spec_from_dict({"train": {"epochs": 0}}, source="ray job")


# ----------------------------------------------------------------------------- --set model.name (issue 25)

def test_set_model_name_drops_the_files_params_the_new_model_does_not_take(caplog):
    """docs/quickstart.md: `--set model.name=mlp` on a cnn job with params {filters: 32}."""
    job = {"model": {"name": "cnn", "params": {"filters": 32, "dropout": 0.1}}}
    with caplog.at_level("WARNING", logger="distrain"):
        spec = spec_from_dict(job, overrides=["model.name=mlp"])
    assert spec.model.name == "mlp" and spec.model.params == {"dropout": 0.1}
    assert [r.getMessage() for r in caplog.records] == [
        "--set model.name=mlp: dropped the job's model.params filters=32 (written for cnn); mlp takes units, dropout"]
    assert job["model"]["params"] == {"filters": 32, "dropout": 0.1}  # the caller's mapping is left alone


@pytest.mark.parametrize("overrides,message", [
    # A param given with --set is meant: it is not dropped, and it is still checked.
    (["model.params.filters=8", "model.name=mlp"], "--set model.params.filters: unknown parameter of model mlp"),
    (["model.name=mlp", "model.params={filters: 8}"], "--set model.params.filters: unknown parameter of model mlp"),
])
def test_set_model_name_keeps_params_given_with_set(overrides, message):
    with pytest.raises(UsageError, match="^" + message):
        spec_from_dict({"model": {"name": "cnn", "params": {"filters": 32}}}, overrides=overrides)


def test_params_are_checked_as_before_without_set_model_name(caplog):
    with pytest.raises(UsageError, match=r"^\(job\): model.params.filters: unknown parameter of model mlp"):
        spec_from_dict({"model": {"name": "mlp", "params": {"filters": 32}}}, overrides=["train.epochs=2"])
    with caplog.at_level("WARNING", logger="distrain"):
        assert spec_from_dict({"model": {"name": "cnn", "params": {"filters": 8}}},
                              overrides=["model.name=cnn"]).model.params == {"filters": 8}
    assert not caplog.records


# ----------------------------------------------------------------------------- --set data.source (issue 25)

def test_set_data_source_drops_the_files_keys_the_new_source_rejects(tmp_path, caplog):
    job = {"data": {"source": "image_folder", "path": str(tmp_path), "cache": "memory", "limit": 100}}
    with caplog.at_level("WARNING", logger="distrain"):
        spec = spec_from_dict(job, overrides=["data.source=digits"])
    assert (spec.data.source, spec.data.path, spec.data.cache, spec.data.limit) == ("digits", None, "none", 100)
    assert [r.getMessage() for r in caplog.records] == [
        f"--set data.source=digits: dropped the job's data.path={str(tmp_path)!r}, data.cache='memory' "
        "(written for image_folder); digits does not take data.path, data.cache"]
    assert job["data"]["path"] == str(tmp_path)  # the caller's mapping is left alone


@pytest.mark.parametrize("overrides,message", [
    # A key given with --set is meant: it stays, and it is still checked.
    (["data.source=digits", "data.path=shapes"], "--set data.path: only used with source image_folder or tfrecord"),
    # A key the new source takes too stays: from an image folder to shards, the path must change.
    (["data.source=tfrecord"], "(job): data.path: {path} has no distrain-data.json"),
    (["data.source=imagenet"], '--set data.source: expected one of digits,'),
])
def test_set_data_source_keeps_keys_given_with_set_or_taken_by_the_new_source(tmp_path, overrides, message, caplog):
    job = {"data": {"source": "image_folder", "path": str(tmp_path), "limit": 10}}
    with caplog.at_level("WARNING", logger="distrain"), pytest.raises(UsageError) as err:
        spec_from_dict(job, overrides=overrides)
    assert str(err.value).startswith(message.format(path=tmp_path))
    dropped = [r.getMessage() for r in caplog.records]
    assert dropped == (["--set data.source=tfrecord: dropped the job's data.limit=10 (written for image_folder); "
                        "tfrecord does not take data.limit"] if "tfrecord" in overrides[0] else [])


def test_cli_validate_switches_an_image_folder_job_to_digits_with_one_flag(tmp_path):
    (tmp_path / "shapes" / "circle").mkdir(parents=True)
    job = write(tmp_path, f"name: shapes\ndata:\n  source: image_folder\n  path: {tmp_path / 'shapes'}\n"
                          "  cache: memory\nmodel: {name: mlp}\ntrain: {epochs: 1}\n")
    result = subprocess.run([sys.executable, "-m", "distrain.cli", "validate", str(job), "--set", "data.source=digits",
                             "--quiet"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (f"--set data.source=digits: dropped the job's data.path='{tmp_path / 'shapes'}', data.cache='memory' "
            "(written for image_folder)") in result.stderr
