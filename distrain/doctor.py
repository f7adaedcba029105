"""``distrain doctor``: what this node gives distrain, whether N devices train the numbers of one in
each precision, and how fast each precision trains here.

    distrain doctor                      the table (about 20 s on 2 CPU cores)
    distrain doctor --json               one JSON object
    distrain doctor --steps 100          more timed steps: steadier speeds
    sbatch --nodes=4 slurm/doctor.sh     every node of an allocation (docs/doctor.md)

Three parts, in one process:

- the machine: TensorFlow and tf-keras, the GPUs TensorFlow sees, the CUDA and cuDNN versions
  TensorFlow was built with, memory growth, NCCL, the CPUs;
- equivalence: a tiny model trained a few steps under ``MirroredStrategy`` over every local GPU
  (no GPU: over 2 logical CPU devices) and on one device, same global batch, for float32,
  mixed_float16 and mixed_bfloat16: the largest relative difference of a weight tensor against
  a tolerance per precision (``TOLERANCE``, how it was chosen is written there);
- speed: images/s of a course model's training loop on one device for each precision and for
  float32 with XLA (``jit_compile=True``), and each one's ratio to float32.

Exit codes: 0 when every check passed, or when no GPU is visible (the CPU part is information: a
failed CPU check is printed, not an error, unless ``--require-gpu``); 1 when a GPU is visible and
a check failed (or no GPU is visible under ``--require-gpu``), with one line naming the check;
2 for a bad flag.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Iterator, Optional, Sequence

from distrain.backends.factory import precision_policy
from distrain.errors import EXIT_FAILED, EXIT_OK, UsageError
from distrain.models import MODELS, build_model
from distrain.tf_startup import import_tensorflow

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# The largest relative (L2) difference of a weight tensor between N replicas and one device after
# EQUIVALENCE_STEPS steps. Chosen from measurements, not from a bound: on the 2-core CPU VM, over 14
# seeds, the largest differences were 7e-8 (float32), 4e-3 (mixed_float16: CPU sums of float16
# accumulate in float16 itself) and 5e-3 (mixed_bfloat16); each tolerance is 2x or more above that.
# In those steps every weight tensor moves by 5-7 % of its norm (the "weights moved" column), so a
# mistake in the replicas' sum (a missing average, a doubled gradient, replicas out of step), which
# changes the weights by the order of one update, lands 5x above every tolerance. float32 keeps the
# 1e-5 of the test suite (README.md).
TOLERANCE = {"float32": 1e-5, "mixed_float16": 1e-2, "mixed_bfloat16": 1e-2}
# float32 on a GPU with TensorFloat-32 (compute capability 8.0 and up, on by default in TensorFlow)
# multiplies with float16's 10-bit mantissa: it gets float16's tolerance.
TF32_CAPABILITY = (8, 0)

EQUIVALENCE_SHAPE, EQUIVALENCE_CLASSES = (8, 8, 1), 10
EQUIVALENCE_STEPS, EQUIVALENCE_BATCH_PER_REPLICA, EQUIVALENCE_LR, SEED = 4, 8, 0.1, 0
CPU_DEVICES = 2  # logical CPU devices the equivalence runs on without a GPU

# Speed: (row name, precision, jit_compile); the first row is the one the others are divided by.
SPEED_RUNS = (("float32", "float32", False), ("mixed_float16", "mixed_float16", False),
              ("mixed_bfloat16", "mixed_bfloat16", False), ("float32 + XLA", "float32", True))
SPEED_MODEL = {"cpu": "cnn", "gpu": "mobilenet_v2"}  # the CNN keeps the CPU run near a minute
SPEED_BATCH = {"cpu": 64, "gpu": 128}
DEFAULT_STEPS, DEFAULT_WARMUP = 30, 5

NO_GPU = ("no GPU visible to TensorFlow: the CPU part ran (equivalence on {n} logical CPU devices); its speeds "
          "say nothing about GPUs")
CPU_SPEED_NOTE = ("CPU figures: they say nothing about a GPU (mixed_float16 is slower than float32 on most CPUs: "
                  "tensorflow#45441; mixed_bfloat16 is fast only with bfloat16 instructions, AVX512_BF16 or AMX)")


# ----------------------------------------------------------------------------- pure pieces

def tolerance(precision: str, tf32: bool = False) -> float:
    """The equivalence tolerance of ``precision``; float32 under TensorFloat-32 gets float16's.

    Example:
        >>> tolerance("float32"), tolerance("float32", tf32=True), tolerance("mixed_bfloat16")
        (1e-05, 0.01, 0.01)
    """
    if precision == "float32" and tf32:
        return TOLERANCE["mixed_float16"]
    return TOLERANCE[precision]


def within(difference: Optional[float], limit: float) -> bool:
    """Whether a measured difference passes: a finite number at most ``limit`` (NaN and None fail)."""
    return difference is not None and math.isfinite(difference) and difference <= limit


def relative_difference(weights: Sequence, reference: Sequence) -> float:
    """The largest relative L2 difference of a tensor of ``weights`` from its ``reference``
    (the measure of tests/conftest.py's ``assert_same_weights``).

    Example:
        >>> relative_difference([[3.0, 4.0]], [[3.0, 4.5]]) < relative_difference([[3.0, 4.0]], [[3.0, 5.0]])
        True
    """
    import numpy as np

    worst = 0.0
    for a, b in zip(weights, reference, strict=True):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)))
    return worst


def failed_checks(report: dict) -> list[str]:
    """One short description per failed check of a report (empty: everything passed)."""
    failed = []
    nccl = report["machine"]["nccl"]
    if nccl.startswith("failed"):
        failed.append(f"NCCL {nccl}")
    for row in report["equivalence"]["rows"]:
        if row["error"]:
            failed.append(f"equivalence {row['precision']}: {row['error']}")
        elif not row["passed"]:
            failed.append(f"equivalence {row['precision']}: max relative difference "
                          f"{row['max_relative_difference']:.1e} > tolerance {row['tolerance']:.0e}")
    failed += [f"speed {row['name']}: {row['error']}" for row in report["speed"]["rows"] if row["error"]]
    return failed


def decide(gpu_visible: bool, failed: Sequence[str], require_gpu: bool = False) -> tuple[int, Optional[str]]:
    """The exit code and the one line that explains a non-zero one (or a CPU check that failed).

    Example:
        >>> decide(True, ["equivalence mixed_float16: ..."])
        (1, 'failed: equivalence mixed_float16: ...')
        >>> decide(False, [])
        (0, None)
    """
    if gpu_visible:
        return (EXIT_FAILED, "failed: " + "; ".join(failed)) if failed else (EXIT_OK, None)
    if require_gpu:
        return EXIT_FAILED, "failed: no GPU visible to TensorFlow, and --require-gpu was given"
    if failed:
        return EXIT_OK, "a CPU check failed (not an error without a GPU): " + "; ".join(failed)
    return EXIT_OK, None


def _numeric(cell: str) -> bool:
    try:
        float(cell.rstrip("x%").replace(",", ""))
    except ValueError:
        return False
    return True


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], indent: int = 2) -> str:
    """Plain-text columns: numbers right-aligned, text left-aligned, two spaces between columns.

    Example:
        >>> print(format_table(["precision", "images/s"], [["float32", "1234.5"], ["mixed_float16", "98.0"]]))
          precision      images/s
          float32          1234.5
          mixed_float16      98.0
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    right = [all(_numeric(row[i]) or row[i] in ("-", "") for row in cells[1:]) and len(cells) > 1
             for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append((" " * indent + "  ".join(parts)).rstrip())
    return "\n".join(lines)


def _number(value: Optional[float], spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def format_report(report: dict) -> str:
    """The report as the table ``distrain doctor`` prints."""
    m, eq, sp = report["machine"], report["equivalence"], report["speed"]
    gpus = "; ".join(f"{g['name']} (compute capability {g['compute_capability'] or '?'})" for g in m["gpus"])
    out = [f"distrain doctor on {report['host']}"]
    if report["notice"]:
        out.append(report["notice"])
    out += ["", "machine", format_table(["item", "value"], [
        ["TensorFlow", m["tensorflow"]], ["tf-keras", m["tf_keras"]], ["GPUs", f"{len(m['gpus'])}: {gpus}" if gpus
                                                                         else "none"],
        ["CUDA_VISIBLE_DEVICES", m["cuda_visible_devices"]], ["CUDA (built with)", m["cuda"]],
        ["cuDNN (built with)", m["cudnn"]], ["memory growth", m["memory_growth"]],
        ["TensorFloat-32", m["tf32"]], ["NCCL", m["nccl"]], ["CPUs", m["cpus"]]])]
    out += ["", f"equivalence: {eq['replicas']} replicas ({eq['devices']}) against 1 device, global batch "
            f"{eq['global_batch']}, {eq['steps']} SGD steps", format_table(
                ["precision", "max rel. diff", "tolerance", "weights moved", "result"],
                [[r["precision"], _number(r["max_relative_difference"], ".1e"), f"{r['tolerance']:.0e}",
                  _number(r["weights_moved"], ".1%"), "pass" if r["passed"] else "FAIL: " + (r["error"] or "over")]
                 for r in eq["rows"]])]
    out += ["", f"speed: {sp['model']} {'x'.join(map(str, sp['input_shape']))}, batch {sp['batch']}, "
            f"{sp['steps']} steps after {sp['warmup']} warm-up, on {sp['device']}", format_table(
                ["run", "images/s", "vs float32"],
                [[r["name"], _number(r["images_per_s"], ".1f"), _number(r["vs_float32"], ".2f") + "x"
                  if r["vs_float32"] is not None else "ERROR: " + (r["error"] or "-")] for r in sp["rows"]])]
    if sp["note"]:
        out.append(sp["note"])
    return "\n".join(out)


# ----------------------------------------------------------------------------- TensorFlow

def configure_devices(tf) -> list:
    """The GPUs, with memory growth on (as distrain trains: ``distribute.memory_growth``); without a
    GPU the CPU split into ``CPU_DEVICES`` logical devices. Before any op: device configuration is
    fixed at TensorFlow's first op, which is why the doctor calls this first."""
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if not gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * CPU_DEVICES)
    return gpus


def _capability(details: dict) -> Optional[tuple[int, int]]:
    cc = details.get("compute_capability")
    return tuple(cc) if cc else None


def machine(tf, gpus: list) -> dict:
    """The machine's part of the report (no op runs: safe before the device checks)."""
    build = dict(tf.sysconfig.get_build_info())
    listed = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        cc = _capability(details)
        listed.append({"device": gpu.name, "name": details.get("device_name", gpu.name),
                       "compute_capability": ".".join(map(str, cc)) if cc else None})
    growth = {tf.config.experimental.get_memory_growth(g) for g in gpus}
    tf32 = bool(gpus) and tf.config.experimental.tensor_float_32_execution_enabled() and any(
        (_capability(tf.config.experimental.get_device_details(g)) or (0, 0)) >= TF32_CAPABILITY for g in gpus)
    try:
        tf_keras = importlib.metadata.version("tf-keras")
    except importlib.metadata.PackageNotFoundError:
        tf_keras = "not installed"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"tensorflow": tf.__version__, "tf_keras": tf_keras, "gpus": listed,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
            "cuda": build.get("cuda_version", "none") if build.get("is_cuda_build") else "none (not a CUDA build)",
            "cudnn": build.get("cudnn_version", "none") if build.get("is_cuda_build") else "none",
            "memory_growth": "no GPU" if not gpus else "on" if growth == {True} else "off" if growth == {False}
            else "on for some GPUs only",
            "tf32": "no GPU" if not gpus else "on (float32 convolutions and matmuls in TF32)" if tf32 else "off",
            "tf32_on": tf32, "nccl": nccl(tf, gpus, build),
            "cpus": f"{usable} usable of {os.cpu_count()}"}


def nccl(tf, gpus: list, build: dict) -> str:
    """What can be said of NCCL here: an all-reduce over every GPU with ``NcclAllReduce`` when there
    are several (TensorFlow's build info does not name NCCL); starts with "failed" when it fails."""
    if not gpus:
        return "not checked: no GPU (NCCL runs between GPUs)"
    if not build.get("is_cuda_build"):
        return "no: TensorFlow was built without CUDA"
    if len(gpus) < 2:
        return "not checked: one GPU, nothing to all-reduce"
    try:
        strategy = tf.distribute.MirroredStrategy(cross_device_ops=tf.distribute.NcclAllReduce())
        ones = strategy.run(lambda: tf.constant(1.0))
        total = float(strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None))
    except Exception as err:  # noqa: BLE001  (any failure is the finding)
        return f"failed: {_one_line(err)}"
    if total != len(gpus):
        return f"failed: an NCCL all-reduce of 1 over {len(gpus)} GPUs gave {total}"
    return f"works: an all-reduce over {len(gpus)} GPUs (NcclAllReduce)"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _tiny_model(tf):
    # No bias vectors: a bias starts at zero, and its relative difference after a few steps would
    # divide by a norm near zero. The output in float32, as mixed precision wants it.
    layers = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input(EQUIVALENCE_SHAPE), layers.Conv2D(4, 3, activation="relu", use_bias=False), layers.Flatten(),
        layers.Dense(EQUIVALENCE_CLASSES, use_bias=False), layers.Activation("softmax", dtype="float32")])


