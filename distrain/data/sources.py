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

from distrain.data import arrays, imagefolder, tfrecord, user
from distrain.data.pipelines import Source
from distrain.user_code import is_reference


def load(data, seed: int, *, channels: int = 3, shard: tuple[int, int] = (0, 1)) -> Source:
    """Loads the job's source (streamed sources: lists them only).

    Args:
        data: the ``DataSpec``.
        seed: split seed; the same on every worker.
        channels: image channels for image folders and TFRecord (the model's input channels).
        shard: (this worker's pipeline index, number of pipelines): TFRecord counts the examples
            an epoch can use from how its shards divide among the pipelines.

    Raises:
        UsageError: the data is missing on this node, or broken (one line naming the path).
    """

    if is_reference(data.source):

        return user.load(data, seed)
    if data.source == "image_folder":

        return imagefolder.load(data, seed, channels)
    if data.source == "tfrecord":

        return tfrecord.load(data, channels, shard)
    return arrays.load(data, seed)
