"""Sources held in memory as arrays: digits, the Keras datasets, synthetic images, and the arrays
of the user's ``load_data()``-style function (``data/user.py``).

Every worker holds the whole arrays and takes its positions of the index stream
(``pipelines.index_stream``), so N workers train the same batches as one and a resume is exact.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from distrain.data import labels
from distrain.data.pipelines import Pipelines, index_stream, replica_batches
from distrain.data.splits import split_indices
from distrain.errors import UsageError

log = logging.getLogger("distrain")

# data.source -> (tf.keras.datasets module, the file or folder its loader caches, its classes)
KERAS_SOURCES = {
    "mnist": ("mnist", "mnist.npz", 10),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", 10),
    "cifar10": ("cifar10", "cifar-10-batches-py", 10),
    "cifar100": ("cifar100", "cifar-100-python", 100),
}
BUILT_IN = ("digits", "synthetic", *KERAS_SOURCES)


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Train, validation and test images and integer labels, in memory.

    Attributes:
        x_train, y_train, x_val, y_val, x_test, y_test: images (N x H x W x C) and labels (N).
        num_classes: classes of the labels.
        rescale: what images are multiplied by before the model sees them.
        synthetic: random images and labels (``data.source: synthetic``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    rescale: float
    synthetic: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def train_size(self) -> int:
        return len(self.x_train)

    @property
    def val_size(self) -> int:
        return len(self.y_val)

    @property
    def test_size(self) -> int:
        return len(self.y_test)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of ``train``, ``validation`` or ``test``."""
        return {"train": (self.x_train, self.y_train), "validation": (self.x_val, self.y_val),
                "test": (self.x_test, self.y_test)}[name]

    def capped(self, limit: Optional[int]) -> "ArraySource":
        """The first ``limit`` examples of each split (``data.limit``); all without a limit."""
        if not limit:
            return self
        return dataclasses.replace(self, x_train=self.x_train[:limit], y_train=self.y_train[:limit],
                                   x_val=self.x_val[:limit], y_val=self.y_val[:limit],
                                   x_test=self.x_test[:limit], y_test=self.y_test[:limit])

    def pipelines(self, global_batch: int, steps: int, seed: int, input_shape, augment, watch=None) -> "ArrayPipelines":
        return ArrayPipelines(self, global_batch, steps, seed, input_shape, augment, watch=watch, rescale=self.rescale)


class ArrayPipelines(Pipelines):
    """Batches gathered from the arrays by position: the index stream for training, every
    ``num_input_pipelines``-th example for evaluation."""

    source: ArraySource

    def _train_batches(self, tf, input_context, epochs, start_epoch, skip, per_replica):
        s = self.source
        positions = index_stream(tf, s.train_size, self.steps * self.global_batch, self.seed, input_context, epochs,
                                 start_epoch, skip)
        x, y = tf.constant(s.x_train), tf.constant(s.y_train)
        return positions.batch(per_replica, drop_remainder=True).map(
            lambda idx: (tf.gather(x, idx), tf.gather(y, idx)), num_parallel_calls=tf.data.AUTOTUNE)

    def _evaluation_batches(self, tf, input_context, split, per_replica, local_replicas):
        xs, ys = self.source.split(split)
        mine = np.arange(len(ys))[input_context.input_pipeline_id::input_context.num_input_pipelines]
        x, y = tf.constant(xs), tf.constant(ys)
        return replica_batches(tf, tf.data.Dataset.from_tensor_slices(mine), per_replica, local_replicas).map(
            lambda i: (tf.gather(x, i), tf.gather(y, i)))


def three_way(x: np.ndarray, y: np.ndarray, data, seed: int, num_classes: int, rescale: float,
              synthetic: bool = False) -> ArraySource:
    """Test, validation and training splits cut from one set of arrays by the seed
    (``data.test_split``, then ``data.validation_split`` of the rest)."""
    test, val, train = split_indices(len(x), (data.test_split, data.validation_split * (1 - data.test_split)), seed)
    return ArraySource(x[train], y[train], x[val], y[val], x[test], y[test], num_classes, rescale, synthetic)


def train_test_splits(x_train, y_train, x_test, y_test, data, seed: int, classes: int, rescale: float) -> ArraySource:
    """Splits of a source with its own test set (``load_data()``'s contract): validation is cut
    from the training arrays by the seed (``data.validation_split``)."""
    val, train = split_indices(len(x_train), (data.validation_split,), seed)
    return ArraySource(x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test, classes, rescale)


