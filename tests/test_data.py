"""Data: splits, the Keras loaders on tiny files in their own cache format, and the in-memory
sharded pipelines (disjoint, covering, equal to one process's batches, resumable)."""
import gzip
import logging
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest

import distrain  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf
from tf_keras.src.utils import data_utils

from distrain.data import labels, sources
from distrain.data.arrays import ArraySource
from distrain.data.pipelines import eval_steps, replica_batches, steps_per_epoch
from distrain.errors import UsageError
from distrain.spec import spec_from_dict


def data_spec(**data):
    return spec_from_dict({"data": data}).data


@pytest.fixture
def offline(monkeypatch):
    """No network at test time: a download attempt fails at once, as it does on a cut-off node."""
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setattr(data_utils, "urlretrieve", refuse)


@pytest.fixture
def accept_tiny_files(monkeypatch):
    # The loaders check the sha256 of the real archives; our tiny stand-ins cannot match it, and
    # a mismatch makes get_file download again. Everything else in the loader runs for real.
    monkeypatch.setattr(data_utils, "validate_file", lambda *a, **k: True)


def test_digits_split_sizes_shapes_dtypes():
    s = sources.load(data_spec(source="digits"), seed=1)
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (1150, 288, 359)
    assert s.input_shape == (8, 8, 1) and s.x_train.dtype == np.float32 and s.y_train.dtype == np.int32
    assert s.num_classes == 10 and s.rescale == pytest.approx(1 / 16) and not s.synthetic
    all_x = np.concatenate([s.x_train, s.x_val, s.x_test]).reshape(1797, -1)
    assert len(np.unique(all_x, axis=0)) == len(np.unique(all_x, axis=0))  # nothing lost
    assert len(all_x) == 1797
    again = sources.load(data_spec(source="digits"), seed=1)
    assert np.array_equal(again.y_val, s.y_val)
    other = sources.load(data_spec(source="digits"), seed=2)
    assert not np.array_equal(other.y_val, s.y_val)


def test_synthetic_is_flagged_and_shaped():
    s = sources.load(data_spec(source="synthetic", synthetic={"shape": [16, 16, 3], "classes": 4, "examples": 100}), 0)
    assert s.synthetic and s.input_shape == (16, 16, 3) and s.x_train.dtype == np.uint8 and s.num_classes == 4


def _idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_loader_reads_its_cache_format(tmp_path, offline):
    root = tmp_path / "datasets" / "fashion-mnist"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x_train, y_train = rng.integers(0, 256, (50, 28, 28)), np.arange(50) % 10
    x_test, y_test = rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10
    _idx(root / "train-images-idx3-ubyte.gz", x_train, 2051)
    _idx(root / "train-labels-idx1-ubyte.gz", y_train, 2049)
    _idx(root / "t10k-images-idx3-ubyte.gz", x_test, 2051)
    _idx(root / "t10k-labels-idx1-ubyte.gz", y_test, 2049)
    s = sources.load(data_spec(source="fashion_mnist", cache_dir=str(tmp_path), validation_split=0.2), seed=0)
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (40, 10, 20)
    assert s.input_shape == (28, 28, 1) and s.x_train.dtype == np.uint8 and s.num_classes == 10
    assert np.array_equal(s.x_test[..., 0], x_test)


def test_mnist_loader_reads_its_cache_format(tmp_path, offline, accept_tiny_files):
    root = tmp_path / "datasets"
    root.mkdir()
    rng = np.random.default_rng(0)
    np.savez(root / "mnist.npz", x_train=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
             y_train=np.arange(30, dtype=np.uint8) % 10, x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
             y_test=np.arange(10, dtype=np.uint8))
    s = sources.load(data_spec(source="mnist", cache_dir=str(tmp_path)), seed=0)
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (24, 6, 10)
    assert s.input_shape == (28, 28, 1)


def _cifar_files(root, name, files, label_key, classes):
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for fname, n in files:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(np.arange(n) % classes)}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f)
    # get_file looks for the archive first; the extracted folder beside it is what is read.
    with tarfile.open(root / f"{name}.tar.gz", "w:gz"):
        pass


