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


@pytest.mark.timeout(60)
def test_what_a_crash_prints_in_the_filtered_block_still_gets_out():
    """As glibc's message when TensorFlow's oneDNN crash aborts the process: not lost with it."""
    code = ("import os\n"
            "from distrain.tf_startup import startup_notices_filtered\n"
            "with startup_notices_filtered():\n"
            f"    os.write(2, {(NOTICES[0] + chr(10)).encode()!r})\n"
            "    os.write(2, b'munmap_chunk(): invalid pointer\\n')\n"
            "    os.abort()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=worker_env(DISTRAIN_TF_LOG="0"), cwd=REPO)
    assert (done.returncode, done.stderr) == (-6, "munmap_chunk(): invalid pointer\n")


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


# A stand-in for TensorFlow, found first on PYTHONPATH: its import prints the start-up notices and
# one real error to fd 2, as TensorFlow's C++ does, and its first device query the cuInit line.
FAKE_TENSORFLOW = f"""\
import os
for line in {NOTICES[:3]!r}:
    os.write(2, (line + "\\n").encode())
os.write(2, b"E0000 real problem at import\\n")


class config:
    probed = False

    @staticmethod
    def list_physical_devices(kind=None):
        if not config.probed:
            os.write(2, ({NOTICES[3]!r} + "\\n").encode())
            config.probed = True
        return []
"""


def _fake_tensorflow_env(tmp_path, **env) -> dict:
    """A worker's environment whose `import tensorflow` finds FAKE_TENSORFLOW, with no verbose switch on."""
    package = tmp_path / "fake" / "tensorflow"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(FAKE_TENSORFLOW)
    return worker_env(**{"PYTHONPATH": f"{tmp_path / 'fake'}:{REPO}", "DISTRAIN_TF_LOG": "0", **env})


def _run_with_fake_tensorflow(tmp_path, code: str, **env) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=_fake_tensorflow_env(tmp_path, **env))
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env, shown", [
    ({}, ["E0000 real problem at import", "after"]),
    ({"DISTRAIN_TF_LOG": "1"}, [*NOTICES[:3], "E0000 real problem at import", NOTICES[3], "after"]),
    ({"TF_CPP_MIN_LOG_LEVEL": "0"}, [*NOTICES[:3], "E0000 real problem at import", NOTICES[3], "after"]),
])
def test_whoever_imports_tensorflow_after_distrain_gets_no_notices_and_every_real_error(tmp_path, env, shown):
    """The mechanism every entry point relies on (a user's model file, data pack, report, TensorBoard):
    `import distrain` first, then any `import tensorflow` is quiet, its cuInit probe included."""
    code = ("import os, sys, distrain\n"
            "import tensorflow as tf\n"
            "tf.config.list_physical_devices('GPU')\n"
            "assert tf.__loader__ is tf.__spec__.loader and type(tf.__loader__).__name__ == 'SourceFileLoader'\n"
            "print('after', file=sys.stderr)\n")
    assert _run_with_fake_tensorflow(tmp_path, code, **env) == shown


@pytest.mark.timeout(60)
def test_tensorflow_imported_before_distrain_keeps_its_import_lines_but_not_the_cuinit_line(tmp_path):
    code = ("import tensorflow, distrain\n"
            "from distrain.tf_startup import import_tensorflow\n"
            "assert import_tensorflow() is tensorflow\n"
            "tensorflow.config.list_physical_devices('GPU')\n")  # as the backend then does
    # The import's lines came before distrain existed (docs/troubleshooting.md says so).
    assert _run_with_fake_tensorflow(tmp_path, code) == [*NOTICES[:3], "E0000 real problem at import"]


@pytest.mark.timeout(60)
def test_python_command_runs_a_program_with_its_tensorflow_quiet(tmp_path):
    """How `distrain tensorboard` starts TensorBoard: the program's own import of TensorFlow is quiet."""
    (tmp_path / "fake" / "prog").mkdir(parents=True)
    (tmp_path / "fake" / "prog" / "__init__.py").write_text(
        "import sys\n\ndef main():\n    import tensorflow\n    print(sys.argv, file=sys.stderr)\n    return 3\n")
    from distrain.tf_startup import python_command

    code = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *python_command("prog", "main"), "--flag"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env=_fake_tensorflow_env(tmp_path))
    assert done.returncode == 3, done.stderr
    assert done.stderr.splitlines() == ["E0000 real problem at import", "['prog', '--flag']"]
