"""``distrain bench JOB.yaml``: how fast a job trains here, and how well it scales.

Runs the job's model on synthetic data of the job's shape (no dataset is read or downloaded) for
a fixed number of steps, through ``distrain.run.train`` under whatever launcher started this
process (alone, ``srun``, ``TF_CONFIG`` workers, ``horovodrun``), and prints images/s per replica
and in total, the step time, and the scaling efficiency against a 1-replica baseline:

    distrain bench jobs/cnn.yaml                                  one process (its own baseline)
    TF_CONFIG=... distrain bench jobs/cnn.yaml --run-dir DIR      each of N workers (same command)
    horovodrun -np 2 -H localhost:2 --gloo distrain bench jobs/cnn.yaml
    srun distrain bench jobs/cnn.yaml --json                      on N nodes (see docs/bench.md)

The baseline (``--baseline auto``): when the run has more than one replica, every worker first
runs the same job as a single replica in a child process with the launcher's variables removed,
at the same time as the other workers run theirs. The baseline therefore sees the same host
contention (and the same core pinning, which a child inherits) as the distributed run, and
``efficiency = images/s / (replicas x baseline images/s per replica)`` isolates synchronisation
and communication. The step time is split into compute (the baseline's step time: same
per-replica batch, same process) and communication + waiting (the rest).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from distrain import run, startup
from distrain.context import image_channels
from distrain.errors import UsageError, signal_death
from distrain.models import MODELS
from distrain.tf_startup import import_tensorflow

# Shapes and class counts of the built-in sources, so a bench needs neither the data nor TensorFlow.
SOURCE_SHAPES = {
    "digits": ((8, 8, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
}
# Synthetic images held in memory per worker at most; more steps cycle over them (epochs).
DATA_BUDGET_BYTES = 256 << 20
MIN_STEPS_PER_EPOCH = 8  # so that several GPUs per worker (unknown before TensorFlow) still fit
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "HOROVOD_", "MPI_LOCAL")
LAUNCHER_VARIABLES = ("TF_CONFIG", "DISTRAIN_RUN_ID", "DISTRAIN_PORT")


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One replica's speed on this job: images/s and median step time (seconds)."""

    images_per_s: float
    step_time_s: Optional[float]
    source: str  # measured | given | self


def data_shape(spec) -> tuple[tuple[int, ...], int]:
    """The shape of one example of the job's data and its class count, without loading it.

    Raises:
        UsageError: an image folder that cannot be listed and no ``model.num_classes``.
    """

    data = spec.data
    if data.source == "synthetic":
        shape, classes = tuple(data.synthetic.shape), data.synthetic.classes
        shape = shape if len(shape) == 3 else (*shape, 1)
    elif data.source == "image_folder":
        entry = MODELS.get(spec.model.name)
        shape = (*data.image_size, image_channels(spec, entry.default_input_shape if entry else None))
        classes = spec.model.num_classes or _folder_classes(data.path)
    else:
        shape, classes = SOURCE_SHAPES[data.source]
    return tuple(int(d) for d in shape), int(spec.model.num_classes or classes)


def _folder_classes(path: Optional[str]) -> int:
    try:
        classes = [p for p in Path(path or "").iterdir() if p.is_dir()]
    except OSError:
        classes = []
    if len(classes) < 2:
        raise UsageError(f"data.path: {path}: no class folders to count; set model.num_classes for distrain bench")
    return len(classes)


def replicas_guess(spec, world) -> int:
    """Replicas the run will most likely have, before TensorFlow counts the devices."""
    if spec.distribute.strategy == "horovod" or world.launcher in ("horovod", "mpi"):
        return world.world_size
    per_worker = max(1, len(world.gpus), spec.distribute.cpu_devices if spec.distribute.strategy in
                     ("auto", "mirrored") else 1)
    return world.world_size * per_worker


