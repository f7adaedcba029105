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

import itertools
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from distrain.errors import UsageError

# Callables the API was given that no reference can name (lambdas, closures, partials) live as
# attributes of this module for the process's lifetime, so they have a reference like any other.
CALLABLES_MODULE = "distrain_callables"
_counter = itertools.count(1)


def reference_of(obj: Union[str, Callable], what: str) -> str:
    """The import reference naming ``obj``: itself for a string, ``module:qualname`` for a function
    defined at the top of a module (a notebook's ``__main__`` included), else a name in
    ``distrain_callables`` (valid in this process only)."""
    if isinstance(obj, str):
        return obj
    if not callable(obj):
        raise UsageError(f"distrain.train: {what}: expected a function or an import reference, got "
                         f"{type(obj).__name__}")
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    module = sys.modules.get(module_name or "")
    if module is not None and qualname and "<" not in qualname:
        target: Any = module
        for part in qualname.split("."):
            target = getattr(target, part, None)
        if target is obj:
            return f"{module_name}:{qualname}"
    holder = sys.modules.get(CALLABLES_MODULE)
    if holder is None:
        holder = sys.modules[CALLABLES_MODULE] = types.ModuleType(
            CALLABLES_MODULE, "Functions given to distrain.train that have no import reference of their own.")
    base = "".join(c if c.isalnum() else "_" for c in getattr(obj, "__name__", "") or what).strip("_") or what
    name = f"{base}_{next(_counter)}"
    setattr(holder, name, obj)
    return f"{CALLABLES_MODULE}:{name}"


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
    import distrain  # noqa: F401  (tf-keras for tf.keras, before the user's code imports TensorFlow)
    from distrain.cli import resolve_run_dir
    from distrain.spec import read_job, spec_from_dict
    from distrain.user_code import check_spec
    from distrain.world import detect

    if isinstance(job, Mapping):
        raw, source, base_dir = dict(job), "distrain.train(job=dict)", Path.cwd()
    elif isinstance(job, (str, os.PathLike)):
        path = Path(job)
        raw, source, base_dir = read_job(path), str(path), path.parent
    else:
        raise UsageError(f"distrain.train: job: expected a job file's path or a dict, got {type(job).__name__}")
    if isinstance(overrides, str):
        raise UsageError("distrain.train: overrides: expected a list of key.path=value strings, got one string")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a mapping of keys at the top level")
    for key, value in (("model", model), ("data", data)):
        if value is None:
            continue
        section = raw.get(key) if raw.get(key) is not None else {}
        if not isinstance(section, dict):
            raise UsageError(f"{source}: {key}: expected a mapping of keys, got {section!r}")
        section = dict(section)
        section["name" if key == "model" else "source"] = reference_of(value, key)
        raw[key] = section
    spec = spec_from_dict(raw, source=source, overrides=overrides, base_dir=base_dir)
    check_spec(spec, source)
    world = detect(port_override=spec.distribute.port)
    directory = resolve_run_dir(spec, run_dir=Path(run_dir) if run_dir else None, run_id=None,
                                world_size=world.world_size)
    from distrain.run import train as run_train

    return run_train(spec, directory, world=world)
