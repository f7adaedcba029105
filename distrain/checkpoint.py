"""Checkpoints the user sees, and the backup a run resumes from.

Under MultiWorkerMirroredStrategy every worker must take part in a save (reading some variables is
a collective), but only the chief's files may be the ones a user sees. ``WorkerFiles`` routes each
write: the chief writes to a temporary name beside the target and renames it into place (so no
half-written file is ever the latest); every other worker writes into its own
scratch directory (``RunDir.scratch``) and deletes what it wrote. No two processes write one path.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

from distrain.rundir import RunDir, remove, replacing

log = logging.getLogger("distrain")


def monitor_mode(monitor: str, mode: str) -> str:
    """``min`` or ``max``: ``mode`` as given, or for ``auto`` max for accuracy-like metrics (acc, auc,
    precision, recall in the name), min for the rest. The one rule for checkpoints and early stopping.

    >>> monitor_mode("val_precision", "auto"), monitor_mode("val_loss", "auto")
    ('max', 'min')
    """
    if mode != "auto":
        return mode
    return "max" if re.search(r"acc|auc|precision|recall", monitor) else "min"


class WorkerFiles:
    """Routes a run's file writes by role: real files for the chief, scratch for the others.

    Args:
        run_dir: the run's ``RunDir``.
        rank: this worker's rank (names its scratch directory).
        is_chief: whether this worker's files are the ones a user sees.
    """

    def __init__(self, run_dir: RunDir, rank: int, is_chief: bool):
        self.run_dir = run_dir
        self.is_chief = is_chief
        self.scratch = run_dir.scratch(rank)

    @contextlib.contextmanager
    def write(self, path: Path) -> Iterator[Path]:
        """Yields where to write ``path``; publishes it atomically (chief) or discards it (others).

        The path yielded keeps the target's suffix: Keras picks the file format by it, and every
        worker must save in the same format (the formats read variables differently, and under
        MultiWorkerMirroredStrategy some reads are collectives).
        """
        path = Path(path)
        if self.is_chief:
            with replacing(path) as tmp:
                yield tmp
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        tmp = self.scratch / path.name
        try:
            yield tmp
        finally:
            remove(tmp)

    def cleanup(self) -> None:
        """Removes this worker's scratch (and ``.workertemp`` when it is the last one out)."""
        if not self.is_chief:
            shutil.rmtree(self.scratch, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.scratch.parent.rmdir()


class Backup:
    """Resume state: weights, optimizer (its ``iterations`` is the global step) and the RNG-free rest.

    Saved with ``tf.train.CheckpointManager``, whose index file is replaced atomically after the
    data files are complete; the last two are kept so a crash during a save still leaves one.
    Non-chief workers save into their scratch directory and delete it at once.
    """

    def __init__(self, model, optimizer, run_dir: RunDir, files: WorkerFiles):
        import tensorflow as tf

        self.directory = run_dir.backup
        self.files = files
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self.optimizer = optimizer
        target = self.directory if files.is_chief else files.scratch / RunDir.BACKUP
        # The prefix is RunDir's: RunDir.backup_step reads the step from the index by it.
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(target), max_to_keep=2,
                                                  checkpoint_name=RunDir.BACKUP_PREFIX)
        self.last_saved_step = -1

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def restore(self) -> int:
        """Restores the chief's latest backup, if there is one; returns the global step reached."""
        import tensorflow as tf

        latest = tf.train.latest_checkpoint(str(self.directory))
        if latest is None:
            return 0
        # expect_partial: the optimizer's slots are created lazily and may not all exist yet.
        self.checkpoint.restore(latest).expect_partial()
        self.last_saved_step = self.step
        log.info("resumed from %s at step %d", latest, self.last_saved_step)
        return self.last_saved_step

    def save(self) -> None:
        """Saves at the current step (all workers must call it at the same step)."""
        step = self.step
        if step == self.last_saved_step:
            return
        self.manager.save(checkpoint_number=step)
        if not self.files.is_chief:
            shutil.rmtree(self.files.scratch / RunDir.BACKUP, ignore_errors=True)
        self.last_saved_step = step


class UserCheckpoints:
    """Weights the user keeps: every N epochs/steps (the last K) and the best by a metric.

    Files (named by ``RunDir``): ``checkpoints/epoch-0003.weights.h5`` or ``step-000150.weights.h5``,
    ``best.weights.h5`` with ``best.json`` (epoch, step, metric and value), and ``index.json`` listing
    the kept files.
    """

    def __init__(self, model, run_dir: RunDir, files: WorkerFiles, *, keep: int, monitor: str, mode: str):
        self.model = model
        self.run_dir = run_dir
        self.files = files
        self.keep = keep
        self.monitor = monitor
        self.mode = monitor_mode(monitor, mode)
        self.best: Optional[float] = None
        self.kept: list[str] = []
        index = run_dir.checkpoint_index
        if index.exists():  # resumed run: keep rotating the same files
            state = json.loads(index.read_text())
            self.kept, self.best = state.get("kept", []), state.get("best")

    def _write_weights(self, path: Path) -> None:
        with self.files.write(path) as tmp:
            self.model.save_weights(str(tmp))

    def _write_json(self, path: Path, payload: dict) -> None:
        with self.files.write(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))

    def save_periodic(self, name: str) -> None:
        self._write_weights(self.run_dir.checkpoint_weights(name))
        if not self.files.is_chief:
            return
        if name in self.kept:
            self.kept.remove(name)
        self.kept.append(name)
        while len(self.kept) > self.keep:
            old = self.kept.pop(0)
            with contextlib.suppress(FileNotFoundError):
                self.run_dir.checkpoint_weights(old).unlink()
        self._write_index()

    def consider_best(self, logs: dict, epoch: int, step: int) -> bool:
        """Saves ``best.weights.h5`` when ``monitor`` improved; every worker must call it."""
        value = logs.get(self.monitor)
        if value is None:
            return False
        value = float(value)
        if not math.isfinite(value):
            return False  # a NaN best would never be beaten again
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if not better:
            return False
        self.best = value
        self._write_weights(self.run_dir.best_weights)
        self._write_json(self.run_dir.best_meta,
                         {"epoch": epoch, "step": step, "monitor": self.monitor, "value": value})
        if self.files.is_chief:
            self._write_index()
        return True

    def _write_index(self) -> None:
        self._write_json(self.run_dir.checkpoint_index, {"kept": self.kept, "best": self.best})
