"""The user's own data: ``data.source`` as an import reference, in one of two contracts.

The contract is told by the function's signature:

- ``fn()`` → ``(x_train, y_train), (x_test, y_test)``, NumPy arrays like ``tf.keras.datasets.*.load_data()``
  (images ``N×H×W`` or ``N×H×W×C``, integer labels ``0 .. classes-1``). The arrays go through
  distrain's in-memory path (``data/arrays.py``): the validation split is cut from the training
  arrays with the job's seed, every worker takes its positions of the seeded index stream, and
  resume is exact. Everything distrain guarantees for ``mnist`` holds for it. ``data.rescale``
  defaults to 1/255 for ``uint8`` images and 1 (as given) for float images.
- ``fn(input_context, split)`` → a ``tf.data.Dataset`` of unbatched ``(image, label)`` examples,
  ``split`` being ``"train"``, ``"validation"`` or ``"test"`` (``None`` for validation: none).
  distrain batches, repeats and distributes it (``DatasetPipelines``) but cannot see inside it:
  the function must shard by ``input_context`` itself, and N workers equal one worker and resume
  is exact only as far as the function is deterministic (docs/own-model-and-data.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from distrain.data import labels
from distrain.data.arrays import ArraySource, train_test_splits
from distrain.data.pipelines import Pipelines, replica_batches
from distrain.errors import UsageError
from distrain.user_code import ARRAYS, data_function, defined_at

KEY = "data.source"
SPLITS = ("train", "validation", "test")


# ----------------------------------------------------------------------------- arrays

def _shape(a: Any) -> str:
    return "x".join(map(str, a.shape)) if isinstance(a, np.ndarray) else type(a).__name__


def check_arrays(text: str, where: str, result: Any, num_classes: Optional[int] = None):
    """The arrays of a ``load_data``-style function, checked and normalised.

    Returns:
        ``(x_train, y_train, x_test, y_test, classes)``: images with a channel axis, ``int32``
        labels, and the ``labels.Classes`` (``num_classes`` if given, else the largest training
        label + 1).

    Raises:
        UsageError: one line naming the reference, its file and what was expected.
    """
    expected = "(x_train, y_train), (x_test, y_test) of NumPy arrays"

    def bad(what: str) -> UsageError:
        return UsageError(f"{KEY}: {text}: {where} returned {what}; expected {expected}")

    try:
        (x_train, y_train), (x_test, y_test) = result
    except (TypeError, ValueError):
        return_type = type(result).__name__
        raise bad(f"a {return_type}" + (f" of {len(result)}" if hasattr(result, "__len__") else "")) from None
    out = []
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise bad(f"x_{name} {type(x).__name__}, y_{name} {type(y).__name__}")
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 2, 3, 4)):
            raise bad(f"x_{name} of shape {_shape(x)}: images must be N x H x W or N x H x W x C (C 1 to 4)")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.reshape(-1)  # CIFAR's labels come as N x 1
        if y.ndim != 1:
            raise bad(f"y_{name} of shape {_shape(y)}: labels must be one integer class per image (N or N x 1)")
        if len(x) != len(y):
            raise bad(f"{len(x)} x_{name} images but {len(y)} y_{name} labels")
        if not len(x):
            raise bad(f"no {name} images")
        if not np.issubdtype(y.dtype, np.integer):
            if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
                raise bad(f"y_{name} of dtype {y.dtype}: labels must be integer classes 0 .. classes-1 "
                          "(not one-hot, not text)")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) or (
                np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x))):
            raise bad(f"x_{name} of dtype {x.dtype}: images must be finite numbers")
        out.append((x[..., None] if x.ndim == 3 else x, y.astype(np.int64)))
    (x_train, y_train), (x_test, y_test) = out
    if x_train.shape[1:] != x_test.shape[1:]:
        raise bad(f"train images of {_shape(x_train[0])} but test images of {_shape(x_test[0])}")
    # The label rules of every source (data/labels.py), on the arrays as the function returned them.
    classes = labels.resolve({"train": labels.histogram(y_train), "test": labels.histogram(y_test)},
                             where=f"{KEY}: {text}: {where} returned labels", num_classes=num_classes)
    return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32), classes


def load_arrays(data, seed: int, fn: Callable, text: str, num_classes: Optional[int] = None) -> ArraySource:
    """A ``load_data``-style function's arrays as an ``ArraySource`` (validation cut by the seed), their
    labels checked against ``num_classes`` (``model.num_classes``) or the training labels' count."""
    result = fn()  # the user's exceptions keep their own traceback
    x_train, y_train, x_test, y_test, classes = check_arrays(
        text, f"{getattr(fn, '__name__', text)} ({defined_at(fn)})", result, num_classes)
    labels.report(classes, f"{KEY}: {text}")
    rescale = data.rescale or (1 / 255 if x_train.dtype == np.uint8 else 1.0)
    return train_test_splits(x_train, y_train, x_test, y_test, data, seed, classes.count, rescale).capped(data.limit)


