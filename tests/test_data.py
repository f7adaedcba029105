"""Data: splits, the Keras loaders on tiny files in their own cache format, and the in-memory
sharded pipelines (disjoint, covering, equal to one process's batches, resumable)."""
import gzip
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest

import distrain  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf
from tf_keras.src.utils import data_utils

from distrain.data import sources
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
