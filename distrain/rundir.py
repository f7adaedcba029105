"""The run dir: every path a run writes, and the one way files in it are replaced.

Every worker of a run names the same directory (``runs/<job>/<run id>`` or ``--run-dir``). Its
layout is defined here and nowhere else; ``report``, the launchers and the SLURM shell launcher
(``slurm/distrain-launch.sh``, checked by ``tests/test_rundir.py``) read the same names::

    job.yaml            the resolved job (chief, at start)
    segments.json       each start of the run: its step, world size and batch arithmetic (chief)
    summary.json        the run summary (chief, at the end)
    history.json/.csv   one row per finished epoch (chief)
    curves.png          accuracy and loss per epoch (chief, at the end)
    model.keras         the trained model (chief)
    checkpoints/        the weights the user keeps (chief)
    backup/             the resume state (chief; ``backup/checkpoint`` is its index)
    tensorboard/        TensorBoard event files (chief)
    logs/rank<r>.log    every worker's log
    .ray-worker-<r>.pid under distrain ray: the pid of each rank's process
    .rendezvous-secret  the start-up rendezvous's per-run secret (chief, mode 0600)
    .workertemp/rank<r> scratch of a non-chief worker, deleted as it goes

Nothing here imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success renames it onto ``path`` atomically.

    Readers (TensorBoard, ``distrain report``, a resuming worker) never see a half-written file:
    they see the old one or the new one. The temporary name keeps the target's suffix, because
    Keras picks a save format by it. On an exception the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        remove(tmp)


def write_atomically(path: PathLike, text: str, *, mode: int | None = None) -> None:
    """Writes ``text`` to ``path`` through ``replacing`` (``mode``: its permission bits)."""
    with replacing(path) as tmp:
        tmp.write_text(text)
        if mode is not None:
            tmp.chmod(mode)


def remove(path: Path) -> None:
    """Removes a file or a directory tree; a missing one is fine."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class RunDir:
    """The paths of one run dir (see the module docstring for the layout)."""

    JOB = "job.yaml"
    SEGMENTS = "segments.json"
    SUMMARY = "summary.json"
    HISTORY = "history.json"
    HISTORY_CSV = "history.csv"
    CURVES = "curves.png"
    MODEL = "model.keras"
    CHECKPOINTS = "checkpoints"
    BACKUP = "backup"
    BACKUP_INDEX = "checkpoint"  # tf.train.CheckpointManager's index file inside backup/
    TENSORBOARD = "tensorboard"
    # TensorBoard "runs" (sub-directories of tensorboard/); report.py reads what tensorboard_log writes.
    TB_TRAIN, TB_VALIDATION, TB_TEST = "train", "validation", "test"
    LOGS = "logs"
    SCRATCH = ".workertemp"
    RENDEZVOUS_SECRET = ".rendezvous-secret"

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def job(self) -> Path:
        return self.root / self.JOB

    @property
    def segments(self) -> Path:
        return self.root / self.SEGMENTS

    def read_segments(self) -> list[dict]:
        """The run's segments (``segments.json``): one per start, oldest first; [] for a new run."""
        import json

        try:
            segments = json.loads(self.segments.read_text())
        except FileNotFoundError:
            return []
        except ValueError:
            from distrain.errors import UsageError

            raise UsageError(f"{self.segments}: not JSON; it records the run's global batch: restore it, or "
                             "remove it to take the job's batch arithmetic") from None
        return segments if isinstance(segments, list) else []

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def history(self) -> Path:
        return self.root / self.HISTORY

    @property
    def history_csv(self) -> Path:
        return self.root / self.HISTORY_CSV

    @property
    def curves(self) -> Path:
        return self.root / self.CURVES

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def backup(self) -> Path:
        return self.root / self.BACKUP

    @property
    def backup_index(self) -> Path:
        return self.backup / self.BACKUP_INDEX

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def logs(self) -> Path:
        return self.root / self.LOGS

    def log_file(self, rank: int) -> Path:
        """``logs/rank<r>.log``: every worker logs to its own file."""
        return self.logs / f"rank{rank}.log"

    @property
    def scratch_root(self) -> Path:
        return self.root / self.SCRATCH

    def scratch(self, rank: int) -> Path:
        """Where a non-chief worker writes what only the chief's copy of should exist."""
        return self.scratch_root / f"rank{rank}"

    @property
    def rendezvous_secret(self) -> Path:
        """The per-run secret of the start-up rendezvous (chief-created, mode 0600; ``rendezvous``)."""
        return self.root / self.RENDEZVOUS_SECRET

    def ray_worker_pid(self, rank: int) -> Path:
        """``.ray-worker-<rank>.pid``: which process is which rank under ``distrain ray``."""
        return self.root / f".ray-worker-{rank}.pid"

    def backup_step(self) -> int:
        """The global step of the latest backup, from its index file (0 without a backup).

        The backup is saved with the step as its checkpoint number (``ckpt-<step>``), so the step
        is known before any model exists (``context.resolve`` needs it).
        """
        try:
            text = self.backup_index.read_text()
        except OSError:
            return 0
        match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', text, re.M)
        return int(match.group(1)) if match else 0

    def is_started(self) -> bool:
        """Whether a run has started here (its ``job.yaml`` and ``logs/`` exist)."""
        return self.job.exists() and self.logs.is_dir()
