"""distrain.malloc: freed tensor memory is kept for the next step instead of re-faulted."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distrain import malloc
from distrain.errors import UsageError

# A worker thread allocates, touches and frees a 32 MiB working set in 8 MiB blocks, as
# TensorFlow's executor threads do with a step's tensors, and reports the minor page faults of
# the last 10 rounds (the first rounds set glibc's dynamic thresholds). One 8 MiB block alone is
# reused even with glibc's defaults; several are what a step holds.
PROBE = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from distrain import malloc
    tuned = malloc.tune()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    SIZE = 8 << 20
    faults = []
    def rounds(n):
        for _ in range(n):
            blocks = [libc.malloc(SIZE) for _ in range(4)]
            for p in blocks:
                ctypes.memset(p, 1, SIZE)
            for p in blocks:
                libc.free(p)
    def worker():
        rounds(3)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        rounds(10)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=worker)
    t.start(); t.join()
    print(tuned, faults[0])
""")


def probe(setting: str) -> tuple[bool, int]:
    env = {"DISTRAIN_MALLOC": setting, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60,
                         check=True, cwd=str(Path(malloc.__file__).parents[1]))
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_tuned_threads_reuse_freed_memory_where_glibc_defaults_refault_it():
    tuned, tuned_faults = probe("tuned")
    system, system_faults = probe("system")
    assert tuned and not system
    pages = 10 * 4 * (8 << 20) // 4096
    # glibc's defaults give the pages back after every round: about one fault per page touched.
    assert system_faults > pages // 2, system_faults
    # Tuned, the same pages are reused: a few faults at most, none per page.
    assert tuned_faults < pages // 100, tuned_faults


@pytest.mark.parametrize("value, wanted", [("", True), ("tuned", True), ("Tuned ", True), ("system", False)])
def test_wanted_reads_the_environment(monkeypatch, value, wanted):
    monkeypatch.setenv(malloc.ENV, value)
    assert malloc.wanted() is wanted


def test_a_bad_value_is_a_usage_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(malloc.ENV, "jemalloc")
    with pytest.raises(UsageError, match=r"DISTRAIN_MALLOC='jemalloc': expected tuned \(the default\) or system"):
        malloc.wanted()
