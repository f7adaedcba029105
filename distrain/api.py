"""The Python API: train a job from a notebook or a script, with your own model and data.

    import distrain

    def my_model(input_shape, num_classes):          # a notebook cell, as in the course
        ...
        return tf.keras.Model(inputs, outputs)

    summary = distrain.train("jobs/quickstart.yaml", model=my_model, overrides=["train.epochs=2"])
    summary["test"]["accuracy"]

In one process it runs what one process can (``one_device``, ``mirrored`` over the local GPUs or
``distribute.cpu_devices`` logical CPUs). Started by a launcher (inside a SLURM step, under
``TF_CONFIG``, under ``horovodrun``) every process runs the same script and joins the world as
``distrain train`` would. To go to a cluster, put the functions in a file and name them in the job
(``model.name: my_model.py:my_model``): docs/own-model-and-data.md.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence, Union

from distrain import startup
from distrain.errors import UsageError
from distrain.run import train as run_train
from distrain.user_code import reference_of


def train(job: Union[str, os.PathLike, Mapping[str, Any]], *, model: Union[str, Callable, None] = None,
          data: Union[str, Callable, None] = None, overrides: Sequence[str] = (),
          run_dir: Union[str, os.PathLike, None] = None) -> dict:
    """Trains a job in this process and returns the run summary.

    Args:
        job: a job file's path, or the job as a dict (what the YAML file would hold).
        model: your model builder ``fn(input_shape, num_classes, **model.params) -> tf.keras.Model``
            or an import reference to one; replaces ``model.name``.
        data: your loader, ``fn() -> (x_train, y_train), (x_test, y_test)`` or
            ``fn(input_context, split) -> tf.data.Dataset``, or a reference; replaces ``data.source``.
        overrides: ``key.path=value`` strings, as ``--set`` on the command line.
        run_dir: where the run writes (default ``OUTPUT_DIR/NAME/<time or job id>``); a run dir
            with a backup resumes from it.

    Returns:
        The run summary (``test`` metrics, ``history``, ``steps``, ``replicas``, ...), also in
        ``RUN_DIR/summary.json``.

    Raises:
        UsageError: bad input (one line naming the key, the reference, the file), before training.
        TrainingStopped: preempted, a peer lost or a NaN loss (``exit_code`` says which).
    """

    try:  # the arguments themselves; what they hold is checked by the start-up, as on the command line
        if not isinstance(job, (str, os.PathLike, Mapping)):
            raise UsageError(f"job: expected a job file's path or a dict, got {type(job).__name__}")
        if isinstance(overrides, str):
            raise UsageError("overrides: expected a list of key.path=value strings, got one string")
        model, data = (None if fn is None else reference_of(fn, what) for what, fn in (("model", model), ("data", data)))
    except UsageError as err:
        raise UsageError(f"distrain.train: {err}") from None
    begun = startup.start(job, overrides, model=model, data=data, run_dir=run_dir)

    return run_train(begun.spec, begun.run_dir, world=begun.world)
