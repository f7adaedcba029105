"""A sweep's trials: the ``sweep:`` section of a job expanded into sets of overrides.

A trial is the job with one set of overrides, ``{job key: value}``, applied as ``--set`` applies
them. The section gives them two ways, which combine:

- ``grid``: job key → list of values; every combination is a trial, in ``itertools.product``
  order (the keys in the order written, the last one changing fastest).
- ``random``: ``trials`` draws of every key of ``distributions`` (``uniform``, ``log_uniform``,
  ``integer`` between ``[low, high]``, ``choice`` among a list), from ``random.Random(seed)``.

With both, every point of the grid is drawn ``trials`` times, in Ray Tune's order (its
``num_samples`` repeats the grid): draw 1 of every grid point, then draw 2, ... Each trial takes
its values from the one random stream, in trial order and key order, so the same section always
gives the same trials, and more random trials (``--trials 8`` after 4) only add trials after the
first ones.

Nothing here knows the job's schema; ``distrain.spec`` checks the keys, ``sweeps.plan`` every
trial's values.
"""
from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import yaml

# Each distribution and what it takes.
DISTRIBUTIONS = {"uniform": "[low, high]", "log_uniform": "[low, high]", "integer": "[low, high] of integers",
                 "choice": "[a, b, ...]"}
EXPECTED_DISTRIBUTION = ("{uniform: [low, high]}, {log_uniform: [low, high]}, {integer: [low, high]} or "
                         "{choice: [a, b, ...]}")
# PyYAML reads YAML 1.1, where a float needs a dot: ``1e-3`` is the string "1e-3".
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class SweepError(ValueError):
    """A ``sweep:`` section that cannot give trials: ``path`` (within the section) and why."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def number(value: Any) -> Any:
    """``value``, with a string such as ``"1e-3"`` (a float to YAML 1.2, a string to PyYAML) as a float.

    >>> number("1e-3"), number("adam"), number([1])
    (0.001, 'adam', [1])
    """
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Distribution:
    """Where a random trial draws a key's value from.

    Attributes:
        kind: ``uniform``, ``log_uniform``, ``integer`` or ``choice``.
        values: ``(low, high)``, or the choices.
    """

    kind: str
    values: tuple

    def draw(self, u: float) -> Any:
        """The value at ``u`` in [0, 1): a uniform draw becomes one of this distribution.

        >>> Distribution("integer", (1, 3)).draw(0.99), Distribution("log_uniform", (1e-4, 1e-2)).draw(0.5)
        (3, 0.001)
        """
        if self.kind == "choice":
            return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
        low, high = self.values
        if self.kind == "integer":
            return low + min(int(u * (high - low + 1)), high - low)
        if self.kind == "log_uniform":
            value = math.exp(math.log(low) + (math.log(high) - math.log(low)) * u)
        else:
            value = low + (high - low) * u
        # 15 significant digits: 0.001, not the 0.0009999999999999998 of exp(log(...)); still exact
        # in YAML, so a trial's overrides read back as the values it trained with.
        return float(f"{value:.15g}")

    def describe(self) -> str:
        """``log_uniform [0.0001, 0.01]``, as the section writes it."""
        return f"{self.kind} {format_value(list(self.values))}"


def parse_distribution(path: str, raw: Any) -> Distribution:
    """A distribution as the section writes it: ``{log_uniform: [1.0e-4, 1.0e-2]}``.

    Raises:
        SweepError: not one of the distributions, or bounds that give no range (``low >= high``,
            ``low <= 0`` for ``log_uniform``, non-integers for ``integer``, no choices).
    """
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS:
        raise SweepError(path, f"expected {EXPECTED_DISTRIBUTION}, got {format_value(raw)}")
    kind, values = next(iter(raw.items()))
    if not isinstance(values, list):
        raise SweepError(f"{path}.{kind}", f"expected {DISTRIBUTIONS[kind]}, got {format_value(values)}")
    values = [number(v) for v in values]
    if kind == "choice":
        if not values:
            raise SweepError(f"{path}.{kind}", "expected a non-empty list of values, got []")
        return Distribution(kind, tuple(values))
    integers = kind == "integer"
    if len(values) != 2 or not all(_real(v) and (not integers or isinstance(v, int)) for v in values):
        raise SweepError(f"{path}.{kind}", f"expected {DISTRIBUTIONS[kind]}, got {format_value(values)}")
    low, high = values
    if kind == "log_uniform" and low <= 0:
        raise SweepError(f"{path}.{kind}", f"expected 0 < low < high (a logarithm), got {format_value(values)}")
    if low >= high:
        raise SweepError(f"{path}.{kind}", f"expected low < high, got {format_value(values)}")
    return Distribution(kind, (low, high) if integers else (float(low), float(high)))


def check_grid(grid: Any) -> dict[str, list]:
    """The grid, ``{job key: [values]}``, its numbers read as YAML 1.2 reads them (``number``).

    Raises:
        SweepError: not a mapping of keys to non-empty lists, or a value listed twice.
    """
    if not isinstance(grid, dict):
        raise SweepError("grid", f"expected a mapping of job keys to lists of values, got {format_value(grid)}")
    checked = {}
    for key, values in grid.items():
        check_key(f"grid.{key}", key)
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key}", f"expected a non-empty list of values, got {format_value(values)}")
        values = [number(v) for v in values]
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise SweepError(f"grid.{key}", f"{format_value(twice)} is listed twice (a trial would run twice)")
        checked[key] = values
    return checked


def check_key(path: str, key: Any) -> None:
    """A swept key is a job key path as ``--set`` takes it (``train.learning_rate``); the section's
    own keys cannot be swept. Whether the job has the key is ``distrain.spec``'s to say."""
    if not isinstance(key, str) or not key or any(c.isspace() for c in key) or "=" in key:
        raise SweepError(path, f"expected a job key such as train.learning_rate, got {format_value(key)}")
    if key == "sweep" or key.startswith("sweep."):
        raise SweepError(path, "the sweep's own keys cannot be swept")


