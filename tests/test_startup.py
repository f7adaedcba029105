"""startup.preflight: the data and model checks training makes before its first step, run by
``distrain validate`` and ``distrain slurm check`` without training."""
import pytest

import distrain  # noqa: F401  (tf-keras before TensorFlow)
from distrain import startup
from distrain.cli import main
from distrain.errors import EXIT_USAGE, UsageError
from distrain.spec import spec_from_dict
from helpers import solid_folder


def spec(**sections):
    return spec_from_dict({"model": {"name": "mlp"}, **sections})


@pytest.mark.timeout(60)
def test_preflight_loads_the_data_and_builds_the_model_as_training_does():
    found = startup.preflight(spec(data={"source": "digits"}))
    assert (found.data.train_size, found.data.val_size, found.data.test_size) == (1150, 288, 359)
    assert found.input_shape == (8, 8, 1) and found.num_classes == 10 and found.params > 0
    assert found.describe().startswith("train 1150, validation 288, test 359 examples, 10 classes; model input 8x8x1, ")
    # model.num_classes reaches the label check (training crashed in TensorFlow on label 9 of 9 classes).
    with pytest.raises(UsageError, match=r"^data.source: digits: \d+ train labels outside 0 .. 8 \(9 classes, from "
                                         r"model.num_classes\): 9 \("):
        startup.preflight(spec(data={"source": "digits"}, model={"name": "mlp", "num_classes": 9}))
    # The batch against the training split, as context.resolve checks it.
    with pytest.raises(UsageError, match=r"^data.batch_size_per_replica: the global batch \(2000\) is larger"):
        startup.preflight(spec(data={"source": "digits", "batch_size_per_replica": 2000}))


@pytest.mark.timeout(60)
def test_preflight_builds_the_users_model_for_the_datas_classes(tmp_path):
    (tmp_path / "net.py").write_text(
        "import tensorflow as tf\n\ndef build(input_shape, num_classes):\n"
        "    return tf.keras.Sequential([tf.keras.Input(input_shape), tf.keras.layers.Flatten(),\n"
        "                                tf.keras.layers.Dense(3)])\n")
    with pytest.raises(UsageError, match=r"^model.name: .*net.py:build: "):
        startup.preflight(spec(model={"name": f"{tmp_path / 'net.py'}:build"}, data={"source": "digits"}))


@pytest.mark.timeout(60)
def test_slurm_check_runs_the_preflight_before_srun(tmp_path, capsys):
    one_class = tmp_path / "one"
    solid_folder(one_class, count=4, classes=("cats",), size=(4, 4))
    job = tmp_path / "job.yaml"
    job.write_text(f"name: one\nmodel: {{name: mlp}}\ndata: {{source: image_folder, path: {one_class}, "
                   "image_size: [4, 4]}\n")
    assert main(["slurm", "check", str(job), "--nodes", "1", "--tasks", "1"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"distrain: error: data.path: {one_class} has one class folder (cats, 4 images)")
    # A pack with fewer training shards than the allocation's tasks: found here, not by every task.
    folder = solid_folder(tmp_path / "imgs", count=8, size=(4, 4))
    assert main(["data", "pack", str(folder), str(tmp_path / "tfr"), "--shards", "2"]) == 0
    job.write_text(f"name: tfr\nmodel: {{name: mlp}}\ndata: {{source: tfrecord, path: {tmp_path / 'tfr'}, "
                   "image_size: [4, 4], batch_size_per_replica: 2}\n")
    capsys.readouterr()
    assert main(["slurm", "check", str(job), "--nodes", "1", "--tasks", "4"]) == EXIT_USAGE
    assert "has 2 training shards for 4 input pipelines" in capsys.readouterr().err
    assert main(["slurm", "check", str(job), "--nodes", "1", "--tasks", "2"]) == 0
    assert capsys.readouterr().out.startswith("name=tfr\n")
