"""The docs' commands run as written (issue 25): every shell command in a ```bash / ```sh code block
of README.md and docs/*.md is either in ``RUN`` (run here, offline, in a scratch copy of the
checkout's jobs, each with a timeout) or in ``EXCLUDED`` with the reason it cannot run here. A
command added to a page is in neither, and ``test_every_doc_command_is_classified`` fails until
someone runs it or consciously excludes it; a listed command that left the docs fails it too, so
the lists stay the docs' own.

Commands run exactly as the page shows them (``bash -c``, from the scratch directory, with the
venv's ``bin`` first on PATH and ``.venv`` linked to it); what a command needs first (an image
folder, an earlier run) is made by the fixture, never by changing the command. Long trainings,
clusters, installs and servers are excluded; the whole file takes about 1.5 minutes on 2 cores.

Also here: the own-model page's notebook cell runs offline as written.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, worker_env

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", re.S | re.M)

# What a command needs in the scratch directory before it runs (made by ``Workspace.need``).
FLOWERS, RUN_A, RUN_B, TWO_RUNS = "data/flowers", "runs/quickstart/a", "runs/quickstart/b", "one-process+2-workers"
TRAIN_A = ".venv/bin/distrain train jobs/quickstart.yaml --run-dir runs/quickstart/a"

# Runs here: command (without its trailing comment) → what it needs first.
RUN: dict[str, tuple[str, ...]] = {
    # docs/data.md
    "distrain data inspect data/flowers": (FLOWERS,),
    "distrain data inspect data/flowers --decode": (FLOWERS,),
    "distrain validate jobs/quickstart.yaml": (),
    # docs/monitoring.md
    TRAIN_A: (),
    ".venv/bin/distrain report runs/quickstart/a": (RUN_A,),
    ".venv/bin/distrain report runs/quickstart/a runs/quickstart/b --out compare/": (RUN_A, RUN_B),
    ".venv/bin/distrain report runs/quickstart/one-process runs/quickstart/2-workers --out compare/": (TWO_RUNS,),
    # docs/own-model-and-data.md
    "distrain models --describe jobs/examples/inception_module.py:build --input-shape 8,8,1": (),
    "distrain validate jobs/examples/inception.yaml": (),
    "distrain train jobs/examples/inception.yaml": (),
    "distrain slurm render jobs/examples/inception.yaml --nodes 2 --gpus-per-node 4 > incep.sh": (),
    # docs/precision.md
    "distrain validate jobs/quickstart.yaml --set train.precision=mixed_bfloat16 --set train.jit_compile=true": (),
    # docs/sweeps.md
    "distrain validate jobs/examples/mobilenet_sweep.yaml": (),
    # docs/quickstart.md
    ".venv/bin/distrain validate jobs/quickstart.yaml --set train.epochs=20 --set model.name=mlp": (),
    ".venv/bin/distrain train jobs/quickstart.yaml --set train.epochs=20 --set model.name=mlp": (),
    # docs/slurm.md
    "distrain slurm render jobs/cnn.yaml --nodes 4 --gpus-per-node 2 --time 04:00:00 --partition gpu "
    "--output cnn-4x2.sh": (),
    "distrain slurm render jobs/mobilenet.yaml --nodes 2 --gpus-per-node 4 --strategy horovod > mobilenet-hvd.sh": (),
    "distrain slurm render jobs/quickstart.yaml --nodes 1 --gpus-per-node 0 --tasks-per-node 2": (),
    "distrain slurm render jobs/mobilenet.yaml --nodes 8 --gpus-per-node 4 --bench --output mobilenet-bench.sh": (),
    'distrain slurm render jobs/quickstart.yaml --nodes 2 --gpus-per-node 0 --time 00:15:00 '
    '--set model.params.filters=8 --set train.epochs=2 --distrain "$PWD/.venv/bin/distrain" --output qs.sh': (),
    # docs/slurm.md, docs/sweeps.md: a sweep as a job array
    "distrain slurm render jobs/examples/mobilenet_sweep.yaml --nodes 1 --gpus-per-node 4 --sweep "
    "runs/mobilenet-sweep --parallel 2 --output mobilenet-sweep.sh": (),
}

SLURM = "needs a SLURM cluster (tests/test_slurm_launch.py runs rendered scripts on a local one)"
RAY = "needs a Ray cluster (tests/test_ray.py starts a local one)"
HOSTS = "needs other hosts (node1, a:4, ...)"
SHARED = "writes to /shared, a cluster's shared storage"
COURSE = "trains a course job on Fashion-MNIST or CIFAR-10, which downloads its data"
BENCH = "benchmarks MobileNetV2 for minutes (tests/test_bench.py runs distrain bench on a small job)"
PERF = "a benchmark of many minutes, recorded into docs/performance-log.md"
LOCAL_SLURM = "the local SLURM cluster walk-through: installs Debian packages and starts daemons " \
              "(tests/test_slurm_cluster.py)"
SSH = "an ssh tunnel from a laptop to a login node"
SERVER = "serves until stopped (tests/test_tensorboard.py starts distrain tensorboard)"

# Cannot run here: command (without its trailing comment) → why.
EXCLUDED: dict[str, str] = {
    # README.md, docs/quickstart.md
    "scripts/quickstart.sh": "sets up .venv (pip install) before it trains: the test suite runs from that venv",
    "scripts/test.sh": "runs the whole test suite, this file included (about 25 minutes)",
    'for i in 0 1; do TF_CONFIG=\'{"cluster":{"worker":["127.0.0.1:23456","127.0.0.1:23457"]},"task":{"type":'
    '"worker","index":\'$i\'}}\' .venv/bin/distrain train jobs/quickstart.yaml --run-dir runs/quickstart/two-workers '
    "& done; wait": "two trainings on the fixed ports 23456-23457, which a concurrent test may hold "
                    "(conftest.two_worker_run trains the same TF_CONFIG launch on free ports)",
    ".venv/bin/distrain train jobs/quickstart.yaml --set distribute.strategy=mirrored --set distribute.cpu_devices=2":
        "a fourth training of ~15 s, over this file's time budget (tests/test_equivalence.py trains MirroredStrategy "
        "over 2 CPU devices)",
    # docs/bench.md
    "distrain bench jobs/mobilenet.yaml": BENCH,
    "distrain bench jobs/mobilenet.yaml --json > one.json": BENCH,
    "TF_CONFIG=... distrain bench jobs/mobilenet.yaml --run-dir /shared/b1": "a placeholder TF_CONFIG; " + SHARED,
    "horovodrun -np 8 -H a:4,b:4 distrain bench jobs/mobilenet.yaml --set distribute.strategy=horovod": HOSTS,
    "srun --distribution=block distrain bench jobs/mobilenet.yaml --json": SLURM,
    "distrain bench jobs/mobilenet.yaml --baseline one.json": BENCH,
    # docs/data.md
    "distrain data pack data/flowers /shared/flowers-tfr --shards 64 --image-size 224 224": SHARED,
    "distrain data inspect /shared/flowers-tfr": "reads the shards the previous command writes to /shared",
    # docs/doctor.md
    "distrain doctor": "about 20 s, over this file's time budget (tests/test_doctor.py runs distrain doctor --json)",
    "distrain doctor --json > doctor.json": "about 20 s, over this file's time budget (tests/test_doctor.py runs it)",
    "sbatch --nodes=4 --gres=gpu:8 slurm/doctor.sh": "needs a SLURM cluster with GPU nodes",
    # docs/fault-tolerance.md
    "distrain train --resume runs/cnn/20261127-101500": "an example run dir of a course job; " + COURSE,
    "distrain train --resume RUN_DIR --set train.epochs=20": "RUN_DIR is a placeholder",
    "distrain train jobs/cnn.yaml --run-dir RUN_DIR": "RUN_DIR is a placeholder; " + COURSE,
    # docs/horovod-build.md, docs/horovod.md
    "scripts/install-horovod.sh": "builds Horovod (about 3 minutes; scripts/test.sh runs it)",
    "scripts/install-horovod.sh --python /path/to/venv/bin/python --cache /shared/wheels": "placeholder paths",
    "HOROVOD_GPU_OPERATIONS=NCCL scripts/install-horovod.sh": "needs nvcc and NCCL (a GPU machine)",
    ".venv/bin/horovodrun --check-build": "takes about 30 s, importing every framework Horovod knows "
                                          "(tests/test_horovod.py runs Horovod itself)",
    "horovodrun -np 2 -H localhost:2 --gloo --network-interface lo distrain train jobs/cnn.yaml --set "
    "distribute.strategy=horovod --run-dir runs/cnn/hvd1": COURSE + " (tests/test_horovod.py runs horovodrun)",
    "horovodrun -np 8 -H node1:4,node2:4 --gloo --network-interface ib0 --start-timeout 120 distrain train "
    "jobs/cnn.yaml --set distribute.strategy=horovod --run-dir /shared/runs/cnn/hvd1": HOSTS,
    "srun --ntasks-per-node=4 --gpus-per-node=4 distrain train jobs/cnn.yaml --set distribute.strategy=horovod": SLURM,
    "mpirun -np 8 -H node1:4,node2:4 -bind-to none -x PATH -x LD_LIBRARY_PATH distrain train jobs/cnn.yaml --set "
    "distribute.strategy=horovod --run-dir /shared/runs/cnn/hvd1": HOSTS,
    # docs/monitoring.md
    ".venv/bin/distrain tensorboard runs/ --port 6006": SERVER,
    ".venv/bin/pip install tensorboard-plugin-profile": "installs a package",
    "distrain tensorboard runs/ --port 6123": SERVER,
    "ssh -N -L 6123:127.0.0.1:6123 ada@login1": SSH,
    "srun --time=2:00:00 --cpus-per-task=1 --pty distrain tensorboard runs/ --port 6123": SLURM,
    "distrain tensorboard /shared/ray-runs --port 6006": SERVER,
    "ssh -N -L 6006:127.0.0.1:6006 ada@head-node": SSH,
    # docs/own-model-and-data.md
    "sbatch incep.sh": SLURM,
    "ray job submit --working-dir . -- distrain ray jobs/examples/inception.yaml --workers 4 --storage-path "
    "/shared/ray-runs": RAY,
    # docs/performance-log.md
    ".venv/bin/python benchmarks/throughput.py --repeats 3 --examples 32768 --record": PERF,
    ".venv/bin/python benchmarks/scaling.py --repeats 3 --record": PERF,
    ".venv/bin/python benchmarks/scaling.py --repeats 3 --batch 256 --examples 16384 --record": PERF,
    ".venv/bin/python benchmarks/pinned.py --repeats 3 --record": PERF,
    "sudo .venv/bin/python benchmarks/network.py --repeats 2 --record": PERF + " (network namespaces, as root)",
    ".venv/bin/python benchmarks/investigations/collective_split.py --record": PERF,
    ".venv/bin/python benchmarks/investigations/ceiling.py --record": PERF,
    ".venv/bin/python benchmarks/input.py --record [--baseline 223f2f0]": PERF,
    # docs/ray.md
    'pip install -e ".[ray]"': "installs a package (scripts/test.sh installs the ray extra)",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --num-cpus=2 --dashboard-host=127.0.0.1":
        "starts a Ray head that outlives the command (tests/test_ray.py starts and stops its own)",
    'ray job submit --address http://127.0.0.1:8265 --working-dir . -- distrain ray jobs/quickstart.yaml --workers 2 '
    '--storage-path "$PWD/runs/ray"': RAY,
    "ray stop": "stops every Ray process of this user on the host, other tests' too",
    "ray up cluster/ray/onprem.yaml": "starts a cluster on other hosts over ssh",
    "ray dashboard cluster/ray/onprem.yaml &": RAY,
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- distrain ray jobs/cnn.yaml --workers 2 "
    "--gpus-per-worker 1 --max-failures 3 --storage-path /shared/ray-runs --name cnn-1": RAY,
    "ray job logs --address http://127.0.0.1:8265 --follow <submission id>": RAY,
    "ray down cluster/ray/onprem.yaml": "stops a cluster on other hosts",
    "sbatch --nodes=4 --gpus-per-node=2 --cpus-per-task=16 cluster/ray/ray-on-slurm.sh jobs/cnn.yaml "
    "--max-failures 3 --storage-path /shared/ray-runs --name cnn-1": SLURM,
    "pytest tests/test_ray.py -q": "the Ray tests themselves (about 3 minutes)",
    'pytest tests/test_ray.py -m "not slurm"': "the Ray tests themselves",
    # docs/ray.md, docs/sweeps.md: a sweep as Ray Tune trials
    "ray job submit --address http://127.0.0.1:8265 --working-dir . -- distrain ray jobs/examples/mobilenet_sweep.yaml "
    "--workers 2 --sweep /shared/sweeps/mobilenet --parallel 2 --scheduler asha --max-failures 2": RAY,
    "pytest tests/test_ray_sweep.py -q": "the Ray sweep tests themselves (2.5 to 3.5 minutes)",
    # docs/fault-tolerance.md
    "pytest tests/test_fault_campaign.py -s": "the campaign's own test, which the suite runs (about 90 s)",
    "DISTRAIN_CAMPAIGN_DRAWS=120 DISTRAIN_CAMPAIGN_REPORT=campaign.json pytest tests/test_fault_campaign.py -s":
        "the long campaign: about half an hour on 2 cores",
    "DISTRAIN_CAMPAIGN_SEED=27 DISTRAIN_CAMPAIGN_ONLY=41 pytest tests/test_fault_campaign.py -s":
        "one draw of the campaign's own test, which the suite runs",
    # docs/sweeps.md
    "distrain sweep jobs/examples/mobilenet_sweep.yaml --run-dir runs/mobilenet-sweep":
        "six trainings of MobileNetV2, about 4 minutes on 2 cores (tests/test_sweep.py runs a sweep of the "
        "quickstart job)",
    "distrain sweep jobs/quickstart.yaml --run-dir runs/lr --set train.epochs=3 --grid "
    "train.learning_rate=0.001,0.003,0.01": "three trainings of the quickstart job, over this file's time budget "
                                           "(tests/test_sweep.py runs a sweep of it)",
    "distrain report runs/mobilenet-sweep": "reports the sweep of the excluded command above (tests/test_sweep.py "
                                            "reports a sweep)",
    "distrain tensorboard runs/mobilenet-sweep --port 6006": SERVER,
    # docs/slurm.md
    "sbatch slurm/mobilenet.sh": SLURM,
    "sbatch mobilenet-sweep.sh": SLURM,
    "TF_ENABLE_ONEDNN_OPTS=0 sbatch slurm/cnn.sh": SLURM,
    "TF_ENABLE_ONEDNN_OPTS=0 distrain train jobs/cnn.yaml": COURSE,
    "DISTRAIN=$PWD/.venv/bin/distrain sbatch slurm/mobilenet.sh": SLURM,
    "sbatch --nodes=4 slurm/mobilenet.sh": SLURM,
    "sbatch mobilenet-bench.sh; sbatch --nodes=1 mobilenet-bench.sh": SLURM,
    "cluster/slurm-local.sh install && cluster/slurm-local.sh start --nodes 2": LOCAL_SLURM,
    'eval "$(cluster/slurm-local.sh env)"': LOCAL_SLURM,
    "sbatch --wait --export=ALL,TF_NUM_INTRAOP_THREADS=1,TF_NUM_INTEROP_THREADS=1 qs.sh; echo \"exit $?\"":
        LOCAL_SLURM,
    "cat slurm-quickstart-*.out; cat runs/quickstart/slurm-*/summary.json": LOCAL_SLURM,
    "cluster/slurm-local.sh stop": LOCAL_SLURM,
}


# ----------------------------------------------------------------------------- reading the docs

@dataclass(frozen=True)
class Command:
    text: str   # as bash runs it: continuations joined, comment lines dropped
    where: str  # page:line of the block

    @property
    def key(self) -> str:
        return " ".join(strip_comment(self.text).split())


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment``: a ``#`` that starts a word outside quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(text: str, page: str) -> list[Command]:
    """The commands of a page's shell code blocks: one per line, with backslash continuations
    joined and a ``for``/``while``/``if`` kept whole up to its ``done``/``fi``."""
    found = []
    for block in SHELL_BLOCK.finditer(text):
        first = text[:block.start()].count("\n") + 2
        lines, pending, start = [], "", first
        for n, line in enumerate(block.group(1).splitlines(), first):
            if not pending:
                start = n
            if line.rstrip().endswith("\\"):
                pending += strip_comment(line).rstrip("\\").rstrip() + " "
                continue
            lines.append((start, (pending + line.strip()).strip()))
            pending = ""
        compound, opened = [], None
        for n, line in lines:
            if not strip_comment(line):
                continue
            words = strip_comment(line).split()
            if opened is None and words[0] in ("for", "while", "until", "if"):
                opened = (n, "fi" if words[0] == "if" else "done")
            if opened is not None:
                compound.append(strip_comment(line))
                if words[0].startswith(opened[1]):
                    found.append(Command("\n".join(compound), f"{page}:{opened[0]}"))
                    compound, opened = [], None
                continue
            found.append(Command(line, f"{page}:{n}"))
        assert opened is None, f"{page}:{opened and opened[0]}: a compound command without its end"
    return found


def doc_commands() -> list[Command]:
    return [c for page in DOCS for c in shell_commands(page.read_text(), str(page.relative_to(REPO)))]


# ----------------------------------------------------------------------------- the scratch checkout

class Workspace:
    """A scratch directory that looks like the checkout to the docs' commands: a copy of ``jobs/``,
    ``.venv`` linked to the running venv, and what a command needs made on demand."""

    def __init__(self, root: Path):
        self.root = root
        shutil.copytree(REPO / "jobs", root / "jobs", ignore=shutil.ignore_patterns("__pycache__", "npy-data"))
        (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
        self.env = worker_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        # One process at a time here: TensorFlow's own thread pools, as a user's shell would have them.
        for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
            self.env.pop(name, None)
        self.done: set[str] = set()

    def run(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def need(self, what: str) -> None:
        if what in self.done:
            return
        if what == FLOWERS:
            from helpers import solid_folder

            solid_folder(self.root / FLOWERS, count=12, classes=("daisy", "rose"))
        elif what == RUN_A:
            check(self.run(TRAIN_A, timeout=120), TRAIN_A)
        elif what == RUN_B:  # a second run to compare with: a copy of the first is enough
            self.need(RUN_A)
            shutil.copytree(self.root / RUN_A, self.root / RUN_B)
        elif what == TWO_RUNS:
            self.need(RUN_A)
            for name in ("one-process", "2-workers"):
                shutil.copytree(self.root / RUN_A, self.root / "runs/quickstart" / name)
        else:  # pragma: no cover - a typo in RUN
            raise ValueError(what)
        self.done.add(what)


def check(result: subprocess.CompletedProcess, command: str) -> None:
    assert result.returncode == 0, (f"{command}\nexit {result.returncode}\n--- stderr ---\n{result.stderr[-4000:]}"
                                    f"\n--- stdout ---\n{result.stdout[-2000:]}")
    assert "Traceback (most recent call last)" not in result.stderr, result.stderr[-4000:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("doc-commands"))


# ----------------------------------------------------------------------------- the tests

@pytest.mark.timeout(30)
def test_every_doc_command_is_classified():
    commands = doc_commands()
    unclassified = [f"{c.where}: {c.key}" for c in commands if c.key not in RUN and c.key not in EXCLUDED]
    assert not unclassified, ("commands in the docs that this test neither runs nor excludes (add each to RUN, "
                              "or to EXCLUDED with the reason it cannot run here):\n" + "\n".join(unclassified))
    keys = {c.key for c in commands}
    stale = sorted(k for k in (*RUN, *EXCLUDED) if k not in keys)
    assert not stale, "listed here but in no doc any more (remove them):\n" + "\n".join(stale)
    assert not set(RUN) & set(EXCLUDED)


@pytest.mark.timeout(30)
def test_shell_commands_joins_continuations_and_keeps_loops_whole():
    page = ("text\n```bash\n# a comment line\na --x 1 \\\n    --y 2   # trailing # comment\n"
            "for i in 0 1; do\n  echo \"#$i\" &\ndone; wait\n```\n```text\nnot a command\n```\n")
    assert [(c.where, c.key) for c in shell_commands(page, "p.md")] == [
        ("p.md:4", "a --x 1 --y 2"), ("p.md:6", 'for i in 0 1; do echo "#$i" & done; wait')]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("command", list(RUN), ids=lambda c: re.sub(r"\W+", "-", c.removeprefix(".venv/bin/"))[:70])
def test_doc_command_runs(workspace, command):
    for what in RUN[command]:
        workspace.need(what)
    texts = [c.text for c in doc_commands() if c.key == command]
    assert texts, f"no longer in the docs: {command}"
    check(workspace.run(texts[0], timeout=120), texts[0])
    if command == TRAIN_A:
        workspace.done.add(RUN_A)


# A socket that tries to leave this machine fails, as it would on a compute node without internet.
OFFLINE = """
import socket as _socket

