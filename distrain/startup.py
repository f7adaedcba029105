"""Every entry point's start: the job loaded and checked, the world detected, the run dir located.

``distrain train``, ``distrain bench``, the Python API (``distrain.train``) and each Ray worker call
``start``; commands that check a job without running it (``validate``, ``slurm check``, the
``distrain ray`` driver) call ``check``, its first half. So a check added here holds everywhere,
and bad input exits 2 before any worker starts, any rendezvous waits or TensorFlow starts a
strategy.

``validate`` and ``slurm check`` then call ``preflight``: the data and model checks ``run.train``
makes before its first step (``load_data`` and ``build_job_model``, which ``run.train`` calls too),
without a strategy or a run dir, so that a job that validates trains.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from distrain.context import image_channels, input_shape
from distrain.data import sources
from distrain.data.pipelines import Source, steps_per_epoch
from distrain.errors import UsageError
from distrain.models import build_model, default_input_shape
from distrain.rundir import RunDir
from distrain.spec import JobSpec, read_job, spec_from_dict
from distrain.tf_startup import import_tensorflow
from distrain.user_code import check_spec, compile_args
from distrain.world import World, detect

JobLike = Union[str, os.PathLike, Mapping[str, Any]]
PURPOSES = ("train", "bench")
# Sources loaded (or listed) without TensorFlow: a bad folder fails preflight before it starts.
LISTED_WITHOUT_TENSORFLOW = ("digits", "synthetic", "image_folder", "tfrecord")


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


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What training would see of a job's data and model, found without training.

    Attributes:
        data: the loaded source (sizes, classes, input shape).
        input_shape: the model's input shape.
        num_classes: the classes the model predicts.
        params: the built model's parameter count.
    """

    data: Source
    input_shape: tuple[int, ...]
    num_classes: int
    params: int

    def describe(self) -> str:
        """``train 1150, validation 288, test 359 examples, 10 classes; model input 8x8x1, 29,066 parameters``."""
        d = self.data
        return (f"train {d.train_size}, validation {d.val_size}, test {d.test_size} examples, {self.num_classes} "
                f"classes; model input {'x'.join(map(str, self.input_shape))}, {self.params:,} parameters")


def preflight(spec: JobSpec, *, pipelines: int = 1) -> Preflight:
    """The data and model checks ``run.train`` makes before its first step, without training.

    The data is loaded as training loads it (``load_data``: an image folder listed and
    its headers checked, the user's arrays loaded, a Keras dataset read from its cache, the labels
    checked against the class count); the batch is checked against the training split
    (``steps_per_epoch``, with one replica); the model is built as ``run.build_trainee`` builds it
    (``build_job_model``: the user's model checked against its contract) and compiled with the
    job's loss and metrics. No strategy, rendezvous or run dir.

    Args:
        spec: a job ``check`` returned.
        pipelines: the input pipelines the run will have (its worker processes): a TFRecord pack
            needs at least as many training shards.

    Raises:
        UsageError: one line, as the run would raise it at start.
    """
    if spec.data.source not in LISTED_WITHOUT_TENSORFLOW:  # a Keras dataset, the user's data function
        import_tensorflow()  # without its start-up notices
    data = load_data(spec, shard=(0, pipelines))
    import_tensorflow()  # for the model
    shape = input_shape(spec, data.input_shape)
    num_classes = spec.model.num_classes or data.num_classes
    steps_per_epoch(data.train_size, spec.data.batch_size_per_replica * spec.train.accumulation_steps,
                    spec.train.steps_per_epoch)
    model = build_job_model(spec, shape, num_classes)
    loss, metrics = compile_args(spec.train)
    model.compile(optimizer="sgd", loss=loss, metrics=metrics)
    return Preflight(data, shape, num_classes, model.count_params())


def load_data(spec: JobSpec, *, shard: tuple[int, int] = (0, 1)) -> Source:
    """The job's data as training loads it: decoded with the model's image channels, its labels
    checked against ``model.num_classes`` (``run.load_data`` and ``preflight``).

    Args:
        shard: (this worker's pipeline index, number of pipelines), see ``sources.load``.
    """
    channels = image_channels(spec, default_input_shape(spec.model.name))
    return sources.load(spec.data, spec.seed, channels=channels, shard=shard, num_classes=spec.model.num_classes)


def build_job_model(spec: JobSpec, shape: tuple[int, ...], num_classes: int):
    """The job's model, uncompiled, as training builds it (``run.build_trainee`` calls it inside the
    strategy's scope, ``preflight`` outside): a user's model is checked against its contract."""
    return build_model(spec.model.name, shape, num_classes, l1=spec.train.l1, l2=spec.train.l2,
                       loss=spec.train.loss, **spec.model.params)
