"""Errors a user can act on, and the exit codes every launcher relies on."""
from __future__ import annotations

import errno
import os
import signal
from typing import Optional

# Exit codes. The SLURM templates and the Ray launcher read these; keep them stable.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # bad input, found before anything expensive started
# EX_IOERR: a file of the run could not be written (disk full, over quota, I/O error); the previous
# backup is kept and nothing half-written is trusted. Launchers do not requeue it: a rerun would hit
# the same full disk. Free space, then rerun with the same run dir.
EXIT_WRITE_FAILED = 74
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: backup written at a step boundary; rerun with the same run dir
EXIT_PEER_LOST = 76  # a collective timed out or a peer died; rerun resumes from the backup
EXIT_NAN = 77  # the loss became NaN or Inf; the last good checkpoint is kept


class UsageError(Exception):
    """Bad input: a job file, a key, a flag or an environment the user can fix.

    The message is one line naming the file, key or flag and what was expected; the CLI prints it
    and exits with ``EXIT_USAGE`` before anything is started or written.
    """


class TrainingStopped(Exception):
    """Training ended early for a reason that maps onto a documented exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WriteFailed(TrainingStopped):
    """A file could not be written because the disk is full, over quota or failing (``EXIT_WRITE_FAILED``).

    The message is one line naming the file, the reason and what was kept.
    """

    def __init__(self, message: str):
        super().__init__(message, EXIT_WRITE_FAILED)


# What a full or failing file system gives a writer: the errno, and the text TensorFlow's C++ writers
# put in their errors (they carry no errno).
_WRITE_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EIO: "EIO"}


def write_failure(err: BaseException) -> Optional[str]:
    """``"No space left on device (ENOSPC)"`` when ``err`` says the disk is full, over quota or failing;
    None for any other error.

    Python and h5py raise ``OSError`` with the errno; TensorFlow's savers raise an ``OpError`` whose
    message holds the system's text.

    Example:
        >>> write_failure(OSError(errno.ENOSPC, "No space left on device"))
        'No space left on device (ENOSPC)'
        >>> write_failure(RuntimeError("... /b/ckpt-1_temp/part-00000; Disk quota exceeded [Op:SaveV2]"))
        'Disk quota exceeded (EDQUOT)'
        >>> write_failure(OSError(errno.ENOENT, "No such file or directory")) is None
        True
    """
    code = getattr(err, "errno", None)
    if code in _WRITE_ERRNOS:
        return f"{os.strerror(code)} ({_WRITE_ERRNOS[code]})"
    text = str(err)
    for number, name in _WRITE_ERRNOS.items():
        if os.strerror(number) in text:
            return f"{os.strerror(number)} ({name})"
    return None


# Where a run killed by a signal is explained (the oneDNN crash of TensorFlow 2.21 among others).
SIGNAL_HELP = "docs/troubleshooting.md#a-run-dies-by-a-signal"
_CRASHES = ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE")


def killed_by(returncode: int) -> Optional[str]:
    """The name of the signal that killed a process, from its exit code, or None.

    Python's ``subprocess`` gives ``-N`` for a child killed by signal N; shells, ``srun`` and
    ``sbatch`` give ``128 + N``. None for the codes distrain itself exits with.

    Example:
        >>> killed_by(-11), killed_by(134), killed_by(76)
        ('SIGSEGV', 'SIGABRT', None)
    """
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 128 + 65 else None
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def signal_death(who: str, returncode: int) -> Optional[str]:
    """One line for a process killed by a signal, pointing to the troubleshooting page; None if it was not.

    Example:
        >>> print(signal_death("worker 1", -6))  # doctest: +ELLIPSIS
        worker 1 died by SIGABRT (exit -6): a crash in TensorFlow or a library; ...; see docs/troubleshooting.md#...
    """
    name = killed_by(returncode)
    if name is None:
        return None
    if name in _CRASHES:
        why = ("a crash in TensorFlow or a library; TensorFlow 2.21's oneDNN crash (munmap_chunk(): invalid "
               "pointer) goes away with TF_ENABLE_ONEDNN_OPTS=0")
    elif name == "SIGKILL":
        why = "killed from outside (out of memory, scancel, the time limit?)"
    else:
        why = "stopped from outside"
    return f"{who} died by {name} (exit {returncode}): {why}; see {SIGNAL_HELP}"
