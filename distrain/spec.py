"""The job spec: one YAML file describes a run.

Layers: dataclass defaults → the YAML file (``yaml.safe_load``) → ``--set key.path=value`` overrides.
Every value is checked against the dataclass field it lands in; unknown keys, wrong types,
out-of-range values, missing files and unknown models or datasets raise ``UsageError`` with one
line naming the file (or the ``--set`` flag), the key path, what was expected and what was given.
Nothing here imports TensorFlow, so a bad job fails in milliseconds, before any worker starts.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from distrain import user_code
from distrain.errors import UsageError
from distrain.models import MODELS, model_params
from distrain.sweeps import trials as sweep_trials

log = logging.getLogger("distrain")

DATA_SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder", "tfrecord", "synthetic")
STREAMED_SOURCES = ("image_folder", "tfrecord")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "horovod")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _check(*, choices: Sequence[Any] = (), min: float | None = None, max: float | None = None,
           min_exclusive: bool = False, max_exclusive: bool = False, doc: str = "",
           renamed: Optional[dict[str, str]] = None) -> dict:
    """Field metadata: the constraints the validator enforces, and the reference text of the key.

    ``renamed`` maps old values of a choice to their new names: an old value still works, with a
    one-line notice naming the new one.
    """
    return {"choices": tuple(choices), "min": min, "max": max, "min_exclusive": min_exclusive,
            "max_exclusive": max_exclusive, "doc": doc, "renamed": dict(renamed or {})}


@dataclass(frozen=True)
class ModelSpec:
    name: str = field(default="mlp", metadata=_check(doc="a course model (" + ", ".join(MODELS) + ") or your own: "
                                                          "package.module:function or path/to/file.py:function "
                                                          "(docs/own-model-and-data.md)"))
    params: dict = field(default_factory=dict, metadata=_check(doc="keyword parameters of the model builder (see `distrain models`)"))
    input_shape: Optional[list[int]] = field(default=None, metadata=_check(min=1, doc="default: the data's shape"))
    num_classes: Optional[int] = field(default=None, metadata=_check(min=2, doc="default: the data's class count"))


@dataclass(frozen=True)
class AugmentSpec:
    flip: str = field(default="none", metadata=_check(choices=("none", "horizontal", "vertical", "horizontal_and_vertical"), doc="random flips of training images (RandomFlip, seeded)"))
    rotation: float = field(default=0.0, metadata=_check(min=0.0, max=1.0, doc="RandomRotation factor, a fraction of a full turn"))
    zoom: float = field(default=0.0, metadata=_check(min=0.0, max=1.0, max_exclusive=True, doc="RandomZoom factor: images are zoomed in or out by up to this fraction (training only)"))


@dataclass(frozen=True)
class SyntheticSpec:
    shape: list[int] = field(default_factory=lambda: [32, 32, 3], metadata=_check(min=1, doc="synthetic: [height, width] or [height, width, channels] of the random uint8 images"))
    classes: int = field(default=10, metadata=_check(min=2, doc="synthetic: random labels 0 .. classes-1"))
    examples: int = field(default=2048, metadata=_check(min=1, doc="synthetic: examples generated (from the job's seed), before the splits"))


@dataclass(frozen=True)
class DataSpec:
    source: str = field(default="digits", metadata=_check(doc="where the examples come from: " + ", ".join(DATA_SOURCES) +
                                                               " (docs/data.md), or your loader: package.module:function "
                                                               "or path/to/file.py:function (docs/own-model-and-data.md)"))
    path: Optional[str] = field(default=None, metadata=_check(doc="image_folder: a directory of class_name/image files; tfrecord: a directory written by `distrain data pack`"))
    batch_size_per_replica: int = field(default=32, metadata=_check(min=1, doc="examples per replica per micro-batch; the global batch is this x replicas x train.accumulation_steps"))
    validation_split: float = field(default=0.2, metadata=_check(min=0.0, max=1.0, max_exclusive=True, doc="fraction of the training examples held out for validation (cut by the seed; 0: no validation)"))
    test_split: float = field(default=0.2, metadata=_check(min=0.0, max=1.0, max_exclusive=True, doc="for sources without a test set of their own"))
    image_size: list[int] = field(default_factory=lambda: [64, 64], metadata=_check(min=1, doc="image_folder, tfrecord: [height, width] images are decoded to"))
    cache: str = field(default="none", metadata=_check(doc="image_folder, tfrecord: keep decoded examples after their first epoch: none, memory, or a directory (node-local scratch)"))
    rescale: Optional[float] = field(default=None, metadata=_check(min=0.0, min_exclusive=True, doc="default: 1/255 for images, 1/16 for digits"))
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    cache_dir: Optional[str] = field(default=None, metadata=_check(doc="where Keras datasets are cached (default ~/.keras); a shared directory on clusters"))
    limit: Optional[int] = field(default=None, metadata=_check(min=1, doc="use only the first N examples of each split"))


@dataclass(frozen=True)
class ScheduleSpec:
    name: str = field(default="constant", metadata=_check(choices=("constant", "step", "cosine", "exponential"), doc="the LR after warmup: constant, step (factors at boundaries), cosine (to min_factor at the last step), exponential"))
    boundaries: list[float] = field(default_factory=lambda: [3, 7], metadata=_check(min=0.0, doc="step: epochs where the factor changes"))
    factors: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.01], metadata=_check(min=0.0, doc="step: LR multipliers, one more than boundaries"))
    min_factor: float = field(default=0.0, metadata=_check(min=0.0, max=1.0, doc="cosine: final LR as a fraction of the peak"))
    decay_rate: float = field(default=0.9, metadata=_check(min=0.0, max=1.0, min_exclusive=True, doc="exponential: factor per decay_epochs"))
    decay_epochs: float = field(default=1.0, metadata=_check(min=0.0, min_exclusive=True, doc="exponential: epochs over which the LR is multiplied by decay_rate (applied smoothly, step by step)"))


@dataclass(frozen=True)
class EarlyStoppingSpec:
    monitor: str = field(default="val_loss", metadata=_check(doc="the epoch metric watched (Keras EarlyStopping); the stop is agreed across workers"))
    patience: int = field(default=3, metadata=_check(min=0, doc="epochs without improvement before the run stops"))
    min_delta: float = field(default=0.0, metadata=_check(min=0.0, doc="the smallest change of monitor that counts as an improvement"))
    mode: str = field(default="auto", metadata=_check(choices=("auto", "min", "max"), doc="whether monitor should fall or rise; auto: max for accuracy-like names (acc, auc, precision, recall), else min, as checkpoint.mode"))
    restore_best_weights: bool = field(default=False, metadata=_check(doc="on stopping, go back to the weights of the best epoch"))


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = field(default=10, metadata=_check(min=1, doc="epochs in all, counting those a resumed run already trained"))
    steps_per_epoch: Optional[int] = field(default=None, metadata=_check(min=1, doc="default: one pass over the training split"))
    optimizer: str = field(default="adam", metadata=_check(choices=("adam", "sgd", "rmsprop"), doc="the Keras optimizer"))
    momentum: float = field(default=0.0, metadata=_check(min=0.0, max=1.0, max_exclusive=True, doc="sgd only"))
    learning_rate: float = field(default=1e-3, metadata=_check(min=0.0, min_exclusive=True, doc="the LR for reference_batch"))
    reference_batch: Optional[int] = field(default=None, metadata=_check(min=1, doc="global batch the LR is given for; default: batch_size_per_replica"))
    lr_scaling: str = field(default="linear", metadata=_check(choices=("linear", "sqrt", "none"), doc="how learning_rate is scaled from reference_batch to the global batch (docs/distributed.md)"))
    warmup_epochs: float = field(default=0.0, metadata=_check(min=0.0, doc="linear warmup from learning_rate to the scaled LR over this many epochs (rounded to steps)"))
    warmup_steps: int = field(default=0, metadata=_check(min=0, doc="the same in optimizer steps; set warmup_epochs or warmup_steps, not both"))
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    l1: float = field(default=0.0, metadata=_check(min=0.0, doc="kernel L1 regularization"))
    l2: float = field(default=0.0, metadata=_check(min=0.0, doc="kernel L2 regularization"))
    early_stopping: Optional[EarlyStoppingSpec] = None
    terminate_on_nan: bool = field(default=True, metadata=_check(doc="a NaN or Inf loss stops every worker (exit 77) at the next agreement step (distribute.preemption_check_every); no backup or checkpoint keeps such weights"))
    accumulation_steps: int = field(default=1, metadata=_check(min=1, doc="micro-batches per optimizer step: the global batch is batch_size_per_replica x replicas x this; a resumed run keeps its global batch and sets this itself"))
    loss: str = field(default="sparse_categorical_crossentropy", metadata=_check(doc="a Keras loss name or your own: package.module:function"))
    metrics: list[str] = field(default_factory=lambda: ["accuracy"], metadata=_check(doc="Keras metric names or references"))
    from_logits: bool = field(default=False, metadata=_check(doc="the model ends without a softmax (crossentropy losses)"))
    precision: str = field(default="float32", metadata=_check(choices=PRECISIONS, doc="Keras's dtype policy for the run: mixed_float16 computes in float16 with dynamic loss scaling, mixed_bfloat16 in bfloat16; variables and the model's output stay float32 (docs/precision.md)"))
    jit_compile: bool = field(default=False, metadata=_check(doc="XLA-compile the training step: the whole step on one device, each replica's forward and backward pass under mirrored, multi_worker and horovod (docs/precision.md)"))
    steps_per_execution: int = field(default=1, metadata=_check(min=1, doc="optimizer steps per call of the compiled step (model.compile(steps_per_execution=K)): less Python between steps; backups, checkpoints, step logs and agreements every N steps act at the end of the call that reaches a multiple of N (docs/precision.md)"))


@dataclass(frozen=True)
class DistributeSpec:
    strategy: str = field(default="auto", metadata=_check(choices=STRATEGIES, doc="auto: horovod under horovodrun/mpirun, multi_worker with several workers, mirrored with several GPUs, else one_device (docs/distributed.md)"))
    devices: list[str] = field(default_factory=list, metadata=_check(doc="mirrored: explicit devices, e.g. [/gpu:0, /gpu:1]"))
    cpu_devices: int = field(default=0, metadata=_check(min=0, doc="split the CPU into N logical devices, to try mirrored without GPUs"))
    mixed_precision: bool = field(default=False, metadata=_check(doc="deprecated: true is train.precision: mixed_float16 (with a notice); use train.precision"))
    memory_growth: bool = field(default=True, metadata=_check(doc="GPUs: TensorFlow takes memory as it needs it, not all of every GPU at start"))
    collective_timeout_s: float = field(default=300.0, metadata=_check(min=0.0, min_exclusive=True, doc="multi_worker and horovod: a worker whose run makes no progress (no batch hook, epoch or evaluation batch ends) for this long aborts its collectives (horovod: shuts Horovod down) and exits 76; the first step's tracing counts, and with train.steps_per_execution K one hook covers K steps"))
    startup_timeout_s: float = field(default=300.0, metadata=_check(min=0.0, min_exclusive=True, doc="how long workers wait for each other at start-up, before the strategy is built; then exit 76 naming the missing ones"))
    port: Optional[int] = field(default=None, metadata=_check(min=1024, max=65535, doc="base port of the workers; default: derived from the job id"))
    preemption_check_every: int = field(default=10, metadata=_check(min=1, doc="steps between agreements on stopping (preemption, NaN)"))
    gradient_compression: str = field(default="none", metadata=_check(choices=("none", "fp16"), doc="multi_worker, mirrored, horovod: all-reduce gradients as float16 (half the bytes; docs/performance.md)"))
    all_reduce_pack_bytes: int = field(default=0, metadata=_check(min=0, doc="multi_worker: all-reduce gradients in packs of about this many bytes (CommunicationOptions.bytes_per_pack); 0: one pack"))
    gradient_all_reduce: str = field(default="auto", metadata=_check(choices=("auto", "setup_once", "tensorflow"), renamed={"resolved_once": "setup_once"}, doc="multi_worker: setup_once sums gradients with collectives set up on the first step only, so no step waits for a round trip to the group leader; tensorflow: MultiWorkerMirroredStrategy's own, which asks the group leader over gRPC before every step's all-reduce; auto: setup_once on CPU workers, tensorflow on GPUs (docs/distributed.md). The old name resolved_once still works"))


@dataclass(frozen=True)
class CheckpointSpec:
    every_epochs: int = field(default=1, metadata=_check(min=0, doc="0: no periodic checkpoint"))
    every_steps: int = field(default=0, metadata=_check(min=0, doc="also keep checkpoints/step-NNNNNN.weights.h5 every N optimizer steps; 0: none"))
    save_best: bool = field(default=True, metadata=_check(doc="keep checkpoints/best.weights.h5 (and best.json) from the epoch with the best monitor"))
    monitor: str = field(default="val_accuracy", metadata=_check(doc="the epoch metric save_best compares"))
    mode: str = field(default="auto", metadata=_check(choices=("auto", "min", "max"), doc="whether a better monitor is higher or lower; auto: max for accuracy-like names (acc, auc, precision, recall), else min"))
    keep: int = field(default=3, metadata=_check(min=1, doc="periodic checkpoints kept (the newest); the best one is kept apart"))
    backup_every_steps: int = field(default=100, metadata=_check(min=0, doc="resume state; 0: only at epoch ends"))


@dataclass(frozen=True)
class LoggingSpec:
    tensorboard: bool = field(default=True, metadata=_check(doc="the chief writes TensorBoard logs to RUN_DIR/tensorboard (metrics, LR, images/s, hparams)"))
    update_every_steps: int = field(default=10, metadata=_check(min=0, doc="step-level scalars and a step line in the chief's log (logs/rank0.log); 0: per epoch only"))
    profile_steps: Optional[list[int]] = field(default=None, metadata=_check(min=1, doc="[first, last] step to profile"))
    verbose: Optional[int] = field(default=None, metadata=_check(choices=(0, 1, 2), doc="Keras's fit output on the chief: 0 none, 1 progress bar, 2 one line per epoch (and the step lines on the terminal too); default: 1 on a terminal or in a notebook, 2 elsewhere (SLURM .out files, Ray logs, output piped to a file)"))

    @property
    def step_scalars_every(self) -> int:
        """Steps between TensorBoard's step-level scalars (0: none)."""
        return self.update_every_steps if self.tensorboard else 0


