"""The label rules every source follows, in one pure function (``resolve``), and its one log line.

Labels are class numbers ``0 .. num_classes-1``. The class count comes from, in this order:

1. ``model.num_classes``, when the job sets it;
2. what the source declares: the dataset's own count (digits, the Keras datasets,
   ``data.synthetic.classes``), the class folders of an image folder, a packed directory's metadata;
3. the training labels, their largest + 1 (the user's ``fn()`` arrays); a ``fn(input_context,
   split)`` source, whose training split distrain does not read, counts its validation and test
   labels instead.

Then, on every split the source can see:

- a label outside ``[0, count)`` is an error (exit 2): one line naming the split, the values and how
  many labels. With the count taken from the training labels, a validation or test label above
  them is a class no training example has: an error too, as training would fail on it.
- fewer than two classes is an error.
- a class with no training example (a gap, a class folder whose images all fell into the test split,
  labels numbered from 1) is one warning line naming it.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Mapping, Optional, Sequence

import numpy as np

from distrain.errors import UsageError

log = logging.getLogger("distrain")

# The order splits are checked and named in; a source passes the ones it can see.
SPLITS = ("train", "validation", "test")
_SHOWN = 5  # values (or classes) named in one line


def histogram(labels: np.ndarray) -> dict[int, int]:
    """``{label: examples}`` of an array of integer labels."""
    values, counts = np.unique(np.asarray(labels).reshape(-1), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


@dataclasses.dataclass(frozen=True)
class Classes:
    """The class count a run uses and where it came from.

    Attributes:
        count: classes the model predicts.
        origin: where the count came from (``model.num_classes``, ``the class folders``, ...).
        untrained: classes with no training example (empty when the training labels are unknown).
        names: class names, when the source has them (image folders, packed directories).
    """

    count: int
    origin: str
    untrained: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    def name(self, label: int) -> str:
        """``3`` or ``3 (dog)`` when the class has a name."""
        return f"{label} ({self.names[label]})" if 0 <= label < len(self.names) else str(label)

    def describe(self) -> str:
        """``4 classes, from the class folders: ant, bee, cat, dog``."""
        names = f": {', '.join(self.names[:10])}{' ...' if len(self.names) > 10 else ''}" if self.names else ""
        return f"{self.count} classes, from {self.origin}{names}"

    def warning(self) -> Optional[str]:
        """One line naming the classes without a training example, or None."""
        if not self.untrained:
            return None
        shown = ", ".join(self.name(c) for c in self.untrained[:_SHOWN]) + (" ..." if len(self.untrained) > _SHOWN else "")
        which = f"class {shown} has" if len(self.untrained) == 1 else f"{len(self.untrained)} classes ({shown}) have"
        hint = "the model cannot learn to predict it" if len(self.untrained) == 1 else "the model cannot learn them"
        if self.untrained == (0,) and self.origin.startswith("the training labels"):
            hint = "labels numbered from 1? number them from 0 (y - 1)"
        return f"{which} no training example ({self.count} classes, from {self.origin}); {hint}"


def resolve(labels: Mapping[str, Mapping[int, int]], *, where: str, num_classes: Optional[int] = None,
            declared: Optional[int] = None, declared_from: str = "", names: Sequence[str] = ()) -> Classes:
    """The class count of a source, its labels checked against it (the rules in the module docstring).

    Args:
        labels: ``{split: {label: examples}}`` for the splits the source can see (``SPLITS``
            names); ``train`` absent: the training labels are unknown. Empty: none known (a pack
            without label counts), then only ``declared`` is checked against ``num_classes``.
        where: the job key and value the data comes from, prefixed to messages
            (``data.path: /data/flowers``).
        num_classes: ``model.num_classes``, if set.
        declared: the count the source declares (a dataset's classes, class folders), if any.
        declared_from: where ``declared`` comes from, for messages (``the class folders``).
        names: class names, by label.

    Returns:
        The count, its origin and the classes without a training example.

    Raises:
        UsageError: one line naming the split, the out-of-range values and how many labels; or
            fewer than two classes.

    Example:
        >>> resolve({"train": {0: 5, 1: 5}, "test": {0: 2, 1: 2}}, where="data.source: x").describe()
        '2 classes, from the training labels (largest 1)'
    """
    if num_classes:
        count, origin = num_classes, "model.num_classes"
    elif declared:
        count, origin = declared, declared_from
    else:
        basis = ["train"] if "train" in labels else [s for s in SPLITS if s in labels]
        top = max((max(labels[s]) for s in basis if labels[s]), default=-1)
        which = "training" if basis == ["train"] else " and ".join(basis)
        count, origin = top + 1, f"the {which} labels (largest {top})"
    for split in (s for s in SPLITS if s in labels):
        bad = {v: n for v, n in sorted(labels[split].items()) if not 0 <= v < count}
        if bad:
            raise UsageError(_out_of_range(where, split, bad, count, origin, labels, names))
    if not labels and num_classes and declared and declared > num_classes:
        raise UsageError(f"{where}: the data has {declared} classes (from {declared_from}), model.num_classes is "
                         f"{num_classes}; set model.num_classes to {declared} or remove it")
    if count < 2:
        raise UsageError(f"{where}: the labels hold {max(count, 0)} class{'es' * (count != 1)}, from {origin}; expected at "
                         "least two classes, numbered from 0")
    train = labels.get("train")
    untrained = tuple(c for c in range(count) if not train.get(c)) if train is not None else ()
    return Classes(count, origin, untrained, tuple(names))


def _out_of_range(where: str, split: str, bad: Mapping[int, int], count: int, origin: str,
                  labels: Mapping[str, Mapping[int, int]], names: Sequence[str]) -> str:
    """The one line for labels outside ``[0, count)``: the split, the values, how many, what to do."""
    def shown(v: int) -> str:
        return f"{v} = {names[v]}" if 0 <= v < len(names) else str(v)

    values = ", ".join(f"{shown(v)} ({n} label{'s' * (n > 1)})" for v, n in list(bad.items())[:_SHOWN])
    values += " ..." if len(bad) > _SHOWN else ""
    total = sum(bad.values())
    everything = [v for h in labels.values() for v in h]
    low, high = min(everything), max(everything)
    if low < 0:
        hint = "labels are class numbers 0 .. classes-1"
    elif origin.startswith("the training labels"):
        hint = (f"a class no training example has; set model.num_classes: {high + 1} if it is meant to exist, or "
                "move its examples into the training data")
    elif origin == "model.num_classes" and low >= 1 and high == count:
        hint = "labels numbered from 1? number them from 0 (y - 1)"
    elif origin == "model.num_classes":
        hint = f"set model.num_classes to at least {high + 1}, or remove it to take the data's count"
    else:
        hint = "expected labels 0 .. classes-1"
    return (f"{where}: {total} {split} label{'s' * (total > 1)} outside 0 .. {count - 1} ({count} classes, from "
            f"{origin}): {values}; {hint}")


def report(classes: Classes, where: str) -> None:
    """Logs the class count and its origin once, and the warning line if a class has no training example."""
    log.info("%s: %s", where, classes.describe())
    warning = classes.warning()
    if warning:
        log.warning("%s: %s", where, warning)
