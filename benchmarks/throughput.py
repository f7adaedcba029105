"""distrain's overhead on one process: images/s of `distrain train` vs the same course model in a
plain tf.keras `fit` script (as the course writes it: tf.data from the arrays, shuffle, batch,
rescale, prefetch), same synthetic data and batch, alternated and repeated, for every course model.

    .venv/bin/python benchmarks/throughput.py [--models mlp,cnn] [--repeats 3] [--record]

About 36 minutes for the five models with 3 repeats on 2 cores (mlp and cnn ~7 min, the other three
~29 min, 2026-12-04); `--record` writes the table into docs/performance.md (section `throughput`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_PARAMS, env, machine, record, run_all, steady_images_per_s, write_job  # noqa: E402

MODELS = ("mlp", "cnn", "residual", "inception", "mobilenet_v2")
# Synthetic examples per model unless --examples is given: the three larger models train at 150-400
# images/s on 2 cores, so 4,096 (64 steps an epoch) keeps each of their runs to 1-2 minutes.
EXAMPLES = {"mlp": 8192, "cnn": 8192, "residual": 4096, "inception": 4096, "mobilenet_v2": 4096}

PLAIN = r'''
import json, sys, time
import distrain  # tf-keras, as the course uses it
import numpy as np, tensorflow as tf
from distrain.models import build_model

batch, epochs, examples = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
name, shape, params = sys.argv[4], tuple(json.loads(sys.argv[5])), json.loads(sys.argv[6])
rng = np.random.default_rng(1)
x = rng.integers(0, 256, size=(examples, *shape), dtype=np.uint8)
y = rng.integers(0, 10, size=examples).astype(np.int32)
n = int(examples * 0.95)
ds = (tf.data.Dataset.from_tensor_slices((x[:n], y[:n])).shuffle(n, seed=1).batch(batch, drop_remainder=True)
      .map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b), num_parallel_calls=tf.data.AUTOTUNE)
      .prefetch(tf.data.AUTOTUNE))
tf.keras.utils.set_random_seed(1)
model = build_model(name, shape, 10, **params)
model.compile(tf.keras.optimizers.Adam(1e-3), tf.keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])

class Timer(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        rates.append((n // batch) * batch / (time.perf_counter() - self.start))

rates = []
model.fit(ds, epochs=epochs, verbose=0, callbacks=[Timer()])
print(json.dumps({"images_per_s": sorted(rates[1:])[len(rates[1:]) // 2]}))
'''


def measure(model: str, args, tmp: Path) -> tuple[list[float], list[float]]:
    """images/s of distrain and of the plain script for one model, one per repeat, runs alternated."""
    import json
    import subprocess

    from distrain.models import MODELS as REGISTRY

    shape = REGISTRY[model].default_input_shape
    examples = args.examples or EXAMPLES[model]
    job = write_job(tmp / f"{model}.yaml", strategy="one_device", batch=args.batch, epochs=args.epochs,
                    examples=examples, model=model, shape=shape)
    distrain_rates, plain_rates = [], []
    for i in range(args.repeats):
        run_dir = tmp / f"{model}-run{i}"
        run_all([[sys.executable, "-m", "distrain.cli", "train", str(job), "--run-dir", str(run_dir)]],
                [env(args.threads)])
        distrain_rates.append(steady_images_per_s(run_dir))
        out = subprocess.run([sys.executable, "-c", PLAIN, str(args.batch), str(args.epochs), str(examples), model,
                              json.dumps(list(shape)), json.dumps(MODEL_PARAMS.get(model, {}))],
                             env=env(args.threads), capture_output=True, text=True, timeout=1800, check=True)
        plain_rates.append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])
        print(f"{model} repeat {i + 1}: distrain {distrain_rates[-1]:.0f} img/s, plain tf.keras "
              f"{plain_rates[-1]:.0f} img/s", file=sys.stderr, flush=True)
    return distrain_rates, plain_rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--examples", type=int, default=0, help="synthetic examples (default: per model, "
                        + ", ".join(f"{m} {n}" for m, n in EXAMPLES.items()) + ")")
    parser.add_argument("--threads", type=int, default=2, help="TF intra-op threads for both")
    parser.add_argument("--record", action="store_true", help="write the result into docs/performance.md")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    rows = []
    started = time.gmtime()
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            ds, ps = measure(model, args, Path(tmp))
            d, p = statistics.median(ds), statistics.median(ps)
            each = ", ".join(f"{a / b:.2f}" for a, b in zip(ds, ps))
            rows.append(f"| {model} | {p:.0f} | {d:.0f} | **{d / p:.2f}** | {each} |")
    examples = (f"{args.examples:,} examples" if args.examples else
                "; ".join(f"{m}: {EXAMPLES[m]:,} examples" for m in models))
    command = " ".join(["benchmarks/throughput.py", *(a for a in sys.argv[1:] if a != "--record")])
    table = (f"Synthetic images of each model's input shape, batch {args.batch}, {args.threads} intra-op threads, "
             f"one process; median of {args.repeats} alternating runs, epochs 2-{args.epochs} of each; {examples}. "
             f"Command: `.venv/bin/python {command}`, {time.strftime('%Y-%m-%d %H:%M', started)}-"
             f"{time.strftime('%H:%M UTC', time.gmtime())}.\n\n"
             "| model | plain tf.keras `fit`, images/s | `distrain train`, images/s | distrain / plain | "
             "each repeat (distrain / plain) |\n"
             "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + f"\n\nMachine: {machine()}.")
    print(table)
    if args.record:
        record("throughput", table)


if __name__ == "__main__":
    main()
