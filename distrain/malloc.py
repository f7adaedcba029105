"""glibc malloc settings for TensorFlow's CPU steps: keep freed tensor memory for the next step.

Under a tf.distribute strategy (mirrored, multi_worker) a tf-keras step's tensors come from
glibc's per-thread arenas, and glibc gives those arenas' freed memory back to the kernel after
each step (``madvise``, heaps shrunk and unmapped), so every step faults the same pages in again
(MobileNetV2's page faults and step times, with and without, are in docs/performance-log.md). The
default strategy (distrain's one_device, Horovod, plain Keras scripts) does not pay it.

``tune()`` makes every thread allocate from the main arena (``M_ARENA_MAX=1``), keeps up to
``TOP_PAD`` bytes of freed memory at its top (``M_TOP_PAD``) and serves blocks below 32 MiB from
the heap instead of fresh mappings (``M_MMAP_THRESHOLD``). The pages are reused, not
re-faulted; the peak resident size stays the same (docs/performance-log.md).
It must run before TensorFlow starts its threads (``tf_startup.import_tensorflow`` calls it),
since threads that already hold an arena keep it. ``DISTRAIN_MALLOC=system`` leaves glibc's
defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from distrain.errors import UsageError

ENV = "DISTRAIN_MALLOC"
# mallopt(3) parameter numbers, from glibc's malloc.h.
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
TOP_PAD = 256 << 20
# glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2): blocks above it are always
# mapped, as they would be anyway.
MMAP_THRESHOLD = 32 << 20
SETTINGS = ((M_ARENA_MAX, 1), (M_TOP_PAD, TOP_PAD), (M_MMAP_THRESHOLD, MMAP_THRESHOLD))

_done = False


def wanted() -> bool:
    """False when ``DISTRAIN_MALLOC=system`` asks for glibc's defaults."""
    value = os.environ.get(ENV, "tuned").strip().lower() or "tuned"
    if value not in ("tuned", "system"):
        raise UsageError(f"environment variable {ENV}={value!r}: expected tuned (the default) or system")
    return value == "tuned"


def tune() -> bool:
    """Applies the settings once per process, where the C library is glibc (Linux).

    Returns whether they are in effect; elsewhere (macOS, musl) it does nothing.
    """
    global _done
    if _done:
        return True
    if not wanted() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has mallopt as a stub that does nothing
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; a refused value leaves glibc's default for that one only.
    accepted = [mallopt(param, value) == 1 for param, value in SETTINGS]
    _done = all(accepted)
    return _done
