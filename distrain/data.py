"""Data sources, splits, per-worker sharding and the ``tf.data`` pipelines.

Every source becomes arrays in memory (``Splits``); image folders are decoded by each worker for
its own shard of files only. The training pipeline is an *index stream*: for each epoch a
permutation of the training indices, seeded by (seed, epoch) and so identical on every worker,
cut to ``steps_per_epoch × global_batch`` and dealt out by position to the input pipelines. The
union of the pipelines' batches at any global step is then exactly the batch one process would
take at that step, which is what makes N workers train the same numbers as one, and what makes
an exact resume possible: the stream can start at any global step.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from distrain.errors import UsageError

log = logging.getLogger("distrain")

KERAS_SOURCES = {
    "mnist": ("mnist", "mnist.npz"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist"),
    "cifar10": ("cifar10", "cifar-10-batches-py"),
    "cifar100": ("cifar100", "cifar-100-python"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclass(frozen=True)
class Splits:
    """Train, validation and test arrays of one source (for image folders: this worker's shard)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    rescale: float
    synthetic: bool = False
    sharded: bool = False  # already this worker's shard (file-level sharding)
    train_size_global: int = 0  # examples in the training split over all workers

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def val_size(self) -> int:
        return len(self.y_val)

    @property
    def test_size(self) -> int:
        return len(self.y_test)


def _split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Seeded permutation of ``range(n)`` cut into the given leading fractions plus the rest."""
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for frac in fractions:
        size = int(round(n * frac))
        parts.append(np.sort(order[start:start + size]))
        start += size
    parts.append(np.sort(order[start:]))
    return parts


def _with_channels(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


def _cap(splits: Splits, limit: Optional[int]) -> Splits:
    if not limit:
        return splits
    return replace(splits, x_train=splits.x_train[:limit], y_train=splits.y_train[:limit],
                   x_val=splits.x_val[:limit], y_val=splits.y_val[:limit],
                   x_test=splits.x_test[:limit], y_test=splits.y_test[:limit])


def _three_way(x: np.ndarray, y: np.ndarray, data, seed: int, num_classes: int, rescale: float,
               synthetic: bool = False) -> Splits:
    test, val, train = _split_indices(len(x), (data.test_split, data.validation_split * (1 - data.test_split)), seed)
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
    val, train = _split_indices(len(x_train), (data.validation_split,), seed)
    classes = int(max(y_train.max(), y_test.max())) + 1
    return Splits(x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test,
                  classes, data.rescale or 1 / 255)


def list_image_folder(path: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Files and labels of a ``class_name/image.jpg`` folder, classes in sorted order.

    Same order as ``tf.keras.utils.image_dataset_from_directory`` (sorted class names, sorted
    files), so labels agree with a model trained by the course's code on the same folder.
    """
    root = Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(f))
                labels.append(label)
    if len(classes) < 2 or not files:
        raise UsageError(f"data.path: {path}: expected at least two class folders with images "
                         f"({', '.join(IMAGE_EXTENSIONS)}), found {len(classes)} classes, {len(files)} images")
    return files, np.asarray(labels, np.int32), classes


def _decode_files(files: list[str], image_size: list[int], channels: int) -> np.ndarray:
    import tensorflow as tf

    if not files:
        return np.zeros((0, *image_size, channels), np.uint8)

    def load(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
        return tf.cast(tf.image.resize(image, image_size), tf.uint8)

    ds = tf.data.Dataset.from_tensor_slices(files).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return np.stack(list(ds.as_numpy_iterator()))


def _load_image_folder(data, seed: int, channels: int, shard: tuple[int, int]) -> Splits:
    """File-level sharding: worker ``i`` of ``n`` reads and decodes only files ``i::n`` of each split."""
    files, labels, classes = list_image_folder(data.path)
    test, val, train = _split_indices(len(files), (data.test_split, data.validation_split * (1 - data.test_split)), seed)
    index, count = shard

    def part(idx: np.ndarray, sharded: bool) -> tuple[np.ndarray, np.ndarray]:
        idx = idx[index::count] if sharded else idx
        return _decode_files([files[i] for i in idx], data.image_size, channels), labels[idx]

    # Training files are sharded; validation and test are decoded whole, then dealt by index like
    # in-memory arrays, so their metrics cover every example exactly once.
    x_train, y_train = part(train, True)
    x_val, y_val = part(val, False)
    x_test, y_test = part(test, False)
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, len(classes), data.rescale or 1 / 255,
                  sharded=count > 1, train_size_global=len(train))


def load(data, seed: int, *, channels: int = 3, shard: tuple[int, int] = (0, 1)) -> Splits:
    """Loads a source into train/validation/test splits.

    Args:
        data: the ``DataSpec``.
        seed: split seed; the same on every worker.
        channels: image channels for image folders (the model's input channels).
        shard: (this worker's pipeline index, number of pipelines), for file-level sharding.
    """
    if ":" in data.source:  # an import reference to the user's loader (distrain.user_data)
        from distrain import user_data

        return user_data.load(data, seed)
    if data.source == "digits":
        splits = _load_digits(data, seed)
    elif data.source == "synthetic":
        splits = _load_synthetic(data, seed)
    elif data.source in KERAS_SOURCES:
        splits = _load_keras(data, seed)
    elif data.source == "image_folder":
        splits = _load_image_folder(data, seed, channels, shard)
    else:  # pragma: no cover - the spec validator rejects other names
        raise UsageError(f"data.source: unknown source {data.source!r}")
    splits = _cap(splits, data.limit)
    if not splits.train_size_global:
        splits = replace(splits, train_size_global=len(splits.x_train))
    return splits


