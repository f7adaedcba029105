"""scripts/setup.sh's stamp: a venv set up with more extras counts as set up, so
scripts/quickstart.sh after scripts/test.sh installs nothing. Runs the real script in a copy of the
checkout whose ``.venv/bin/python`` only records how it was called (no pip, no network)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls"
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    (tmp_path / "setup.cfg").write_text("[metadata]\nname = distrain\n")
    (tmp_path / "pyproject.toml").write_text("[build-system]\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def setup(checkout: Path, extras: str = "") -> list[str]:
    """Runs setup.sh; returns the pip commands it ran."""
    calls = checkout / ".venv" / "bin" / "calls"
    calls.unlink(missing_ok=True)
    done = subprocess.run(["bash", str(checkout / "scripts" / "setup.sh"), *([extras] if extras else [])],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.timeout(60)
def test_fewer_extras_than_installed_install_nothing(checkout):
    assert setup(checkout, "ray,test") == ["-m pip install -q -e .[ray,test]"]
    stamp = checkout / ".venv" / ".distrain-setup"
    digest = stamp.read_text().split()[0]
    assert stamp.read_text() == f"{digest} ray,test\n"
    assert setup(checkout) == []  # scripts/quickstart.sh after scripts/test.sh
    assert setup(checkout, "ray") == []
    assert setup(checkout, "ray, test") == []
    assert setup(checkout, "horovod") == ["-m pip install -q -e .[horovod,ray,test]"]  # keeps the old ones
    assert setup(checkout, "test") == []


@pytest.mark.timeout(60)
def test_changed_requirements_or_an_old_stamp_install_again(checkout):
    stamp = checkout / ".venv" / ".distrain-setup"
    assert setup(checkout) == ["-m pip install -q -e ."]
    digest = stamp.read_text().split()[0]
    assert setup(checkout) == []
    stamp.write_text(f"{digest} test,ray\n")  # the format written before extras were sorted
    assert setup(checkout, "ray,test") == []
    (checkout / "setup.cfg").write_text("[metadata]\nname = distrain\nversion = 2\n")
    assert setup(checkout) == ["-m pip install -q -e .[ray,test]"]
    assert stamp.read_text() != f"{digest} ray,test\n" and setup(checkout, "test") == []
