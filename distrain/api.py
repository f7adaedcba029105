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

``distrain.sweep(job, run_dir=..., grid={...})`` trains a sweep's trials one after another, as
``distrain sweep`` does (docs/sweeps.md).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from distrain import startup
from distrain.errors import UsageError
from distrain.run import train as run_train
from distrain.sweeps import local as sweep_local
from distrain.sweeps.compare import ranked
from distrain.sweeps.plan import plan as plan_sweep
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

    model, data = _arguments("distrain.train", job, overrides, model, data)
    begun = startup.start(job, overrides, model=model, data=data, run_dir=run_dir)

    return run_train(begun.spec, begun.run_dir, world=begun.world)


def _arguments(function: str, job, overrides, model, data) -> tuple:
    """The API's own arguments checked, ``model`` and ``data`` made references; what they hold is
    checked by the start-up, as on the command line."""
    try:
        if not isinstance(job, (str, os.PathLike, Mapping)):
            raise UsageError(f"job: expected a job file's path or a dict, got {type(job).__name__}")
        if isinstance(overrides, str):
            raise UsageError("overrides: expected a list of key.path=value strings, got one string")
        return tuple(None if fn is None else reference_of(fn, what) for what, fn in (("model", model), ("data", data)))
    except UsageError as err:
        raise UsageError(f"{function}: {err}") from None


def sweep(job: Union[str, os.PathLike, Mapping[str, Any]], *, run_dir: Union[str, os.PathLike],
          model: Union[str, Callable, None] = None, data: Union[str, Callable, None] = None,
          overrides: Sequence[str] = (), grid: Optional[Mapping[str, Sequence[Any]]] = None,
          trials: Optional[int] = None) -> dict:
    """Trains a job's sweep in this process, one trial after another, as ``distrain sweep`` does.

    Args:
        job, model, data, overrides: as ``train``; the overrides apply to every trial.
        run_dir: the sweep dir: ``sweep.yaml`` and ``trial-NNN/`` run dirs. Calling again with
            the same sweep skips finished trials and resumes the others.
        grid: ``{job key: [values]}``, added to the job's ``sweep.grid`` (a key it has is replaced).
        trials: random trials, replacing ``sweep.random.trials``.

    Returns:
        ``{"sweep_dir", "metric", "mode", "trials": [...], "best": ...}``: each trial with its
        ``index``, ``overrides``, ``state``, ``result`` (the metric at its last epoch) and
        ``run_dir``; ``best`` is the best finished trial (None before any finished).

    Raises:
        UsageError: bad input (the key, the value, the trial), before any trial starts.
        TrainingStopped: a trial was preempted or could not write; call again to go on.

    Example:
        >>> out = distrain.sweep("jobs/quickstart.yaml", run_dir="runs/lr-sweep",  # doctest: +SKIP
        ...                      grid={"train.learning_rate": [0.001, 0.003]})
        >>> out["best"]["overrides"]  # doctest: +SKIP
        {'train.learning_rate': 0.003}
    """
    model, data = _arguments("distrain.sweep", job, overrides, model, data)
    if grid is not None and not isinstance(grid, Mapping):
        raise UsageError(f"distrain.sweep: grid: expected a dict of job keys to lists, got {type(grid).__name__}")
    planned = plan_sweep(job, overrides, grid=grid, trials=trials, model=model, data=data)
    done = sweep_local.run(planned, run_dir)
    rows = [{"index": t.index, "name": t.name, "overrides": dict(t.overrides), "state": t.state, "result": t.result,
             "error": t.error, "run_dir": str(done.trial_dir(t.index))} for t in done.trials]
    best = ranked(done.trials, done.mode)
    best = rows[best[0].index] if best and best[0].result is not None else None
    return {"sweep_dir": str(done.root), "metric": done.metric, "mode": done.mode, "trials": rows, "best": best}
