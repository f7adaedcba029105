"""``data.source: image_folder``: a directory of ``class_name/image`` files, streamed.

The folder is listed and each file's header checked once (``imagefiles``); nothing is decoded up
front. Training deals file positions by the index stream (``pipelines.index_stream``), exactly as
arrays deal theirs, so N workers train the same batches as one; files are read and decoded inside
``tf.data``, in parallel and prefetched, optionally through the decoded cache (``data.cache``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

from distrain.data import imagefiles
from distrain.data import labels as label_rules
from distrain.data.pipelines import DecodedImages, DecodedPipelines, index_stream, replica_batches
from distrain.data.splits import split_indices

log = logging.getLogger("distrain")


class ImageFolderPipelines(DecodedPipelines):
    """Positions of the folder, read and decoded in the pipeline (through the decoded cache)."""

    source: ImageFolderSource

    def _loader(self, tf):
        """Position in the folder → (decoded uint8 image, label): reads one file."""
        s = self.source
        files, labels, cache = tf.constant(s.files), tf.constant(s.labels), self.decoded_cache
        size, channels = list(s.image_shape[:2]), s.image_shape[2]

        def load(i):
            def decode():
                return imagefiles.decode(tf, tf.io.read_file(files[i]), size, channels)
            image = cache.lookup(tf, i, decode) if cache else decode()
            return image, labels[i]
        return load

    def _train_batches(self, tf, input_context, epochs, start_epoch, skip, per_replica):
        s = self.source
        stream = index_stream(tf, s.train_size, self.steps * self.global_batch, self.seed, input_context, epochs,
                              start_epoch, skip)
        positions, load = tf.constant(s.train), self._loader(tf)
        return (stream.map(lambda i: load(tf.gather(positions, i)), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(per_replica, drop_remainder=True))

    def _evaluation_batches(self, tf, input_context, split, per_replica, local_replicas):
        positions = self.source.validation if split == "validation" else self.source.test
        mine = np.asarray(positions)[input_context.input_pipeline_id::input_context.num_input_pipelines]
        return replica_batches(tf, tf.data.Dataset.from_tensor_slices(mine).map(
            self._loader(tf), num_parallel_calls=tf.data.AUTOTUNE), per_replica, local_replicas)


@dataclasses.dataclass(frozen=True)
class ImageFolderSource(DecodedImages):
    """The listed folder: every readable file, and which positions of it each split holds.

    Attributes:
        files: every readable file, sorted by class then name.
        labels: the class of each file.
        train, validation, test: positions in ``files`` of each split.
        num_classes: class folders.
        rescale: what decoded pixels are multiplied by.
        image_shape: (height, width, channels) images are decoded to.
        cache: ``data.cache``: none, memory or a directory.
        cache_key: names the decoded cache of exactly these files at this shape.
    """

    files: np.ndarray
    labels: np.ndarray
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    num_classes: int
    rescale: float
    image_shape: tuple[int, ...]
    cache: str = "none"
    cache_key: Optional[str] = None
    PIPELINES = ImageFolderPipelines

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def cached_examples(self) -> int:
        return len(self.files)

    @property
    def val_size(self) -> int:
        return len(self.validation)

    @property
    def test_size(self) -> int:
        return len(self.test)


def load(data, seed: int, channels: int, num_classes: Optional[int] = None) -> ImageFolderSource:
    """Lists the folder and checks every file's header; nothing is decoded here.

    The class count is ``num_classes`` (``model.num_classes``), else the class folders; the labels
    of every split are checked against it (``labels.resolve``).

    Raises:
        UsageError: the folder is missing, has fewer than two class folders or no readable image, or
            a class folder beyond ``num_classes`` (names it).
    """
    files, labels, classes = imagefiles.list_image_folder(data.path)
    infos = imagefiles.scan(files)
    files, labels, infos = imagefiles.drop_unreadable(files, labels, infos, data.path)
    imagefiles.warn_mixed_channels(infos, channels, data.path)
    test, val, train = split_indices(len(files), (data.test_split, data.validation_split * (1 - data.test_split)), seed)
    if data.limit:
        train, val, test = train[:data.limit], val[:data.limit], test[:data.limit]
    where = f"data.path: {data.path}"
    resolved = label_rules.resolve({"train": label_rules.histogram(labels[train]),
                                    "validation": label_rules.histogram(labels[val]),
                                    "test": label_rules.histogram(labels[test])},
                                   where=where, num_classes=num_classes, declared=len(classes),
                                   declared_from="the class folders", names=classes)
    image_shape = (*data.image_size, channels)
    cache_key = imagefiles.cache_key(files, infos, data.image_size, channels) if data.cache != "none" else None
    imagefiles.check_cache_room(data.cache, len(files), image_shape)
    log.info("data.path %s: %d images in %d classes (train %d, validation %d, test %d), streamed",
             data.path, len(files), len(classes), len(train), len(val), len(test))
    label_rules.report(resolved, where)
    return ImageFolderSource(np.asarray(files), np.asarray(labels, np.int32), train, val, test, resolved.count,
                             data.rescale or 1 / 255, image_shape, data.cache, cache_key)
