"""The data layer: where examples come from and how each worker reads its share of them.

``sources`` loads distrain's sources (digits, the Keras datasets, synthetic, image folders via
``imagefiles``, TFRecord shards via ``tfrecord``) into ``splits.Splits``; ``user`` does the same for
the user's own loader. ``pipelines`` turns them into the per-worker ``tf.data`` pipelines,
``inputwatch`` measures how long training waits for them, and ``cli`` is ``distrain data``.
"""
