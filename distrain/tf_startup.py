"""TensorFlow's start-up, without its start-up chatter on the user's terminal.

On a machine without a GPU, importing TensorFlow 2.21 and listing its devices prints lines like::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ... UNKNOWN ERROR (303)

They come from C++ before absl logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` does not hide
them, and a newcomer reads an E-level "error" where nothing is wrong. ``import_tensorflow`` runs the
import and the first device query with the process's stderr (file descriptor 2) captured, then
writes back every captured line except the known start-up notices above: a real error printed
there still reaches the terminal. ``DISTRAIN_TF_LOG=1`` (``distrain --verbose``) shows everything.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

from distrain import malloc

VERBOSE_ENV = "DISTRAIN_TF_LOG"

# Start-up notices that say nothing is wrong. Anything else captured is shown.
STARTUP_NOTICES = tuple(re.compile(p) for p in (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"\] oneDNN custom operations are on\.",
    r"\] Could not find cuda drivers on your machine, GPU will not be used\.",
    r"\] failed call to cuInit: .*(UNKNOWN ERROR \(303\)|CUDA_ERROR_NO_DEVICE|no CUDA-capable device)",
    r"\] This TensorFlow binary is optimized to use available CPU instructions",
    r"\] To enable the following instructions: .* in other operations, rebuild TensorFlow",
    r"\] Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory for plugin",
    r"\] TF-TRT Warning: Could not find TensorRT",
))


def is_startup_notice(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's harmless start-up notices."""
    return any(p.search(line) for p in STARTUP_NOTICES)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def startup_notices_filtered() -> Iterator[None]:
    """Captures file descriptor 2 for the block; then writes back all but the start-up notices.

    Python's own ``sys.stderr`` writes in the block are captured too, and written back in order.
    """
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not is_startup_notice(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tensorflow():
    """``import tensorflow``, and the device query that probes CUDA, with the notices filtered.

    ``tf.keras`` is tf-keras: this module is inside the ``distrain`` package, whose ``__init__``
    selects it first. Later ``import tensorflow`` statements get the same module.
    """

    # Before TensorFlow's threads take their arenas; after them (a user's script imported
    # TensorFlow first) the top pad and mmap threshold still apply.
    malloc.tune()
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with startup_notices_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # probes CUDA once; later calls print nothing
    return tf
