"""Starts ``distrain`` runs in 3-4 s instead of about 10: a process that has imported TensorFlow and
distrain once forks one child per run, and each child runs ``distrain.cli.main(argv)``. The fault
campaign (tests/test_fault_campaign.py) starts its hundreds of runs this way; each is still a
process of its own, killed, stopped and signalled as any other.

Not a test module. Run by the campaign, and by conftest's ``run_distrain(..., forked=True)``, as::

    python tests/forked_runs.py SOCKET     # listens on the unix socket SOCKET for one client

``ForkServer`` below is the client. Requests and answers are JSON lines on the socket:

- ``{"argv": [...], "env": {...}, "log": PATH, "progress": PATH or null}`` → ``{"pid": N}``: a child
  runs ``distrain ARGV`` with ``env`` added to this process's environment (a null value removes
  a variable), its stdout and stderr in ``log``; with ``progress``, each finished optimizer step
  is written there (only the step number), so a client can aim a fault at a step. Optional:
  ``"stderr": PATH`` (stderr there, stdout in ``log``), ``"cwd": PATH`` (the child's working
  directory), ``"code": TEXT`` (the child runs ``python -c TEXT ARGV`` instead of distrain).
- ``{"exited": N, "code": C}`` when child N ends: its exit code, or minus the signal that ended it.

The server ends, killing the children still running, when the client closes the socket.

What a forked child does not repeat is the import of TensorFlow: a fault during that import
meets a process that has written nothing yet. TensorFlow's runtime is not started before the
fork (importing it only lists the devices), so every child configures it anew (threads,
collectives, ``MultiWorkerMirroredStrategy``).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

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
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    out = os.open(request["log"], flags, 0o644)
    os.dup2(out, 1)
    os.dup2(os.open(request["stderr"], flags, 0o644) if request.get("stderr") else out, 2)
    if request.get("cwd"):
        os.chdir(request["cwd"])
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
        if request.get("code") is not None:  # python -c CODE ARGV
            sys.argv = ["-c", *request["argv"]]
            exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})
            return 0
        return int(cli.main(request["argv"]) or 0)
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)  # as python does with sys.exit("message")
        return 1
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


# ----------------------------------------------------------------------------- the client

class ForkServer:
    """A client of tests/forked_runs.py, which forks each run from a process that imported TensorFlow."""

    def __init__(self, path: Path, timeout: float = 180):
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the fork server at {path} did not start within {timeout:.0f} s") from None
                time.sleep(0.1)
        self.codes: dict[int, int] = {}
        self._pids: list[int] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with self.sock.makefile("rb") as lines:
            for line in lines:
                message = json.loads(line)
                with self._changed:
                    if "pid" in message:
                        self._pids.append(message["pid"])
                        self.codes.pop(message["pid"], None)  # an earlier child's, whose pid the kernel reused
                    else:
                        self.codes[message["exited"]] = message["code"]
                    self._changed.notify_all()

    def start(self, argv: list[str], log: Path, env: Optional[dict] = None, progress: Optional[Path] = None, *,
              stderr: Optional[Path] = None, cwd: Optional[Path] = None, code: Optional[str] = None) -> int:
        """Forks a child running ``distrain ARGV`` (the request above); returns its pid."""
        request = {"argv": [str(a) for a in argv], "env": env or {}, "log": str(log),
                   "progress": str(progress) if progress else None, "stderr": str(stderr) if stderr else None,
                   "cwd": str(cwd) if cwd else None, "code": code}
        with self._changed:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            if not self._changed.wait_for(lambda: self._pids, timeout=30):
                raise RuntimeError("the fork server did not answer within 30 s")
            return self._pids.pop(0)

    def wait(self, pid: int, until: float) -> Optional[int]:
        """The exit code of ``pid``, waiting until ``until`` (monotonic) at most; None if still running."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self.codes, timeout=max(0.0, until - time.monotonic()))
            return self.codes.get(pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


if __name__ == "__main__":
    serve(sys.argv[1])
