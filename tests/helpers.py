"""Helpers several test modules share that are neither fixtures nor process control (those are in
conftest.py): reading TensorBoard event files, and an image folder whose pixels name their file.

Not a test module; import from it as ``from helpers import ...``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# 100 images: 20 test, 16 validation, 64 training (so a global batch of 16 covers an epoch exactly).
COUNT, CLASSES = 100, ("ant", "bee", "cat", "dog")


def solid_folder(root: Path, count: int = COUNT, classes=CLASSES, size=(8, 8)) -> Path:
    """An image folder under ``root``: image ``k`` is a solid PNG of value ``k`` in class folder
    ``classes[k % len(classes)]``, so a decoded pixel tells which file a batch holds."""
    from PIL import Image

    for k in range(count):
        folder = root / classes[k % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*size, 3), k, np.uint8)).save(folder / f"{k:04d}.png")
    return root


def accumulate(directory: Path):
    """TensorBoard's own reader over one event directory, keeping every point."""
    import distrain  # noqa: F401  (tf-keras before TensorFlow, which the reader imports)
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> dict[int, float]:
    """Step → value of a scalar ``tag`` read by ``accumulate``."""
    from tensorboard.util import tensor_util

    assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars", tag
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def text(acc, tag: str) -> str:
    """The last value of a text ``tag`` read by ``accumulate``."""
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(acc.Tensors(tag)[-1].tensor_proto).item().decode()
