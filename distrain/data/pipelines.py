"""The ``tf.data`` pipelines of distrain's sources: the index stream, per-worker sharding, batching.

The training pipeline of arrays and folders is an *index stream*: for each epoch a permutation of
the training positions, seeded by (seed, epoch) and so identical on every worker, cut to
``steps_per_epoch × global_batch`` and dealt out by position to the input pipelines. The union of
the pipelines' batches at any global step is then exactly the batch one process would take at
that step, which is what makes N workers train the same numbers as one, and what makes an exact
resume possible: the stream can start at any global step, skipping positions without decoding.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from distrain.data import imagefiles
from distrain.data.splits import Splits
from distrain.errors import UsageError


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
            from distrain.data import tfrecord

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
            from distrain.data import tfrecord

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