def test_cifar10_loader_reads_its_cache_format(tmp_path, offline, accept_tiny_files):
    files = [(f"data_batch_{i}", 10000) for i in range(1, 6)] + [("test_batch", 1000)]
    _cifar_files(tmp_path / "datasets", "cifar-10-batches-py", files, b"labels", 10)
    s = sources.load(data_spec(source="cifar10", cache_dir=str(tmp_path), validation_split=0.1, limit=500), seed=0)
    assert s.input_shape == (32, 32, 3) and len(s.x_train) == 500 and s.num_classes == 10
    assert s.y_train.dtype == np.int32 and s.y_train.ndim == 1


def test_cifar100_loader_reads_its_cache_format(tmp_path, offline, accept_tiny_files):
    _cifar_files(tmp_path / "datasets", "cifar-100-python", [("train", 400), ("test", 100)], b"fine_labels", 100)
    s = sources.load(data_spec(source="cifar100", cache_dir=str(tmp_path)), seed=0)
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (320, 80, 100)
    assert s.num_classes == 100


def test_missing_keras_dataset_offline_is_a_clear_error(tmp_path, offline):
    with pytest.raises(UsageError) as info:
        sources.load(data_spec(source="fashion_mnist", cache_dir=str(tmp_path)), seed=0)
    message = str(info.value)
    assert message.startswith("data.source: fashion_mnist is not in the Keras cache")
    assert str(tmp_path / "datasets" / "fashion-mnist") in message and "\n" not in message
    assert ('python -c "import tf_keras; tf_keras.datasets.fashion_mnist.load_data(cache_dir='
            f"'{tmp_path}')\"") in message


def test_a_failed_download_into_the_default_cache_says_where_and_how_to_prefetch(tmp_path, monkeypatch, offline):
    # An empty home: Keras's real loader looks in ~/.keras/datasets, fails to fetch (offline: the
    # fixture refuses at once, no hang), raises its raw "URL fetch failure"; distrain translates it.
    (tmp_path / ".keras").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError) as info:
        sources.load(data_spec(source="fashion_mnist"), seed=0)
    message = str(info.value)
    assert f"not in the Keras cache ({tmp_path}/.keras/datasets/fashion-mnist)" in message
    assert "URL fetch failure" in message and "(a login node)" in message and "\n" not in message
    assert 'python -c "import tf_keras; tf_keras.datasets.fashion_mnist.load_data()"' in message


# --- the label rules (data/labels.py) ------------------------------------------------------------

def _hist(**splits):
    return {split: labels.histogram(np.asarray(values)) for split, values in splits.items()}


def test_labels_outside_num_classes_name_the_split_the_values_and_how_many():
    seen = _hist(train=[0, 1, 2, 0], validation=[0, 1], test=[0, 3, 3, 4, 2])
    with pytest.raises(UsageError) as info:
        labels.resolve(seen, where="data.source: m:load", num_classes=3)
    assert str(info.value) == (
        "data.source: m:load: 3 test labels outside 0 .. 2 (3 classes, from model.num_classes): 3 (2 labels), "
        "4 (1 label); set model.num_classes to at least 5, or remove it to take the data's count")
    with pytest.raises(UsageError, match=r"^data.source: m:load: 1 train label outside 0 .. 2 .*: -1 \(1 label\); "
                                         r"labels are class numbers"):
        labels.resolve(_hist(train=[0, 1, 2, -1], test=[0]), where="data.source: m:load")


def test_labels_numbered_from_1_are_an_error_with_num_classes_and_a_warning_without():
    seen = _hist(train=[1, 2, 3, 1], test=[3, 2])
    with pytest.raises(UsageError, match=r"1 train label outside 0 .. 2 \(3 classes, from model.num_classes\): "
                                         r"3 \(1 label\); labels numbered from 1\? number them from 0"):
        labels.resolve(seen, where="w", num_classes=3)
    classes = labels.resolve(seen, where="w")
    assert classes.count == 4 and classes.untrained == (0,)
    assert classes.warning() == ("class 0 has no training example (4 classes, from the training labels (largest 3)); "
                                 "labels numbered from 1? number them from 0 (y - 1)")


