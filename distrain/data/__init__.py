"""The data layer: where examples come from and how each worker reads its share of them.

``sources.load`` is the one dispatch on ``data.source``; each kind of source has its module:
``arrays`` (digits, the Keras datasets, synthetic, the user's arrays), ``imagefolder`` (streamed
files, listed and header-checked by ``imagefiles``), ``tfrecord`` (shards written by
``distrain data pack``) and ``user`` (the user's loader, either contract). Each gives a
``pipelines.Source`` that makes the per-worker ``tf.data`` pipelines; ``labels`` holds the label
rules every source follows (the class count, labels checked against it), ``splits`` cuts examples
into splits by the seed, ``inputwatch`` measures how long training waits for its input, and
``cli`` is ``distrain data``.
"""
