"""What a data source is split into: ``Splits`` and the seeded split of example positions.

Its own module so that ``data`` and the readers it dispatches to (``tfrecord``) share them
without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Splits:
    """Train, validation and test examples of one source.

    In-memory sources: ``x_*`` are the images. Image folders: ``x_*`` are positions in ``files``
    (decoded by the pipeline) and ``image_shape`` is the decoded shape. TFRecord: ``records``
    describes the shards and ``x_*``/``y_*`` are empty.
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
    train_size_global: int = 0  # training examples one epoch can draw from, over all workers
    files: Optional[np.ndarray] = None  # image folder: every readable file, sorted by class then name
    image_shape: Optional[tuple[int, ...]] = None  # streamed sources: (height, width, channels) decoded
    cache: str = "none"  # data.cache: none, memory or a directory
    cache_key: Optional[str] = None
    records: Optional[object] = None  # tfrecord.Records

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.image_shape) if self.image_shape else tuple(self.x_train.shape[1:])

    @property
    def val_size(self) -> int:
        """Validation examples over all workers."""
        return self.records.counts["val"] if self.records else len(self.y_val)

    @property
    def test_size(self) -> int:
        """Test examples over all workers."""
        return self.records.counts["test"] if self.records else len(self.y_test)


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Seeded permutation of ``range(n)`` cut into the given leading fractions plus the rest."""
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for frac in fractions:
        size = int(round(n * frac))
        parts.append(np.sort(order[start:start + size]))
        start += size
    parts.append(np.sort(order[start:]))
    return parts
