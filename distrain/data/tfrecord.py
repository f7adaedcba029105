"""TFRecord shards: ``distrain data pack`` writes them, ``data.source: tfrecord`` reads them.

Layout of a packed directory::

    distrain-data.json                    classes, counts (per class too), image size, split, shards (written last)
    train-00000-of-00008.tfrecord ...     records: image (encoded bytes), label, index
    val-00000-of-00001.tfrecord ...
    test-00000-of-00001.tfrecord ...

Guarantees when reading (the docs repeat them, docs/data.md):

- training: each epoch, the shards are permuted by (seed, epoch) and dealt to the input pipelines
  by position, so the pipelines' examples are disjoint. Each pipeline interleaves its shards and
  shuffles them in windows with a seed of (seed, epoch, pipeline). Every pipeline draws the same
  number of examples per epoch, the most that its smallest possible share of shards holds: with a
  shard count that is a multiple of the number of pipelines (and shards of equal size, as pack
  writes them), that is every example once per epoch; otherwise up to a shard's worth of examples
  per pipeline sit out an epoch (a warning says how many).
- resume at a global step: the epoch's stream is rebuilt from its seeds and the records before
  the step are skipped unparsed and undecoded (they are still read from disk: the cost is measured
  in docs/performance-log.md).
- validation and test: every record once over all pipelines (record ``i`` goes to pipeline
  ``i mod n``); each pipeline reads the split's files but parses and decodes only its share.
- N workers do not see the examples in the order one process does, so weights after k steps are
  not comparable to a one-process run (image folders are; pack is for when they are too slow).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from distrain.data import imagefiles
from distrain.data import labels as label_rules
from distrain.data.pipelines import DecodedImages, DecodedPipelines, replica_batches
from distrain.data.splits import split_indices
from distrain.errors import UsageError
from distrain.rundir import replacing, write_atomically
from distrain.spec import JobSpec

log = logging.getLogger("distrain")

METADATA = "distrain-data.json"
FORMAT = "distrain-tfrecord-1"
SPLITS = ("train", "val", "test")  # as packed: file names and distrain-data.json
PACKED_SPLIT = {"train": "train", "validation": "val", "test": "test"}  # a pipeline's split -> its packed name
CYCLE_LENGTH = 8  # shards a pipeline reads at once
DEFAULTS = JobSpec()  # pack splits with a job's default seed and fractions unless told otherwise
SHUFFLE_WINDOW = 1024  # records shuffled together; pack already wrote the examples in a seeded order


@dataclass(frozen=True)
class Records:
    """A packed directory as read from its metadata."""

    root: Path
    classes: list[str]
    shards: dict[str, list[tuple[str, int]]]  # split → [(file, records)]
    image_size: Optional[list[int]]
    metadata: dict

    @property
    def counts(self) -> dict[str, int]:
        return {split: sum(c for _, c in self.shards.get(split, [])) for split in SPLITS}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def files(self, split: str) -> list[str]:
        return [str(self.root / name) for name, _ in self.shards.get(split, [])]


def read_metadata(path: str) -> Records:
    """Reads ``PATH/distrain-data.json`` and checks that every shard it lists is visible here.

    Raises:
        UsageError: no metadata, a different format, or a missing shard (names the file).
    """
    root = Path(path)
    meta_file = root / METADATA
    host = socket.gethostname()
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise UsageError(f"data.path: {root} has no {METADATA} on {host} (write the shards with "
                         f"`distrain data pack`; every node must see the directory)") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"data.path: cannot read {meta_file}: {err}") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"data.path: {meta_file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    records = Records(root, list(meta["classes"]), {s: [(x["file"], int(x["count"])) for x in meta["splits"][s]["shards"]]
                                                    for s in SPLITS if s in meta["splits"]},
                      meta.get("image_size"), meta)
    for split in SPLITS:
        for f in records.files(split):
            if not os.path.isfile(f):
                raise UsageError(f"data.path: shard {f} listed in {meta_file} is missing on {host}")
    return records


def usable_per_pipeline(shard_counts: list[int], num_pipelines: int) -> int:
    """Training examples every pipeline can draw in every epoch, whatever shards it is dealt.

    A pipeline is dealt ``floor(S / n)`` or ``ceil(S / n)`` of the S shards; the worst case is the
    ``floor(S / n)`` smallest ones.
    """
    per = len(shard_counts) // num_pipelines
    return sum(sorted(shard_counts)[:per])


class TFRecordPipelines(DecodedPipelines):
    """Shards dealt to the pipelines each epoch (training), records dealt by position (evaluation)."""

    source: TFRecordSource

    def _parser(self, tf):
        """A serialized record → (decoded uint8 image, label), through the decoded cache."""
        cache = self.decoded_cache
        size, channels = list(self.source.image_shape[:2]), self.source.image_shape[2]
        features = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64),
                    "index": tf.io.FixedLenFeature([], tf.int64)}

        def parse(serialized):
            ex = tf.io.parse_single_example(serialized, features)

            def decode():
                return imagefiles.decode(tf, ex["image"], size, channels)
            image = cache.lookup(tf, ex["index"], decode) if cache else decode()
            return image, tf.cast(ex["label"], tf.int32)
        return parse

    def _train_batches(self, tf, input_context, epochs, start_epoch, skip, per_replica):
        """Each epoch: the shards permuted by (seed, epoch), dealt by position, interleaved and
        shuffled in windows; every pipeline draws ``steps × per_pipeline`` records."""
        records = self.source.records
        files = tf.constant(records.files("train"))
        num_shards = len(records.shards["train"])
        pid, n = input_context.input_pipeline_id, input_context.num_input_pipelines
        per_epoch = self.steps * (self.global_batch // n)
        seed = tf.constant(self.seed, tf.int64)

        def epoch(e):
            order = tf.random.experimental.stateless_shuffle(tf.range(num_shards, dtype=tf.int64),
                                                             seed=tf.stack([seed, e]))
            ds = tf.data.Dataset.from_tensor_slices(tf.gather(files, order[pid::n])).interleave(
                tf.data.TFRecordDataset, cycle_length=CYCLE_LENGTH, block_length=1,
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return _window_shuffle(tf, ds, tf.stack([seed + 1, e * n + pid])).take(per_epoch)

        ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(epoch).skip(skip)
        return ds.map(self._parser(tf), num_parallel_calls=tf.data.AUTOTUNE).batch(per_replica, drop_remainder=True)

    def _evaluation_batches(self, tf, input_context, split, per_replica, local_replicas):
        """Record ``i`` of the split goes to pipeline ``i mod n``: each reads the files, parses its share."""
        files = self.source.records.files(PACKED_SPLIT[split])
        ds = tf.data.TFRecordDataset(files) if files else tf.data.Dataset.from_tensor_slices(tf.zeros([0], tf.string))
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return replica_batches(tf, ds.map(self._parser(tf), num_parallel_calls=tf.data.AUTOTUNE), per_replica,
                               local_replicas)


@dataclass(frozen=True)
class TFRecordSource(DecodedImages):
    """A packed directory as this worker reads it.

    Attributes:
        records: the shards and counts (``read_metadata``).
        train_size: training examples one epoch draws from over all pipelines (every pipeline
            draws the same number: ``usable_per_pipeline``).
        num_classes: classes recorded by ``pack``.
        rescale: what decoded pixels are multiplied by.
        image_shape: (height, width, channels) images are decoded to.
        cache: ``data.cache``: none, memory or a directory.
        cache_key: names the decoded cache of this pack at this shape.
    """

    records: Records
    train_size: int
    num_classes: int
    rescale: float
    image_shape: tuple[int, ...]
    cache: str = "none"
    cache_key: Optional[str] = None
    PIPELINES = TFRecordPipelines

    @property
    def cached_examples(self) -> int:
        return self.records.total

    @property
    def val_size(self) -> int:
        return self.records.counts[PACKED_SPLIT["validation"]]

    @property
    def test_size(self) -> int:
        return self.records.counts[PACKED_SPLIT["test"]]


def label_counts(records: Records) -> dict[str, dict[int, int]]:
    """``{split: {label: examples}}`` (the pipelines' split names) from the metadata; empty for a pack
    written before ``pack`` recorded them."""
    counts = records.metadata.get("label_counts") or {}
    return {split: {label: n for label, n in enumerate(counts[packed]) if n}
            for split, packed in PACKED_SPLIT.items() if packed in counts}


def load(data, channels: int, shard: tuple[int, int], num_classes: Optional[int] = None) -> TFRecordSource:
    """The packed directory ``data.path`` for pipeline ``shard[0]`` of ``shard[1]``.

    The class count is ``num_classes`` (``model.num_classes``), else the pack's classes; the labels
    the metadata counts are checked against it (``labels.resolve``).

    Raises:
        UsageError: no metadata, a missing shard, fewer training shards than pipelines, or labels
            beyond ``num_classes``.
    """
    records = read_metadata(data.path)
    train_counts = [c for _, c in records.shards["train"]]
    _, num_pipelines = shard
    if len(train_counts) < num_pipelines:
        raise UsageError(f"data.path: {data.path} has {len(train_counts)} training shards for {num_pipelines} input "
                         f"pipelines; pack again with --shards {num_pipelines} or a multiple of it")
    where = f"data.path: {data.path}"
    classes = label_rules.resolve(label_counts(records), where=where, num_classes=num_classes,
                                  declared=len(records.classes), declared_from=f"its {METADATA}", names=records.classes)
    usable = usable_per_pipeline(train_counts, num_pipelines) * num_pipelines
    counts = records.counts
    if usable < counts["train"]:
        log.warning("data.path: %d training shards do not divide among %d input pipelines: %d of %d examples sit out "
                    "each epoch (pack with --shards a multiple of %d to use all)", len(train_counts), num_pipelines,
                    counts["train"] - usable, counts["train"], num_pipelines)
    meta = records.metadata
    log.info("data.path %s: TFRecord, %d classes (train %d in %d shards, validation %d, test %d; split fixed by "
             "`distrain data pack` with seed %s)", data.path, len(records.classes), counts["train"], len(train_counts),
             counts["val"], counts["test"], meta.get("seed"))
    label_rules.report(classes, where)
    imagefiles.check_cache_room(data.cache, records.total, (*data.image_size, channels))
    key = None
    if data.cache != "none":
        # A new pack (or a different decoded shape) is a new cache.
        text = (records.root / METADATA).read_bytes() + f"{list(data.image_size)} {channels}".encode()
        key = hashlib.sha256(text).hexdigest()[:16]
    return TFRecordSource(records, usable, classes.count, data.rescale or 1 / 255, (*data.image_size, channels),
                          data.cache, key)


def _window_shuffle(tf, ds, seed):
    """Shuffles consecutive windows of records with a stateless permutation: reproducible from
    the seed alone, which is what lets a resume rebuild the stream exactly."""
    def shuffle(window):
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(window, out_type=tf.int64)[0]), seed=seed)
        return tf.data.Dataset.from_tensor_slices(tf.gather(window, order))
    return ds.batch(SHUFFLE_WINDOW).flat_map(shuffle)


class Progress:
    """A one-line progress bar on stderr (a plain line per 10% when stderr is not a terminal)."""

    def __init__(self, total: int, what: str, stream=sys.stderr) -> None:
        self.total, self.what, self.stream = max(total, 1), what, stream
        self.tty = stream.isatty()
        self.started = self.last = time.monotonic()
        self.last_tenth = -1
        self.done = 0

    def update(self, done: int) -> None:
        """Shows ``done`` of ``total`` items."""
        self.done = done
        now = time.monotonic()
        tenth = done * 10 // self.total
        if self.tty and (now - self.last > 0.2 or done == self.total):
            width = 30
            filled = width * done // self.total
            rate = done / max(now - self.started, 1e-9)
            self.stream.write(f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                              f"({rate:.0f} images/s)")
            self.stream.flush()
            self.last = now
        elif not self.tty and tenth != self.last_tenth:
            self.stream.write(f"{self.what}: {done}/{self.total}\n")
            self.last_tenth = tenth

    def advance(self, items: int) -> None:
        """Shows ``items`` more done."""
        self.update(self.done + items)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _shard_plan(count: int, shards: int) -> list[int]:
    """Sizes of ``shards`` contiguous shards of ``count`` examples, differing by at most one."""
    shards = max(1, min(shards, count)) if count else 0
    return [count // shards + (i < count % shards) for i in range(shards)]


def pack(folder: str, out_dir: str, *, shards: int, image_size: Optional[list[int]] = None, channels: int = 3,
         seed: int = DEFAULTS.seed, validation_split: float = DEFAULTS.data.validation_split,
         test_split: float = DEFAULTS.data.test_split, quality: int = 95, progress: bool = True) -> dict:
    """Writes an image folder as TFRecord shards plus ``distrain-data.json``.

    The split is the one ``data.source: image_folder`` makes with the same seed and fractions.
    Training examples are written in a seeded random order (so every shard holds every class) and
    cut into ``shards`` files of equal size (±1); validation and test get shards in proportion.
    Every image is decoded once to check it; ones that fail are left out and named.

    Args:
        folder: a ``class_name/image`` folder.
        out_dir: where the shards go (created; must not hold a packed dataset already).
        shards: training shards; a multiple of the number of input pipelines you will train with.
        image_size: resize to [height, width] and store as JPEG; None stores the files' own bytes.
        channels: with ``image_size``: 1 or 3.
        seed, validation_split, test_split: the split, as in the job's ``seed`` and ``data`` keys
            (their defaults are a job's defaults: an unpacked folder read by a job that sets none of
            them splits the same way).
        quality: JPEG quality with ``image_size``.
        progress: print a progress bar on stderr.

    Returns:
        The metadata written.

    Raises:
        UsageError: a bad folder, an existing packed dataset in ``out_dir``, too many broken files.
    """
    import tensorflow as tf


    out = Path(out_dir)
    if (out / METADATA).exists():
        raise UsageError(f"OUT_DIR: {out} already holds a packed dataset ({METADATA}); choose another directory")
    files, labels, classes = imagefiles.list_image_folder(folder)
    infos = imagefiles.scan(files)
    files, labels, infos = imagefiles.drop_unreadable(files, labels, infos, folder)
    test, val, train = split_indices(len(files), (test_split, validation_split * (1 - test_split)), seed)
    train = np.random.default_rng(seed).permutation(train)
    out.mkdir(parents=True, exist_ok=True)

    def encode(path):
        contents = tf.io.read_file(path)
        if image_size is None:
            # Decode only to check (the control dependency keeps the decode from being pruned);
            # the stored bytes are the file's own.
            with tf.control_dependencies([tf.shape(tf.io.decode_image(contents, channels=3, expand_animations=False))]):
                return tf.identity(contents)
        return tf.io.encode_jpeg(imagefiles.decode(tf, contents, list(image_size), channels), quality=quality)

    splits_meta, failed, next_index, per_class = {}, [], 0, {}
    bar = Progress(len(files), f"packing {folder}") if progress else None
    for split, idx in (("train", train), ("val", val), ("test", test)):
        n_shards = shards if split == "train" else max(1, round(shards * len(idx) / max(len(train), 1)))
        entries, lost, next_index = _write_shards(tf, out, split, idx, files, labels, n_shards, encode, next_index,
                                                  bar)
        failed += lost
        splits_meta[split] = {"count": sum(e["count"] for e in entries), "shards": entries}
        written = np.asarray(labels)[idx][~np.isin(np.asarray(files)[idx], lost)] if len(idx) else np.zeros(0, int)
        per_class[split] = np.bincount(written, minlength=len(classes)).tolist()
    if bar:
        bar.close()
    if failed:
        log.warning("pack: left out %d images that failed to decode: %s%s", len(failed), "; ".join(failed[:5]),
                    " ..." if len(failed) > 5 else "")
    meta = {"format": FORMAT, "classes": classes, "image_size": list(image_size) if image_size else None,
            "channels": channels if image_size else None, "encoding": "jpeg" if image_size else "original",
            "source": str(Path(folder).resolve()), "seed": seed, "validation_split": validation_split,
            "test_split": test_split, "splits": splits_meta, "label_counts": per_class, "failed_to_decode": failed}
    write_atomically(out / METADATA, json.dumps(meta, indent=1))  # last: a directory with metadata is complete
    return meta


def _write_shards(tf, out: Path, split: str, idx, files, labels, n_shards: int, encode, first_index: int, bar):
    """One split's shards: examples in ``idx`` order, ``n_shards`` files of equal size (±1).

    Returns:
        (the shards' entries for the metadata, the files that failed to decode, the next index).
    """
    plan = _shard_plan(len(idx), n_shards)
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(idx)), np.asarray(files)[idx] if len(idx) else
                                             np.zeros(0, str)))
    ds = ds.map(lambda i, p: (i, encode(p)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors(log_warning=False)  # a file that fails to decode: left out, named by pack
    encoded = iter(ds.as_numpy_iterator())
    pending = next(encoded, None)
    entries, failed, start, next_index = [], [], 0, first_index
    for k, size in enumerate(plan):
        name = f"{split}-{k:05d}-of-{len(plan):05d}.tfrecord"
        written = []
        with replacing(out / name) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
            while pending is not None and pending[0] < start + size:
                i, image = pending
                example = tf.train.Example(features=tf.train.Features(feature={
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(labels[idx[i]])])),
                    "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[next_index])),
                }))
                writer.write(example.SerializeToString())
                written.append(i)
                next_index += 1
                pending = next(encoded, None)
        failed += [files[idx[j]] for j in sorted(set(range(start, start + size)) - set(written))]
        entries.append({"file": name, "count": len(written)})
        start += size
        if bar:
            bar.advance(size)
    return entries, failed, next_index
