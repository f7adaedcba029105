"""distrain's data sources, loaded into train/validation/test ``Splits``: one dispatch on ``data.source``.

Small sources (digits, the Keras datasets, synthetic) are arrays in memory. Image folders are
*streamed*: the folder is listed and each file's header checked once (``data/imagefiles.py``),
then files are read and decoded inside ``tf.data`` (``data/pipelines.py``), never the whole
folder up front. TFRecord shards written by ``distrain data pack`` stream too (``data/tfrecord.py``).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from distrain.data import imagefiles
from distrain.data.splits import Splits, split_indices
from distrain.errors import UsageError

log = logging.getLogger("distrain")

KERAS_SOURCES = {
    "mnist": ("mnist", "mnist.npz"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist"),
    "cifar10": ("cifar10", "cifar-10-batches-py"),
    "cifar100": ("cifar100", "cifar-100-python"),
}


def _with_channels(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


def cap_examples(splits: Splits, limit: Optional[int]) -> Splits:
    """The first ``limit`` examples of each in-memory split (``data.limit``); all without a limit."""
    if not limit:
        return splits
    return replace(splits, x_train=splits.x_train[:limit], y_train=splits.y_train[:limit],
                   x_val=splits.x_val[:limit], y_val=splits.y_val[:limit],
                   x_test=splits.x_test[:limit], y_test=splits.y_test[:limit])


def _three_way(x: np.ndarray, y: np.ndarray, data, seed: int, num_classes: int, rescale: float,
               synthetic: bool = False) -> Splits:
    test, val, train = split_indices(len(x), (data.test_split, data.validation_split * (1 - data.test_split)), seed)
    return Splits(x[train], y[train], x[val], y[val], x[test], y[test], num_classes, rescale, synthetic)


def _load_digits(data, seed: int) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()  # real data shipped inside scikit-learn: 1,797 8x8 images, values 0..16
    x = digits.images.astype(np.float32)[..., None]
    return _three_way(x, digits.target.astype(np.int32), data, seed, 10, data.rescale or 1 / 16)


def _load_synthetic(data, seed: int) -> Splits:
    s = data.synthetic
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(s.examples, *s.shape), dtype=np.uint8)
    if len(s.shape) == 2:
        x = x[..., None]
    y = rng.integers(0, s.classes, size=s.examples).astype(np.int32)
    return _three_way(x, y, data, seed, s.classes, data.rescale or 1 / 255, synthetic=True)


def keras_cache_dir(cache_dir: Optional[str] = None) -> Path:
    """Where ``tf.keras.datasets`` loaders keep their files (``~/.keras/datasets`` by default)."""
    return Path(cache_dir or Path.home() / ".keras").expanduser() / "datasets"


def _load_keras(data, seed: int) -> Splits:
    import tensorflow as tf

    module_name, cache_name = KERAS_SOURCES[data.source]
    loader = getattr(tf.keras.datasets, module_name).load_data
    try:
        (x_train, y_train), (x_test, y_test) = loader(cache_dir=data.cache_dir)
    except Exception as err:  # the loaders raise bare Exception on a failed download
        raise UsageError(
            f"data.source: {data.source} is not in the Keras cache ({keras_cache_dir(data.cache_dir) / cache_name}) and "
            f"could not be downloaded ({type(err).__name__}: {str(err).splitlines()[0][:120]}); copy the "
            f"dataset there from a machine with network, or use source digits offline") from None
    x_train, x_test = _with_channels(x_train), _with_channels(x_test)
    y_train, y_test = y_train.reshape(-1).astype(np.int32), y_test.reshape(-1).astype(np.int32)
    classes = int(max(y_train.max(), y_test.max())) + 1
    return train_test_splits(x_train, y_train, x_test, y_test, data, seed, classes, data.rescale or 1 / 255)


def train_test_splits(x_train, y_train, x_test, y_test, data, seed: int, classes: int, rescale: float) -> Splits:
    """Splits of a source with its own test set (``load_data()``'s contract): validation is cut
    from the training arrays by the seed (``data.validation_split``)."""
    val, train = split_indices(len(x_train), (data.validation_split,), seed)
    return Splits(x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test, classes, rescale)


def _load_image_folder(data, seed: int, channels: int) -> Splits:
    """Lists the folder and checks every file's header; nothing is decoded here (see ``Pipelines``)."""
    files, labels, classes = imagefiles.list_image_folder(data.path)
    infos = imagefiles.scan(files)
    files, labels, infos = imagefiles.drop_unreadable(files, labels, infos, data.path)
    imagefiles.warn_mixed_channels(infos, channels, data.path)
    test, val, train = split_indices(len(files), (data.test_split, data.validation_split * (1 - data.test_split)), seed)
    image_shape = (*data.image_size, channels)
    cache_key = imagefiles.cache_key(files, infos, data.image_size, channels) if data.cache != "none" else None
    imagefiles.check_cache_room(data.cache, len(files), image_shape)
    log.info("data.path %s: %d images in %d classes (train %d, validation %d, test %d), streamed",
             data.path, len(files), len(classes), len(train), len(val), len(test))
    # x_* are positions in ``files``: the index stream deals positions, the pipeline decodes them.
    return Splits(train, labels[train], val, labels[val], test, labels[test], len(classes), data.rescale or 1 / 255,
                  files=np.asarray(files), image_shape=image_shape, cache=data.cache, cache_key=cache_key)


def load(data, seed: int, *, channels: int = 3, shard: tuple[int, int] = (0, 1)) -> Splits:
    """Loads a source into train/validation/test splits (streamed sources: lists them only).

    Args:
        data: the ``DataSpec``.
        seed: split seed; the same on every worker.
        channels: image channels for image folders and TFRecord (the model's input channels).
        shard: (this worker's pipeline index, number of pipelines): TFRecord counts the examples
            an epoch can use from how its shards divide among the pipelines.

    Raises:
        UsageError: the data is missing on this node, or broken (one line naming the path).
    """
    if data.source == "digits":
        splits = _load_digits(data, seed)
    elif data.source == "synthetic":
        splits = _load_synthetic(data, seed)
    elif data.source in KERAS_SOURCES:
        splits = _load_keras(data, seed)
    elif data.source == "image_folder":
        splits = _load_image_folder(data, seed, channels)
    elif data.source == "tfrecord":
        from distrain.data import tfrecord

        splits = tfrecord.load(data, channels, shard)
    else:  # pragma: no cover - the spec validator rejects other names
        raise UsageError(f"data.source: unknown source {data.source!r}")
    if splits.records is None:
        splits = cap_examples(splits, data.limit)
    if not splits.train_size_global:
        splits = replace(splits, train_size_global=len(splits.x_train))
    return splits