# ----------------------------------------------------------------------------- tf.data

@dataclass(frozen=True)
class DatasetSource:
    """A ``fn(input_context, split)`` source, as found from the unsharded datasets once at start."""

    fn: Callable
    text: str
    num_classes: int
    input_shape: tuple[int, ...]
    train_size: int
    val_size: int
    test_size: int
    synthetic = False

    def pipelines(self, global_batch: int, steps: int, seed: int, input_shape, augment,
                  watch=None) -> "DatasetPipelines":
        # No watch: the user's pipeline is opaque, its input wait is not measured.
        return DatasetPipelines(self, global_batch, steps, seed, input_shape, None)


def _context(tf, pipelines: int = 1, pipeline: int = 0, replicas: int = 1):
    return tf.distribute.InputContext(pipelines, pipeline, replicas)


def _dataset(tf, fn, text: str, input_context, split: str):
    """``fn(input_context, split)``, checked: a Dataset of (image, label) examples, or None for validation."""
    where = f"{getattr(fn, '__name__', text)} ({defined_at(fn)})"
    ds = fn(input_context, split)
    if ds is None and split == "validation":
        return None
    if not isinstance(ds, tf.data.Dataset):
        raise UsageError(f"{KEY}: {text}: {where} returned {type(ds).__name__} for split {split!r}; expected a "
                         "tf.data.Dataset of (image, label) examples" + (" (None: no validation)" if split == "validation" else ""))
    spec = ds.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise UsageError(f"{KEY}: {text}: {where} split {split!r} gives elements {spec}; expected (image, label) pairs")
    image, label = spec
    if image.shape.rank not in (2, 3) or label.shape.rank != 0 or not label.dtype.is_integer:
        raise UsageError(f"{KEY}: {text}: {where} split {split!r} gives images {image.shape} and labels "
                         f"{label.shape} {label.dtype.name}; expected unbatched examples: an H x W (x C) image and "
                         "one integer label (do not batch: distrain batches)")
    if not image.shape.is_fully_defined():
        raise UsageError(f"{KEY}: {text}: {where} split {split!r} gives images of shape {image.shape}; expected a "
                         "fixed H x W (x C) (resize in your pipeline)")
    return ds


def _count(tf, ds) -> int:
    """Examples of a finite split: one pass over it."""
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1))


def _label_counts(ds) -> dict[int, int]:
    """``{label: examples}`` of a finite split: one pass over it."""
    counts: dict[int, int] = {}
    for batch in ds.map(lambda image, label: label).batch(4096).as_numpy_iterator():
        for label, n in labels.histogram(batch).items():
            counts[label] = counts.get(label, 0) + n
    return counts


def _size(tf, ds) -> int:
    n = int(ds.cardinality())
    return n if n >= 0 else _count(tf, ds)