@dataclass(frozen=True)
class RandomSpec:
    trials: int = field(default=1, metadata=_check(min=1, doc="sweep: random trials (for each point of the grid), each drawing every key of distributions"))
    seed: int = field(default=0, metadata=_check(min=0, doc="sweep: seeds the random draws: the same seed gives the same trials"))
    distributions: dict = field(default_factory=dict, metadata=_check(doc="sweep: job key to {uniform: [low, high]}, {log_uniform: [low, high]}, {integer: [low, high]} or {choice: [a, b, ...]} (docs/sweeps.md)"))


@dataclass(frozen=True)
class SweepSpec:
    metric: Optional[str] = field(default=None, metadata=_check(doc="sweep: the epoch metric trials are compared on (its last epoch's value): loss, a train.metrics name or val_ + one of them; default: checkpoint.monitor"))
    mode: str = field(default="auto", metadata=_check(choices=("auto", "min", "max"), doc="sweep: whether a higher metric is better; auto: checkpoint.mode for the default metric, else max for accuracy-like names (acc, auc, precision, recall), else min"))
    grid: dict = field(default_factory=dict, metadata=_check(doc="sweep: job key to a list of values; every combination is a trial (distrain sweep, docs/sweeps.md)"))
    random: Optional[RandomSpec] = None

    @property
    def defined(self) -> bool:
        """Whether the section gives any trial (a grid or random distributions)."""
        return bool(self.grid or (self.random and self.random.distributions))


