"""The run dir: every path a run writes, and the one way files in it are replaced.

Every worker of a run names the same directory (``runs/<job>/<run id>`` or ``--run-dir``). Where
it lives (``RunDir.for_training``, ``for_bench``, ``for_slurm_launcher``, ``for_ray``) and its layout
are defined here and nowhere else; ``report``, the launchers and the SLURM shell launcher
(``slurm/distrain-launch.sh``, checked by ``tests/test_rundir.py``) read the same names::

    job.yaml            the resolved job (chief, at start)
    segments.json       each start of the run: its step, world size and batch arithmetic (chief)
    summary.json        the run summary (chief, at the end)
    history.json/.csv   one row per finished epoch (chief)
    curves.png          accuracy and loss per epoch (chief, at the end)
    model.keras         the trained model (chief)
    checkpoints/        the weights the user keeps (chief): <name>.weights.h5 (epoch-0003,
                        step-000150), best.weights.h5 with best.json, index.json (what is kept)
    backup/             the resume state (chief; ``backup/checkpoint`` is its index, ``ckpt-<step>``
                        its checkpoints)
    tensorboard/        TensorBoard event files (chief)
    logs/rank<r>.log    every worker's log
    .ray-worker-<r>.pid under distrain ray: the pid of each rank's process
    .rendezvous-secret  the start-up rendezvous's per-run secret (chief, mode 0600)
    .workertemp/rank<r> scratch of a non-chief worker, deleted as it goes

Nothing here imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

from distrain.errors import UsageError

PathLike = Union[str, os.PathLike]
# A rendezvous secret file every worker reads instead of RUN_DIR/.rendezvous-secret (``rendezvous``).
SECRET_ENV = "DISTRAIN_SECRET_FILE"


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
    CHECKPOINT_INDEX = "index.json"  # inside checkpoints/: the kept files and the best value
    BEST_WEIGHTS = "best"  # checkpoints/best.weights.h5
    BEST_META = "best.json"  # inside checkpoints/: epoch, step, metric and value of the best weights
    WEIGHTS_SUFFIX = ".weights.h5"  # Keras's one-file weights format (it picks the format by the suffix)
    BACKUP_INDEX = "checkpoint"  # tf.train.CheckpointManager's index file inside backup/
    BACKUP_PREFIX = "ckpt"  # backup/ckpt-<step>: CheckpointManager's checkpoint_name, numbered by the step
    TENSORBOARD = "tensorboard"
    # TensorBoard "runs" (sub-directories of tensorboard/); report.py reads what tensorboard_log writes.
    TB_TRAIN, TB_VALIDATION, TB_TEST = "train", "validation", "test"
    LOGS = "logs"
    SCRATCH = ".workertemp"
    RENDEZVOUS_SECRET = ".rendezvous-secret"

    RAY_RUN = "run"  # distrain ray: STORAGE/NAME/run, the same for every attempt

    def __init__(self, root: PathLike):
        self.root = Path(root)

    # -- where a run dir lives -----------------------------------------------------------------

    @staticmethod
    def run_id(env: Mapping[str, str], *, explicit: Optional[str] = None) -> Optional[str]:
        """The run's id every worker agrees on: ``--run-id``, ``$DISTRAIN_RUN_ID`` or ``slurm-$SLURM_JOB_ID``
        (None: no launcher named one)."""
        if explicit:
            return explicit
        if env.get("DISTRAIN_RUN_ID"):
            return env["DISTRAIN_RUN_ID"]
        return f"slurm-{env['SLURM_JOB_ID']}" if env.get("SLURM_JOB_ID") else None

    @classmethod
    def for_training(cls, output_dir: str, name: str, *, run_dir: Optional[PathLike] = None,
                     run_id: Optional[str] = None, world_size: int = 1, env: Mapping[str, str] = os.environ,
                     now: Optional[datetime.datetime] = None) -> Path:
        """Where a training run writes: ``run_dir`` as given, else ``OUTPUT_DIR/NAME/<run id>``.

        Every worker must compute the same directory, so a time-stamped id is only allowed for a
        single process; launchers give a job id.

        Raises:
            UsageError: several workers and nothing they could all agree on.
        """
        if run_dir:
            return Path(run_dir)
        run_id = cls.run_id(env, explicit=run_id)
        if run_id is None:
            if world_size > 1:
                raise UsageError("--run-dir: required with several workers outside SLURM (each worker must "
                                 "name the same directory), or set DISTRAIN_RUN_ID")
            run_id = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
        return Path(output_dir) / name / run_id

    @classmethod
    def for_bench(cls, output_dir: str, name: str, *, run_dir: Optional[PathLike] = None, world_size: int = 1,
                  env: Mapping[str, str] = os.environ) -> Optional[Path]:
        """Where the workers of ``distrain bench`` write: one directory they all see, when there are several.

        The start-up rendezvous keeps the run's secret there (``rendezvous``), so separate temporary
        directories per worker would leave the others waiting for it. One worker, or a secret given
        with ``DISTRAIN_SECRET_FILE``: ``run_dir`` as given (None: a temporary directory). Under SLURM:
        ``OUTPUT_DIR/NAME/bench-slurm-JOB.STEP``, new for every ``srun``.

        Raises:
            UsageError: several workers outside SLURM without ``--run-dir`` or the secret file, or a
                ``--run-dir`` that holds a backup (a benchmark there would resume instead of measuring).
        """
        if run_dir is None and world_size > 1 and not env.get(SECRET_ENV):
            if not env.get("SLURM_JOB_ID"):
                raise UsageError("--run-dir: required with several workers outside SLURM: a fresh directory every "
                                 f"worker sees (the start-up rendezvous keeps its secret there), or set {SECRET_ENV}")
            run_dir = Path(output_dir) / name / f"bench-slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', 0)}"
        if run_dir is not None and cls(run_dir).backup_step() > 0:
            raise UsageError(f"--run-dir: {run_dir} holds a run's backup; a benchmark there would resume it: give a "
                             "fresh directory")
        return Path(run_dir) if run_dir is not None else None

    @staticmethod
    def for_slurm_launcher(runs_dir: str, name: str, *, bench: bool, env: Mapping[str, str] = os.environ,
                           cwd: Optional[PathLike] = None) -> Path:
        """The run dir ``slurm/distrain-launch.sh`` gives every task of an sbatch job: ``$DISTRAIN_RUN_DIR``,
        else ``RUNS_DIR/NAME/slurm-JOBID`` (``bench-slurm-JOBID`` for a benchmark), absolute. Keyed by
        the job id, so a requeued job finds its backup."""
        given = env.get("DISTRAIN_RUN_DIR")
        path = Path(given) if given else Path(runs_dir) / name / f"{'bench-' if bench else ''}slurm-{env['SLURM_JOB_ID']}"
        return path if path.is_absolute() else Path(cwd or os.getcwd()) / path

    @classmethod
    def for_ray(cls, experiment_dir: PathLike) -> Path:
        """``distrain ray``'s run dir, ``STORAGE/NAME/run``: the same for every attempt, so a
        restarted worker group resumes from the backup."""
        return Path(experiment_dir) / cls.RAY_RUN

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

    def checkpoint_weights(self, name: str) -> Path:
        """``checkpoints/<name>.weights.h5``: a kept set of weights (``epoch-0003``, ``step-000150``, ``best``)."""
        return self.checkpoints / f"{name}{self.WEIGHTS_SUFFIX}"

    @property
    def checkpoint_index(self) -> Path:
        return self.checkpoints / self.CHECKPOINT_INDEX

    @property
    def best_weights(self) -> Path:
        return self.checkpoint_weights(self.BEST_WEIGHTS)

    @property
    def best_meta(self) -> Path:
        return self.checkpoints / self.BEST_META

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
        match = re.search(rf'^model_checkpoint_path: "{re.escape(self.BACKUP_PREFIX)}-(\d+)"', text, re.M)
        return int(match.group(1)) if match else 0

    def is_started(self) -> bool:
        """Whether a run has started here (its ``job.yaml`` and ``logs/`` exist)."""
        return self.job.exists() and self.logs.is_dir()
