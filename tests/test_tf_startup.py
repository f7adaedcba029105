"""TensorFlow's start-up notices stay off the terminal; real errors and --verbose still show."""
import subprocess
import sys

import pytest

from conftest import REPO, run_distrain, worker_env
from distrain.tf_startup import is_startup_notice

NOTICES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795962370.317448   30516 port.cc:153] oneDNN custom operations are on. You may see "
    "slightly different numerical results due to floating-point round-off errors.",
    "I0000 00:00:1795962370.322702   30516 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.",
    "E0000 00:00:1795962376.563091   30516 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
]


def test_known_notices_are_recognised_and_errors_are_not():
    assert all(is_startup_notice(line) for line in NOTICES)
    for line in ("E0000 00:00:1.0 1 op_kernel.cc:1] OOM when allocating tensor",
                 "E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_OUT_OF_MEMORY",
                 "Traceback (most recent call last):"):
        assert not is_startup_notice(line), line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verbose", [False, True])
def test_filter_keeps_everything_but_the_notices(verbose):
    code = ("import os, sys\n"
            "from distrain.tf_startup import startup_notices_filtered\n"
            "with startup_notices_filtered():\n"
            + "".join(f"    os.write(2, {(line + chr(10)).encode()!r})\n" for line in NOTICES) +
            "    os.write(2, b'E0000 real problem\\n')\n"
            "    print('from python', file=sys.stderr)\n"
            "print('after', file=sys.stderr)\n")
    env = worker_env(DISTRAIN_TF_LOG="1" if verbose else "0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    expected = (NOTICES if verbose else []) + ["E0000 real problem", "from python", "after"]
    assert done.stderr.splitlines() == expected


@pytest.mark.timeout(120)
def test_env_prints_no_tensorflow_startup_lines_unless_verbose():
    quiet = run_distrain(["env"], timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if is_startup_notice(line)], quiet.stderr
    assert "launcher" in quiet.stdout
    loud = run_distrain(["--verbose", "env"], timeout=120)
    assert loud.returncode == 0, loud.stderr
    # On a machine without a GPU TensorFlow 2.21 always prints them (the cuInit probe at least).
    assert [line for line in loud.stderr.splitlines() if is_startup_notice(line)], loud.stderr


@pytest.mark.timeout(60)
def test_models_and_version_need_no_tensorflow():
    code = ("import sys\nfrom distrain.cli import main\n"
            "assert main(['models']) == 0\n"
            "assert 'tensorflow' not in sys.modules, 'distrain models imported TensorFlow'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=worker_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "mobilenet_v2" in done.stdout and "2,270,794" in done.stdout
    assert done.stderr == ""
    version = run_distrain(["--version"], timeout=60)
    from distrain import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"distrain {__version__}"