def check_distributions(distributions: Any, grid: Mapping[str, list]) -> dict[str, Distribution]:
    """``random.distributions``: ``{job key: distribution}``, none of them also in the grid.

    Raises:
        SweepError: not a non-empty mapping, a bad distribution, or a key swept both ways.
    """
    if not isinstance(distributions, dict) or not distributions:
        raise SweepError("random.distributions", f"expected a mapping of job keys to distributions "
                                                 f"({EXPECTED_DISTRIBUTION}), got {format_value(distributions)}")
    checked = {}
    for key, raw in distributions.items():
        path = f"random.distributions.{key}"
        check_key(path, key)
        if key in grid:
            raise SweepError(path, "also in sweep.grid: sweep a key one way")
        checked[key] = parse_distribution(path, raw)
    return checked


def grid_points(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key changing fastest (``[{}]`` for no grid).

    >>> grid_points({"a": [1, 2], "b": ["x", "y"]})
    [{'a': 1, 'b': 'x'}, {'a': 1, 'b': 'y'}, {'a': 2, 'b': 'x'}, {'a': 2, 'b': 'y'}]
    """
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand(grid: Mapping[str, Sequence], distributions: Optional[Mapping[str, Distribution]] = None,
           trials: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """The trials' overrides, in trial order: draw ``s`` of every grid point before draw ``s + 1``.

    Args:
        grid: ``{job key: [values]}`` (``check_grid``).
        distributions: ``{job key: Distribution}`` (``check_distributions``); none: the grid alone.
        trials: draws of the distributions (for each point of the grid).
        seed: seeds the draws.

    Returns:
        One ``{job key: value}`` per trial, the grid's keys first; ``[]`` for an empty section.

    >>> expand({"a": [1, 2]}, {"b": Distribution("choice", ("x", "y"))}, trials=2, seed=0)
    [{'a': 1, 'b': 'y'}, {'a': 2, 'b': 'y'}, {'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}]
    """
    if not grid and not distributions:
        return []
    points = grid_points(grid)
    if not distributions:
        return points
    stream = random.Random(seed)  # Mersenne Twister's random(): the same numbers on every Python
    out = []
    for _ in range(trials):
        for point in points:
            out.append({**point, **{key: d.draw(stream.random()) for key, d in distributions.items()}})
    return out


def format_value(value: Any) -> str:
    """A value as ``--set`` reads it back (YAML, on one line): ``0.001``, ``[3, 7]``, ``'true'``.

    >>> format_value(0.001), format_value([3, 7]), format_value("true"), format_value({"name": "step"})
    ('0.001', '[3, 7]', "'true'", '{name: step}')
    """
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 16).strip()
    return text.removesuffix("\n...").strip()


def override(key: str, value: Any) -> str:
    """``key=value`` as ``--set`` takes it.

    >>> override("train.schedule.boundaries", [3, 7])
    'train.schedule.boundaries=[3, 7]'
    """
    return f"{key}={format_value(value)}"


def parse_grid_flag(text: str) -> tuple[str, list]:
    """``--grid key=a,b,c``: the key and its values, each read as YAML (``[3,7],[5,8]`` is two lists).

    Raises:
        SweepError: no ``=``, or no values.

    >>> parse_grid_flag("train.learning_rate=1e-3,3e-3"), parse_grid_flag("train.schedule.boundaries=[3,7],[5,8]")
    (('train.learning_rate', [0.001, 0.003]), ('train.schedule.boundaries', [[3, 7], [5, 8]]))
    """
    key, _, raw = text.partition("=")
    key = key.strip()
    if not _ or not key:
        raise SweepError(f"--grid {text}", "expected key.path=a,b,... e.g. --grid train.learning_rate=0.001,0.003")
    try:
        values = yaml.safe_load(f"[{raw}]") if raw.strip() else []
    except yaml.YAMLError:
        values = None
    if not values or any(v is None for v in values):
        raise SweepError(f"--grid {key}", f"expected a non-empty list of values separated by commas, each read as "
                                          f"YAML (quote a string holding , [ ] {{ }}), got {raw!r}")
    return key, [number(v) for v in values]
