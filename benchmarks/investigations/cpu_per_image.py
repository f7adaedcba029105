"""Where a one-process gap comes from: CPU time per image of `distrain train` and of the plain
tf.keras script of benchmarks/throughput.py, epoch by epoch, runs alternated.

Wall time on this 2-core VM moves by ±15% with whatever else runs; the CPU seconds a process
spends per image (all its threads, from getrusage) move far less, so two programs that do the same
work show the same CPU per image even on a busy machine. A wall-clock gap with equal CPU per image
is time spent waiting (a synchronisation, a file write), not work.

    .venv/bin/python benchmarks/investigations/cpu_per_image.py [--model residual] [--repeats 3] [--threads 1]

About 2 minutes per repeat for the residual net (4,096 examples, 4 epochs, epoch 1 left out).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import MODEL_PARAMS, REPO, env, machine, write_job  # noqa: E402

EXAMPLES = 4096
EPOCHS = 4


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_distrain(job: str, run_dir: str) -> list[tuple[int, float, float]]:
    """``distrain train`` in this process, its RunMetrics callback timed: (steps, wall s, CPU s) per epoch."""
    import distrain.callbacks as callbacks
    from distrain import cli

    epochs = []
    begin, end = callbacks.RunMetrics.on_epoch_begin, callbacks.RunMetrics.on_epoch_end

    def on_epoch_begin(self, epoch, logs=None):
        self._marks = (time.perf_counter(), _cpu_s())
        begin(self, epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        epochs.append((self._steps, time.perf_counter() - self._marks[0], _cpu_s() - self._marks[1]))
        end(self, epoch, logs)

    callbacks.RunMetrics.on_epoch_begin, callbacks.RunMetrics.on_epoch_end = on_epoch_begin, on_epoch_end
    cli.main(["train", job, "--run-dir", run_dir])
    return epochs


def run_plain(model: str, batch: int) -> list[tuple[int, float, float]]:
    """The plain script of benchmarks/throughput.py (the same pipeline and compile), timed the same way."""
    import distrain  # noqa: F401  (tf-keras, as the course uses it)
    import numpy as np
    import tensorflow as tf

    from distrain.models import MODELS, build_model

    shape = MODELS[model].default_input_shape
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(EXAMPLES, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, size=EXAMPLES).astype(np.int32)
    n = int(EXAMPLES * 0.95)
    ds = (tf.data.Dataset.from_tensor_slices((x[:n], y[:n])).shuffle(n, seed=1).batch(batch, drop_remainder=True)
          .map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b), num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE))
    tf.keras.utils.set_random_seed(1)
    net = build_model(model, shape, 10, **MODEL_PARAMS.get(model, {}))
    net.compile(tf.keras.optimizers.Adam(1e-3), tf.keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    epochs = []

    class Timer(tf.keras.callbacks.Callback):  # epoch hooks only, like throughput.py's
        def on_epoch_begin(self, epoch, logs=None):
            self.marks = (time.perf_counter(), _cpu_s())

        def on_epoch_end(self, epoch, logs=None):
            epochs.append((n // batch, time.perf_counter() - self.marks[0], _cpu_s() - self.marks[1]))

    net.fit(ds, epochs=EPOCHS, verbose=0, callbacks=[Timer()])
    return epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="residual")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="TF intra-op threads for both")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--side", choices=("distrain", "plain"), help=argparse.SUPPRESS)  # one measured process
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        epochs = run_distrain(args.job, args.run_dir) if args.side == "distrain" else run_plain(args.model, args.batch)
        print("EPOCHS " + json.dumps(epochs), flush=True)
        return

    from distrain.models import MODELS

    tmp = Path(tempfile.mkdtemp(prefix="cpu-per-image-"))
    job = write_job(tmp / f"{args.model}.yaml", strategy="one_device", batch=args.batch, epochs=EPOCHS, examples=EXAMPLES,
                    model=args.model, shape=MODELS[args.model].default_input_shape)
    per_image = {"distrain": [], "plain": []}
    rate = {"distrain": [], "plain": []}
    for repeat in range(args.repeats):
        for side in ("distrain", "plain") if repeat % 2 == 0 else ("plain", "distrain"):
            command = [sys.executable, __file__, "--side", side, "--model", args.model, "--batch", str(args.batch),
                       "--job", str(job), "--run-dir", str(tmp / f"run{repeat}")]
            out = subprocess.run(command, env=env(args.threads), cwd=REPO, capture_output=True, text=True,
                                 timeout=1800, check=True).stdout
            epochs = json.loads(next(line for line in out.splitlines() if line.startswith("EPOCHS "))[7:])
            for steps, wall, cpu in epochs[1:]:  # epoch 1 traces the step
                per_image[side].append(cpu * 1000 / (steps * args.batch))
                rate[side].append(steps * args.batch / wall)
            print(f"repeat {repeat + 1} {side}: CPU ms/image " + ", ".join(f"{v:.3f}" for v in per_image[side][-3:]),
                  file=sys.stderr, flush=True)
    print(f"{args.model}, batch {args.batch}, {args.threads} intra-op thread(s), {args.repeats} repeats x "
          f"{EPOCHS - 1} epochs; {machine()}")
    print("| | CPU ms per image, median | images/s, median |\n| --- | --- | --- |")
    for side in ("distrain", "plain"):
        print(f"| {side} | {statistics.median(per_image[side]):.3f} | {statistics.median(rate[side]):.0f} |")
    ratio = statistics.median(per_image["plain"]) / statistics.median(per_image["distrain"])
    print(f"plain / distrain CPU per image: {ratio:.3f}")


if __name__ == "__main__":
    main()
