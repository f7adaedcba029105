"""Checkpoints the user sees, and the backup a run resumes from.

Under MultiWorkerMirroredStrategy every worker must take part in a save (reading some variables is
a collective), but only the chief's files may be the ones a user sees. ``WorkerFiles`` routes each
write: the chief writes to a temporary name beside the target and renames it into place (so no
half-written file is ever the latest); every other worker writes into its own
scratch directory (``RunDir.scratch``) and deletes what it wrote. No two processes write one path.

What is read back is verified first: a backup by its commit marker (``RunDir.choose_backup``), the
user's checkpoints by reading every array of them (``read_checkpoint_state``). A write that fails
because the disk is full, over quota or failing stops the run with ``WriteFailed`` (exit 74) and
leaves the previous files intact.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from distrain.errors import UsageError, WriteFailed, write_failure
from distrain.rundir import BackupChoice, RunDir, failed_writes_stop, file_problem, file_record, remove, replacing

log = logging.getLogger("distrain")

KEEP_BACKUPS = 2  # the newest backup cut short still leaves one to resume from
SCRATCH_ONLY = "it was a non-chief worker's scratch copy, no file of the run"


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
        tmp = self.scratch / path.name
        with failed_writes_stop(tmp, SCRATCH_ONLY):
            self.scratch.mkdir(parents=True, exist_ok=True)
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


def save_weights_h5(model, path: Path) -> None:
    """``model.save_weights(path)`` for a ``.weights.h5`` path, the same file, but HDF5 writes it
    into memory and Python writes it to disk.

    HDF5 that meets a full disk in the middle of a file crashes the process (SIGSEGV in h5py's
    clean-up after "file write failed", h5py 3 with tf-keras 2.21; found by the fault campaign,
    docs/fault-tolerance.md#the-fault-campaign); Python's write raises ``ENOSPC``, a ``WriteFailed``
    (exit 74). It is what tf-keras does for the weights inside ``model.keras``: its ``H5IOStore``
    with an archive writes to memory, and the "archive" here writes the bytes to ``path``. The
    file is held in memory once while it is written.
    """
    from tf_keras.src.saving import saving_lib

    class ToFile:
        def writestr(self, _name: str, data: bytes) -> None:
            Path(path).write_bytes(data)

    store = saving_lib.H5IOStore(Path(path).name, archive=ToFile(), mode="w")
    saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="", visited_trackables=set())
    store.close()


class Backup:
    """Resume state: weights, optimizer (its ``iterations`` is the global step) and the RNG-free rest.

    Each save writes ``backup/ckpt-<step>`` (``tf.train.Checkpoint.write``) and commits it
    (``RunDir.commit_backup``: its files on disk, then the commit marker, last); only then are the
    backups beyond the newest ``keep`` removed, so a crash or a full disk during a save leaves the
    previous ones intact, and a backup cut short after its commit still leaves an older one.
    Non-chief workers save into their scratch directory and delete it at once.
    """

    def __init__(self, model, optimizer, run_dir: RunDir, files: WorkerFiles, *, keep: int = KEEP_BACKUPS):
        import tensorflow as tf

        self.run_dir = run_dir
        self.directory = run_dir.backup
        self.files = files
        self.keep = keep
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self.optimizer = optimizer
        self.last_saved_step = -1

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def restore(self) -> int:
        """Restores the newest backup that verifies (``RunDir.choose_backup``), if there is one; returns
        the global step reached. The chief first removes the backups that must not meet a new save
        (``BackupChoice.stale``: newer than the one restored, or never committed).

        Raises:
            UsageError: backups exist and none verifies, or the one chosen cannot be restored into
                this job's model and optimizer.
        """
        import tensorflow as tf

        choice = self.run_dir.choose_backup()
        if self.files.is_chief and choice.stale:
            for step in choice.stale:
                self.run_dir.remove_backup(step)
                log.info("backup: removed %s-%d (newer than the backup resumed from, or never committed)",
                         RunDir.BACKUP_PREFIX, step)
            if choice.verified and choice.prefix is not None:
                self.run_dir.write_backup_index(self.run_dir.committed_backups()[-self.keep:])
        if choice.prefix is None:
            return 0
        try:
            # expect_partial: the optimizer's slots are created lazily and may not all exist yet.
            self.checkpoint.restore(str(choice.prefix)).expect_partial()
        except (tf.errors.OpError, IndexError, ValueError) as err:
            raise UsageError(restore_failed(choice, err)) from None
        self.last_saved_step = self.step
        log.info("resumed from %s at step %d", choice.prefix, self.last_saved_step)
        return self.last_saved_step

    def save(self) -> None:
        """Saves and commits at the current step (all workers must call it at the same step).

        Raises:
            WriteFailed: the disk is full, over quota or failing; nothing of this save counts and
                the previous backups are intact.
        """
        step = self.step
        if step == self.last_saved_step:
            return
        if self.files.is_chief:
            self._save_committed(step)
        else:
            scratch = RunDir(self.files.scratch)
            try:
                with failed_writes_stop(scratch.backup_prefix(step), SCRATCH_ONLY):
                    self._write(scratch.backup_prefix(step))
            finally:
                shutil.rmtree(scratch.backup, ignore_errors=True)
        self.last_saved_step = step

    def _write(self, prefix: Path) -> None:
        # Counted as tf.train.CheckpointManager.save counted before commit markers: a backup holds
        # the same objects as it did.
        self.checkpoint.save_counter.assign_add(1)
        self.checkpoint.write(str(prefix))

    def _save_committed(self, step: int) -> None:
        """The chief's save: write, commit, then rotate; a failed write is removed and stops the run."""
        run_dir = self.run_dir
        previous = [s for s in run_dir.committed_backups() if s != step]
        try:
            # A backup of this step from before a resume (its run went further, then resumed from
            # an older one): uncommitted before it is overwritten.
            run_dir.remove_backup(step)
            self._write(run_dir.backup_prefix(step))
            run_dir.commit_backup(step)
        except Exception as err:
            reason = write_failure(err)
            if reason is None:
                raise
            with contextlib.suppress(OSError):
                run_dir.remove_backup(step)
            raise WriteFailed(write_failed_message(run_dir, step, reason, previous[-1] if previous else None)) from err
        committed = run_dir.committed_backups()
        run_dir.write_backup_index(committed[-self.keep:])
        for old in committed[:-self.keep]:
            run_dir.remove_backup(old)


def write_failed_message(run_dir: RunDir, step: int, reason: str, previous: Optional[int]) -> str:
    """The one line of a backup the disk refused: what failed, why, and what a rerun resumes from.

    Example:
        >>> write_failed_message(RunDir("/r"), 120, "No space left on device (ENOSPC)", 110)  # doctest: +ELLIPSIS
        '/r/backup/ckpt-120: backup of step 120 not written: No space left on device (ENOSPC); ... from step 110...'
    """
    kept = (f"the backup of step {previous} is intact and a rerun resumes from it" if previous is not None
            else "there is no earlier backup, so a rerun starts from step 0")
    return (f"{run_dir.backup_prefix(step)}: backup of step {step} not written: {reason}; nothing of it counts and "
            f"{kept}. Free space on the run dir's file system (or raise the quota, or repair the disk), then run "
            "again with the same run dir")


def restore_failed(choice: BackupChoice, err: Exception) -> str:
    """The one line of a backup TensorFlow could not restore, and what to do about it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    what = f"{type(err).__name__}: {lines[0][:200] if lines else 'no message'}"
    if choice.verified:
        hint = ("its files verify, so this job's model or optimizer is not the one that wrote it: resume with the "
                f"run's own job ({RunDir.JOB} in the run dir)")
    else:
        hint = (f"it was written before commit markers, unverified, and may be cut short: remove "
                f"{choice.prefix}.* to resume from an older backup, or move {choice.prefix.parent} away to start "
                "again from step 0")
    return f"{choice.prefix}: cannot be restored ({what}); {hint}"


class UserCheckpoints:
    """Weights the user keeps: every N epochs/steps (the last K) and the best by a metric.

    Files (named by ``RunDir``): ``checkpoints/epoch-0003.weights.h5`` or ``step-000150.weights.h5``,
    ``best.weights.h5`` with ``best.json`` (epoch, step, metric, value and the weights file's size
    and CRC-32), and ``index.json`` listing the kept files. A resumed run reads them back verified
    (``read_checkpoint_state``): what does not verify is named in one line each and left out.
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
        if run_dir.checkpoints.is_dir():  # resumed run: keep rotating the same files
            state = read_checkpoint_state(run_dir)
            self.kept, self.best = state.kept, state.best
            for line in state.notes:
                log.log(logging.WARNING if files.is_chief else logging.INFO, "%s", line)
            if files.is_chief:
                for path in state.unusable:
                    remove(path)

    def _write_weights(self, path: Path) -> None:
        with self.files.write(path) as tmp:
            save_weights_h5(self.model, tmp)

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
        meta = {"epoch": epoch, "step": step, "monitor": self.monitor, "value": value}
        if self.files.is_chief:  # what best.json describes: a reader checks the weights are those
            meta["weights"] = file_record(self.run_dir.best_weights)
        self._write_json(self.run_dir.best_meta, meta)
        if self.files.is_chief:
            self._write_index()
        return True

    def _write_index(self) -> None:
        self._write_json(self.run_dir.checkpoint_index, {"kept": self.kept, "best": self.best})


@dataclass(frozen=True)
class CheckpointState:
    """What a resumed run continues from in ``checkpoints/`` (``read_checkpoint_state``).

    Attributes:
        kept: the periodic checkpoints that verify, oldest first (their rotation continues).
        best: the best value to beat (None: the next evaluation saves a new best).
        notes: one line for each file that did not verify, saying why and what happens to it.
        unusable: files that did not verify, which the chief removes.
    """

    kept: list[str]
    best: Optional[float]
    notes: list[str]
    unusable: list[Path]


_PERIODIC = re.compile(rf"((?:epoch|step)-\d+){re.escape(RunDir.WEIGHTS_SUFFIX)}")


def read_checkpoint_state(run_dir: RunDir) -> CheckpointState:
    """The kept checkpoints and the best value of a run dir, each file verified on read.

    ``index.json`` lists the kept files (unreadable: the periodic files present are taken instead),
    each of which must read whole (``weights_problem``); a periodic file the index does not list yet
    (a crash between the two writes) is kept when it verifies. The best value is ``best.json``'s when
    it describes ``best.weights.h5`` (size and CRC-32), else ``index.json``'s; a best weights file
    that does not read whole is dropped with its ``best.json``, so the next evaluation makes a new
    best. Every worker reads the same files, so every worker decides alike.
    """
    notes: list[str] = []
    unusable: list[Path] = []
    index = _read_json(run_dir.checkpoint_index, notes, "the kept files are taken from checkpoints/")
    present = sorted(m.group(1) for p in run_dir.checkpoints.iterdir() if (m := _PERIODIC.fullmatch(p.name)))
    listed = index.get("kept") if isinstance(index.get("kept"), list) else []
    kept = []
    for name in [n for n in listed if isinstance(n, str)] + [n for n in present if n not in listed]:
        path = run_dir.checkpoint_weights(name)
        problem = weights_problem(path)
        if problem is None:
            kept.append(name)
        elif path.exists():
            notes.append(f"{path}: skipped: {problem}; it is removed and left out of the kept checkpoints")
            unusable.append(path)
    return CheckpointState(kept, _best_value(run_dir, index, notes, unusable), notes, unusable)


def _best_value(run_dir: RunDir, index: dict, notes: list[str], unusable: list[Path]) -> Optional[float]:
    weights = run_dir.best_weights
    if not weights.exists():
        return None
    problem = weights_problem(weights)
    if problem:
        notes.append(f"{weights}: skipped: {problem}; it is removed with {RunDir.BEST_META}, and the next "
                     "evaluation saves a new best")
        unusable.extend([weights, run_dir.best_meta])
        return None
    fallback = index.get("best") if isinstance(index.get("best"), (int, float)) else None
    meta = _read_json(run_dir.best_meta, notes, f"the best value to beat is {RunDir.CHECKPOINT_INDEX}'s ({fallback})")
    value = meta.get("value")
    if not isinstance(value, (int, float)):
        return fallback
    record = meta.get("weights")
    mismatch = file_problem(weights, record) if isinstance(record, dict) else None
    if mismatch:
        notes.append(f"{run_dir.best_meta}: does not describe {weights.name} ({mismatch}); the best value to beat "
                     f"is {RunDir.CHECKPOINT_INDEX}'s ({fallback})")
        return fallback
    return float(value)


def _read_json(path: Path, notes: list[str], instead: str) -> dict:
    """A JSON object from ``path`` ({} when missing); an unreadable one adds a line to ``notes``."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        notes.append(f"{path}: skipped: cannot be read ({getattr(err, 'strerror', None) or err}); {instead}")
        return {}
    if not isinstance(value, dict):
        notes.append(f"{path}: skipped: not a JSON object; {instead}")
        return {}
    return value


def weights_problem(path: Path) -> Optional[str]:
    """Why a ``.weights.h5`` file cannot be trusted (None: HDF5 opens it and reads every array in it
    whole; a file cut short fails HDF5's own end-of-file check)."""
    import h5py

    def read(_name, item):
        if isinstance(item, h5py.Dataset):
            item[()]

    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
    except FileNotFoundError:
        return "missing"
    except Exception as err:  # h5py raises OSError, KeyError or RuntimeError for a damaged file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"HDF5 cannot read it whole ({lines[0][:160] if lines else type(err).__name__})"
    return None
