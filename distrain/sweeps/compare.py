"""A sweep's trials compared: the metric and mode, each trial's result, the ranking and table of
``distrain report SWEEP_DIR``, and the swept keys as the hparams TensorBoard shows for each trial.

A trial's result is the sweep's metric at its last epoch (``summary.json``'s history): the value
TensorBoard's HParams dashboard shows for it too (the last one written). Pure functions: no
TensorFlow, no files.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from distrain.checkpoint import monitor_mode
from distrain.errors import EXIT_NAN
from distrain.spec import JobSpec, SweepSpec, spec_to_dict
from distrain.sweeps.trials import check_distributions, format_value


def metric_and_mode(spec: JobSpec) -> tuple[str, str]:
    """The sweep's metric and whether higher (``max``) or lower (``min``) is better.

    Without ``sweep.metric``, the checkpoint's: ``checkpoint.monitor`` and ``checkpoint.mode``;
    ``auto`` decides by the name, as checkpoints do (``checkpoint.monitor_mode``).
    """
    sweep = spec.sweep
    if sweep.metric is None:
        mode = spec.checkpoint.mode if sweep.mode == "auto" else sweep.mode
        return spec.checkpoint.monitor, monitor_mode(spec.checkpoint.monitor, mode)
    return sweep.metric, monitor_mode(sweep.metric, sweep.mode)


def swept_keys(sweep: SweepSpec) -> dict[str, str]:
    """``{key: how it is swept}`` for the keys a sweep section sets, the grid's first.

    The text names the values or the distribution, not how many random trials there are: more
    trials of the same sweep keep its TensorBoard config.
    """
    how = {key: f"sweep.grid {format_value(values)}" for key, values in sweep.grid.items()}
    if sweep.random:
        distributions = check_distributions(sweep.random.distributions, sweep.grid)
        how.update({key: f"sweep.random {d.describe()}" for key, d in distributions.items()})
    return how


def value_at(job: Mapping, key: str) -> Any:
    """The value at a key path of a job as a dict (``spec_to_dict``); None where there is none.

    >>> value_at({"train": {"schedule": {"boundaries": [3, 7]}}}, "train.schedule.boundaries")
    [3, 7]
    """
    node: Any = job
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def hparam_value(value: Any) -> Any:
    """A value as TensorBoard's hparams take it: a bool, number or string (else its YAML, one line).

    >>> hparam_value(0.003), hparam_value([3, 7]), hparam_value(None)
    (0.003, '[3, 7]', 'null')
    """
    if isinstance(value, (bool, int, float, str)):
        return value
    return format_value(value)


def swept_hparams(spec: JobSpec) -> dict[str, Any]:
    """``{swept key: the run's value}``: the hparams a run of a sweep's trial logs beside the
    usual ones, read from its resolved job (so a resumed trial logs the same)."""
    job = spec_to_dict(spec)
    return {key: hparam_value(value_at(job, key)) for key in swept_keys(spec.sweep)}


def result(summary: Mapping, metric: str) -> Optional[float]:
    """The metric at the run's last epoch (None: not logged, or not finite)."""
    values = (summary.get("history") or {}).get(metric) or []
    value = values[-1] if values else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def ranked(trials: Sequence, mode: str) -> list:
    """The trials (records with ``index``, ``result``), the best first; those without a result last,
    by index."""
    scored = sorted((t for t in trials if t.result is not None),
                    key=lambda t: (-t.result if mode == "max" else t.result, t.index))
    return scored + sorted((t for t in trials if t.result is None), key=lambda t: t.index)


def format_number(value: Any) -> str:
    """``0.003``, ``0.9132``: four significant digits for floats, others as the job writes them."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return format_value(value)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def table_rows(trials: Sequence, keys: Sequence[str], metric: str, mode: str,
               summaries: Mapping[int, Mapping]) -> list[dict]:
    """One row per trial, the best first: its rank, overrides, result, state, and from its
    ``summary.json`` (``summaries[index]``, if any) epochs, test metrics and wall time."""
    rows = []
    for rank, trial in enumerate(ranked(trials, mode), 1):
        summary = summaries.get(trial.index) or {}
        test = summary.get("test") or {}
        rows.append({
            "rank": str(rank) if trial.result is not None else "-",
            "trial": trial.name,
            **{key: format_number(trial.overrides.get(key)) for key in keys},
            f"{metric} ({mode})": f"{trial.result:.4f}" if trial.result is not None else "-",
            "state": "failed (NaN loss)" if trial.state == "failed" and trial.exit_code == EXIT_NAN else trial.state,
            "epochs": str(summary.get("epochs_completed", "-")),
            "test loss": f"{test['loss']:.4f}" if "loss" in test else "-",
            "wall time": _duration(summary.get("wall_time_s")),
        })
    return rows


def axis(values: Sequence[Any]) -> str:
    """How a swept key's values go on a plot's x axis: ``log`` (positive floats over a factor of
    10 or more: learning rates, L2), ``linear`` (other numbers), ``category`` (anything else:
    lists, strings, booleans).

    >>> axis([1e-3, 1e-2]), axis([3, 50]), axis([[3, 7], [5, 8]])
    ('log', 'linear', 'category')
    """
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not values or len(numbers) != len(values):
        return "category"
    floats = any(isinstance(v, float) for v in numbers)
    return "log" if floats and min(numbers) > 0 and max(numbers) / min(numbers) >= 10 else "linear"
