"""What every kind of source shares: the ``Source`` protocol, the batch arithmetic, and the
``tf.data`` scaffolding of a pipeline (batching per replica, rescale, resize, augment, prefetch).

A source (``arrays.ArraySource``, ``imagefolder.ImageFolderSource``, ``tfrecord.TFRecordSource``,
``user.DatasetSource``) knows its sizes and classes and makes its ``Pipelines``: per input pipeline
(one per worker), the training batches from any global step and the evaluation batches.

Arrays and folders feed training through an *index stream* (``index_stream``): for each epoch a
permutation of the training positions, seeded by (seed, epoch) and so identical on every worker,
cut to ``steps_per_epoch × global_batch`` and dealt out by position to the input pipelines. The
union of the pipelines' batches at any global step is then exactly the batch one process would
take at that step, which is what makes N workers train the same numbers as one, and what makes an
exact resume possible: the stream can start at any global step, skipping positions without decoding.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

from distrain.data import imagefiles
from distrain.errors import UsageError

# The evaluation splits, as every source names them.
EVALUATION_SPLITS = ("validation", "test")


class Source(Protocol):
    """What a run knows of its data once it is loaded, before any pipeline exists.

    Attributes:
        num_classes: classes of the labels (``model.num_classes`` overrides it in the context).
        input_shape: the shape of one example as the data gives it (H, W, C).
        train_size: training examples one epoch can draw from, over all workers.
        val_size, test_size: validation and test examples over all workers.
        synthetic: random data, for throughput only.
    """

    num_classes: int
    input_shape: tuple[int, ...]
    train_size: int
    val_size: int
    test_size: int
    synthetic: bool

    def pipelines(self, global_batch: int, steps: int, seed: int, input_shape: tuple[int, ...], augment,
                  watch=None) -> "Pipelines":
        """This run's pipelines (see ``Pipelines`` for the arguments)."""


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


def index_stream(tf, n: int, take: int, seed: int, input_context, epochs: int, start_epoch: int, skip: int):
    """This pipeline's training positions (``0 .. n-1``) for epochs ``start_epoch .. epochs``, the
    first ``skip`` left out: the replicas of this pipeline take its positions in turn, so skipping
    the steps already done costs nothing (nothing is read or decoded for them)."""
    pid, count = input_context.input_pipeline_id, input_context.num_input_pipelines
    return tf.data.Dataset.range(start_epoch, epochs).flat_map(
        lambda e: tf.data.Dataset.from_tensor_slices(epoch_positions(n, take, seed, e, pid, count))).skip(skip)


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


