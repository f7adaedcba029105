"""distrain: train the Keras course models data-parallel on clusters.

Importing distrain selects tf-keras (Keras 2) for ``tf.keras`` by setting
``TF_USE_LEGACY_KERAS=1``. It must happen before TensorFlow is first imported:
Keras 3's ``fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585)
and Horovod's Keras glue needs Keras 2.

It also makes every later ``import tensorflow`` of the process quiet: TensorFlow's start-up
notices (the ``E0000 ... failed call to cuInit`` line and others) are filtered from stderr, by
whoever imports it (``distrain.tf_startup``; ``distrain --verbose`` or ``DISTRAIN_TF_LOG=1`` show
them).

``distrain.train(job, model=..., data=...)`` and ``distrain.sweep(job, run_dir=..., grid=...)``
are the Python API (``distrain.api``); it is imported on first use, so ``import distrain`` stays
cheap.
"""
import os as _os

_os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ INFO/WARNING lines drown a user's terminal on every worker; errors still show.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from distrain import tf_startup as _tf_startup  # noqa: E402  (after the variables TensorFlow reads)

_tf_startup.install()

__version__ = "0.2.0"
__all__ = ["train", "sweep"]


def __getattr__(name):
    if name in ("train", "sweep"):
        from distrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'distrain' has no attribute {name!r}")