def load_datasets(data, fn: Callable, text: str, num_classes: Optional[int] = None) -> DatasetSource:
    """Inspects a ``fn(input_context, split)`` source: shapes, classes and split sizes.

    Validation and test are read once (their sizes and labels); the training split only when its
    cardinality is unknown (its labels are not read). The class count is ``num_classes``
    (``model.num_classes``), else the largest validation or test label + 1; the labels of both
    splits are checked against it (``labels.resolve``).
    """
    import tensorflow as tf

    for key, value, default in (("data.augment", data.augment, type(data.augment)()),
                                ("data.rescale", data.rescale, None), ("data.limit", data.limit, None)):
        if value != default:
            raise UsageError(f"{key}: not applied to a tf.data source ({KEY} {text}); do it in your pipeline")
    one = _context(tf)
    train = _dataset(tf, fn, text, one, "train")
    shape = tuple(train.element_spec[0].shape.as_list())
    shape = (*shape, 1) if len(shape) == 2 else shape
    seen = {}
    for split in ("validation", "test"):
        ds = _dataset(tf, fn, text, one, split)
        if ds is None:
            continue
        if tuple(ds.element_spec[0].shape.as_list()[:2]) != shape[:2]:
            raise UsageError(f"{KEY}: {text}: split {split!r} has images of {ds.element_spec[0].shape}, "
                             f"the training split of {list(shape)}")
        if int(ds.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
            raise UsageError(f"{KEY}: {text}: split {split!r} is infinite; expected every example once (no repeat())")
        seen[split] = _label_counts(ds)
    sizes = {split: sum(seen.get(split, {}).values()) for split in ("validation", "test")}
    if not sizes["test"]:
        raise UsageError(f"{KEY}: {text}: split 'test' is empty; expected every test example once")
    if int(train.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise UsageError(f"{KEY}: {text}: split 'train' is infinite; expected one pass (distrain repeats it)")
    classes = labels.resolve(seen, where=f"{KEY}: {text}", num_classes=num_classes)
    labels.report(classes, f"{KEY}: {text}")
    return DatasetSource(fn, text, classes.count, shape, _size(tf, train), sizes["validation"], sizes["test"])


class DatasetPipelines(Pipelines):
    """Per-pipeline datasets of a ``fn(input_context, split)`` source.

    Training: this pipeline's examples, repeated, batched to the per-replica batch (whole batches
    only), the steps already done skipped. Evaluation: this pipeline's examples once, checked to be
    its share of the split by position, so metrics over all workers cover every example once.
    """

    source: DatasetSource

    @staticmethod
    def _images(tf, image, label):
        image = tf.cast(image, tf.float32)
        return (image[..., None] if image.shape.rank == 2 else image), label

    def _train_batches(self, tf, input_context, epochs, start_epoch, skip, per_replica):
        s = self.source
        done = start_epoch * self.steps * (self.global_batch // input_context.num_input_pipelines) + skip
        ds = _dataset(tf, s.fn, s.text, input_context, "train").repeat()
        ds = ds.map(lambda x, y: self._images(tf, x, y), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(per_replica, drop_remainder=True).skip(done // per_replica)

    def _evaluation_batches(self, tf, input_context, split, per_replica, local_replicas):
        s = self.source
        size = s.val_size if split == "validation" else s.test_size
        ds = _dataset(tf, s.fn, s.text, input_context, split)
        pid, count = input_context.input_pipeline_id, input_context.num_input_pipelines
        expected = len(range(pid, size, count))
        got = _size(tf, ds)
        if got != expected:
            raise UsageError(f"{KEY}: {s.text}: split {split!r} of input pipeline {pid} of {count} has {got} examples, "
                             f"expected {expected} of {size}; shard it with "
                             "ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)")
        ds = ds.map(lambda x, y: self._images(tf, x, y), num_parallel_calls=tf.data.AUTOTUNE)
        return replica_batches(tf, ds, per_replica, local_replicas)


def load(data, seed: int, num_classes: Optional[int] = None):
    """``data.source`` as a reference: an ``ArraySource`` for ``fn()``, a ``DatasetSource`` for
    ``fn(input_context, split)``; ``num_classes`` is ``model.num_classes``, if set."""
    fn, kind = data_function(data.source)
    if kind == ARRAYS:
        return load_arrays(data, seed, fn, data.source, num_classes)
    return load_datasets(data, fn, data.source, num_classes)