def _train_tiny(tf, strategy, precision: str, initial: list, data) -> list:
    with precision_policy(precision):
        with strategy.scope():
            model = _tiny_model(tf)
            model.set_weights(initial)
            # mixed_float16: compile wraps the optimizer in a dynamic LossScaleOptimizer.
            model.compile(tf.keras.optimizers.SGD(EQUIVALENCE_LR), "sparse_categorical_crossentropy")
        model.fit(data, epochs=1, verbose=0)
    return model.get_weights()


def equivalence(tf, gpus: list, tf32: bool = False) -> dict:
    """The equivalence part: ``MirroredStrategy`` over every GPU (no GPU: the logical CPUs) against
    one device, for each precision, from the same initial weights on the same batches."""
    import numpy as np

    devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
    global_batch = EQUIVALENCE_BATCH_PER_REPLICA * len(devices)
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(EQUIVALENCE_STEPS * global_batch, *EQUIVALENCE_SHAPE)).astype("float32")
    y = rng.integers(0, EQUIVALENCE_CLASSES, size=len(x))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
    tf.keras.utils.set_random_seed(SEED)
    initial = _tiny_model(tf).get_weights()
    rows = []
    for precision in PRECISIONS:
        limit = tolerance(precision, tf32)
        row = {"precision": precision, "max_relative_difference": None, "weights_moved": None, "tolerance": limit,
               "passed": False, "error": None}
        try:
            one = _train_tiny(tf, tf.distribute.get_strategy(), precision, initial, data)
            mirrored = _train_tiny(tf, tf.distribute.MirroredStrategy(devices=devices), precision, initial, data)
        except Exception as err:  # noqa: BLE001  (a precision that errors is the finding)
            row["error"] = _one_line(err)
        else:
            row["max_relative_difference"] = relative_difference(mirrored, one)
            row["weights_moved"] = min(relative_difference([w], [w0]) for w, w0 in zip(one, initial))
            row["passed"] = within(row["max_relative_difference"], limit)
        rows.append(row)
        tf.keras.backend.clear_session()
    where = f"{len(devices)} GPUs" if gpus else f"{len(devices)} logical CPUs"
    return {"replicas": len(devices), "devices": f"MirroredStrategy over {where}", "global_batch": global_batch,
            "steps": EQUIVALENCE_STEPS, "rows": rows}


