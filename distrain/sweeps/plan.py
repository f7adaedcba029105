"""A job's sweep, planned: the trials expanded and each one validated as ``--set`` validates it,
and the metric they are compared on checked, before any trial starts.

``plan(job, overrides, grid=, trials=)`` reads the job's ``sweep:`` section, adds the command
line's ``--grid key=a,b`` (a key given there replaces the section's) and ``--trials N`` (replaces
``random.trials``), expands the trials (``sweeps.trials``) and checks each trial's job with
``startup.check``, exactly as ``distrain train JOB --set ... --set <trial's overrides>`` would:
a value one trial's key refuses stops the sweep with one line naming the trial before anything
has started.

Each trial's job carries the sweep section in effect (the file's with the command line's flags),
so a trial's run logs the swept keys as TensorBoard hparams (``sweeps.compare``) as any resume of it
does.
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from distrain import startup, user_code
from distrain.data import tfrecord
from distrain.errors import UsageError
from distrain.spec import JobSpec, key_problem
from distrain.sweeps import trials as expansion
from distrain.sweeps.compare import metric_and_mode

JobLike = Union[str, os.PathLike, Mapping[str, Any]]
GridLike = Union[Sequence[str], Mapping[str, Sequence[Any]], None]


def trial_name(index: int) -> str:
    """The trial's run dir inside the sweep dir: ``trial-003``."""
    return f"trial-{index:03d}"


@dataclass(frozen=True)
class Trial:
    """One training of the sweep.

    Attributes:
        index: its place in the sweep, from 0.
        overrides: ``{job key: value}``, applied after the job's own ``--set``.
        spec: the trial's validated job.
    """

    index: int
    overrides: dict
    spec: JobSpec

    @property
    def name(self) -> str:
        return trial_name(self.index)

    @property
    def sets(self) -> list[str]:
        """The overrides as ``--set`` takes them: ``["train.learning_rate=0.003"]``."""
        return [expansion.override(key, value) for key, value in self.overrides.items()]


@dataclass(frozen=True)
class Plan:
    """A sweep ready to run.

    Attributes:
        source: the job, for messages (its file).
        overrides: the job's ``--set`` (every trial's first overrides).
        metric: the epoch metric the trials are compared on (its last epoch's value).
        mode: ``max`` or ``min``: which is better.
        keys: the swept keys, grid first.
        trials: every trial, in order.
        spec: the job with the sweep section in effect.
    """

    source: str
    overrides: tuple[str, ...]
    metric: str
    mode: str
    keys: tuple[str, ...]
    trials: tuple[Trial, ...]
    spec: JobSpec

    def describe(self) -> list[str]:
        """One line for the sweep, then one per trial: what ``distrain validate`` lists."""
        sweep = self.spec.sweep
        how = [f"grid of {len(expansion.grid_points(sweep.grid))}"] if sweep.grid else []
        if sweep.random:
            how.append(f"{sweep.random.trials} random draw(s) (seed {sweep.random.seed})")
        lines = [f"sweep: {len(self.trials)} trial(s), {' x '.join(how)}, compared on {self.metric} ({self.mode})"]
        return lines + [f"  {t.name}  {' '.join(t.sets)}" for t in self.trials]


def plan(job: JobLike, overrides: Sequence[str] = (), *, grid: GridLike = None,
         trials: Optional[int] = None, model: Optional[str] = None, data: Optional[str] = None) -> Plan:
    """The sweep of ``job``, every trial validated.

    Args:
        job: a job file or a dict (as ``startup.load``).
        overrides: ``--set`` strings, applied to every trial before its own overrides.
        grid: ``--grid`` strings (``key=a,b``) or a mapping ``{key: [values]}``: added to the
            section's grid, replacing a key it has (in the grid or among its distributions).
        trials: replaces ``random.trials``.
        model, data: import references that replace ``model.name`` / ``data.source`` (the API's).

    Raises:
        UsageError: one line naming the flag, the key or the trial, before anything starts.
    """
    overrides = tuple(overrides)
    source = "distrain.sweep(job=dict)" if isinstance(job, Mapping) else str(job)
    base = startup.check(job, overrides, model=model, data=data)
    section = _section_overrides(base, _grid_flags(grid), trials)
    spec = startup.check(job, [*overrides, *section], model=model, data=data)
    sweep = spec.sweep
    if not sweep.defined:
        raise UsageError(f"{source}: sweep: no trials: give sweep.grid or sweep.random.distributions in the job, "
                         "or --grid KEY=A,B (docs/sweeps.md)")
    distributions = expansion.check_distributions(sweep.random.distributions, sweep.grid) if sweep.random else None
    points = expansion.expand(sweep.grid, distributions, sweep.random.trials if sweep.random else 1,
                              sweep.random.seed if sweep.random else 0)
    metric, mode = metric_and_mode(spec)
    problem = metric_problem(spec, metric)
    if problem:
        default = "" if sweep.metric else " (default: checkpoint.monitor)"
        raise UsageError(f"{source}: sweep.metric{default}: {problem}")
    checked = []
    for index, point in enumerate(points):
        trial = _trial(job, [*overrides, *section], index, point, source, model=model, data=data)
        problem = metric_problem(trial.spec, metric)
        if problem:  # the trial changes what runs log (train.metrics, data.validation_split)
            raise UsageError(f"{source}: sweep trial {index} ({' '.join(trial.sets)}): sweep.metric: {problem}")
        checked.append(trial)
    return Plan(source, overrides, metric, mode, tuple(points[0]), tuple(checked), spec)


