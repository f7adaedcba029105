"""Input at scale: memory and start-up of a run on 4,000 vs 40,000 JPEGs, the input pipeline's
images/s against the model's, TFRecord against JPEG, and the cost of resuming a TFRecord stream.

    .venv/bin/python benchmarks/input.py                     # prints the tables
    .venv/bin/python benchmarks/input.py --record            # and writes them into docs/performance-log.md
    .venv/bin/python benchmarks/input.py --sizes 400 4000    # a quick look

The image folders are generated once into --data-dir (128x128 JPEGs, 10 classes, a class-coloured
square at a random place on noise: learnable) and reused by later runs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, env, machine, record  # noqa: E402

CLASSES = 10
TRAIN_JOB = """
name: input-bench
seed: 1
model: {{name: {model}, params: {params}}}
data: {{source: {source}, path: {path}, image_size: [{size}, {size}], batch_size_per_replica: {batch},
        validation_split: 0.0, test_split: {test_split}{synthetic}}}
train: {{epochs: {epochs}, steps_per_epoch: {steps}, optimizer: adam, learning_rate: 1e-3, lr_scaling: none}}
distribute: {{strategy: one_device}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 0}}
logging: {{tensorboard: false, verbose: 0}}
"""

# A run with a callback that notes the time of the first finished training step; the parent passes
# the time it started the process, so the start-up includes Python and TensorFlow imports.
CHILD_RUN = r'''
import json, resource, sys, time
from pathlib import Path
started = float(sys.argv[3])
import distrain
import tensorflow as tf
from distrain.run import train
from distrain.spec import load_spec

class FirstStep(tf.keras.callbacks.Callback):
    at = None
    def on_train_batch_end(self, batch, logs=None):
        if FirstStep.at is None:
            FirstStep.at = time.time() - started

summary = train(load_spec(sys.argv[1]), Path(sys.argv[2]), extra_callbacks=[FirstStep()])
print(json.dumps({"first_step_s": FirstStep.at, "wall_s": time.time() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "history": summary["history"]}))
'''

# The input pipeline alone: the run's own pipelines, one pipeline, batches pulled as fast as they come.
CHILD_INPUT = r'''
import json, sys, time
import distrain
import tensorflow as tf
from distrain.data import sources
from distrain.data.pipelines import steps_per_epoch
from distrain.spec import spec_from_dict

source, path, size, channels, batches, flip = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
spec = spec_from_dict({"data": {"source": source, "path": path, "image_size": [size, size], "batch_size_per_replica": 32,
                                "validation_split": 0.0, "test_split": 0.01, "augment": {"flip": flip}}}).data
splits = sources.load(spec, 1, channels=channels)
steps = steps_per_epoch(splits.train_size, 32)
pipes = splits.pipelines(32, steps, 1, (size, size, channels), spec.augment)
it = iter(pipes.train(tf.distribute.InputContext(1, 0, 1), 100))
for _ in range(10):  # warm-up: tracing, thread pools, the first prefetch
    next(it)
t = time.perf_counter()
for _ in range(batches):
    next(it)
print(json.dumps({"images_per_s": batches * 32 / (time.perf_counter() - t)}))
'''

# Time to the first batch of a TFRecord stream built to start at a step (resume) vs at step 0.
CHILD_RESUME = r'''
import json, sys, time
import distrain
import tensorflow as tf
from distrain.data import sources
from distrain.data.pipelines import steps_per_epoch
from distrain.spec import spec_from_dict

path, size, fraction = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
spec = spec_from_dict({"data": {"source": "tfrecord", "path": path, "image_size": [size, size]}}).data
splits = sources.load(spec, 1, channels=3)
steps = steps_per_epoch(splits.train_size, 32)
pipes = splits.pipelines(32, steps, 1, (size, size, 3), spec.augment)
next(iter(pipes.train(tf.distribute.InputContext(1, 0, 1), 1)))  # warm-up (tracing)
start = int(steps * fraction)
t = time.perf_counter()
next(iter(pipes.train(tf.distribute.InputContext(1, 0, 1), 2, start_step=start)))
print(json.dumps({"first_batch_s": time.perf_counter() - t, "start_step": start, "steps": steps}))
'''


def make_folder(root: Path, count: int, size: int = 128) -> Path:
    """``count`` JPEGs in ``CLASSES`` folders; made once, marked complete by a file."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(count)
    colours = rng.integers(0, 256, (CLASSES, 3))
    started = time.time()
    for k in range(count):
        c = k % CLASSES
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        image[y:y + size // 2, x:x + size // 2] = colours[c]
        Image.fromarray(image).save(folder / f"{k:06d}.jpg", quality=90)
        if k % 5000 == 4999:
            print(f"generated {k + 1}/{count} images ({time.time() - started:.0f} s)", file=sys.stderr)
    done.write_text(str(count))
    return root


def python(code: str, *args, threads: int = 2, timeout: float = 3600, pythonpath: str | None = None) -> dict:
    extra = {"PYTHONPATH": pythonpath} if pythonpath else {}
    # `python -c` puts its working directory first on sys.path: run a baseline from its own tree.
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env(threads, **extra),
                         cwd=pythonpath or REPO,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        sys.exit(f"benchmark step failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_job(tmp: Path, name: str, pythonpath: str | None = None, **fields) -> dict:
    job = tmp / f"{name}.yaml"
    values = {"model": "cnn", "params": "{filters: 64}", "source": "image_folder", "path": "null", "size": 128,
              "batch": 32, "test_split": 0.01, "epochs": 1, "steps": 5, "synthetic": ""}
    values.update(fields)
    job.write_text(TRAIN_JOB.format(**values))
    run_dir = tmp / f"run-{name}-{time.time_ns()}"
    result = python(CHILD_RUN, job, run_dir, time.time(), pythonpath=pythonpath)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def model_rate(tmp: Path, model: str, size: int, channels: int, batch: int, steps: int) -> float:
    """Steady training images/s of a model on in-memory synthetic data (no input cost)."""
    synthetic = f", synthetic: {{shape: [{size}, {size}, {channels}], classes: {CLASSES}, examples: {batch * steps + batch}}}"
    params = "{filters: 64}" if model == "cnn" else "{}"
    r = run_job(tmp, f"model-{model}", model=model, params=params, source="synthetic", size=size, batch=batch,
                epochs=3, steps=steps, synthetic=synthetic, test_split=0.05)
    rates = r["history"].get("images_per_s") or []
    return statistics.median(rates[1:]) if len(rates) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[4000, 40000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "distrain-input-bench")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per size (median reported)")
    parser.add_argument("--batches", type=int, default=60, help="batches timed per input-pipeline measurement")
    parser.add_argument("--no-mobilenet", action="store_true", help="skip MobileNetV2 at 224x224 (slow on CPUs)")
    parser.add_argument("--baseline", metavar="GIT_REV",
                        help="also run the memory/start-up runs with distrain/ of this revision (e.g. the last one "
                             "that decoded folders into memory) for comparison")
    parser.add_argument("--record", action="store_true", help="write the tables into docs/performance-log.md")
    args = parser.parse_args()
    small, large = args.sizes
    folders = {n: make_folder(args.data_dir / f"jpeg-{n}", n) for n in (small, large)}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        # 1. Memory and start-up: the same 5-step CNN run at 128x128 on both folders, alternated.
        runs = {small: [], large: []}
        for i in range(args.repeats):
            for n in (small, large):
                runs[n].append(run_job(tmp, f"folder{n}", path=folders[n]))
                r = runs[n][-1]
                print(f"repeat {i + 1}, {n} images: first step {r['first_step_s']:.1f} s, peak RSS "
                      f"{r['peak_rss_mb']:.0f} MB", file=sys.stderr)
        med = {n: {k: statistics.median(r[k] for r in runs[n]) for k in ("first_step_s", "peak_rss_mb", "wall_s")}
               for n in runs}
        baseline = ""
        if args.baseline:
            old = tmp / "baseline"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "distrain"], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            rows = []
            for n in (small, large):
                r = run_job(tmp, f"baseline{n}", pythonpath=str(old), path=folders[n])
                print(f"baseline {args.baseline}, {n} images: first step {r['first_step_s']:.1f} s, peak RSS "
                      f"{r['peak_rss_mb']:.0f} MB", file=sys.stderr)
                rows.append(f"| {n:,}, before (`{args.baseline}`: decoded into memory) | {r['first_step_s']:.1f} s | "
                            f"{r['peak_rss_mb']:.0f} MB | {r['wall_s']:.1f} s |\n")
            baseline = "".join(rows)
        rss_delta = med[large]["peak_rss_mb"] - med[small]["peak_rss_mb"]
        start_ratio = med[large]["first_step_s"] / med[small]["first_step_s"]
        tables["input-flat"] = (
            f"`distrain train` of the course CNN (Conv64) on a folder of 128x128 JPEGs, 10 classes, image_size "
            f"[128, 128], batch 32, 5 steps, 1% test split; one process, 2 intra-op threads; median of {args.repeats} "
            f"alternating runs.\n\n"
            f"| images in the folder | time to first step | peak RSS | whole run |\n| --- | --- | --- | --- |\n"
            + "".join(f"| {n:,} | {med[n]['first_step_s']:.1f} s | {med[n]['peak_rss_mb']:.0f} MB | {med[n]['wall_s']:.1f} s |\n"
                      for n in (small, large))
            + baseline
            + f"| **{large:,} vs {small:,}** | **{start_ratio:.2f}x** (goal ≤ 1.5x) | **{rss_delta:+.0f} MB, "
              f"{rss_delta / med[small]['peak_rss_mb']:+.1%}** (goal within 10% or 150 MB) | |\n"
            + "\nEach run (in order): " + "; ".join(
                f"{n:,}: " + ", ".join(f"{r['first_step_s']:.1f} s / {r['peak_rss_mb']:.0f} MB" for r in runs[n])
                for n in (small, large)) + ".\n")

        # 2. Input pipeline vs model: images/s of the pipeline alone vs the model training on memory.
        cnn_in = python(CHILD_INPUT, "image_folder", folders[small], 128, 1, args.batches, "horizontal")["images_per_s"]
        cnn_model = model_rate(tmp, "cnn", 128, 1, 32, 12)
        rows = [("course CNN (Conv64), 128x128x1", cnn_in, cnn_model)]
        if not args.no_mobilenet:
            mob_in = python(CHILD_INPUT, "image_folder", folders[small], 224, 3, args.batches, "horizontal")["images_per_s"]
            mob_model = model_rate(tmp, "mobilenet_v2", 224, 3, 16, 6)
            rows.append(("MobileNetV2, 224x224x3", mob_in, mob_model))
        tables["input-vs-model"] = (
            f"Input pipeline alone (read, decode, resize, flip, batch 32; the run's own pipelines) vs the model "
            f"training on in-memory synthetic data of the same shape; {small:,}-image folder of 128x128 JPEGs, one "
            f"process, 2 intra-op threads.\n\n"
            f"| model, input | input images/s | model images/s | **input / model** (goal ≥ 2) |\n| --- | --- | --- | --- |\n"
            + "".join(f"| {name} | {i:.0f} | {m:.0f} | **{i / m:.1f}** |\n" for name, i, m in rows))

        # 3. TFRecord vs the same folder's JPEGs, and the cost of resuming a TFRecord stream.
        from distrain.data import tfrecord

        tfr = {}
        for label, size in (("resized", [64, 64]), ("original", None)):
            out = args.data_dir / f"tfr-{small}-{label}"
            if not (out / tfrecord.METADATA).exists():
                shutil.rmtree(out, ignore_errors=True)
                tfrecord.pack(str(folders[small]), str(out), shards=16, image_size=size, progress=False)
            tfr[label] = out
        rates = {}
        for name, source, path, size in (("JPEG folder, decoded to 64x64", "image_folder", folders[small], 64),
                                         ("TFRecord packed at 64x64 (`--image-size 64 64`)", "tfrecord", tfr["resized"], 64),
                                         ("JPEG folder, 128x128", "image_folder", folders[small], 128),
                                         ("TFRecord of the original JPEG bytes, 128x128", "tfrecord", tfr["original"], 128)):
            rates[name] = python(CHILD_INPUT, source, path, size, 3, args.batches, "none")["images_per_s"]
        names = list(rates)
        big_out = args.data_dir / f"tfr-{large}-original"
        if not (big_out / tfrecord.METADATA).exists():
            shutil.rmtree(big_out, ignore_errors=True)
            tfrecord.pack(str(folders[large]), str(big_out), shards=32, progress=False)
        fresh = python(CHILD_RESUME, big_out, 128, 0.0)
        late = python(CHILD_RESUME, big_out, 128, 0.95)
        tables["input-tfrecord"] = (
            f"Input pipeline alone, batch 32, no augmentation, RGB, {small:,} 128x128 JPEGs; TFRecord in 16 shards.\n\n"
            f"| input | images/s | vs its JPEG folder |\n| --- | --- | --- |\n"
            f"| {names[0]} | {rates[names[0]]:.0f} | 1.00 |\n"
            f"| {names[1]} | {rates[names[1]]:.0f} | **{rates[names[1]] / rates[names[0]]:.2f}x** (goal ≥ 1.5x) |\n"
            f"| {names[2]} | {rates[names[2]]:.0f} | 1.00 |\n"
            f"| {names[3]} | {rates[names[3]]:.0f} | {rates[names[3]] / rates[names[2]]:.2f}x |\n\n"
            f"Resuming a TFRecord stream ({large:,} images, 32 shards, {fresh['steps']} steps per epoch): first batch "
            f"{fresh['first_batch_s']:.2f} s at step 0, {late['first_batch_s']:.2f} s at step {late['start_step']} "
            f"(the records before it are read and skipped, not parsed or decoded).\n")
    text = "\n".join(tables.values())
    print(text)
    print(f"Machine: {machine()}.")
    if args.record:
        note = (f"\n\nMachine: {machine()}. Measured {time.strftime('%Y-%m-%d')} while other jobs shared the "
                f"machine (load average above its 2 cores): treat the ratios as rough; rerun on a quiet machine "
                f"with `.venv/bin/python benchmarks/input.py --record`.")
        for section, body in tables.items():
            record(section, body + note)


if __name__ == "__main__":
    main()
