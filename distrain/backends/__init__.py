"""The backends: how a run is distributed, behind one interface (``distribution.Distribution``).

``factory`` chooses and builds one: ``tensorflow`` (one_device, mirrored, multi_worker) or
``horovod``. ``allreduce`` sums gradients under tf.distribute, ``stepmetrics`` keeps
multi_worker's step metrics local, and ``watchdog`` is multi_worker's deadline on collectives.
"""