@dataclass(frozen=True)
class JobSpec:
    name: str = field(default="job", metadata=_check(doc="the run's name: runs go to OUTPUT_DIR/<name>/<run id>"))
    seed: int = field(default=42, metadata=_check(min=0, doc="seeds the splits, the shuffling, the initial weights and augmentation, the same on every worker"))
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    distribute: DistributeSpec = field(default_factory=DistributeSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    output_dir: str = field(default="runs", metadata=_check(doc="runs go to OUTPUT_DIR/<name>/<run id>"))


class _Invalid(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path
        self.message = message


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _expected(kind: str, meta: dict) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if kind in ("integer", "number") and lo is not None:
        if lo == 0 and meta.get("min_exclusive") and hi is None:
            return f"a positive {kind}"
        if lo == 1 and kind == "integer" and hi is None:
            return "a positive integer"
        if lo == 0 and hi is None:
            return f"a non-negative {kind}"
        lo_s = f"{'>' if meta.get('min_exclusive') else '>='} {lo:g}"
        hi_s = "" if hi is None else f" and {'<' if meta.get('max_exclusive') else '<='} {hi:g}"
        return f"{_article(kind)} {kind} {lo_s}{hi_s}"
    return f"{_article(kind)} {kind}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _scalar(value: Any, typ: type, meta: dict, path: str) -> Any:
    if typ is bool:
        if not isinstance(value, bool):
            raise _Invalid(path, f"expected true or false, got {_show(value)}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise _Invalid(path, f"expected a string, got {_show(value)}")
        out = value
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(path, f"expected {_expected('integer', meta)}, got {_show(value)}")
        out = value
    elif typ is float:
        # PyYAML reads 1e-3 (no dot) as a string; accept numeric strings so the course's LRs work.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Invalid(path, f"expected {_expected('number', meta)}, got {_show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Invalid(path, f"expected {_expected('number', meta)}, got {_show(value)}")
        out = float(value)
    else:  # pragma: no cover - a schema bug, not user input
        raise TypeError(f"unsupported field type {typ}")
    renamed = meta.get("renamed") or {}
    if out in renamed:
        log.warning("%s: %s is now called %s; the old name still works, for now", path, out, renamed[out])
        out = renamed[out]
    choices = meta.get("choices") or ()
    if choices and out not in choices:
        raise _Invalid(path, f"expected one of {', '.join(map(str, choices))}, got {_show(value)}")
    if typ in (int, float):
        lo, hi = meta.get("min"), meta.get("max")
        too_low = lo is not None and (out <= lo if meta.get("min_exclusive") else out < lo)
        too_high = hi is not None and (out >= hi if meta.get("max_exclusive") else out > hi)
        if too_low or too_high:
            raise _Invalid(path, f"expected {_expected('integer' if typ is int else 'number', meta)}, got {_show(value)}")
    return out


def _convert(value: Any, hint: Any, meta: dict, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(value, args[0], meta, path)
    if value is None:
        raise _Invalid(path, "expected a value, got null")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise _Invalid(path, f"expected a list, got {_show(value)}")
        return [_convert(v, item, meta, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(path, f"expected a mapping, got {_show(value)}")
        return dict(value)
    return _scalar(value, hint, meta, path)


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise _Invalid(path or "(top level)", f"expected a mapping of keys, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise _Invalid(where, f"unknown key; valid keys here: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            where = f"{path}.{name}" if path else name
            values[name] = _convert(raw[name], hints[name], dict(f.metadata), where)
    return cls(**values)


def _check_references(spec: JobSpec, base_dir: Path) -> JobSpec:
    """Names that are import references: their syntax, their files (relative ones made absolute
    against the job's directory, so the run dir's job.yaml names the same file). The import itself
    and the signature are checked by ``distrain.user_code.check_spec`` (it needs TensorFlow)."""

    def checked(value: str, path: str, builtins: Sequence[str], what: str) -> str:
        if not user_code.is_reference(value):
            if builtins and value not in builtins:
                raise _Invalid(path, f"expected one of {', '.join(builtins)}, or {what} as "
                                     f"{user_code.EXPECTED}, got {_show(value)}")
            return value
        try:
            ref = user_code.parse(value)
        except ValueError as err:
            raise _Invalid(path, f"{err}, got {_show(value)}") from None
        value = user_code.absolute(value, base_dir)
        if ref.file is not None:
            file = user_code.parse(value).file
            if not Path(file).is_file() and not user_code.is_shipped(file):
                raise _Invalid(path, f"{value}: no such file {file} (a relative path is relative to the job file)")
        return value

    model = checked(spec.model.name, "model.name", tuple(MODELS), "your model")
    source = checked(spec.data.source, "data.source", DATA_SOURCES, "your loader")
    loss = checked(spec.train.loss, "train.loss", (), "")
    metrics = [checked(m, f"train.metrics[{i}]", (), "") for i, m in enumerate(spec.train.metrics)]
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, name=model),
                               data=dataclasses.replace(spec.data, source=source),
                               train=dataclasses.replace(spec.train, loss=loss, metrics=metrics))


def _check_model_params(spec: JobSpec) -> JobSpec:
    """Checks ``model.params`` against the builder's keyword parameters; returns them converted.

    A user's model's parameters are checked against its signature by ``user_code.check_spec``."""
    if spec.model.name not in MODELS:
        return spec
    allowed = model_params(spec.model.name)
    converted = {}
    for key, value in spec.model.params.items():
        path = f"model.params.{key}"
        if key not in allowed:
            valid = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
            raise _Invalid(path, f"unknown parameter of model {spec.model.name}; valid: {valid}")
        default = allowed[key]
        converted[key] = value if default is None else _scalar(value, type(default), {}, path)
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, params=converted))


def _check_cross_fields(spec: JobSpec) -> None:
    """Rules that involve more than one key."""
    t, d = spec.train, spec.data
    if t.warmup_epochs and t.warmup_steps:
        raise _Invalid("train.warmup_steps", "set warmup_epochs or warmup_steps, not both")
    s = t.schedule
    if s.name == "step":
        if list(s.boundaries) != sorted(s.boundaries):
            raise _Invalid("train.schedule.boundaries", f"expected increasing epochs, got {s.boundaries}")
        if len(s.factors) != len(s.boundaries) + 1:
            raise _Invalid("train.schedule.factors", f"expected {len(s.boundaries) + 1} factors (one more than boundaries), got {len(s.factors)}")
    if d.validation_split + (d.test_split if d.source in ("digits", "image_folder", "synthetic") else 0) >= 1:
        raise _Invalid("data.validation_split", "validation_split + test_split must leave training data")
    if d.source == "image_folder":
        if not d.path:
            raise _Invalid("data.path", "expected a directory of class_name/image files for source image_folder")
        if not Path(d.path).is_dir():
            raise _Invalid("data.path", f"no such directory: {d.path}")
    elif d.source == "tfrecord":
        if not d.path:
            raise _Invalid("data.path", "expected a directory written by `distrain data pack` for source tfrecord")
        if not Path(d.path).is_dir():
            raise _Invalid("data.path", f"no such directory: {d.path}")
        if not (Path(d.path) / "distrain-data.json").is_file():
            raise _Invalid("data.path", f"{d.path} has no distrain-data.json (write the shards with `distrain data pack`)")
        if d.limit is not None:
            raise _Invalid("data.limit", "not supported with source tfrecord (pack fewer images instead)")
    elif d.path is not None:
        raise _Invalid("data.path", f"only used with source image_folder or tfrecord, got source {d.source}")
    if d.source in STREAMED_SOURCES and len(d.image_size) != 2:
        raise _Invalid("data.image_size", f"expected [height, width], got {d.image_size}")
    if d.cache != "none" and d.source not in STREAMED_SOURCES:
        raise _Invalid("data.cache", f"only used with source image_folder or tfrecord (source {d.source} is in memory already)")
    if d.cache not in ("none", "memory") and Path(d.cache).exists() and not Path(d.cache).is_dir():
        raise _Invalid("data.cache", f"expected none, memory or a directory, got {d.cache} (a file)")
    if spec.model.input_shape is not None and len(spec.model.input_shape) not in (2, 3):
        raise _Invalid("model.input_shape", f"expected [height, width] or [height, width, channels], got {spec.model.input_shape}")
    p = spec.logging.profile_steps
    if p is not None and (len(p) != 2 or p[0] > p[1]):
        raise _Invalid("logging.profile_steps", f"expected [first, last] with first <= last, got {p}")
    if spec.distribute.devices and spec.distribute.strategy not in ("mirrored", "auto"):
        raise _Invalid("distribute.devices", f"only used with strategy mirrored, got strategy {spec.distribute.strategy}")
    if not spec.name or "/" in spec.name or spec.name.startswith("."):
        raise _Invalid("name", f"expected a plain name usable as a directory, got {_show(spec.name)}")


def _check_sweep(spec: JobSpec) -> JobSpec:
    """The ``sweep`` section's shape and keys (``sweeps.trials``: lists, distributions, bounds), its
    numbers read as YAML 1.2 reads them. Each trial's values are checked where a sweep is planned
    (``sweeps.plan``): that takes one validation per trial."""
    sweep = spec.sweep
    try:
        grid = sweep_trials.check_grid(sweep.grid)
        random = sweep.random
        if random is not None:
            sweep_trials.check_distributions(random.distributions, grid)
    except sweep_trials.SweepError as err:
        raise _Invalid(f"sweep.{err.path}", err.message) from None
    for path, key in [*((f"sweep.grid.{k}", k) for k in grid),
                      *((f"sweep.random.distributions.{k}", k) for k in (random.distributions if random else ()))]:
        problem = key_problem(key)
        if problem:
            raise _Invalid(path, problem)
    return dataclasses.replace(spec, sweep=dataclasses.replace(sweep, grid=grid))


def key_problem(key: str) -> Optional[str]:
    """Why ``key``, a key path as ``--set`` takes it, names no key of a job (None: it names one).

    A key below a mapping of free keys (``model.params.filters``) is checked with its value.

    >>> key_problem("train.learning_rate"), key_problem("train.schedule"), key_problem("model.params.alpha")
    (None, None, None)
    >>> key_problem("train.epochs.x")
    'train.epochs is a value, not a section of keys'
    """
    cls, parts = JobSpec, key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            where = f"in {'.'.join(parts[:i])}" if i else "at the top level"
            return f"not a job key; valid keys {where}: {', '.join(fields)}"
        hint = typing.get_type_hints(cls)[part]
        sections = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
        if sections:
            cls = sections[0]
        elif hint is dict or typing.get_origin(hint) is dict:
            return None
        elif i < len(parts) - 1:
            return f"{'.'.join(parts[:i + 1])} is a value, not a section of keys"
    return None


def _resolve_precision(spec: JobSpec, raw: dict) -> JobSpec:
    """``distribute.mixed_precision: true`` (the old key) as ``train.precision: mixed_float16``, with
    a one-line notice; the resolved spec (and so the run dir's ``job.yaml``) holds the new key only.

    Raises:
        _Invalid: both keys given and they disagree.
    """
    if not spec.distribute.mixed_precision:
        return spec
    train = raw.get("train")
    given = train.get("precision") if isinstance(train, dict) else None
    if given is not None and spec.train.precision != "mixed_float16":
        raise _Invalid("distribute.mixed_precision", f"true means train.precision mixed_float16, but train.precision "
                                                     f"is {spec.train.precision}; set only train.precision")
    log.warning("distribute.mixed_precision: true is deprecated; it is train.precision: mixed_float16, the key to use")
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, precision="mixed_float16"),
                               distribute=dataclasses.replace(spec.distribute, mixed_precision=False))


def parse_override(text: str) -> tuple[str, Any]:
    """Splits ``key.path=value``; the value is read as YAML, so ``3`` is an int and ``[1, 2]`` a list."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise UsageError(f"--set {text}: expected key.path=value, e.g. --set train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply_override(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise UsageError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = value


def spec_from_dict(raw: Any, *, source: str = "(job)", overrides: Sequence[str] = (),
                   base_dir: str | os.PathLike | None = None) -> JobSpec:
    """Validates a job given as a mapping (as read from YAML) plus ``--set`` overrides.

    Args:
        raw: The parsed YAML document.
        source: How the job is named in error messages, usually its file path.
        overrides: ``key.path=value`` strings, applied in order after the file.
        base_dir: where relative file references (``model.name: my_model.py:build``) are found:
            the job file's directory (default: the current directory).

    Returns:
        The frozen, fully-defaulted ``JobSpec``.

    Raises:
        UsageError: one line, ``SOURCE: key.path: what was expected, got what``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a mapping of keys at the top level, got {_show(raw)}")
    raw = _deepcopy(raw)
    parsed = [parse_override(text) for text in overrides]
    _drop_params_of_the_replaced_model(raw, parsed)
    _drop_data_keys_of_the_replaced_source(raw, parsed)
    overridden = []
    for key, value in parsed:
        _apply_override(raw, key, value)
        overridden.append(key)
    try:
        spec = _check_model_params(_check_references(_build(JobSpec, raw, ""), Path(base_dir or ".")))
        spec = _resolve_precision(spec, raw)
        _check_cross_fields(spec)
        spec = _check_sweep(spec)
    except _Invalid as err:
        flag = next((k for k in overridden if err.path == k or err.path.startswith(k + ".")
                     or k.startswith(err.path + ".")), None)
        if flag:
            raise UsageError(f"--set {err.path}: {err.message}") from None
        raise UsageError(f"{source}: {err.path}: {err.message}") from None
    return spec


def _drop_params_of_the_replaced_model(raw: dict, parsed: Sequence[tuple[str, Any]]) -> None:
    """``--set model.name=OTHER`` (a course model) drops the job file's ``model.params`` that OTHER
    does not take, with a one-line notice, so a course job tries another model in one flag.

    The file's params were written for its own model; params given with ``--set`` are the user's
    intent and stay (an unknown one is still an error). For a model of the user's, nothing is
    dropped: its signature is only known once its module is imported (``user_code.check_spec``).
    """
    names = [value for key, value in parsed if key == "model.name"]
    model = raw.get("model")
    if not names or not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        return
    new, old = names[-1], model.get("name", ModelSpec.name)
    if new == old or not isinstance(new, str) or new not in MODELS or any(k == "model.params" for k, _ in parsed):
        return
    given = {key.split(".")[2] for key, _ in parsed if key.startswith("model.params.")}
    allowed = model_params(new)
    dropped = {k: v for k, v in model["params"].items() if k not in allowed and k not in given}
    if dropped:
        model["params"] = {k: v for k, v in model["params"].items() if k not in dropped}
        log.warning("--set model.name=%s: dropped the job's model.params %s (written for %s); %s takes %s", new,
                    ", ".join(f"{k}={v!r}" for k, v in dropped.items()), old, new, ", ".join(allowed) or "none")


def _data_keys_rejected_by(source: str) -> tuple[str, ...]:
    """The ``data`` keys that ``_check_cross_fields`` rejects, when set, for ``source``."""
    if source == "tfrecord":
        return ("limit",)
    return () if source in STREAMED_SOURCES else ("path", "cache")


def _drop_data_keys_of_the_replaced_source(raw: dict, parsed: Sequence[tuple[str, Any]]) -> None:
    """``--set data.source=OTHER`` drops the job file's ``data`` keys OTHER rejects (an image
    folder's ``path`` and ``cache`` for ``digits``), with a one-line notice, as ``--set model.name``
    drops the old model's params: switching a job's data takes one flag, not also
    ``--set data.path=null``.

    Keys given with ``--set`` are the user's intent and stay (and are still checked); so does a
    key the new source takes too (``path`` from image_folder to tfrecord must name shards: the
    check says so). An unknown source drops nothing: its own error is the one to show.
    """
    sources = [value for key, value in parsed if key == "data.source"]
    data = raw.get("data")
    if not sources or not isinstance(data, dict) or any(key == "data" for key, _ in parsed):
        return
    new, old = sources[-1], data.get("source", DataSpec.source)
    if new == old or not isinstance(new, str) or (new not in DATA_SOURCES and not user_code.is_reference(new)):
        return
    unset = {f.name: f.default for f in dataclasses.fields(DataSpec) if f.default is not dataclasses.MISSING}
    given = {key for key, _ in parsed}
    dropped = {k: data[k] for k in _data_keys_rejected_by(new)
               if k in data and data[k] != unset[k] and f"data.{k}" not in given}
    if dropped:
        for key in dropped:
            del data[key]
        log.warning("--set data.source=%s: dropped the job's %s (written for %s); %s does not take %s", new,
                    ", ".join(f"data.{k}={v!r}" for k, v in dropped.items()), old, new,
                    ", ".join(f"data.{k}" for k in dropped))


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def load_spec(path: str | os.PathLike, overrides: Sequence[str] = ()) -> JobSpec:
    """Reads and validates a job file.

    Example:
        >>> spec = load_spec("jobs/quickstart.yaml", ["train.epochs=2"])  # doctest: +SKIP
    """
    path = Path(path)
    return spec_from_dict(read_job(path), source=str(path), overrides=overrides, base_dir=path.parent)


def read_job(path: Path) -> Any:
    """A job file's YAML document, unvalidated (``UsageError`` for a missing or unreadable file)."""
    if not path.is_file():
        raise UsageError(f"{path}: no such job file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise UsageError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file") from None


def spec_to_dict(spec: JobSpec) -> dict:
    """The resolved spec as plain data, every default filled in (what is saved as ``job.yaml``)."""
    return dataclasses.asdict(spec)


def dump_spec(spec: JobSpec) -> str:
    """The resolved spec as YAML text that ``load_spec`` reads back to an equal spec (a job without
    a sweep has no ``sweep`` section: its defaults, which every run dir's ``job.yaml`` would carry)."""
    raw = spec_to_dict(spec)
    if not spec.sweep.defined and spec.sweep == SweepSpec():
        raw.pop("sweep", None)
    return yaml.safe_dump(raw, sort_keys=False)


def reference(cls: type = JobSpec, prefix: str = "") -> list[tuple[str, str, str]]:
    """Rows (key path, default, description) of every key, for ``docs/job-spec.md`` and ``--help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint) or inner:
            rows.extend(reference(hint if dataclasses.is_dataclass(hint) else inner[0], path + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meta = dict(f.metadata)
        doc = meta.get("doc", "")
        if meta.get("choices"):
            doc = (doc + "; " if doc else "") + "one of " + ", ".join(map(str, meta["choices"]))
        rows.append((path, yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n..."), doc))
    return rows