def _grid_flags(grid: GridLike) -> list[tuple[str, list]]:
    """``--grid`` flags (or the API's mapping) as ``(key, values)``, each key a job key."""
    if grid is None:
        return []
    if isinstance(grid, str):
        raise UsageError("grid: expected a list of key=a,b strings or a mapping of keys to lists, got one string")
    try:
        pairs = (list(grid.items()) if isinstance(grid, Mapping)
                 else [expansion.parse_grid_flag(text) for text in grid])
        for key, values in pairs:
            expansion.check_key(f"--grid {key}", key)
            if not isinstance(values, (list, tuple)):
                raise expansion.SweepError(f"--grid {key}", f"expected a list of values, got {values!r}")
            expansion.check_grid({key: list(values)})
    except expansion.SweepError as err:
        flag = str(err).replace("grid.", "--grid ", 1) if err.path.startswith("grid.") else str(err)
        raise UsageError(flag) from None
    for key, _ in pairs:
        problem = key_problem(key)
        if problem:
            raise UsageError(f"--grid {key}: {problem}")
    return [(key, [expansion.number(v) for v in values]) for key, values in pairs]


def _section_overrides(spec: JobSpec, flags: list[tuple[str, list]], trials: Optional[int]) -> list[str]:
    """The ``--set`` overrides that make the job's sweep section the one in effect: the section's
    grid with the ``--grid`` flags, ``random.trials`` replaced by ``--trials``. None without flags.

    Raises:
        UsageError: ``--trials`` for a sweep that draws nothing at random, or not a positive integer.
    """
    if not flags and trials is None:
        return []
    sweep = spec.sweep
    grid = {**sweep.grid, **dict(flags)}
    random = None
    if sweep.random is not None:
        kept = {k: v for k, v in sweep.random.distributions.items() if k not in grid}
        random = {"trials": sweep.random.trials, "seed": sweep.random.seed, "distributions": kept} if kept else None
    if trials is not None:
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
            raise UsageError(f"--trials: expected a positive integer, got {trials!r}")
        if random is None:
            raise UsageError("--trials: the sweep draws nothing at random: give sweep.random.distributions in the "
                             "job (docs/sweeps.md)")
        random["trials"] = trials
    return [expansion.override("sweep.grid", grid), expansion.override("sweep.random", random)]


def _trial(job, overrides: list[str], index: int, point: dict, source: str, **replace) -> Trial:
    """Trial ``index``: the job loaded with its overrides and checked as ``distrain train`` checks it.

    Raises:
        UsageError: ``SOURCE: sweep trial 3 (train.learning_rate=-1): train.learning_rate: expected ...``.
    """
    sets = [expansion.override(key, value) for key, value in point.items()]
    try:
        spec = startup.check(job, [*overrides, *sets], **replace)
    except UsageError as err:
        reason = str(err)
        for prefix in (f"{source}: ", "distrain.train(job=dict): ", "--set "):  # startup.load's sources
            reason = reason.removeprefix(prefix)
        raise UsageError(f"{source}: sweep trial {index} ({' '.join(sets)}): {reason}") from None
    return Trial(index, dict(point), spec)


def logged_metrics(spec: JobSpec) -> list[str]:
    """The names an epoch of the job logs for its loss and ``train.metrics`` (Keras's names:
    a string as given, a function by its name, a metric class by its ``name`` default)."""
    return ["loss", *(metric_name(m, f"train.metrics[{i}]") for i, m in enumerate(spec.train.metrics))]


def metric_problem(spec: JobSpec, metric: str) -> Optional[str]:
    """Why no run of ``spec`` logs ``metric`` in its history (None: every epoch logs it).

    A run logs its loss and ``train.metrics`` per epoch, and the same with ``val_`` when it has a
    validation split.
    """
    logged = logged_metrics(spec)
    base = metric.removeprefix("val_")
    if base not in logged:
        return (f"no run logs {metric!r}: an epoch logs {', '.join(logged)} and, with a validation split, "
                f"{', '.join('val_' + m for m in logged)}")
    if metric != base and not has_validation(spec):
        why = ("its TFRecord pack has no validation split" if spec.data.source == "tfrecord"
               else "data.validation_split is 0")
        return f"{metric} needs a validation split, and the job has none ({why}): compare on {base}"
    return None


def has_validation(spec: JobSpec) -> bool:
    """Whether the job's runs validate every epoch: a validation split (a TFRecord pack's own)."""
    if spec.data.source == "tfrecord":
        return tfrecord.read_metadata(spec.data.path).counts.get("val", 0) > 0
    return spec.data.validation_split > 0


def metric_name(text: str, key: str) -> str:
    """The name Keras logs a ``train.metrics`` entry under (its ``MeanMetricWrapper`` or ``Metric`` name)."""
    if not user_code.is_reference(text):
        return text
    found: Callable = user_code.resolve(text, key)
    if inspect.isclass(found):
        name = inspect.signature(found).parameters.get("name")
        if name is not None and isinstance(name.default, str):
            return name.default
        return _snake_case(found.__name__)
    return found.__name__


def _snake_case(name: str) -> str:
    """Keras's default name of a layer or metric class (``tf_keras``'s ``to_snake_case``).

    >>> _snake_case("MeanIoU"), _snake_case("TopTwo")
    ('mean_io_u', 'top_two')
    """
    intermediate = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    snake = re.sub("([a-z])([A-Z])", r"\1_\2", intermediate).lower()
    return snake if not snake.startswith("_") else "private" + snake