def steps_per_epoch(train_size: int, global_batch: int, cap: Optional[int] = None) -> int:
    """Global steps per epoch: whole global batches only, so every worker runs the same count."""
    steps = train_size // global_batch
    if steps == 0:
        raise UsageError(f"data.batch_size_per_replica: the global batch ({global_batch}) is larger than "
                         f"the training split ({train_size} examples); lower the batch or use more data")
    return min(steps, cap) if cap else steps


def eval_steps(size: int, global_batch: int) -> int:
    """Global steps to see every validation/test example once (the last batch may be partial)."""
    return max(1, math.ceil(size / global_batch))


def epoch_positions(n: int, take: int, seed: int, epoch, pipeline_id: int, num_pipelines: int):
    """This pipeline's training indices for one epoch (a TensorFlow op, usable in ``tf.data``).

    The permutation depends only on (seed, epoch): every worker computes the same one and takes
    every ``num_pipelines``-th position of its first ``take`` entries.
    """
    import tensorflow as tf

    epoch = tf.cast(epoch, tf.int64)
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
    return perm[:take][pipeline_id::num_pipelines]


class Pipelines:
    """Builds the per-pipeline datasets for one run.

    Args:
        splits: the arrays.
        global_batch: per-replica batch × replicas in sync.
        steps: global steps per epoch.
        seed: shuffle seed.
        input_shape: the model's input shape; images are resized to it when the data differs.
        augment: the ``AugmentSpec`` (training only).
    """

    def __init__(self, splits: Splits, global_batch: int, steps: int, seed: int,
                 input_shape: tuple[int, ...], augment) -> None:
        self.splits = splits
        self.global_batch = global_batch
        self.steps = steps
        self.seed = seed
        self.input_shape = tuple(input_shape)
        self.augment = augment

    def _prepare(self, tf, x):
        x = tf.cast(x, tf.float32) * self.splits.rescale
        if tuple(x.shape[1:3]) != self.input_shape[:2]:
            x = tf.image.resize(x, self.input_shape[:2])
        return x

    def _augmenter(self, tf):
        a = self.augment
        layers = []
        if a.flip != "none":
            layers.append(tf.keras.layers.RandomFlip(a.flip, seed=self.seed))
        if a.rotation:
            layers.append(tf.keras.layers.RandomRotation(a.rotation, seed=self.seed))
        if a.zoom:
            layers.append(tf.keras.layers.RandomZoom(a.zoom, seed=self.seed))
        return tf.keras.Sequential(layers) if layers else None

    def train(self, ctx, epochs: int, start_step: int = 0):
        """Training batches for global steps ``start_step .. epochs × steps`` of this pipeline."""
        import tensorflow as tf

        s = self.splits
        per_replica = ctx.get_per_replica_batch_size(self.global_batch)
        per_pipeline = self.global_batch // ctx.num_input_pipelines
        if s.sharded:
            # File-level shard: this worker permutes its own files; same step count as every other worker.
            n, take, pid, count = len(s.x_train), self.steps * per_pipeline, 0, 1
        else:
            n, take, pid, count = len(s.x_train), self.steps * self.global_batch, ctx.input_pipeline_id, ctx.num_input_pipelines
        start_epoch, step_in_epoch = divmod(start_step, self.steps)
        seed = self.seed + (1000003 * ctx.input_pipeline_id if s.sharded else 0)
        x, y = tf.constant(s.x_train), tf.constant(s.y_train)
        ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(
            lambda e: tf.data.Dataset.from_tensor_slices(epoch_positions(n, take, seed, e, pid, count)))
        ds = ds.batch(per_replica, drop_remainder=True)
        # Replicas of this pipeline take its batches in turn: skip theirs for the steps already done.
        ds = ds.skip(step_in_epoch * (per_pipeline // per_replica))
        augmenter = self._augmenter(tf)

        def gather(idx):
            images = self._prepare(tf, tf.gather(x, idx))
            if augmenter is not None:
                images = augmenter(images, training=True)
            return images, tf.gather(y, idx)

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        options.deterministic = True
        return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE).with_options(options)

    def evaluation(self, ctx, which: str):
        """Validation or test batches of this pipeline: every example once, over all pipelines."""
        import tensorflow as tf

        s = self.splits
        xs, ys = (s.x_val, s.y_val) if which == "val" else (s.x_test, s.y_test)
        per_replica = ctx.get_per_replica_batch_size(self.global_batch)
        x, y = tf.constant(xs), tf.constant(ys)
        # Position-dealt like training: global step k covers examples [k*B, (k+1)*B) over all pipelines.
        idx = tf.range(len(xs), dtype=tf.int64)[ctx.input_pipeline_id::ctx.num_input_pipelines]
        ds = tf.data.Dataset.from_tensor_slices(idx).batch(per_replica)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return (ds.map(lambda i: (self._prepare(tf, tf.gather(x, i)), tf.gather(y, i)),
                       num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE).with_options(options))
