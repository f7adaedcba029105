"""TensorBoard logging of a run, written by the chief only.

``tensorboard_callbacks`` is called on the chief alone: no event file ever comes from another
worker, and nothing here may run a collective (the other workers would not join it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import tensorflow as tf

from distrain.spec import dump_spec


class StepScalars(tf.keras.callbacks.Callback):
    """Every N steps: the LR actually applied, step time and images/s (global and per replica)."""

    def __init__(self, log_dir: Path, every: int, global_batch: int, replicas: int):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(log_dir / "train"))
        self.every = every
        self.global_batch = global_batch
        self.replicas = replicas
        self._last_time = None
        self._last_step = None

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        now = time.perf_counter()
        if self._last_time is None:
            self._last_time, self._last_step = now, step
            return
        if self.every and step % self.every == 0 and step > self._last_step:
            step_time = (now - self._last_time) / (step - self._last_step)
            with self.writer.as_default(step=step):
                tf.summary.scalar("step/lr", (logs or {}).get("lr", 0.0))
                tf.summary.scalar("step/step_time_s", step_time)
                tf.summary.scalar("step/images_per_s", self.global_batch / step_time)
                tf.summary.scalar("step/images_per_s_per_replica", self.global_batch / step_time / self.replicas)
            self._last_time, self._last_step = now, step

    def on_train_end(self, logs=None):
        self.writer.flush()


def tensorboard_callbacks(spec, run_dir: Path, dist, plan, splits) -> list:
    """The chief's TensorBoard callbacks; also writes the world and the resolved spec as text."""
    log_dir = Path(run_dir) / "tensorboard"
    if not spec.logging.tensorboard:
        return []
    writer = tf.summary.create_file_writer(str(log_dir / "run"))
    with writer.as_default(step=0):
        tf.summary.text("job_spec", "```\n" + dump_spec(spec) + "\n```")
        tf.summary.text("world", "```\n" + json.dumps({
            "strategy": dist.name, "replicas": dist.replicas, "workers": dist.world.world_size,
            "launcher": dist.world.launcher, "synthetic_data": splits.synthetic}, indent=1) + "\n```")
    writer.flush()
    profile = tuple(spec.logging.profile_steps) if spec.logging.profile_steps else 0
    return [
        StepScalars(log_dir, spec.logging.update_every_steps, spec.data.batch_size_per_replica * dist.replicas,
                    dist.replicas),
        tf.keras.callbacks.TensorBoard(log_dir=str(log_dir), update_freq="epoch", profile_batch=profile,
                                       write_graph=False),
    ]