def bench_layout(steps: int, warmup: int, global_batch: int, example_bytes: int) -> tuple[int, int]:
    """(steps per epoch, epochs) that run at least ``warmup + steps`` steps on at most
    ``DATA_BUDGET_BYTES`` of synthetic images.

    >>> bench_layout(50, 10, 64, 784)
    (60, 1)
    """
    wanted = warmup + steps
    fit = max(1, DATA_BUDGET_BYTES // max(1, global_batch * example_bytes))
    per_epoch = max(MIN_STEPS_PER_EPOCH, min(wanted, fit))
    return per_epoch, math.ceil(wanted / per_epoch)


def bench_spec(spec, *, steps: int, warmup: int, replicas: int):
    """The job turned into a benchmark: synthetic data of its shape, a fixed number of steps, no
    validation, checkpoints or TensorBoard. Model, batch, optimizer, augmentation, strategy and
    precision stay as the job has them, since they are what is being measured."""
    shape, classes = data_shape(spec)
    d = spec.data
    global_batch = d.batch_size_per_replica * replicas
    per_epoch, epochs = bench_layout(steps, warmup, global_batch, math.prod(shape))
    test = global_batch  # one evaluation step: run.train always evaluates at the end
    examples = per_epoch * global_batch + test
    data = dataclasses.replace(
        d, source="synthetic", path=None, validation_split=0.0, test_split=test / examples, limit=None,
        cache_dir=None, synthetic=dataclasses.replace(d.synthetic, shape=list(shape), classes=classes,
                                                     examples=examples))
    train = dataclasses.replace(spec.train, epochs=epochs, steps_per_epoch=per_epoch, early_stopping=None)
    checkpoint = dataclasses.replace(spec.checkpoint, every_epochs=0, every_steps=0, save_best=False,
                                     backup_every_steps=0)
    # No step lines either: reading the step's loss every N steps would wait for the step in the timing.
    logging_ = dataclasses.replace(spec.logging, tensorboard=False, verbose=0, profile_steps=None,
                                   update_every_steps=0)
    return dataclasses.replace(spec, data=data, train=train, checkpoint=checkpoint, logging=logging_)


def parse_baseline(value: str) -> Optional[Baseline] | str:
    """``--baseline``: ``auto``, ``none``, images/s of one replica, or an earlier ``--json`` output.

    Returns:
        "auto", None (no baseline) or a ``Baseline``.

    Raises:
        UsageError: anything else.
    """
    if value in ("auto", "none"):
        return None if value == "none" else "auto"
    try:
        rate = float(value)
    except ValueError:
        rate = None
    if rate is not None:
        if not rate > 0 or math.isinf(rate):
            raise UsageError(f"--baseline: expected images/s of one replica > 0, got {value}")
        return Baseline(rate, None, "given")
    try:
        result = json.loads(Path(value).read_text())
        return Baseline(float(result["images_per_s_per_replica"]), result["step_time_s"]["median"], "given")
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--baseline: expected auto, none, images/s of one replica, or a file written by "
                         f"distrain bench --json; got {value!r}") from None


class StepTimer:
    """Keras callback factory: the wall time of every training step (global step, seconds).

    A step's time runs from the previous step's end, so it includes the input pipeline and every
    callback of the run; the first step of an epoch is timed from its own start instead, so epoch
    boundaries (history files, iterator set-up) are not counted as step time.
    """

    def __new__(cls):

        tf = import_tensorflow()

        class _StepTimer(tf.keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                # Logs stay tensors: the timer must not make Keras wait for each step's numbers.
                self._supports_tf_logs = True
                self.times: list[float] = []
                self._last: Optional[float] = None

            def on_epoch_begin(self, epoch, logs=None):
                self._last = None

            def on_train_batch_begin(self, batch, logs=None):
                self._first_batch = batch
                if self._last is None:
                    self._last = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                now = time.perf_counter()
                # A call of several steps (train.steps_per_execution): each gets the call's mean.
                steps = batch - self._first_batch + 1
                self.times.extend([(now - self._last) / steps] * steps)
                self._last = now

        return _StepTimer()


def summarize(step_times: Sequence[float], *, warmup: int, global_batch: int, replicas: int,
              baseline: Optional[Baseline]) -> dict:
    """Rates, the step-time split and the efficiency from the timed steps (pure arithmetic).

    Raises:
        RuntimeError: no step after the warm-up was timed.
    """
    timed = list(step_times[warmup:])
    if not timed:
        raise RuntimeError(f"distrain bench: {len(step_times)} steps ran, none after the {warmup} warm-up steps")
    total = global_batch * len(timed) / sum(timed)
    median = statistics.median(timed)
    out = {
        "steps": len(timed), "warmup_steps": warmup,
        "step_time_s": {"median": median, "mean": sum(timed) / len(timed),
                        "min": min(timed), "max": max(timed)},
        "images_per_s": total, "images_per_s_per_replica": total / replicas,
        "compute_s_per_step": None, "communication_s_per_step": None, "efficiency": None, "baseline": None,
    }
    if baseline is not None:
        out["efficiency"] = total / (replicas * baseline.images_per_s)
        out["baseline"] = dataclasses.asdict(baseline)
        if baseline.step_time_s is not None:
            # What one replica alone needs per step is compute (and input); the rest of a
            # distributed step is all-reduce plus waiting for the slowest worker.
            out["compute_s_per_step"] = baseline.step_time_s
            out["communication_s_per_step"] = max(0.0, median - baseline.step_time_s)
    return out


def baseline_command(job: str, overrides: Sequence[str], steps: int, warmup: int) -> list[str]:
    """The child process that measures one replica of the job."""
    return [sys.executable, "-m", "distrain.cli", "bench", job, *(f"--set={o}" for o in overrides),
            "--set=distribute.strategy=one_device", "--set=distribute.cpu_devices=0", "--steps", str(steps),
            "--warmup", str(warmup), "--baseline", "none", "--json"]


def single_process_env(env=os.environ) -> dict:
    """This process's environment without any launcher's variables, and one GPU at most."""
    out = {k: v for k, v in env.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_VARIABLES}
    gpus = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip() and g.strip() != "-1"]
    if gpus:
        out["CUDA_VISIBLE_DEVICES"] = gpus[0]
    return out