def dataset_options(tf, deterministic: bool = True):
    """Options of every pipeline: sharding is the source's job (the index stream, the shard
    dealing, the user's function), so tf.distribute must not shard again."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = deterministic
    return options


class Pipelines:
    """The per-pipeline datasets of one run; each kind of source fills in where examples come from.

    Subclasses give ``_train_batches`` (this pipeline's raw training batches of ``per_replica``
    examples from the start step) and ``_evaluation_batches`` (this pipeline's raw batches of a
    split); this class rescales, resizes and augments them, notes when each training batch is
    ready (``watch``) and prefetches.

    Args:
        source: the source's examples.
        global_batch: per-replica batch × replicas in sync.
        steps: global steps per epoch.
        seed: shuffle seed.
        input_shape: the model's input shape; images are resized to it when the data differs.
        augment: the ``AugmentSpec`` (training only).
        watch: an ``inputwatch.InputWatch`` to note when each training batch is ready (optional).
        rescale: the factor images are multiplied by (1: as given).
    """

    def __init__(self, source, global_batch: int, steps: int, seed: int, input_shape: tuple[int, ...], augment,
                 watch=None, rescale: float = 1.0) -> None:
        self.source = source
        self.global_batch = global_batch
        self.steps = steps
        self.seed = seed
        self.input_shape = tuple(input_shape)
        self.augment = augment
        self.watch = watch
        self.rescale = rescale

    # -- what a kind of source gives ------------------------------------------------------------

    def _train_batches(self, tf, input_context, epochs: int, start_epoch: int, skip: int, per_replica: int):
        """(images, labels) batches of ``per_replica`` for this pipeline, ``skip`` examples left out."""
        raise NotImplementedError

    def _evaluation_batches(self, tf, input_context, split: str, per_replica: int, local_replicas: int):
        """(images, labels) batches of this pipeline's share of ``split`` (``replica_batches``)."""
        raise NotImplementedError

    # -- the run's datasets ---------------------------------------------------------------------

    def train(self, input_context, epochs: int, start_step: int = 0):
        """Training batches for global steps ``start_step .. epochs × steps`` of this pipeline."""
        import tensorflow as tf

        per_replica = input_context.get_per_replica_batch_size(self.global_batch)
        per_pipeline = self.global_batch // input_context.num_input_pipelines
        start_epoch, step_in_epoch = divmod(start_step, self.steps)
        augmenter = self._augmenter(tf)

        def finish(images, labels):
            images = self._prepare(tf, images)
            if augmenter is not None:
                images = augmenter(images, training=True)
            return images, labels

        ds = self._train_batches(tf, input_context, epochs, start_epoch, step_in_epoch * per_pipeline, per_replica)
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
        if self.watch is not None:
            ds = self.watch.stamp(tf, ds)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options(tf))

    def evaluation(self, input_context, split: str):
        """Validation or test batches of this pipeline: every example once, over all pipelines.

        Position-dealt like training: pipeline ``i`` of ``n`` takes examples ``i, i+n, ...``, so
        each worker reads (and decodes) only its share.
        """
        import tensorflow as tf

        if split not in EVALUATION_SPLITS:
            raise ValueError(f"split: expected one of {EVALUATION_SPLITS}, got {split!r}")
        per_replica = input_context.get_per_replica_batch_size(self.global_batch)
        local_replicas = max(1, input_context.num_replicas_in_sync // input_context.num_input_pipelines)
        ds = self._evaluation_batches(tf, input_context, split, per_replica, local_replicas)
        ds = ds.map(lambda images, labels: (self._prepare(tf, images), labels), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options(tf))

    def _prepare(self, tf, x):
        x = tf.cast(x, tf.float32)
        if self.rescale != 1.0:
            x = x * self.rescale
        if x.shape.rank == 4 and tuple(x.shape[1:3]) != self.input_shape[:2]:
            x = tf.image.resize(x, self.input_shape[:2])
        return x

    def _augmenter(self, tf):
        a = self.augment
        if a is None:
            return None
        layers = []
        if a.flip != "none":
            layers.append(tf.keras.layers.RandomFlip(a.flip, seed=self.seed))
        if a.rotation:
            layers.append(tf.keras.layers.RandomRotation(a.rotation, seed=self.seed))
        if a.zoom:
            layers.append(tf.keras.layers.RandomZoom(a.zoom, seed=self.seed))
        return tf.keras.Sequential(layers) if layers else None


class DecodedImages:
    """What the sources that decode images in the pipeline share (``imagefolder``, ``tfrecord``):
    their dataclasses give ``rescale``, ``image_shape``, ``cache``, ``cache_key`` and
    ``cached_examples``, and name their ``DecodedPipelines`` subclass as ``PIPELINES``."""

    synthetic = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.image_shape)

    def pipelines(self, global_batch: int, steps: int, seed: int, input_shape, augment, watch=None) -> "Pipelines":
        return self.PIPELINES(self, global_batch, steps, seed, input_shape, augment, watch=watch, rescale=self.rescale)


class DecodedPipelines(Pipelines):
    """Pipelines that read and decode images inside ``tf.data`` (image folders, TFRecord), through
    the source's decoded cache (``data.cache``): one per process, shared by its pipelines and splits.

    The source gives ``cache``, ``cache_key``, ``image_shape`` and ``cached_examples`` (how many
    examples the cache holds a slot for, indexed by the example's number).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        s = self.source
        self.decoded_cache = (imagefiles.DecodedCache(s.cache, s.cached_examples, s.image_shape, s.cache_key)
                              if s.cache != "none" else None)
