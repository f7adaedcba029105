"""TensorFlow's start-up, without its start-up chatter on the user's terminal.

On a machine without a GPU, importing TensorFlow 2.21 and listing its devices prints lines like::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ... UNKNOWN ERROR (303)

They come from C++ before absl logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL=2`` does not hide
them, and a newcomer reads an E-level "error" where nothing is wrong. The import and the first
device query (which probes CUDA) run with the process's stderr, file descriptor 2, going through a
filter process that drops the known start-up notices and writes every other line on as it comes:
a real error printed there still reaches the terminal, even when the process crashes.

Where: ``import distrain`` calls ``install`` (cheap: TensorFlow is not imported), which puts an
import hook in front of ``sys.meta_path``, so whoever imports TensorFlow afterwards does it with the
notices filtered: distrain's own modules, a user's model file or notebook cell, ``tf_keras``,
TensorBoard started by ``distrain tensorboard`` (``python_command``), ``distrain data pack`` and
``distrain report``. Every ``distrain`` command, the Python API and each SLURM task import
``distrain`` first, so nothing else has to be called; ``import_tensorflow`` also returns the module.

What cannot be filtered: a process that imported TensorFlow before ``distrain`` (a user's script
with ``import tensorflow`` above ``import distrain``) has printed the import's lines before
distrain existed; ``import_tensorflow`` still keeps the cuInit line of the first device query off.

``DISTRAIN_TF_LOG=1`` (``distrain --verbose``) or an explicit ``TF_CPP_MIN_LOG_LEVEL=0`` show
everything.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import os
import re
import subprocess
import sys
from typing import Iterator

from distrain import malloc
from distrain.errors import UsageError

VERBOSE_ENV = "DISTRAIN_TF_LOG"

# Start-up notices that say nothing is wrong. Anything else captured is shown.
STARTUP_NOTICES = tuple(re.compile(p) for p in (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"\] oneDNN custom operations are on\.",
    r"\] Could not find cuda drivers on your machine, GPU will not be used\.",
    r"\] failed call to cuInit: .*(UNKNOWN ERROR \(303\)|CUDA_ERROR_NO_DEVICE|no CUDA-capable device)",
    r"\] This TensorFlow binary is optimized to use available CPU instructions",
    r"\] To enable the following instructions: .* in other operations, rebuild TensorFlow",
    r"^To enable the following instructions: .* in other operations, rebuild TensorFlow",
    r"\] Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory for plugin",
    r"\] TF-TRT Warning: Could not find TensorRT",
))

_probed = False  # the first device query (CUDA's probe) ran with the notices filtered


def is_startup_notice(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's harmless start-up notices."""
    return any(p.search(line) for p in STARTUP_NOTICES)


def verbose(env=os.environ) -> bool:
    """Whether the user asked to see everything: ``DISTRAIN_TF_LOG=1`` or ``TF_CPP_MIN_LOG_LEVEL=0``."""
    return env.get(VERBOSE_ENV, "") not in ("", "0") or env.get("TF_CPP_MIN_LOG_LEVEL", "").strip() == "0"


# The filter: a small Python reading the captured fd 2 through a pipe, writing on what is not a
# notice to where fd 2 went. A separate process, so that what a crash prints (TensorFlow's "compiled
# to use AVX instructions" before an abort, glibc's "munmap_chunk(): invalid pointer") still gets
# out when this process dies in the middle: the pipe ends, the filter writes what it read.
_FILTER = """\
import re, sys
notices = [re.compile(p) for p in sys.argv[1:]]
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not any(p.search(line.decode(errors="replace")) for p in notices):
        out.write(line)
        out.flush()
"""