def last_json(text: str) -> dict:
    """The last JSON object printed in ``text`` (``--json`` prints it as the output's last lines)."""
    start = text.rfind("\n{") + 1
    try:
        return json.loads(text[start:])
    except ValueError:
        raise RuntimeError(f"distrain bench: no JSON result in the baseline's output: {text[-500:]!r}") from None


def measure_baseline(job: str, overrides: Sequence[str], steps: int, warmup: int, timeout: float) -> Baseline:
    """Runs one replica of the job in a child process and returns its speed."""
    cmd = baseline_command(job, overrides, steps, warmup)
    try:
        done = subprocess.run(cmd, env=single_process_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"distrain bench: the 1-replica baseline did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        died = signal_death("the 1-replica baseline", done.returncode)
        raise RuntimeError(f"distrain bench: {died or f'the 1-replica baseline failed (exit {done.returncode})'}:\n"
                           + done.stderr[-2000:])
    result = last_json(done.stdout)
    return Baseline(result["images_per_s_per_replica"], result["step_time_s"]["median"], "measured")


def run_bench(spec, *, steps: int, warmup: int, baseline: Optional[Baseline] | str, world,
              run_dir: Optional[Path] = None, baseline_fn=None) -> dict:
    """Benchmarks ``spec`` in this process, as one worker of ``world``.

    Args:
        spec: the validated job (not yet turned into a benchmark).
        steps: timed steps, after ``warmup`` untimed ones.
        baseline: "auto" (``baseline_fn`` measures one replica when the run has several),
            None, or a given ``Baseline``.
        world: this process's place (``startup.start``).
        run_dir: where the run writes (default: a temporary directory, removed afterwards).
        baseline_fn: returns the measured ``Baseline`` (called before TensorFlow starts here).

    Returns:
        The result (see ``summarize``), plus the job, model, world and batch arithmetic.
    """
    guess = replicas_guess(spec, world)
    if baseline == "auto":
        baseline = baseline_fn() if guess > 1 and baseline_fn else None
    job = bench_spec(spec, steps=steps, warmup=warmup, replicas=guess)

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="distrain-bench-") as tmp:
        summary = run.train(job, Path(run_dir or tmp), world=world, extra_callbacks=[timer])
    replicas, global_batch = summary["replicas"], summary["global_batch"]
    if baseline is None and replicas == 1 and world.world_size == 1:
        baseline = Baseline(0.0, None, "self")  # filled in below: a single replica is its own baseline
    shape, classes = data_shape(spec)
    out = {"job": spec.name, "model": spec.model.name, "input_shape": list(shape), "num_classes": classes,
           "launcher": world.launcher, "strategy": summary["strategy"], "workers": world.world_size,
           "replicas": replicas, "per_replica_batch": spec.data.batch_size_per_replica,
           "global_batch": global_batch, "precision": summary["precision"],
           "jit_compile": summary["jit_compile"]}
    if baseline is not None and baseline.source == "self":
        result = summarize(timer.times, warmup=warmup, global_batch=global_batch, replicas=replicas, baseline=None)
        baseline = Baseline(result["images_per_s_per_replica"], result["step_time_s"]["median"], "self")
    out.update(summarize(timer.times, warmup=warmup, global_batch=global_batch, replicas=replicas,
                         baseline=baseline))
    return out


