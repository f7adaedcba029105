"""Every entry point's start: the job loaded and checked, the world detected, the run dir located.

``distrain train``, ``distrain bench``, the Python API (``distrain.train``) and each Ray worker call
``start``; commands that check a job without running it (``validate``, ``slurm check``, the
``distrain ray`` driver) call ``check``, its first half. So a check added here holds everywhere,
and bad input exits 2 before any worker starts, any rendezvous waits or TensorFlow starts a
strategy.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from distrain.errors import UsageError
from distrain.rundir import RunDir
from distrain.spec import JobSpec, read_job, spec_from_dict
from distrain.user_code import check_spec
from distrain.world import World, detect

JobLike = Union[str, os.PathLike, Mapping[str, Any]]
PURPOSES = ("train", "bench")


@dataclasses.dataclass(frozen=True)
class Start:
    """What every entry point has before it runs: the checked job, this process's world, the run dir.

    Attributes:
        spec: the validated job, the user's code imported and checked against its contract.
        source: where the job came from, for messages (a file path, or ``distrain.train(job=dict)``).
        world: this process's place in the job.
        run_dir: where the run writes (None: a benchmark of one process, in a temporary directory).
    """

    spec: JobSpec
    source: str
    world: World
    run_dir: Optional[Path]


def load(job: JobLike, overrides: Sequence[str] = (), *, model: Optional[str] = None,
         data: Optional[str] = None) -> tuple[JobSpec, str]:
    """The job as a validated ``JobSpec`` and its source, from a file or a dict.

    Args:
        job: a job file's path, or the job as a dict (what the YAML file would hold).
        overrides: ``key.path=value`` strings (``--set``).
        model, data: import references that replace ``model.name`` / ``data.source`` (the Python
            API's ``model=`` and ``data=``, made references by ``user_code.reference_of``).

    Raises:
        UsageError: one line naming the file, the key and what was expected.
    """
    if isinstance(job, Mapping):
        raw, source, base_dir = dict(job), "distrain.train(job=dict)", Path.cwd()
    elif isinstance(job, (str, os.PathLike)):
        path = Path(job)
        raw, source, base_dir = read_job(path), str(path), path.parent
    else:
        raise UsageError(f"job: expected a job file's path or a dict, got {type(job).__name__}")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a mapping of keys at the top level")
    for key, value in (("model", model), ("data", data)):
        if value is not None:
            section = raw.get(key) if raw.get(key) is not None else {}
            if not isinstance(section, dict):
                raise UsageError(f"{source}: {key}: expected a mapping of keys, got {section!r}")
            raw[key] = {**section, ("name" if key == "model" else "source"): value}
    return spec_from_dict(raw, source=source, overrides=overrides, base_dir=base_dir), source


def check(job: Union[JobLike, JobSpec], overrides: Sequence[str] = (), *, source: str = "", **replace) -> JobSpec:
    """The job loaded (``load``) and the user's code in it imported and checked (``user_code.check_spec``).

    Args:
        job: a job file, a dict, or an already validated ``JobSpec`` (then ``source`` names it).
        overrides, replace: as ``load`` (not with a ``JobSpec``).

    Raises:
        UsageError: bad input, one line (exit 2 on the command line).
    """
    return _checked(job, overrides, source, replace)[0]


def _checked(job, overrides: Sequence[str], source: str, replace: dict) -> tuple[JobSpec, str]:
    if isinstance(job, JobSpec):
        spec = job
    else:
        spec, source = load(job, overrides, **replace)
    check_spec(spec, source)
    return spec, source


def start(job: Union[JobLike, JobSpec], overrides: Sequence[str] = (), *, purpose: str = "train",
          run_dir: Union[str, os.PathLike, None] = None, run_id: Optional[str] = None,
          world: Optional[World] = None, source: str = "", env: Mapping[str, str] = os.environ,
          **replace) -> Start:
    """The one start-up of every entry point that runs a job.

    Args:
        job, overrides, source, replace: as ``check``.
        purpose: ``train`` (the run dir is ``RunDir.for_training``) or ``bench``
            (``RunDir.for_bench``).
        run_dir: ``--run-dir`` (or ``--resume``), if given.
        run_id: ``--run-id``, if given.
        world: this process's place when the launcher knows it (Ray); default: detected.
        env: the environment the world and the run id are read from.

    Returns:
        The checked job, the world and the run dir.

    Raises:
        UsageError: bad input, before anything expensive starts.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose: expected one of {PURPOSES}, got {purpose!r}")
    spec, source = _checked(job, overrides, source, replace)
    world = world or detect(env, port_override=spec.distribute.port)
    if purpose == "bench":
        where = RunDir.for_bench(spec.output_dir, spec.name, run_dir=run_dir, world_size=world.world_size, env=env)
    else:
        where = RunDir.for_training(spec.output_dir, spec.name, run_dir=run_dir, run_id=run_id,
                                    world_size=world.world_size, env=env)
    return Start(spec, source, world, where)