def test_a_class_only_in_the_test_split_is_an_error_unless_num_classes_makes_room_for_it():
    seen = _hist(train=[0, 1, 2, 1], validation=[0], test=[0, 7, 7])
    with pytest.raises(UsageError) as info:
        labels.resolve(seen, where="data.source: m:load")
    assert str(info.value) == (
        "data.source: m:load: 2 test labels outside 0 .. 2 (3 classes, from the training labels (largest 2)): "
        "7 (2 labels); a class no training example has; set model.num_classes: 8 if it is meant to exist, or move "
        "its examples into the training data")
    classes = labels.resolve(seen, where="w", num_classes=8)
    assert classes.untrained == (3, 4, 5, 6, 7) and classes.describe() == "8 classes, from model.num_classes"
    assert classes.warning().startswith("5 classes (3, 4, 5, 6, 7) have no training example")


def test_the_count_comes_from_the_source_when_it_declares_one_and_fewer_than_two_is_an_error():
    folders = labels.resolve(_hist(train=[0, 1, 0], test=[2]), where="data.path: d", declared=3,
                             declared_from="the class folders", names=["ant", "bee", "eel"])
    assert folders.describe() == "3 classes, from the class folders: ant, bee, eel"
    assert folders.warning().startswith("class 2 (eel) has no training example")
    with pytest.raises(UsageError, match=r"^w: the labels hold 1 class, from the training labels \(largest 0\); "
                                         r"expected at least two classes"):
        labels.resolve(_hist(train=[0, 0], test=[0]), where="w")
    # A pack written before pack counted labels per class: only the counts can be compared.
    with pytest.raises(UsageError, match=r"^w: the data has 4 classes \(from its distrain-data.json\), "
                                         r"model.num_classes is 3"):
        labels.resolve({}, where="w", num_classes=3, declared=4, declared_from="its distrain-data.json")
    assert labels.resolve({}, where="w", declared=4, declared_from="x").untrained == ()


def test_every_in_memory_source_checks_its_labels_against_model_num_classes(tmp_path, caplog):
    caplog.set_level(logging.INFO, "distrain")
    logging.getLogger("distrain").propagate = True
    with pytest.raises(UsageError, match=r"^data.source: digits: \d+ train labels outside 0 .. 4 \(5 classes, "
                                         r"from model.num_classes\): 5 \("):
        sources.load(data_spec(source="digits"), seed=0, num_classes=5)
    assert sources.load(data_spec(source="digits"), seed=0, num_classes=12).num_classes == 12
    assert "data.source: digits: 2 classes (10, 11) have no training example (12 classes, from model.num_classes)" \
        in caplog.text
    caplog.clear()
    assert sources.load(data_spec(source="digits"), seed=0).num_classes == 10
    assert "data.source: digits: 10 classes, from the digits dataset" in caplog.text
    # The user's fn() arrays: load_arrays is given model.num_classes (it was not).
    (tmp_path / "from_one.py").write_text(
        "import numpy as np\n\ndef load():\n    x = np.zeros((30, 4, 4), np.uint8)\n"
        "    return (x, np.arange(30) % 3 + 1), (x[:9], np.arange(9) % 3 + 1)\n")
    user = data_spec(source=f"{tmp_path / 'from_one.py'}:load", batch_size_per_replica=4)
    with pytest.raises(UsageError, match=r": 10 train labels outside 0 .. 2 \(3 classes, from model.num_classes\): "
                                         r"3 \(10 labels\); labels numbered from 1"):
        sources.load(user, seed=0, num_classes=3)
    assert sources.load(user, seed=0).num_classes == 4
    assert "class 0 has no training example (4 classes, from the training labels (largest 3))" in caplog.text


def _index_splits(n_train=100, n_val=37):
    # Each example's pixel value is its index, so a batch tells which examples it holds.
    def arr(n, offset):
        return (np.arange(n, dtype=np.float32) + offset).reshape(n, 1, 1, 1)
    return ArraySource(arr(n_train, 0), np.zeros(n_train, np.int32), arr(n_val, 1000), np.zeros(n_val, np.int32),
                       arr(n_val, 1000), np.zeros(n_val, np.int32), 2, 1.0)