def format_result(r: dict) -> str:
    """The result as a few aligned lines for a terminal."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    st = r["step_time_s"]
    lines = [
        f"job {r['job']}: model {r['model']}, input {'x'.join(map(str, r['input_shape']))}, "
        f"{r['num_classes']} classes, synthetic data",
        f"{r['launcher']} launcher, strategy {r['strategy']}: {r['workers']} worker(s), {r['replicas']} replica(s), "
        f"global batch {r['global_batch']} = {r['per_replica_batch']} x {r['replicas']}",
        f"precision {r['precision']}{', XLA' if r['jit_compile'] else ''}; "
        f"{r['steps']} timed steps after {r['warmup_steps']} warm-up steps",
        f"  images/s total        {r['images_per_s']:10.1f}",
        f"  images/s per replica  {r['images_per_s_per_replica']:10.1f}",
        f"  step time (median)    {st['median'] * 1e3:10.2f} ms   (min {st['min'] * 1e3:.2f}, max {st['max'] * 1e3:.2f})",
        f"    compute             {num(r['compute_s_per_step'] and r['compute_s_per_step'] * 1e3, '10.2f')} ms"
        "   (the 1-replica baseline's step time)",
        f"    communication+wait  {num(r['communication_s_per_step'] and r['communication_s_per_step'] * 1e3, '10.2f')} ms",
    ]
    b = r["baseline"]
    if b:
        lines.append(f"  baseline ({b['source']})   {b['images_per_s']:10.1f} images/s for 1 replica")
    lines.append(f"  scaling efficiency    {num(r['efficiency'], '10.3f')}"
                 + ("" if b else "   (no baseline: --baseline auto with several replicas, or a given one)"))
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    """Registers ``distrain bench``."""
    p = subparsers.add_parser(
        "bench", help="images/s and scaling efficiency of a job on synthetic data of its shape",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="the job's YAML file (see jobs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the job (repeatable)")
    p.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first: tracing, warm-up (default 10)")
    p.add_argument("--baseline", default="auto", metavar="auto|none|IMAGES_PER_S|FILE.json",
                   help="1-replica baseline: measured first (auto), none, or given as images/s of one replica "
                        "or as a file written by distrain bench --json")
    p.add_argument("--baseline-timeout", type=float, default=1800, help="seconds (default 1800)")
    p.add_argument("--run-dir", type=Path, help="where the run writes (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (chief only)")
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args) -> int:
    """``distrain bench``: checks every input, then benchmarks; the chief prints the result."""

    if args.steps < 1:
        raise UsageError(f"--steps: expected a positive integer, got {args.steps}")
    if args.warmup < 0:
        raise UsageError(f"--warmup: expected a non-negative integer, got {args.warmup}")
    baseline = parse_baseline(args.baseline)
    # The user's code and the world are checked, and the run dir located, before the baseline or
    # any peer starts.
    begun = startup.start(args.job, args.overrides, purpose="bench", run_dir=args.run_dir)
    spec, world = begun.spec, begun.world
    data_shape(spec)  # an image folder without classes fails here, before anything starts

    def measure() -> Baseline:
        return measure_baseline(args.job, args.overrides, args.steps, args.warmup, args.baseline_timeout)

    result = run_bench(spec, steps=args.steps, warmup=args.warmup, baseline=baseline, world=world,
                       run_dir=begun.run_dir, baseline_fn=measure)
    if world.is_chief:
        print(json.dumps(result, indent=1) if args.json else format_result(result), flush=True)
    return 0


def result_keys() -> tuple[str, ...]:
    """The top-level keys of ``--json`` (documented in docs/bench.md, checked by the tests)."""
    return ("job", "model", "input_shape", "num_classes", "launcher", "strategy", "workers", "replicas",
            "per_replica_batch", "global_batch", "precision", "jit_compile", "steps", "warmup_steps", "step_time_s",
            "images_per_s", "images_per_s_per_replica", "compute_s_per_step", "communication_s_per_step",
            "efficiency", "baseline")
