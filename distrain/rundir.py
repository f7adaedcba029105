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
    backup/             the resume state (chief): ``ckpt-<step>`` its checkpoints, each counted only
                        once ``ckpt-<step>.commit`` (its commit marker, written last) exists;
                        ``backup/checkpoint`` TensorFlow's index of the committed ones
    tensorboard/        TensorBoard event files (chief)
    logs/rank<r>.log    every worker's log
    .ray-worker-<r>.pid under distrain ray: the pid of each rank's process
    .rendezvous-secret  the start-up rendezvous's per-run secret (chief, mode 0600)
    .workertemp/rank<r> scratch of a non-chief worker, deleted as it goes

A backup counts once its commit marker exists: written last, after its files are on disk, it holds
each file's size and CRC-32, and reading a backup checks them (``RunDir.choose_backup``): a run
resumes from the newest backup that verifies. Files are replaced through ``replacing``: written
beside the target, flushed to disk, renamed into place.

Nothing here imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

from distrain.errors import UsageError, WriteFailed, write_failure

PathLike = Union[str, os.PathLike]
# A rendezvous secret file every worker reads instead of RUN_DIR/.rendezvous-secret (``rendezvous``).
SECRET_ENV = "DISTRAIN_SECRET_FILE"


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success flushes it to disk and renames it onto
    ``path`` atomically.

    Readers (TensorBoard, ``distrain report``, a resuming worker) never see a half-written file:
    they see the old one or the new one, also after a crash of the node (the data is on disk
    before the rename). The temporary name keeps the target's suffix, because Keras picks a save
    format by it. On an exception the temporary file is removed and ``path`` is left as it was.

    Raises:
        WriteFailed: the disk is full, over quota or failing (``errors.write_failure``).
    """
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    with failed_writes_stop(path, f"{path.name} as it was before is unchanged"):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            sync(tmp)
            os.replace(tmp, path)
            sync(path.parent, directory=True)
        finally:
            with contextlib.suppress(OSError):  # an I/O error here must not hide the one that matters
                remove(tmp)


@contextlib.contextmanager
def failed_writes_stop(path: PathLike, kept: str) -> Iterator[None]:
    """Turns a write that fails because the disk is full, over quota or failing into ``WriteFailed``:
    one line naming ``path``, the reason and ``kept`` (what is still intact). Other errors pass."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        raise WriteFailed(f"{path}: not written: {reason}; {kept}. Free space on its file system (or raise the "
                          "quota, or repair the disk), then run again with the same run dir") from err


def sync(path: PathLike, *, directory: bool = False) -> None:
    """Flushes a file, or with ``directory`` a directory's entries, to disk (``fsync``)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        # Some network and FUSE file systems cannot fsync a directory (EINVAL); the rename is then
        # as durable as they make it. A full or failing disk still stops the write.
        if not directory or write_failure(err) is not None:
            raise


def file_crc32(path: PathLike) -> int:
    """The CRC-32 of a file's bytes (zlib's, read in 1 MiB blocks)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def file_record(path: PathLike) -> dict:
    """``{"size": bytes, "crc32": checksum}`` of a file: what a commit marker or ``best.json`` records."""
    return {"size": os.path.getsize(path), "crc32": file_crc32(path)}


def file_problem(path: PathLike, record: Mapping) -> Optional[str]:
    """Why a file does not match its ``file_record`` (None: it does).

    Example:
        >>> file_problem("/nonexistent/ckpt-1.index", {"size": 1, "crc32": 0})
        'ckpt-1.index is missing'
    """
    name = Path(path).name
    try:
        size = os.path.getsize(path)
        if size != record.get("size"):
            return f"{name} has {size} bytes, {record.get('size')} were written (cut short or overwritten)"
        if file_crc32(path) != record.get("crc32"):
            return f"{name} does not match the checksum of what was written (its bytes changed)"
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as err:
        return f"{name} cannot be read ({err.strerror or err})"
    return None


