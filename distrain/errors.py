"""Errors a user can act on, and the exit codes every launcher relies on."""

# Exit codes. The SLURM templates and the Ray launcher read these; keep them stable.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # bad input, found before anything expensive started
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
