"""Launchers at the edge: they start processes that all call ``distrain.run.train``.

Each launcher module may define ``add_parser(subparsers)`` to register its ``distrain`` sub-command.
"""
from __future__ import annotations

import importlib

LAUNCHERS = ("slurm", "ray", "ray_tune")  # ray_tune adds --sweep to the ray sub-command


def register_parsers(subparsers) -> None:
    """Registers each launcher's sub-command (a launcher's heavy imports happen only when it runs)."""
    for name in LAUNCHERS:
        try:
            module = importlib.import_module(f"distrain.launch.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"distrain.launch.{name}":
                raise
            continue
        module.add_parser(subparsers)