@dataclass(frozen=True)
class BackupChoice:
    """The backup a run resumes from (``RunDir.choose_backup``).

    Attributes:
        step: the global step it holds (0: none; the run starts from step 0).
        prefix: the checkpoint to restore (``backup/ckpt-<step>``; None without one).
        verified: False for a backup written before commit markers (restored as TensorFlow's index
            names it, unchecked).
        skipped: (step, why) of each newer backup passed over, newest first.
        stale: steps of the backups the chief removes before it saves again: those newer than
            ``step`` and those never committed (a new save of the same step must not meet them).
    """

    step: int = 0
    prefix: Optional[Path] = None
    verified: bool = True
    skipped: tuple[tuple[int, str], ...] = ()
    stale: tuple[int, ...] = ()


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
    BACKUP_INDEX = "checkpoint"  # TensorFlow's index file inside backup/ (tf.train.latest_checkpoint reads it)
    BACKUP_PREFIX = "ckpt"  # backup/ckpt-<step>: a checkpoint's prefix, numbered by the step
    BACKUP_COMMIT = ".commit"  # backup/ckpt-<step>.commit: the commit marker, written last
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
        if run_dir is not None and cls(run_dir).has_backup():
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
        """The global step a run here resumes from: the newest backup that verifies (0 without a backup).

        Raises:
            UsageError: the run dir holds backups and none verifies (``choose_backup``).
        """
        return self.choose_backup().step

    def has_backup(self) -> bool:
        """Whether ``backup/`` holds any backup, complete or not, or TensorFlow's index of one."""
        committed, written = self._backup_steps()
        return bool(committed or written) or self.backup_index.exists()

    # -- the backup's files: committed last, verified on read ------------------------------------

    def backup_prefix(self, step: int) -> Path:
        """``backup/ckpt-<step>``: the prefix TensorFlow writes a backup's files under."""
        return self.backup / f"{self.BACKUP_PREFIX}-{step}"

    def backup_commit(self, step: int) -> Path:
        """``backup/ckpt-<step>.commit``: the backup's commit marker (its files' sizes and CRC-32)."""
        return self.backup / f"{self.BACKUP_PREFIX}-{step}{self.BACKUP_COMMIT}"

    def backup_files(self, step: int) -> list[Path]:
        """The files TensorFlow wrote for ``ckpt-<step>``: its ``.index`` and ``.data-*`` files."""
        pattern = re.compile(rf"{re.escape(self.BACKUP_PREFIX)}-{step}\.(index|data-\d+-of-\d+)")
        return sorted(p for p in self._backup_entries() if pattern.fullmatch(p.name))

    def _backup_entries(self) -> list[Path]:
        try:
            return list(self.backup.iterdir())
        except OSError:
            return []

    def _backup_steps(self) -> tuple[set[int], set[int]]:
        """(steps with a commit marker, steps with any other file: a checkpoint's or a save's temporary)."""
        committed, written = set(), set()
        pattern = re.compile(rf"{re.escape(self.BACKUP_PREFIX)}-(\d+)(\{self.BACKUP_COMMIT}$|[._])")
        for entry in self._backup_entries():
            match = pattern.match(entry.name)
            if match:
                (committed if match.group(2) == self.BACKUP_COMMIT else written).add(int(match.group(1)))
        return committed, written

    def committed_backups(self) -> list[int]:
        """Steps of the backups with a commit marker, oldest first (not verified: ``verify_backup``)."""
        return sorted(self._backup_steps()[0])

    def commit_backup(self, step: int) -> None:
        """Commits ``ckpt-<step>``: its files flushed to disk, then its commit marker with each file's
        size and CRC-32, written last (the one write after which the backup counts).

        Raises:
            FileNotFoundError: TensorFlow wrote no ``.index`` for it.
            WriteFailed: the disk is full, over quota or failing.
        """
        files = self.backup_files(step)
        if not any(p.name.endswith(".index") for p in files):
            raise FileNotFoundError(f"{self.backup_prefix(step)}.index: the save wrote no index")
        record = {"step": step, "files": {}}
        with failed_writes_stop(self.backup_prefix(step), "it does not count (no commit marker)"):
            for path in files:
                sync(path)
                record["files"][path.name] = file_record(path)
            sync(self.backup, directory=True)
        write_atomically(self.backup_commit(step), json.dumps(record, indent=1) + "\n")

    def verify_backup(self, step: int) -> Optional[str]:
        """Why ``ckpt-<step>`` cannot be trusted, or None when it verifies: its commit marker exists and
        names the step, and every file it lists has the recorded size and CRC-32."""
        marker = self.backup_commit(step)
        try:
            record = json.loads(marker.read_text())
        except FileNotFoundError:
            return "no commit marker: its save did not finish"
        except (OSError, ValueError) as err:
            return f"its commit marker {marker.name} cannot be read ({getattr(err, 'strerror', None) or err})"
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict) or record.get("step") != step or not any(n.endswith(".index") for n in files):
            return f"its commit marker {marker.name} does not describe {self.BACKUP_PREFIX}-{step}"
        for name, expected in sorted(files.items()):
            problem = file_problem(self.backup / name, expected if isinstance(expected, dict) else {})
            if problem:
                return problem
        return None

    def remove_backup(self, step: int) -> None:
        """Removes ``ckpt-<step>``: its commit marker first (from then on it does not count), then its
        files and anything a save of it left behind."""
        remove(self.backup_commit(step))
        pattern = re.compile(rf"{re.escape(self.BACKUP_PREFIX)}-{step}[._]")
        for entry in self._backup_entries():
            if pattern.match(entry.name):
                remove(entry)

    def write_backup_index(self, steps: list[int]) -> None:
        """Writes TensorFlow's index of the backups (``backup/checkpoint``), newest last, so that
        ``tf.train.latest_checkpoint(RUN_DIR/backup)`` names the newest committed one."""
        names = [f"{self.BACKUP_PREFIX}-{s}" for s in sorted(steps)]
        lines = [f'model_checkpoint_path: "{names[-1]}"'] + [f'all_model_checkpoint_paths: "{n}"' for n in names]
        write_atomically(self.backup_index, "\n".join(lines) + "\n")

    def choose_backup(self) -> BackupChoice:
        """The backup a run here resumes from: the newest that verifies (``verify_backup``).

        Newer ones that do not verify (cut short by a crash or a full disk, never committed) are
        skipped, each with one line saying why. A backup directory without any commit marker was
        written by a distrain before them: its newest backup as TensorFlow's index names it is
        taken unverified. Every worker reads the same files, so every worker chooses the same.

        Raises:
            UsageError: backups exist and none verifies (one line naming each and why).
        """
        committed, written = self._backup_steps()
        if not committed and self.backup_index.exists():
            return self._unverified_backup()
        skipped = []
        for step in sorted(committed | written, reverse=True):
            problem = self.verify_backup(step) if step in committed else "no commit marker: its save did not finish"
            if problem is None:
                stale = {s for s in committed | written if s > step} | (written - committed - {step})
                return BackupChoice(step, self.backup_prefix(step), True, tuple(skipped), tuple(sorted(stale)))
            skipped.append((step, problem))
        if committed:
            named = "; ".join(f"{self.BACKUP_PREFIX}-{step}: {why}" for step, why in skipped)
            raise UsageError(f"{self.backup}: no backup verifies, so the run cannot resume: {named}. Restore the "
                             f"files, or move {self.backup} away to start again from step 0")
        return BackupChoice(skipped=tuple(skipped), stale=tuple(sorted(written)))

    def _unverified_backup(self) -> BackupChoice:
        """A backup directory from before commit markers: TensorFlow's index names the backup."""
        try:
            text = self.backup_index.read_text()
        except OSError as err:
            raise UsageError(f"{self.backup_index}: cannot be read ({err.strerror or err}), and no backup has a "
                             "commit marker") from None
        match = re.search(rf'^model_checkpoint_path: "{re.escape(self.BACKUP_PREFIX)}-(\d+)"', text, re.M)
        step = int(match.group(1)) if match else 0
        if step == 0 or not any(p.name.endswith(".index") for p in self.backup_files(step)):
            raise UsageError(f"{self.backup_index}: names {self.BACKUP_PREFIX}-{step}, whose files are missing, and "
                             f"no backup has a commit marker. Restore the files, or move {self.backup} away to start "
                             "again from step 0")
        return BackupChoice(step, self.backup_prefix(step), False)

    def is_started(self) -> bool:
        """Whether a run has started here (its ``job.yaml`` and ``logs/`` exist)."""
        return self.job.exists() and self.logs.is_dir()