def _load_digits(data, seed: int) -> ArraySource:
    from sklearn.datasets import load_digits

    digits = load_digits()  # real data shipped inside scikit-learn: 1,797 8x8 images, values 0..16
    x = digits.images.astype(np.float32)[..., None]
    return three_way(x, digits.target.astype(np.int32), data, seed, 10, data.rescale or 1 / 16)


def _load_synthetic(data, seed: int) -> ArraySource:
    s = data.synthetic
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(s.examples, *s.shape), dtype=np.uint8)
    if len(s.shape) == 2:
        x = x[..., None]
    y = rng.integers(0, s.classes, size=s.examples).astype(np.int32)
    return three_way(x, y, data, seed, s.classes, data.rescale or 1 / 255, synthetic=True)


def keras_cache_dir(cache_dir: Optional[str] = None) -> Path:
    """Where ``tf.keras.datasets`` loaders keep their files: ``CACHE_DIR/datasets``, by default
    ``~/.keras/datasets``; ``/tmp/.keras/datasets`` when that directory does not exist or is not
    writable, as Keras's ``get_file`` decides."""
    base = Path(cache_dir or Path.home() / ".keras").expanduser()
    if not os.access(base, os.W_OK):  # also when it does not exist
        base = Path("/tmp/.keras")
    return base / "datasets"


def prefetch_command(source: str, cache_dir: Optional[str] = None) -> str:
    """The command that downloads a Keras dataset into the cache a job reads (run where there is network)."""
    module = KERAS_SOURCES[source][0]
    where = f"cache_dir={str(cache_dir)!r}" if cache_dir else ""
    return f'python -c "import tf_keras; tf_keras.datasets.{module}.load_data({where})"'


def download_failed(source: str, cache_dir: Optional[str], err: BaseException) -> UsageError:
    """The one line for a Keras dataset that is not in the cache and could not be downloaded."""
    expected = keras_cache_dir(cache_dir) / KERAS_SOURCES[source][1]
    reason = (str(err).strip().splitlines() or [""])[0][:160]
    return UsageError(
        f"data.source: {source} is not in the Keras cache ({expected}) and could not be downloaded "
        f"({type(err).__name__}: {reason}); fetch it where there is network (a login node) with: "
        f"{prefetch_command(source, cache_dir)} (the cache must be visible on the nodes: set data.cache_dir to a "
        f"shared directory), or use data.source: digits offline")


def _with_channels(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


def _load_keras(data, seed: int) -> ArraySource:
    import tensorflow as tf

    module_name, _, classes = KERAS_SOURCES[data.source]
    loader = getattr(tf.keras.datasets, module_name).load_data
    try:
        (x_train, y_train), (x_test, y_test) = loader(cache_dir=data.cache_dir)
    except Exception as err:  # the loaders raise bare Exception on a failed download
        raise download_failed(data.source, data.cache_dir, err) from None
    x_train, x_test = _with_channels(x_train), _with_channels(x_test)
    y_train, y_test = y_train.reshape(-1).astype(np.int32), y_test.reshape(-1).astype(np.int32)
    return train_test_splits(x_train, y_train, x_test, y_test, data, seed, classes, data.rescale or 1 / 255)


def with_classes(source: ArraySource, where: str, *, num_classes: Optional[int], declared_from: str) -> ArraySource:
    """The source with its class count resolved (``num_classes``, else its own, ``declared_from``) and
    the labels of every split checked against it (``labels.resolve``), logged once."""
    seen = {split: labels.histogram(source.split(split)[1]) for split in labels.SPLITS}
    classes = labels.resolve(seen, where=where, num_classes=num_classes, declared=source.num_classes,
                             declared_from=declared_from)
    labels.report(classes, where)
    return dataclasses.replace(source, num_classes=classes.count)


def load(data, seed: int, num_classes: Optional[int] = None) -> ArraySource:
    """A built-in in-memory source (``BUILT_IN``), split by the seed, capped by ``data.limit``, its
    labels checked against ``num_classes`` (``model.num_classes``) or the dataset's own count."""
    if data.source == "digits":
        source, origin = _load_digits(data, seed), "the digits dataset"
    elif data.source == "synthetic":
        source, origin = _load_synthetic(data, seed), "data.synthetic.classes"
    else:
        source, origin = _load_keras(data, seed), f"the {data.source} dataset"
    return with_classes(source.capped(data.limit), f"data.source: {data.source}", num_classes=num_classes,
                        declared_from=origin)
