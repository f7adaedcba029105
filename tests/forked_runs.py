"""Starts ``distrain`` runs in 3-4 s instead of about 10: a process that has imported TensorFlow and
distrain once forks one child per run, and each child runs ``distrain.cli.main(argv)``. The fault
campaign (tests/test_fault_campaign.py) starts its hundreds of runs this way; each is still a
process of its own, killed, stopped and signalled as any other.

Not a test module. Run by the campaign as::

    python tests/forked_runs.py SOCKET     # listens on the unix socket SOCKET for one client

Requests and answers are JSON lines on the socket:

- ``{"argv": [...], "env": {...}, "log": PATH, "progress": PATH or null}`` → ``{"pid": N}``: a child
  runs ``distrain ARGV`` with ``env`` added to this process's environment (a null value removes
  a variable), its stdout and stderr in ``log``; with ``progress``, each finished optimizer step
  is written there (only the step number), so a client can aim a fault at a step.
- ``{"exited": N, "code": C}`` when child N ends: its exit code, or minus the signal that ended it.

The server ends, killing the children still running, when the client closes the socket.

What a forked child does not repeat is the import of TensorFlow: a fault during that import
meets a process that has written nothing yet. TensorFlow's runtime is not started before the
fork (importing it only lists the devices), so every child configures it anew (threads,
collectives, ``MultiWorkerMirroredStrategy``).
"""
from __future__ import annotations

import importlib
import io
import json
import os
import select
import signal
import socket
import sys
import traceback

# What every run imports, imported once here (the children inherit it); distrain first (tf-keras).
PRELOAD = ("distrain", "distrain.cli", "distrain.run", "matplotlib.pyplot")


def _preload() -> None:
    importlib.import_module("distrain")
    from distrain.tf_startup import import_tensorflow

    import_tensorflow()  # with the device query, but no op: the runtime starts in each child
    for name in PRELOAD:
        importlib.import_module(name)


def _progress_callback(path: str):
    import tensorflow as tf

    class Progress(tf.keras.callbacks.Callback):
        """Writes the optimizer step after each batch, last among the callbacks (after the backup)."""

        def on_train_batch_end(self, batch, logs=None):
            step = str(int(self.model.optimizer.iterations.numpy())).encode()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, step)
            finally:
                os.close(fd)

    return Progress()


def _child(request: dict) -> int:
    """Runs in the forked child: ``distrain ARGV`` as the request says; returns its exit code."""
    os.setsid()  # its own process group, as a launcher's task has
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    # New stream objects: the server's may have been in use (their locks held) at the fork.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True)
    for key, value in request.get("env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)
    from distrain import cli

    if request.get("progress"):
        real_train = cli.train
        progress = _progress_callback(request["progress"])

        def train(spec, run_dir, **kwargs):
            extra = [*kwargs.pop("extra_callbacks", ()), progress]
            return real_train(spec, run_dir, extra_callbacks=extra, **kwargs)

        cli.train = train
    try:
        return int(cli.main(request["argv"]) or 0)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    except BaseException:  # what the console script would print before exit 1
        traceback.print_exc()
        return 1


def _fork(request: dict, conn: socket.socket) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            conn.close()  # the client sees the server's end only
            code = _child(request)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _reap(children: set) -> list[tuple[int, int]]:
    ended = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in children:
            children.discard(pid)
            ended.append((pid, os.waitstatus_to_exitcode(status)))
    return ended


def serve(path: str) -> None:
    """Answers one client on the unix socket ``path`` until it hangs up."""
    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    conn, _ = listener.accept()
    listener.close()
    children: set[int] = set()
    pending = b""
    try:
        while True:
            # One thread only: a fork copies no other thread of ours, and no lock held by one.
            readable, _, _ = select.select([conn], [], [], 0.02)
            if readable:
                data = conn.recv(65536)
                if not data:
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    pid = _fork(json.loads(line), conn)
                    children.add(pid)
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            for pid, code in _reap(children):
                conn.sendall(json.dumps({"exited": pid, "code": code}).encode() + b"\n")
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    serve(sys.argv[1])
