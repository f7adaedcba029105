"""Data sources, splits, per-worker sharding and the ``tf.data`` pipelines.

Small sources (digits, the Keras datasets, synthetic) are arrays in memory. Image folders are
*streamed*: the folder is listed and each file's header checked once (``distrain/imagefiles.py``),
then files are read and decoded inside ``tf.data``, in parallel and prefetched, never the whole
folder up front. TFRecord shards written by ``distrain data pack`` stream too
(``distrain/tfrecord.py``).

The training pipeline of arrays and folders is an *index stream*: for each epoch a permutation of
the training positions, seeded by (seed, epoch) and so identical on every worker, cut to
``steps_per_epoch × global_batch`` and dealt out by position to the input pipelines. The union of
the pipelines' batches at any global step is then exactly the batch one process would take at
that step, which is what makes N workers train the same numbers as one, and what makes an exact
resume possible: the stream can start at any global step, skipping positions without decoding.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from distrain import imagefiles
from distrain.errors import UsageError
from distrain.imagefiles import IMAGE_EXTENSIONS, list_image_folder  # noqa: F401  (public names of this module)
from distrain.splits import Splits, split_indices as _split_indices  # noqa: F401  (used here and by user_data)

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
    classes = int(max(y_train.max(), y_test.max())) + 1
    return train_test_splits(x_train, y_train, x_test, y_test, data, seed, classes, data.rescale or 1 / 255)


def train_test_splits(x_train, y_train, x_test, y_test, data, seed: int, classes: int, rescale: float) -> Splits:
    """Splits of a source with its own test set (``load_data()``'s contract): validation is cut
    from the training arrays by the seed (``data.validation_split``)."""
    val, train = _split_indices(len(x_train), (data.validation_split,), seed)
    return Splits(x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test, classes, rescale)


def _load_image_folder(data, seed: int, channels: int) -> Splits:
    """Lists the folder and checks every file's header; nothing is decoded here (see ``Pipelines``)."""
    files, labels, classes = imagefiles.list_image_folder(data.path)
    infos = imagefiles.scan(files)
    files, labels, infos = imagefiles.drop_unreadable(files, labels, infos, data.path)
    imagefiles.warn_mixed_channels(infos, channels, data.path)
    test, val, train = _split_indices(len(files), (data.test_split, data.validation_split * (1 - data.test_split)), seed)
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
        from distrain import tfrecord

        splits = tfrecord.load(data, channels, shard)
    else:  # pragma: no cover - the spec validator rejects other names
        raise UsageError(f"data.source: unknown source {data.source!r}")
    if splits.records is None:
        splits = cap_examples(splits, data.limit)
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


def replica_batches(tf, ds, per_replica: int, local_replicas: int):
    """Evaluation batches for this pipeline's replicas: ``per_replica`` each, and the last step's
    remainder split over the replicas as evenly as possible.

    Batching by ``per_replica`` alone leaves the last replicas of a partial step an empty batch;
    TensorFlow's oneDNN CPU convolutions fail on an empty batch after a 1x1 convolution ("input
    depth must be evenly divisible by filter depth"), which stopped MirroredStrategy over logical
    CPUs with the inception model. Split evenly, a replica gets an empty batch only when the step
    has fewer examples left than replicas. Every example is still evaluated once, in order.
    """
    if local_replicas == 1:
        return ds.batch(per_replica)

    def split_step(*step):
        n = tf.shape(step[0], out_type=tf.int64)[0]
        q, big = n // local_replicas, n % local_replicas
        sizes = tf.concat([tf.fill([big], q + 1), tf.fill([local_replicas - big], q)], 0)
        sizes = tf.boolean_mask(sizes, sizes > 0)
        starts = tf.cumsum(sizes, exclusive=True)
        pieces = tf.data.Dataset.from_tensor_slices((starts, sizes))
        return pieces.map(lambda start, size: tuple(t[start:start + size] for t in step)
                          if len(step) > 1 else step[0][start:start + size])

    return ds.batch(per_replica * local_replicas).flat_map(split_step)


def _options(tf, deterministic: bool = True):
    options = tf.data.Options()
    # Sharding is the index stream's job (or the shard dealing's); tf.distribute must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = deterministic
    return options


class Pipelines:
    """Builds the per-pipeline datasets for one run.

    Args:
        splits: the examples (arrays, folder positions or TFRecord shards).
        global_batch: per-replica batch × replicas in sync.
        steps: global steps per epoch.
        seed: shuffle seed.
        input_shape: the model's input shape; images are resized to it when the data differs.
        augment: the ``AugmentSpec`` (training only).
        watch: an ``inputwatch.InputWatch`` to note when each training batch is ready (optional).
    """

    def __init__(self, splits: Splits, global_batch: int, steps: int, seed: int,
                 input_shape: tuple[int, ...], augment, watch=None) -> None:
        self.splits = splits
        self.global_batch = global_batch
        self.steps = steps
        self.seed = seed
        self.input_shape = tuple(input_shape)
        self.augment = augment
        self.watch = watch
        self._cache = None

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

    def decoded_cache(self) -> Optional[imagefiles.DecodedCache]:
        """The ``data.cache`` of this run (one per process, shared by its pipelines and splits)."""
        s = self.splits
        if s.cache == "none":
            return None
        if self._cache is None:
            count = s.records.total if s.records else len(s.files)
            self._cache = imagefiles.DecodedCache(s.cache, count, s.image_shape, s.cache_key)
        return self._cache

    def _file_loader(self, tf):
        """Position in the folder → (decoded uint8 image, label): reads one file."""
        s = self.splits
        files = tf.constant(s.files)
        all_labels = np.zeros(len(s.files), np.int32)
        for x, y in ((s.x_train, s.y_train), (s.x_val, s.y_val), (s.x_test, s.y_test)):
            all_labels[x] = y
        labels = tf.constant(all_labels)
        cache = self.decoded_cache()
        size, channels = list(s.image_shape[:2]), s.image_shape[2]

        def load(i):
            def decode():
                return imagefiles.decode(tf, tf.io.read_file(files[i]), size, channels)
            image = cache.lookup(tf, i, decode) if cache else decode()
            return image, labels[i]
        return load

    def train(self, ctx, epochs: int, start_step: int = 0):
        """Training batches for global steps ``start_step .. epochs × steps`` of this pipeline."""
        import tensorflow as tf

        s = self.splits
        per_replica = ctx.get_per_replica_batch_size(self.global_batch)
        per_pipeline = self.global_batch // ctx.num_input_pipelines
        start_epoch, step_in_epoch = divmod(start_step, self.steps)
        augmenter = self._augmenter(tf)

        def finish(images, labels):
            images = self._prepare(tf, images)
            if augmenter is not None:
                images = augmenter(images, training=True)
            return images, labels

        if s.records is not None:
            from distrain import tfrecord

            ds = tfrecord.train_dataset(tf, s.records, self, ctx, epochs, start_epoch,
                                        skip=step_in_epoch * per_pipeline, per_pipeline=per_pipeline)
            ds = ds.batch(per_replica, drop_remainder=True).map(finish, num_parallel_calls=tf.data.AUTOTUNE)
            return self._ready(tf, ds)

        n, take = len(s.x_train), self.steps * self.global_batch
        positions = tf.constant(s.x_train if s.files is not None else np.arange(n))
        ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(
            lambda e: tf.data.Dataset.from_tensor_slices(
                epoch_positions(n, take, self.seed, e, ctx.input_pipeline_id, ctx.num_input_pipelines)))
        # Replicas of this pipeline take its examples in turn: skip theirs for the steps already
        # done. Skipping positions costs nothing: nothing is read or decoded for them.
        ds = ds.skip(step_in_epoch * per_pipeline)
        if s.files is not None:
            load = self._file_loader(tf)
            ds = (ds.map(lambda i: load(tf.gather(positions, i)), num_parallel_calls=tf.data.AUTOTUNE)
                  .batch(per_replica, drop_remainder=True)
                  .map(finish, num_parallel_calls=tf.data.AUTOTUNE))
        else:
            x, y = tf.constant(s.x_train), tf.constant(s.y_train)
            ds = ds.batch(per_replica, drop_remainder=True).map(
                lambda idx: finish(tf.gather(x, idx), tf.gather(y, idx)), num_parallel_calls=tf.data.AUTOTUNE)
        return self._ready(tf, ds)

    def _ready(self, tf, ds):
        if self.watch is not None:
            ds = self.watch.stamp(tf, ds)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))

    def evaluation(self, ctx, which: str):
        """Validation or test batches of this pipeline: every example once, over all pipelines.

        Position-dealt like training: pipeline ``i`` of ``n`` takes examples ``i, i+n, ...``, so
        each worker reads (and decodes) only its share.
        """
        import tensorflow as tf

        s = self.splits
        per_replica = ctx.get_per_replica_batch_size(self.global_batch)
        pid, count = ctx.input_pipeline_id, ctx.num_input_pipelines
        local_replicas = max(1, ctx.num_replicas_in_sync // count)

        def finish(images, labels):
            return self._prepare(tf, images), labels

        if s.records is not None:
            from distrain import tfrecord

            ds = replica_batches(tf, tfrecord.eval_dataset(tf, s.records, self, which, pid, count), per_replica,
                                 local_replicas)
        else:
            xs, ys = (s.x_val, s.y_val) if which == "val" else (s.x_test, s.y_test)
            mine = np.arange(len(ys))[pid::count]
            if s.files is not None:
                load = self._file_loader(tf)
                ds = replica_batches(tf, tf.data.Dataset.from_tensor_slices(np.asarray(xs)[mine])
                                     .map(load, num_parallel_calls=tf.data.AUTOTUNE), per_replica, local_replicas)
            else:
                x, y = tf.constant(xs), tf.constant(ys)
                ds = replica_batches(tf, tf.data.Dataset.from_tensor_slices(mine), per_replica, local_replicas).map(
                    lambda i: (tf.gather(x, i), tf.gather(y, i)))
        return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE).with_options(_options(tf))
