"""The one dispatch on the kind of source: ``data.source`` → a ``pipelines.Source``.

=========================================  =============================================
``data.source``                            source
=========================================  =============================================
digits, mnist, fashion_mnist, cifar10,     ``arrays.ArraySource`` (in memory)
cifar100, synthetic
image_folder                               ``imagefolder.ImageFolderSource`` (streamed)
tfrecord                                   ``tfrecord.TFRecordSource`` (streamed shards)
your ``fn()`` (package.module:function)    ``arrays.ArraySource`` (``user.load_arrays``)
your ``fn(input_context, split)``          ``user.DatasetSource``
=========================================  =============================================
"""
from __future__ import annotations

from typing import Optional

from distrain.data import arrays, imagefolder, tfrecord, user
from distrain.data.pipelines import Source
from distrain.user_code import is_reference


def load(data, seed: int, *, channels: int = 3, shard: tuple[int, int] = (0, 1),
         num_classes: Optional[int] = None) -> Source:
    """Loads the job's source (streamed sources: lists them only) and checks its labels.

    Every source follows the same label rules (``labels.resolve``, docs/data.md): labels are
    ``0 .. num_classes-1``, the count and where it came from is logged once.

    Args:
        data: the ``DataSpec``.
        seed: split seed; the same on every worker.
        channels: image channels for image folders and TFRecord (the model's input channels).
        shard: (this worker's pipeline index, number of pipelines): TFRecord counts the examples
            an epoch can use from how its shards divide among the pipelines.
        num_classes: ``model.num_classes``, if the job sets it (else the data's own count).

    Raises:
        UsageError: the data is missing on this node, or broken, or its labels break the rules
            (one line naming the path or the source).
    """
    if is_reference(data.source):
        return user.load(data, seed, num_classes)
    if data.source == "image_folder":
        return imagefolder.load(data, seed, channels, num_classes)
    if data.source == "tfrecord":
        return tfrecord.load(data, channels, shard, num_classes)
    return arrays.load(data, seed, num_classes)
