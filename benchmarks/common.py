"""Shared pieces of the benchmarks: the job, worker processes, machine facts, results in the docs."""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(REPO / "cluster"))
from free_ports import free_ports  # noqa: E402,F401  (ports below the ephemeral range; the scripts import it from here)

PERFORMANCE_MD = REPO / "docs" / "performance.md"  # the results page
PERFORMANCE_LOG = REPO / "docs" / "performance-log.md"  # the measurements behind it, investigations

# By default the course CNN (Conv64 3x3-MaxPool-Flatten-Dense10) on 28x28x1 images. Synthetic data so
# that the benchmark needs no download; no validation split so an epoch's time is training only.
JOB = """
name: bench
seed: 1
model: {{name: {model}, params: {params}}}
data:
  source: synthetic
  synthetic: {{shape: {shape}, classes: 10, examples: {examples}}}
  batch_size_per_replica: {batch}
  validation_split: 0.0
  test_split: 0.05
train: {{epochs: {epochs}, optimizer: adam, learning_rate: 1e-3, lr_scaling: none}}
distribute: {{strategy: {strategy}}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 0}}
logging: {{tensorboard: false, verbose: 0}}
"""


# What the benchmarks build each course model with: the CNN at the width the tables always used.
MODEL_PARAMS = {"cnn": {"filters": 64}}


def write_job(path: Path, *, strategy: str = "auto", batch: int = 64, epochs: int = 4, examples: int = 8192,
              model: str = "cnn", shape: tuple[int, ...] = (28, 28, 1)) -> Path:
    params = json.dumps(MODEL_PARAMS.get(model, {}))
    path.write_text(JOB.format(strategy=strategy, batch=batch, epochs=epochs, examples=examples, model=model,
                               params=params, shape=json.dumps(list(shape))))
    return path


def env(threads: int = 1, **extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "HOROVOD_", "PMI_"))
         and k != "TF_CONFIG"}
    e.update({"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1", "CUDA_VISIBLE_DEVICES": "-1"})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_all(commands: list[list[str]], envs: list[dict], timeout: float = 900) -> None:
    """Starts the processes together and waits for all; exits with the failing one's stderr."""
    run_group(commands, envs, timeout, every=True)


def run_group(commands: list[list[str]], envs: list[dict], timeout: float = 900, every: bool = False):
    """Starts the processes together, waits for all, returns the first one's output (the chief's),
    or with ``every`` all outputs."""
    procs = [subprocess.Popen(c, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, e in zip(commands, envs)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"benchmark timed out: {' '.join(commands[0])}")
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"benchmark process failed ({p.returncode}): {' '.join(p.args)}\n{err[-3000:]}")
    return [out for out, _ in outs] if every else outs[0][0]


def steady_images_per_s(run_dir: Path) -> float:
    """Median images/s over the epochs after the first (which includes tracing and warm-up)."""
    from distrain.rundir import RunDir

    epochs = json.loads(RunDir(run_dir).history.read_text())
    return statistics.median(e["images_per_s"] for e in epochs[1:])


def bare_cnn_step(tf, strategy, *, setup_once: bool = True, batch: int = 64):
    """The course CNN's training step without Keras's ``fit``: forward, backward, the gradient sum
    (distrain's, ``distrain/backends/allreduce.py``, on MultiWorkerMirroredStrategy), Adam.

    Returns ``(replica_step, batches)``: the function for ``strategy.run`` and an iterator over
    synthetic batches of ``batch`` per replica to feed it, distributed under MultiWorkerMirroredStrategy.
    """
    sys.path.insert(0, str(REPO))
    from distrain.backends.allreduce import sum_gradients
    from distrain.models import build_model

    distributed = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if distributed:
        strategy.extended.experimental_enable_get_next_as_optional = False  # as distrain's training input
    rng = tf.random.Generator.from_seed(1)
    images = rng.uniform([2048, 28, 28, 1])
    labels = tf.cast(rng.uniform([2048], maxval=10, dtype=tf.int64), tf.int32)

    def dataset(_context=None):
        return tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(batch, drop_remainder=True).prefetch(2)

    with strategy.scope():
        model = build_model("cnn", (28, 28, 1), 10, filters=64)
        optimizer = tf.keras.optimizers.Adam(1e-3)
        if distributed:
            optimizer = sum_gradients(optimizer, strategy, setup_once=setup_once)
    batches = iter(strategy.distribute_datasets_from_function(dataset) if distributed else dataset())
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(reduction="none")
    global_batch = batch * strategy.num_replicas_in_sync

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.nn.compute_average_loss(loss_fn(y, model(x, training=True)), global_batch_size=global_batch)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    return replica_step, batches


def busy_share(seconds: float = 1.0) -> float:
    """The share of both cores in use during ``seconds`` (before a run: anything else running?)."""
    def ticks():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    (t0, i0), _, (t1, i1) = ticks(), time.sleep(seconds), ticks()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def machine() -> str:
    import distrain  # noqa: F401
    import tensorflow as tf
    import tf_keras

    cpu = "unknown CPU"
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"tf-keras {tf_keras.__version__}")


def record(section: str, text: str) -> None:
    """Replaces the section between `<!-- section -->` markers in the page that holds them
    (docs/performance.md or docs/performance-log.md); a new section goes to the end of the log."""
    begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    page = next((p for p in (PERFORMANCE_MD, PERFORMANCE_LOG) if p.exists() and begin in p.read_text()), None)
    if page is None:
        page = PERFORMANCE_LOG
        doc = (page.read_text() if page.exists() else "# Performance log\n").rstrip() + "\n\n" + block + "\n"
    else:
        doc = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, page.read_text(), flags=re.S)
    page.write_text(doc)