@contextlib.contextmanager
def startup_notices_filtered() -> Iterator[None]:
    """File descriptor 2 goes through a filter for the block, which drops the start-up notices.

    Everything else written to fd 2 in the block (C++ and Python's ``sys.stderr``) comes out in
    order, as it is written, also if the process crashes in the block. ``verbose()`` turns it off.
    """
    try:
        saved = None if verbose() else os.dup(2)
    except OSError:  # no fd 2 (a daemon): nothing to keep quiet
        saved = None
    if saved is None:
        yield
        return
    read, write = os.pipe()
    try:
        command = [sys.executable, "-I", "-S", "-c", _FILTER, *(p.pattern for p in STARTUP_NOTICES)]
        reader = subprocess.Popen(command, stdin=read, stdout=saved, close_fds=True)
    except OSError:  # no interpreter to start (an embedded Python): unfiltered
        for fd in (read, write, saved):
            os.close(fd)
        yield
        return
    os.close(read)
    _flush_stderr()
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        _flush_stderr()
        os.dup2(saved, 2)  # the pipe's last write end here: the filter reads to its end and exits
        os.close(saved)
        try:
            reader.wait(timeout=10)  # its lines before anything written after the block
        except subprocess.TimeoutExpired:  # a child started in the block holds the pipe: it goes on alone
            pass


def _flush_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


def _probe_devices(tf) -> None:
    """The first device query, which probes CUDA (and prints the cuInit line); later ones print nothing."""
    global _probed
    tf.config.list_physical_devices("GPU")
    _probed = True


def _tune_malloc() -> None:
    # Before TensorFlow's threads take their arenas. A bad DISTRAIN_MALLOC is not raised from inside
    # someone's `import tensorflow`: the CLI refuses it at start, import_tensorflow when it runs.
    with contextlib.suppress(UsageError):
        malloc.tune()


class _FilteredLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader, and the device query after it, with the notices filtered."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The module keeps its real loader (importlib.resources and pickling look at it).
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        _tune_malloc()
        with startup_notices_filtered():
            self.loader.exec_module(module)
            _probe_devices(module)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` with the other finders and wraps its loader in ``_FilteredLoader``."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or verbose():
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _FilteredLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Makes every later ``import tensorflow`` of this process quiet (``import distrain`` calls it).

    Cheap: it imports nothing. Once per process; a process that already imported TensorFlow gets
    nothing from it (``import_tensorflow`` then filters the first device query).
    """
    if not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def import_tensorflow():
    """``import tensorflow``, and the device query that probes CUDA, with the notices filtered.

    ``tf.keras`` is tf-keras: this module is inside the ``distrain`` package, whose ``__init__``
    selects it first. Later ``import tensorflow`` statements get the same module.

    Raises:
        UsageError: a bad ``DISTRAIN_MALLOC``.
    """

    # Before TensorFlow's threads take their arenas; after them (a user's script imported
    # TensorFlow first) the top pad and mmap threshold still apply.
    malloc.tune()
    install()
    import tensorflow as tf  # through the hook: quiet, unless TensorFlow came before distrain

    if not _probed:
        with startup_notices_filtered():  # TensorFlow imported before distrain: its cuInit line
            _probe_devices(tf)
    return tf


def python_command(module: str, function: str = "run_main") -> list[str]:
    """The argv of a Python that runs ``module.function()`` as a console script, with TensorFlow quiet.

    For programs distrain starts that import TensorFlow themselves (TensorBoard): this interpreter,
    ``import distrain`` first (its import hook), then the program, with ``sys.argv[0]`` the
    package's name. Append the program's arguments.

    Example:
        >>> python_command("tensorboard.main")[2].endswith("import distrain, tensorboard.main; "
        ...                                                "sys.exit(tensorboard.main.run_main())")
        True
    """
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module) or not function.isidentifier():
        raise ValueError(f"python_command: expected a module and a function name, got {module!r}, {function!r}")
    # Without "" (the working directory) on sys.path, as the console script runs: a folder there
    # named like the program's package cannot stand in for it.
    code = (f'import sys; sys.path[:] = [p for p in sys.path if p]; sys.argv[0] = "{module.split(".")[0]}"; '
            f"import distrain, {module}; sys.exit({module}.{function}())")
    return [sys.executable, "-c", code]