def _batches(ds):
    return [sorted(x[:, 0, 0, 0].astype(int).tolist()) for x, _ in ds.as_numpy_iterator()]


NO_AUGMENT = spec_from_dict({}).data.augment


@pytest.mark.parametrize("pipelines,replicas_per_pipeline", [(2, 1), (4, 1), (2, 2)])
def test_train_shards_are_disjoint_cover_the_epoch_and_equal_one_process(pipelines, replicas_per_pipeline):
    splits, global_batch, epochs = _index_splits(), 8, 2
    steps = steps_per_epoch(100, global_batch)  # 12 whole global batches, 4 examples dropped
    pipes = splits.pipelines(global_batch, steps, 7, (1, 1, 1), NO_AUGMENT)
    single = _batches(pipes.train(tf.distribute.InputContext(1, 0, 1), epochs))
    assert len(single) == steps * epochs
    replicas = pipelines * replicas_per_pipeline
    shards = [_batches(pipes.train(tf.distribute.InputContext(pipelines, i, replicas), epochs)) for i in range(pipelines)]
    for epoch in range(epochs):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            # Global step `step`: each pipeline's replicas take its next replicas_per_pipeline batches.
            union = sorted(sum((shard[step * replicas_per_pipeline + r] for shard in shards
                                for r in range(replicas_per_pipeline)), []))
            assert union == single[step], f"global step {step} differs from one process"
            seen.extend(union)
        assert len(seen) == len(set(seen)) == steps * global_batch  # disjoint, each example at most once
    assert single[:steps] != single[steps:]  # reshuffled each epoch


def test_train_stream_resumes_at_any_step():
    pipes = _index_splits().pipelines(8, 12, 7, (1, 1, 1), NO_AUGMENT)
    ctx = tf.distribute.InputContext(2, 1, 2)
    full = _batches(pipes.train(ctx, 3))
    for start in (0, 5, 12, 30):
        assert _batches(pipes.train(ctx, 3, start_step=start)) == full[start:]


@pytest.mark.parametrize("pipelines,global_batch", [(1, 8), (2, 8), (3, 9)])
def test_evaluation_covers_every_example_exactly_once(pipelines, global_batch):
    splits = _index_splits(n_val=37)
    pipes = splits.pipelines(global_batch, 12, 7, (1, 1, 1), NO_AUGMENT)
    seen = []
    for i in range(pipelines):
        seen += sum(_batches(pipes.evaluation(tf.distribute.InputContext(pipelines, i, pipelines), "validation")), [])
    assert sorted(seen) == list(range(1000, 1037))
    assert eval_steps(37, 8) == 5


def test_global_batch_larger_than_data_is_a_usage_error():
    with pytest.raises(UsageError, match="data.batch_size_per_replica: the global batch \\(256\\)"):
        steps_per_epoch(100, 256)


def test_pipeline_resizes_and_rescales():
    s = sources.load(data_spec(source="digits"), seed=0)
    pipes = s.pipelines(16, 4, 0, (16, 16, 1), spec_from_dict({"data": {"augment": {"flip": "horizontal"}}}).data.augment)
    x, y = next(iter(pipes.train(tf.distribute.InputContext(1, 0, 1), 1)))
    assert x.shape == (16, 16, 16, 1) and x.dtype == tf.float32 and y.dtype == tf.int32
    assert float(tf.reduce_max(x)) <= 1.0 + 1e-6


@pytest.mark.parametrize("n,replicas,expected", [
    (19, 2, [4, 4, 4, 4, 2, 1]),     # the last step's 3 examples: 2 + 1, no empty batch
    (16, 2, [4, 4, 4, 4]),
    (13, 3, [4, 4, 4, 1]),           # 1 left for 3 replicas: the only case with empty ones
    (22, 3, [4, 4, 4, 4, 3, 3]),
    (9, 1, [4, 4, 1]),
])
def test_replica_batches_split_the_last_step_evenly(n, replicas, expected):
    import tensorflow as tf

    batches = [b.numpy().tolist() for b in replica_batches(tf, tf.data.Dataset.range(n), 4, replicas)]
    assert [len(b) for b in batches] == expected
    assert sum(batches, []) == list(range(n))  # every example once, in order