def _step_clock(tf, warmup: int, last: int):
    """A callback that notes the time at the end of step ``warmup`` and of step ``last`` (1-based),
    waiting for each of those two steps' loss so that the queue of steps is drained there."""

    class _Clock(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True  # no wait on the other steps
            self.marks: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 in (warmup, last):
                float(logs["loss"])
                self.marks.append(time.perf_counter())

    return _Clock()


def speed_one(tf, model_name: str, batch: int, steps: int, warmup: int, precision: str, jit: bool) -> float:
    """images/s of ``model_name``'s training loop on the default device, timed over ``steps`` steps
    after ``warmup`` (tracing, XLA compilation) on one synthetic batch repeated (no input cost)."""
    import numpy as np

    shape = MODELS[model_name].default_input_shape
    rng = np.random.default_rng(SEED)
    x = rng.random((batch, *shape), dtype=np.float32)
    y = rng.integers(0, 10, size=batch)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    clock = _step_clock(tf, warmup, warmup + steps)
    with precision_policy(precision):
        model = build_model(model_name, shape, 10)
        model.compile(tf.keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy",
                      jit_compile=jit)
        model.fit(data, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[clock])
    tf.keras.backend.clear_session()
    return batch * steps / (clock.marks[1] - clock.marks[0])


def speed(tf, gpus: list, steps: int, warmup: int, model_name: Optional[str] = None) -> dict:
    """The speed part: every ``SPEED_RUNS`` row on one device, and each one's ratio to the first."""
    kind = "gpu" if gpus else "cpu"
    model_name = model_name or SPEED_MODEL[kind]
    batch = SPEED_BATCH[kind]
    rows = []
    for name, precision, jit in SPEED_RUNS:
        row = {"name": name, "precision": precision, "jit_compile": jit, "images_per_s": None, "vs_float32": None,
               "error": None}
        try:
            row["images_per_s"] = speed_one(tf, model_name, batch, steps, warmup, precision, jit)
        except Exception as err:  # noqa: BLE001  (a precision that errors is the finding)
            row["error"] = _one_line(err)
            tf.keras.backend.clear_session()
        rows.append(row)
    base = rows[0]["images_per_s"]
    for row in rows:
        if base and row["images_per_s"] is not None:
            row["vs_float32"] = row["images_per_s"] / base
    note = None if gpus else CPU_SPEED_NOTE
    return {"model": model_name, "input_shape": list(MODELS[model_name].default_input_shape), "batch": batch,
            "steps": steps, "warmup": warmup, "device": gpus[0].name if gpus else "/CPU:0", "rows": rows,
            "note": note}


@contextlib.contextmanager
def _quiet_python_log() -> Iterator[None]:
    # Keras warns once that mixed_float16 "may run slowly" without a GPU: the doctor's own notice says it.
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tf_log.setLevel(level)


def run(steps: int = DEFAULT_STEPS, warmup: int = DEFAULT_WARMUP, model_name: Optional[str] = None,
        require_gpu: bool = False) -> dict:
    """Every part of the doctor, in a process whose TensorFlow has run no op yet; the report as a dict."""
    tf = import_tensorflow()
    gpus = configure_devices(tf)  # first: device configuration is fixed at the first op
    with _quiet_python_log():
        info = machine(tf, gpus)
        report = {"host": socket.gethostname(), "gpu_visible": bool(gpus),
                  "notice": None if gpus else NO_GPU.format(n=CPU_DEVICES), "machine": info,
                  "equivalence": equivalence(tf, gpus, info["tf32_on"]),
                  "speed": speed(tf, gpus, steps, warmup, model_name)}
    report["failed"] = failed_checks(report)
    report["exit_code"], report["verdict"] = decide(bool(gpus), report["failed"], require_gpu)
    return report


# ----------------------------------------------------------------------------- the command

def add_parser(subparsers) -> None:
    """Registers ``distrain doctor``."""
    p = subparsers.add_parser(
        "doctor", help="this node's GPUs, CUDA, NCCL; N devices == 1 in each precision; images/s per precision",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"timed steps of each speed run (default {DEFAULT_STEPS})")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"untimed steps first: tracing, XLA compilation (default {DEFAULT_WARMUP})")
    p.add_argument("--model", choices=sorted(MODELS), metavar="MODEL",
                   help=f"the speed runs' model (default: {SPEED_MODEL['cpu']} on CPU, {SPEED_MODEL['gpu']} on GPUs)")
    p.add_argument("--require-gpu", action="store_true",
                   help="exit 1 when TensorFlow sees no GPU (slurm/doctor.sh passes it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(args) -> int:
    """``distrain doctor``: checks the flags, runs the doctor, prints the table or JSON."""
    if args.steps < 1:
        raise UsageError(f"--steps: expected a positive integer, got {args.steps}")
    if args.warmup < 1:
        raise UsageError(f"--warmup: expected an integer >= 1 (the first step traces), got {args.warmup}")
    if not args.json:
        print("distrain doctor: checking this node (about 20 s on 2 CPU cores) ...", file=sys.stderr, flush=True)
    report = run(args.steps, args.warmup, args.model, args.require_gpu)
    print(json.dumps(report, indent=1) if args.json else format_report(report), flush=True)
    if report["verdict"]:
        print(f"distrain doctor: {report['verdict']}", file=sys.stderr)
    return report["exit_code"]