def _local(host):
    return host is None or str(host) in ("localhost", "::1", "") or str(host).startswith("127.")

def _offline_guard(connect, getaddrinfo):
    def local_connect(self, address):
        if isinstance(address, tuple) and not _local(address[0]):
            raise OSError(f"offline: no connection to {address[0]}")
        return connect(self, address)

    def local_getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            raise OSError(f"offline: cannot resolve {host}")
        return getaddrinfo(host, *args, **kwargs)

    _socket.socket.connect, _socket.getaddrinfo = local_connect, local_getaddrinfo

_offline_guard(_socket.socket.connect, _socket.getaddrinfo)
"""


@pytest.mark.timeout(150)
def test_own_model_notebook_cell_runs_offline(workspace):
    """docs/own-model-and-data.md's first cell, as written, from the checkout, with no network."""
    page = (REPO / "docs/own-model-and-data.md").read_text()
    cell = re.search(r"^```python\n(.*?)^```", page, re.S | re.M).group(1)
    script = workspace.root / "notebook_cell.py"
    script.write_text(OFFLINE + "\n" + cell + "\nprint('test accuracy', summary['test']['accuracy'])\n")
    result = subprocess.run([sys.executable, str(script)], cwd=workspace.root, env=workspace.env,
                            capture_output=True, text=True, timeout=140)
    check(result, "the notebook cell")
    accuracy = float(re.search(r"^test accuracy (\S+)$", result.stdout, re.M).group(1))
    assert accuracy > 0.5, result.stdout  # the page says about 0.7
