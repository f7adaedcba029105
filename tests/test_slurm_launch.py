"""SLURM launch: ``distrain slurm render`` (golden files), the shipped ``slurm/*.sh``, the launcher's
exit-code mapping (fake srun/scontrol), and rendered scripts run by a real local SLURM
(``cluster/slurm-local.sh``): two tasks on one node, one task on each of two nodes, worker
addresses from NodeAddr, preemption with requeue and resume, and requests refused before srun.

Run: cluster/slurm-local.sh install   (once, as root)
     .venv/bin/python -m pytest tests/test_slurm_launch.py -q
     .venv/bin/python -m pytest tests/test_slurm_launch.py -m "not slurm"    # no SLURM needed
After a deliberate change of the rendered text:
     DISTRAIN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_slurm_launch.py -k golden
     slurm/regenerate.sh
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import socket
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, Forked, backup_step, free_port_block, write_job
from slurm_cluster import SbatchResult
from distrain.cli import build_parser, main
from distrain.errors import EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE, EXIT_WRITE_FAILED
from distrain.launch.slurm import check_layout, render_from_args
from distrain.world import job_port

GOLDEN = Path(__file__).parent / "golden"
SHIPPED = ("mlp", "cnn", "residual", "inception", "mobilenet")
VENV_DISTRAIN = str(Path(sys.executable).with_name("distrain"))
UPDATE = bool(os.environ.get("DISTRAIN_UPDATE_GOLDEN"))



def render(argv: list[str]) -> str:
    """``distrain slurm render ARGV`` through the real parser, without writing anything."""
    args = build_parser().parse_args(["slurm", "render", *argv])
    return render_from_args(args)


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # job paths in golden files are relative to the checkout


# --------------------------------------------------------------------------------------------
# render: golden files (no SLURM needed)
# --------------------------------------------------------------------------------------------

GOLDEN_CASES = {
    "mirrored-one-node.sh": ["jobs/quickstart.yaml", "--nodes", "1", "--gpus-per-node", "4"],
    "one-device.sh": ["jobs/mlp.yaml", "--nodes", "1", "--gpus-per-node", "1", "--time", "00:30:00"],
    "explicit-mirrored.sh": ["jobs/cnn.yaml", "--nodes", "1", "--gpus-per-node", "2", "--strategy", "mirrored"],
    "multi-worker-four-nodes.sh": ["jobs/residual.yaml", "--nodes", "4", "--gpus-per-node", "2", "--time",
                                   "1-12:00:00", "--partition", "gpu", "--account", "proj42", "--job-name",
                                   "res4x2"],
    "horovod-two-nodes.sh": ["jobs/mobilenet.yaml", "--nodes", "2", "--gpus-per-node", "4", "--strategy",
                             "horovod", "--cpus-per-task", "6"],
    "horovod-cpu.sh": ["jobs/quickstart.yaml", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2",
                       "--strategy", "horovod"],
    "cpu-two-tasks.sh": ["jobs/quickstart.yaml", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
                         "--runs-dir", "/scratch/runs", "--set", "train.epochs=2", "--set",
                         "model.params={filters: 8}", "--no-requeue", "--distrain", "/opt/venv/bin/distrain"],
    "bench-two-nodes.sh": ["jobs/mobilenet.yaml", "--nodes", "2", "--gpus-per-node", "4", "--bench"],
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_render_matches_golden_file(name, in_repo):
    text = render(GOLDEN_CASES[name])
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; create it with DISTRAIN_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"render changed; if intended: DISTRAIN_UPDATE_GOLDEN=1 pytest -k golden ({name})"


@pytest.mark.timeout(30)
def test_golden_files_are_all_cases():
    assert sorted(p.name for p in GOLDEN.glob("*.sh")) == sorted(GOLDEN_CASES)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_rendered_scripts_are_valid_bash_with_the_sbatch_defaults(name):
    path = GOLDEN / name
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    sbatch = re.findall(r"^#SBATCH (\S+)$", text, re.MULTILINE)
    for option in ("--output=slurm-%x-%j.out", "--open-mode=append", "--signal=USR1@90"):
        assert option in sbatch
    assert any(o in ("--requeue", "--no-requeue") for o in sbatch)
    # #SBATCH lines are read only before the first command: all of them come before the settings.
    assert text.index("#SBATCH --signal") < text.index("\nJOB=")
    header = text.split("#SBATCH", 1)[0]
    assert re.search(r"^#   sbatch \S+ ", header, re.MULTILINE), "the header shows how to run it"
    assert "# Generated by: distrain slurm render " in header


@pytest.mark.timeout(30)
def test_layouts(in_repo):
    mirrored = render(GOLDEN_CASES["mirrored-one-node.sh"])
    assert "--ntasks-per-node=1\n" in mirrored and "--gres=gpu:4\n" in mirrored
    assert "strategy mirrored (auto)" in mirrored
    multi = render(GOLDEN_CASES["multi-worker-four-nodes.sh"])
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n#SBATCH --gres=gpu:2\n" in multi
    assert "strategy multi_worker (auto)" in multi and "#SBATCH --partition=gpu" in multi
    horovod = render(GOLDEN_CASES["horovod-two-nodes.sh"])
    assert "#SBATCH --ntasks-per-node=4\n#SBATCH --gres=gpu:4\n#SBATCH --cpus-per-task=6\n" in horovod
    assert "SET=(distribute.strategy=horovod)" in horovod
    cpu = render(GOLDEN_CASES["cpu-two-tasks.sh"])
    assert "--gres" not in cpu and "#SBATCH --ntasks-per-node=2\n#SBATCH --cpus-per-task=1\n" in cpu
    assert "SET=(train.epochs=2 'model.params={filters: 8}')" in cpu
    assert "DISTRAIN=${DISTRAIN:-/opt/venv/bin/distrain}" in cpu and "REQUEUE=0" in cpu
    assert "##SBATCH --partition=PARTITION" in cpu


@pytest.mark.timeout(30)
@pytest.mark.parametrize("strategy, nodes, tasks, gpus, expected", [
    ("auto", 1, 1, 4, "mirrored"), ("auto", 1, 1, 1, "one_device"), ("auto", 1, 1, 0, "one_device"),
    ("auto", 2, 2, 4, "multi_worker"), ("auto", 1, 2, 0, "multi_worker"), ("multi_worker", 1, 1, 2, "multi_worker"),
    ("horovod", 2, 8, 4, "horovod"), ("horovod", 1, 2, 0, "horovod"), ("mirrored", 1, 1, 0, "mirrored"),
])
def test_check_layout_resolves_the_strategy_the_run_will_use(strategy, nodes, tasks, gpus, expected):
    assert check_layout(strategy, nodes=nodes, tasks=tasks, gpus_per_node=gpus, source="s", asked="a") == expected


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2", "--gpus-per-node", "4", "--strategy", "mirrored"],
     "--strategy mirrored trains in one process, but --nodes 2 makes 2 tasks on 2 nodes"),
    (["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--strategy", "one_device"],
     "--strategy one_device trains in one process, but --nodes 1 --tasks-per-node 2 makes 2 tasks"),
    (["--nodes", "1", "--gpus-per-node", "4", "--tasks-per-node", "2", "--set", "distribute.strategy=mirrored"],
     "--set distribute.strategy mirrored trains in one process"),
    (["--nodes", "2", "--gpus-per-node", "0", "--strategy", "horovod"],
     "--tasks-per-node: horovod without GPUs (--gpus-per-node 0) needs the number of CPU tasks per node"),
    (["--nodes", "2", "--gpus-per-node", "4", "--tasks-per-node", "2", "--strategy", "horovod"],
     "--tasks-per-node: horovod runs one task per GPU"),
    (["--nodes", "2", "--gpus-per-node", "2", "--tasks-per-node", "2"],
     "a multi_worker task uses every GPU of its node"),
    (["--nodes", "0", "--gpus-per-node", "1"], "--nodes: expected a positive integer, got 0"),
    (["--nodes", "1", "--gpus-per-node", "-1"], "--gpus-per-node: expected an integer >= 0, got -1"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "25h"], "--time: expected HH:MM:SS or D-HH:MM:SS, got '25h'"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "a b"], "--partition: expected a partition name"),
    (["--nodes", "1", "--gpus-per-node", "1", "--strategy", "ring"], "--strategy: expected one of auto, one_device"),
    (["--nodes", "1", "--gpus-per-node", "1", "--set", "train.epochs=0"],
     "--set train.epochs: expected a positive integer, got 0"),
    (["--nodes", "1", "--gpus-per-node", "1", "--check"], "--check: compares with the file of --output"),
])
def test_impossible_requests_fail_with_one_line_and_exit_2(argv, message, in_repo, capsys):
    assert main(["slurm", "render", "jobs/quickstart.yaml", *argv]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("distrain: error: "), err
    assert message in err, err


@pytest.mark.timeout(30)
def test_missing_job_file_fails_with_one_line(in_repo, capsys):
    assert main(["slurm", "render", "jobs/nope.yaml", "--nodes", "1", "--gpus-per-node", "1"]) == EXIT_USAGE
    assert capsys.readouterr().err == "distrain: error: jobs/nope.yaml: no such job file\n"


@pytest.mark.timeout(30)
def test_output_writes_an_executable_script_that_names_itself(tmp_path, in_repo, capsys):
    out = tmp_path / "cnn.sh"
    argv = ["jobs/cnn.yaml", "--nodes", "2", "--gpus-per-node", "1", "--output", str(out)]
    assert main(["slurm", "render", *argv]) == 0
    assert capsys.readouterr().out == ""
    assert out.read_text() == render(argv) and os.access(out, os.X_OK)
    assert f"#   sbatch {out} " in out.read_text()
    assert main(["slurm", "render", *argv, "--check"]) == 0
    out.write_text(out.read_text() + "# edited\n")
    assert main(["slurm", "render", *argv, "--check"]) == 1
    assert "is not the render of its command" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_check_prints_what_the_launcher_needs(in_repo, capsys):
    assert main(["slurm", "check", "jobs/quickstart.yaml", "--nodes", "2", "--tasks", "2"]) == 0
    assert capsys.readouterr().out == "name=quickstart\nstrategy=multi_worker\ntensorboard=true\n"
    assert main(["slurm", "check", "jobs/quickstart.yaml", "--nodes", "1", "--tasks", "2",
                 "--set", "distribute.strategy=mirrored"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set distribute.strategy mirrored trains in one process, but the " \
                                   "allocation (SLURM_NTASKS=2, SLURM_JOB_NUM_NODES=1) makes 2 tasks" in err


# --------------------------------------------------------------------------------------------
# the shipped scripts
# --------------------------------------------------------------------------------------------

def generated_by(path: Path) -> list[str]:
    m = re.search(r"^# Generated by: distrain slurm render (.*)$", path.read_text(), re.MULTILINE)
    assert m, f"{path}: no '# Generated by:' line"
    return shlex.split(m.group(1))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_script_is_the_render_of_its_job(name, in_repo):
    path = REPO / "slurm" / f"{name}.sh"
    argv = generated_by(path)
    assert argv[0] == f"jobs/{name}.yaml" and argv[-2:] == ["--output", f"slurm/{name}.sh"]
    assert path.read_text() == render(argv), f"{path} is stale: run slurm/regenerate.sh"
    assert f"#   sbatch slurm/{name}.sh " in path.read_text()


@pytest.mark.timeout(60)
def test_regenerate_check_passes_and_covers_every_shipped_script():
    scripts = sorted(p.stem for p in (REPO / "slurm").glob("*.sh"))
    # doctor.sh is written by hand, not rendered from a job (tests/test_doctor.py checks it).
    assert scripts == sorted([*SHIPPED, "distrain-launch", "regenerate", "doctor"])
    done = subprocess.run(["bash", str(REPO / "slurm" / "regenerate.sh"), "--check"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DISTRAIN": VENV_DISTRAIN})
    assert done.returncode == 0, done.stderr
    text = (REPO / "slurm" / "regenerate.sh").read_text()
    assert sorted(re.findall(r"^render (\w+) ", text, re.MULTILINE)) == sorted(SHIPPED)


@pytest.mark.timeout(30)
def test_shell_scripts_pass_shellcheck(needs_shellcheck):
    files = [REPO / "slurm" / "distrain-launch.sh", REPO / "slurm" / "regenerate.sh",
             *(REPO / "slurm" / f"{n}.sh" for n in SHIPPED)]
    done = subprocess.run(["shellcheck", "-x", "-P", str(REPO), *map(str, files)], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout


# --------------------------------------------------------------------------------------------
# the launcher's exit codes, with a fake srun and scontrol (no SLURM needed)
# --------------------------------------------------------------------------------------------

FAKE = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_LOG.{name}"
{body}
"""


# FAKE_SRUN_RUN=1: run the task's command as one task of a one-node step (what a 1-task srun gives
# it). FAKE_SRUN_SIGNAL=SEGV: die by that signal, as srun reports a task killed by it (128 + N).
FAKE_SRUN = """\
if [[ -n ${FAKE_SRUN_RUN:-} ]]; then
  while [[ $1 == --* ]]; do shift; done
  SLURM_STEP_NUM_TASKS=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_STEP_ID=0 \\
    SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_TASKS_PER_NODE=1 exec "$@"
fi
[[ -z ${FAKE_SRUN_SIGNAL:-} ]] || kill -"$FAKE_SRUN_SIGNAL" $$
exit "${FAKE_SRUN_RC:-0}"
"""


# `scontrol show job` answers as SLURM does for a batch job: Command= names the script as submitted
# (FAKE_SUBMITTED, when the test runs a copy as sbatch does); every other call exits FAKE_SCONTROL_RC.
FAKE_SCONTROL = """\
if [[ $1 == show ]]; then
  [[ -z ${FAKE_SUBMITTED:-} ]] || echo "   Command=$FAKE_SUBMITTED"
  exit 0
fi
exit "${FAKE_SCONTROL_RC:-0}"
"""


def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(FAKE.format(name=name, body=body))
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_fake_job(tmp_path: Path, script: Path, *, srun_rc: int, restarts: int | None = None,
                 scontrol_rc: int = 0, extra_env: dict | None = None, cwd: Path = REPO):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update({"PATH": f"{fake_bin(tmp_path)}:{env['PATH']}", "FAKE_LOG": str(tmp_path / "calls"),
                "FAKE_SRUN_RC": str(srun_rc), "FAKE_SCONTROL_RC": str(scontrol_rc), "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "1",
                "SLURM_JOB_NODELIST": "n1", "SLURM_SUBMIT_HOST": "login1", "USER": "ada",
                **({"SLURM_RESTART_COUNT": str(restarts)} if restarts is not None else {}), **(extra_env or {})})
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=100, cwd=cwd, env=env)
    calls = {n: (tmp_path / f"calls.{n}").read_text().splitlines() if (tmp_path / f"calls.{n}").exists() else []
             for n in ("srun", "scontrol")}
    calls["scontrol"] = [c for c in calls["scontrol"] if not c.startswith("show job")]  # the launcher lookup
    return done, calls


# The `distrain` of the launcher tests: `distrain slurm check`, the launcher's first step, whose preflight
# imports TensorFlow and builds the model, is forked from the session's fork server (conftest.Forked),
# which imported TensorFlow once: about 1 s instead of 6 a job. It asks a relay, a thread of this
# pytest process (the fork server's one client), over a unix socket; the relay starts the check and
# answers with its exit code and output. Any other command (the tasks' `train`) is the real distrain,
# exec'd: a task is still a process that srun started. test_the_out_file_of_a_rendered_script_is_readable,
# which reads what a real check step prints, keeps the real one throughout.
FORKED_DISTRAIN = """#!{python}
import json, os, socket, sys
if sys.argv[1:3] != ["slurm", "check"]:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
sock = socket.socket(socket.AF_UNIX)
sock.connect({socket!r})
sock.sendall(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}).encode() + b"\\n")
done = json.loads(sock.makefile().readline())
sys.stdout.write(open(done["stdout"]).read())
sys.stderr.write(open(done["stderr"]).read())
sys.exit(done["code"] if done["code"] >= 0 else 128 - done["code"])
"""


@pytest.fixture(scope="module")
def forked_distrain(tmp_path_factory) -> Iterator[str]:
    """The path of FORKED_DISTRAIN, its relay running until the module's end."""
    root = tmp_path_factory.mktemp("forked-distrain")
    where = Path(tempfile.mkdtemp(prefix="dt-relay-", dir="/tmp"))  # short: a unix socket's path is limited
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(where / "sock"))
    listener.listen(4)
    listener.settimeout(0.2)
    stop = threading.Event()

    def relay() -> None:
        for n in itertools.count():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                if stop.is_set():
                    return
                continue
            with conn:
                conn.settimeout(None)
                out, err = root / f"{n}.out", root / f"{n}.err"
                try:
                    request = json.loads(conn.makefile().readline())
                    run = Forked(request["argv"], out, stderr=err, env=request["env"], cwd=Path(request["cwd"]))
                    code = run.wait(timeout=90).returncode
                except subprocess.TimeoutExpired:
                    code = -9
                except Exception:  # on the wrapper's stderr, not lost in this thread
                    out.write_text("")
                    err.write_text(f"the forked-distrain relay failed:\n{traceback.format_exc()}")
                    code = 1
                conn.sendall(json.dumps({"code": code, "stdout": str(out), "stderr": str(err)}).encode() + b"\n")

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    wrapper = root / "distrain"
    wrapper.write_text(FORKED_DISTRAIN.format(python=sys.executable, real=VENV_DISTRAIN, socket=str(where / "sock")))
    wrapper.chmod(0o755)
    try:
        yield str(wrapper)
    finally:
        stop.set()
        thread.join(timeout=120)
        listener.close()
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def cpu_script(tmp_path, forked_distrain):
    job = write_job(tmp_path / "job.yaml", JOB.format(name="fake", epochs=2, steps=10, tensorboard="true"))
    script = tmp_path / "job.sh"
    script.write_text(render([str(job), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
                              "--runs-dir", str(tmp_path / "runs"), "--set", "train.epochs=3",
                              "--distrain", forked_distrain]))
    return script


@pytest.mark.timeout(60)
def test_launcher_runs_srun_with_the_run_dir_and_prints_tensorboard_first(tmp_path, cpu_script, forked_distrain):
    done, calls = run_fake_job(tmp_path, cpu_script, srun_rc=0)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "fake" / "slurm-4242"
    lines = done.stdout.splitlines()
    assert lines[:5] == [
        f"distrain-launch: job 4242: {tmp_path / 'job.yaml'}, 2 task(s) on n1, strategy multi_worker",
        f"distrain-launch: run dir {run_dir}",
        f"distrain-launch: TensorBoard logs: {run_dir}/tensorboard",
        f"distrain-launch:   on login1: tensorboard --logdir {run_dir}/tensorboard --host 127.0.0.1 --port 6006",
        "distrain-launch:   on your machine: ssh -N -L 6006:127.0.0.1:6006 ada@login1 then open http://127.0.0.1:6006",
    ]
    (srun,) = calls["srun"]
    assert srun == (f"--kill-on-bad-exit=1 --distribution=block --cpus-per-task=1 bash -c "
                    f"trap \"\" TERM USR1; exec \"$@\" distrain-task {forked_distrain} train {tmp_path / 'job.yaml'} "
                    f"--run-dir {run_dir} --set train.epochs=3")
    assert calls["scontrol"] == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["rendered into a project", "beside its own launcher"])
def test_a_script_submitted_from_another_directory_finds_its_launcher_job_and_checkout(tmp_path, where, in_repo,
                                                                                         forked_distrain):
    """sbatch runs a copy of the script from its spool directory, in the directory it was submitted
    from: the launcher is found from the original script (SLURM's Command=), a course job from the
    checkout, so a user's project need not be the distrain checkout."""
    project, elsewhere, spool = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "spool"
    for d in (project, elsewhere, spool):
        d.mkdir()
    if where == "rendered into a project":  # --output outside the checkout: the script names the checkout
        script, job = project / "qs.sh", "jobs/quickstart.yaml"
        text = render([job, "--nodes", "1", "--gpus-per-node", "0", "--output", str(script), "--runs-dir", "runs",
                       "--distrain", forked_distrain])
        expected_job = REPO / job
    else:  # a copy of the launcher beside the script, the job given by its absolute path
        script, job = project / "qs.sh", str(REPO / "jobs" / "quickstart.yaml")
        text = render([job, "--nodes", "1", "--gpus-per-node", "0", "--runs-dir", "runs", "--distrain",
                       forked_distrain])
        shutil.copy(REPO / "slurm" / "distrain-launch.sh", project / "distrain-launch.sh")
        expected_job = Path(job)
    script.write_text(text)
    (spool / "slurm_script").write_text(text)  # what sbatch runs
    done, calls = run_fake_job(tmp_path, spool / "slurm_script", srun_rc=0, cwd=elsewhere,
                               extra_env={"FAKE_SUBMITTED": str(script)})
    assert done.returncode == 0, done.stdout + done.stderr
    (srun,) = calls["srun"]
    assert f" train {expected_job} --run-dir {elsewhere / 'runs' / 'quickstart' / 'slurm-4242'}" in srun, srun


@pytest.mark.timeout(30)
def test_a_script_whose_launcher_cannot_be_found_says_where_it_looked(tmp_path, in_repo):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = tmp_path / "qs.sh"
    script.write_text(render(["jobs/quickstart.yaml", "--nodes", "1", "--gpus-per-node", "0"]))
    done, calls = run_fake_job(tmp_path, script, srun_rc=0, cwd=elsewhere)
    assert done.returncode == 2 and calls["srun"] == []
    assert done.stderr.strip() == (f"distrain-launch.sh: not found (looked beside {script} and in {elsewhere}/slurm); "
                                   "set DISTRAIN_LAUNCH=/path/to/distrain/slurm/distrain-launch.sh")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("srun_rc, restarts, scontrol_rc, exit_code, requeued", [
    (EXIT_PREEMPTED, None, 0, 0, True),   # preempted: requeue, and the job is no failure
    (EXIT_PREEMPTED, 7, 0, 0, True),      # preemptions always requeue
    (EXIT_PEER_LOST, 2, 0, 0, True),      # a lost peer: requeue while restarts < MAX_RESTARTS (3)
    (EXIT_PEER_LOST, 3, 0, EXIT_PEER_LOST, False),
    (EXIT_WRITE_FAILED, None, 0, EXIT_WRITE_FAILED, False),  # a full disk: never requeued
    (EXIT_PREEMPTED, None, 1, EXIT_PREEMPTED, True),  # scontrol requeue failed: the code stays
    (1, None, 0, 1, False),
    (143, None, 0, 143, False),
])
def test_launcher_maps_exit_codes(tmp_path, cpu_script, srun_rc, restarts, scontrol_rc, exit_code, requeued):
    done, calls = run_fake_job(tmp_path, cpu_script, srun_rc=srun_rc, restarts=restarts, scontrol_rc=scontrol_rc)
    assert done.returncode == exit_code, done.stdout + done.stderr
    assert calls["scontrol"] == (["requeue 4242"] if requeued else [])
    if requeued and exit_code == 0:
        assert f"requeueing job 4242: it resumes from {tmp_path}/runs/fake/slurm-4242/backup" in done.stdout
    elif srun_rc in (EXIT_PREEMPTED, EXIT_PEER_LOST, EXIT_WRITE_FAILED):
        assert "sbatch --export=ALL,DISTRAIN_RUN_DIR=" in done.stderr


@pytest.mark.timeout(60)
def test_a_task_killed_by_a_signal_is_named_in_one_line_with_the_troubleshooting_page(tmp_path, cpu_script):
    done, calls = run_fake_job(tmp_path, cpu_script, srun_rc=0, extra_env={"FAKE_SRUN_SIGNAL": "SEGV"})
    assert done.returncode == 139 and calls["scontrol"] == [], done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == (
        "distrain-launch: a task died by SIGSEGV (exit 139): a crash in TensorFlow or a library; TensorFlow 2.21's "
        "oneDNN crash (munmap_chunk(): invalid pointer) goes away with TF_ENABLE_ONEDNN_OPTS=0; see "
        f"docs/troubleshooting.md#a-run-dies-by-a-signal; run dir {tmp_path}/runs/fake/slurm-4242")
    assert (REPO / "docs" / "troubleshooting.md").read_text().count("\n## A run dies by a signal\n") == 1


OWN_MODEL = """\
import tensorflow as tf  # at the top, as a user writes it: the check step and the task import it first


def build(input_shape, num_classes):
    inputs = tf.keras.Input(shape=input_shape)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes)(tf.keras.layers.Flatten()(inputs)))
"""


@pytest.mark.timeout(120)
def test_the_out_file_of_a_rendered_script_is_readable(tmp_path):
    """What the .out file of a job gets, with the check step and one task really run (a fake srun): no
    TensorFlow start-up lines, one line per epoch instead of the progress bar's redraws, a step line
    every logging.update_every_steps, and the worker's start-up line at INFO."""
    (tmp_path / "my_model.py").write_text(OWN_MODEL)
    job = write_job(tmp_path / "job.yaml", "name: fake\nmodel: {name: my_model.py:build}\n"
                    "data: {source: digits, batch_size_per_replica: 16}\ntrain: {epochs: 2, steps_per_epoch: 10}\n"
                    "checkpoint: {every_epochs: 0, save_best: false, backup_every_steps: 0}\n"
                    "logging: {tensorboard: false, update_every_steps: 5}\n")
    script = tmp_path / "job.sh"
    script.write_text(render([str(job), "--nodes", "1", "--gpus-per-node", "0", "--runs-dir", str(tmp_path / "runs"),
                              "--distrain", VENV_DISTRAIN]))
    env = {"FAKE_SRUN_RUN": "1", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "localhost",
           "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "CUDA_VISIBLE_DEVICES": "-1"}
    done, _ = run_fake_job(tmp_path, script, srun_rc=0, extra_env=env)
    out = done.stdout + done.stderr  # one .out file gets both
    assert done.returncode == 0, out
    from distrain.tf_startup import is_startup_notice

    assert not [line for line in out.splitlines() if is_startup_notice(line)], out
    assert "\r" not in out and "\b" not in out, out
    epochs = re.findall(r"^Epoch \d/2$|^10/10 - ", done.stdout, re.M)
    assert epochs == ["Epoch 1/2", "10/10 - ", "Epoch 2/2", "10/10 - "], done.stdout
    line = r"INFO step (\d+)/20 \(epoch (\d)/2\): loss [\d.]+, accuracy [\d.]+, lr [\d.e-]+, \d+ images/s$"
    steps = re.findall(line, done.stderr, re.M)
    assert steps == [("5", "1"), ("10", "1"), ("15", "2"), ("20", "2")], done.stderr
    log = (tmp_path / "runs" / "fake" / "slurm-4242" / "logs" / "rank0.log").read_text()
    assert "INFO distrain worker rank 0/1" in log and "INFO step 20/20 (epoch 2/2)" in log


@pytest.mark.timeout(60)
def test_a_mode_in_the_environment_does_not_turn_training_into_a_benchmark(tmp_path, cpu_script, forked_distrain):
    done, calls = run_fake_job(tmp_path, cpu_script, srun_rc=0, extra_env={"MODE": "bench"})
    assert done.returncode == 0, done.stderr
    (srun,) = calls["srun"]
    assert f" {forked_distrain} train " in srun and " bench " not in srun


@pytest.mark.timeout(60)
@pytest.mark.parametrize("srun_rc", [0, EXIT_PEER_LOST, EXIT_PREEMPTED, 1])
def test_bench_script_runs_distrain_bench_and_never_requeues(tmp_path, srun_rc):
    job = write_job(tmp_path / "job.yaml", JOB.format(name="fake", epochs=2, steps=10, tensorboard="true"))
    script = tmp_path / "bench.sh"
    script.write_text(render([str(job), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--bench",
                              "--runs-dir", str(tmp_path / "runs"), "--distrain", VENV_DISTRAIN])
                      .replace("BENCH_ARGS=()", "BENCH_ARGS=(--json --steps 20)"))
    done, calls = run_fake_job(tmp_path, script, srun_rc=srun_rc)
    assert done.returncode == srun_rc, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "fake" / "bench-slurm-4242"
    assert done.stdout.splitlines()[:2] == [
        f"distrain-launch: job 4242: {job}, 2 task(s) on n1, strategy multi_worker", f"distrain-launch: run dir {run_dir}"]
    assert "TensorBoard" not in done.stdout
    (srun,) = calls["srun"]
    assert srun.endswith(f"distrain-task {VENV_DISTRAIN} bench {job} --run-dir {run_dir} --json --steps 20")
    assert calls["scontrol"] == []


@pytest.mark.timeout(60)
def test_no_requeue_passes_75_through(tmp_path, cpu_script):
    cpu_script.write_text(cpu_script.read_text().replace("REQUEUE=1", "REQUEUE=0"))
    done, calls = run_fake_job(tmp_path, cpu_script, srun_rc=EXIT_PREEMPTED)
    assert done.returncode == EXIT_PREEMPTED and calls["scontrol"] == []
    assert "REQUEUE=0, so the job ends here" in done.stderr


@pytest.mark.timeout(60)
def test_launcher_continues_a_given_run_dir(tmp_path, cpu_script):
    done, calls = run_fake_job(tmp_path, cpu_script, srun_rc=0, extra_env={"DISTRAIN_RUN_DIR": "runs/old"})
    assert done.returncode == 0
    assert f"--run-dir {REPO}/runs/old " in calls["srun"][0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_ID": ""}, "distrain-launch: not inside a SLURM job; submit the script with sbatch\n"),
    ({"DISTRAIN": "/nonexistent/distrain"}, "distrain-launch: DISTRAIN=/nonexistent/distrain: command not found"),
    ({"SLURM_NTASKS": "3"}, None),  # allowed: CPU multi_worker, 3 tasks
])
def test_launcher_refuses_before_srun(tmp_path, cpu_script, env, message):
    done, calls = run_fake_job(tmp_path, cpu_script, srun_rc=0, extra_env=env)
    if message is None:
        assert done.returncode == 0 and len(calls["srun"]) == 1
        return
    assert done.returncode == EXIT_USAGE and calls["srun"] == []
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


# --------------------------------------------------------------------------------------------
# a real SLURM (cluster/slurm-local.sh)
# --------------------------------------------------------------------------------------------

JOB = """\
name: {name}
seed: 1
model: {{name: cnn, params: {{filters: 8}}}}
data: {{source: digits, batch_size_per_replica: 16}}
train: {{epochs: {epochs}, steps_per_epoch: {steps}, optimizer: adam, learning_rate: 0.002}}
distribute: {{collective_timeout_s: 30, preemption_check_every: 1}}
checkpoint: {{every_epochs: 1, backup_every_steps: 5}}
logging: {{tensorboard: {tensorboard}, verbose: 0}}
"""


def exports(**extra) -> str:
    """sbatch --export for the test jobs: one thread each on this 2-core machine, quiet TF, a free port."""
    env = {"TF_NUM_INTRAOP_THREADS": 1, "TF_NUM_INTEROP_THREADS": 1, "TF_CPP_MIN_LOG_LEVEL": 3,
           "CUDA_VISIBLE_DEVICES": -1, "DISTRAIN_PORT": free_port_block(2), **extra}
    return "--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items())


def rendered(tmp_path: Path, job: Path, *argv: str, distrain: str = VENV_DISTRAIN) -> Path:
    script = tmp_path / f"{job.stem}.sh"
    script.write_text(render([str(job), "--gpus-per-node", "0", "--runs-dir", str(tmp_path / "runs"),
                              "--time", "00:15:00", "--distrain", distrain, *argv]))
    return script


def assert_finished_run(run_dir: Path, output: str, *, steps: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["launcher"], summary["strategy"]) == (2, "slurm", "multi_worker"), summary
    epochs = steps // summary["steps_per_epoch"]
    assert summary["steps"] == steps and summary["epochs_completed"] == epochs
    for rank in (0, 1):
        assert f"distrain worker rank {rank}/2" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    kept = [f"epoch-{e:04d}.weights.h5" for e in range(max(1, epochs - 2), epochs + 1)]  # checkpoint.keep: 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.json", "best.weights.h5", *kept, "index.json"]
    assert not [p for p in run_dir.rglob("*") if "workertemp" in p.name], "a worker's temp dir was left"
    assert "distrain-launch: done" in output
    return summary


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_one_task_on_each_of_two_nodes(slurm_two_nodes, tmp_path, forked_distrain):
    job = write_job(tmp_path / "two.yaml", JOB.format(name="two", epochs=2, steps=10, tensorboard="false"))
    script = rendered(tmp_path, job, "--nodes", "2", distrain=forked_distrain)
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n" in script.read_text()
    result = slurm_two_nodes.sbatch_wait(script, exports(), timeout=280, cwd=REPO)
    assert result.returncode == 0, result.output
    run_dir = tmp_path / "runs" / "two" / f"slurm-{result.job_id}"
    assert_finished_run(run_dir, result.output, steps=20)
    assert "2 task(s) on n[1-2], strategy multi_worker" in result.output
    for rank in (0, 1):  # one task on each node: each is the only one on its node
        assert "(local 0/1, launcher slurm" in (run_dir / "logs" / f"rank{rank}.log").read_text()


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_bench_render_measures_two_nodes(slurm_two_nodes, tmp_path):
    job = write_job(tmp_path / "bench.yaml", JOB.format(name="bench", epochs=1, steps=10, tensorboard="false"))
    script = rendered(tmp_path, job, "--nodes", "2", "--bench")
    script.write_text(script.read_text().replace("BENCH_ARGS=()", "BENCH_ARGS=(--json --steps 10 --warmup 3)"))
    result = slurm_two_nodes.sbatch_wait(script, exports(), timeout=280, cwd=REPO)
    assert result.returncode == 0, result.output
    report = json.loads(result.output[result.output.index("\n{") + 1:result.output.rindex("}") + 1])
    assert (report["launcher"], report["strategy"], report["workers"], report["replicas"], report["steps"]) == (
        "slurm", "multi_worker", 2, 2, 10), report
    assert report["baseline"]["source"] == "measured" and 0 < report["efficiency"]
    assert report["images_per_s"] > 0 and "distrain-launch: benchmark done" in result.output
    assert (tmp_path / "runs" / "bench" / f"bench-slurm-{result.job_id}").is_dir()


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.horovod
@pytest.mark.timeout(300)
def test_horovod_render_runs_one_task_per_slot_on_two_nodes(needs_horovod, slurm_two_nodes, tmp_path, forked_distrain):
    """--strategy horovod as rendered: srun starts the tasks, distrain.backends.horovod bootstraps Gloo."""
    job = write_job(tmp_path / "hvd.yaml", JOB.format(name="hvd", epochs=2, steps=10, tensorboard="false"))
    script = rendered(tmp_path, job, "--nodes", "2", "--tasks-per-node", "1", "--strategy", "horovod",
                      distrain=forked_distrain)
    result = slurm_two_nodes.sbatch_wait(script, exports(), timeout=280, cwd=REPO)
    assert result.returncode == 0, result.output
    run_dir = tmp_path / "runs" / "hvd" / f"slurm-{result.job_id}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["launcher"], summary["strategy"], summary["steps"]) == (
        2, "slurm", "horovod", 20), summary
    for rank in (0, 1):
        assert f"distrain worker rank {rank}/2" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    assert not [p for p in run_dir.rglob("*") if "workertemp" in p.name]


USER_MODEL = """
import tensorflow as tf


def build(input_shape, num_classes, *, filters=4):
    inputs = tf.keras.Input(shape=input_shape)
    x = tf.keras.layers.Conv2D(filters, 3, activation="relu")(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes, activation="softmax")(x), name="slurm_user_net")
"""


# One job of 2 tasks on one node, as rendered, with a model file of the user's and TensorBoard on,
# preempted once it has a backup and requeued: three tests read it (one job instead of three).
EPOCHS, STEPS_PER_EPOCH = 6, 10


@dataclass
class OneNodeJob:
    root: Path
    job: Path
    script: Path
    model_file: Path
    result: SbatchResult
    run_dir: Path


@pytest.fixture(scope="module")
def one_node_job(slurm_one_node, tmp_path_factory, forked_distrain) -> OneNodeJob:
    """SIGUSR1 to the tasks once a backup exists (what --signal=USR1@90 sends) → exit 75 → scontrol
    requeue → resume, to the end."""
    root = tmp_path_factory.mktemp("one-node")
    (root / "code").mkdir()
    model_file = root / "code" / "slurm_user_net.py"
    model_file.write_text(USER_MODEL)
    text = JOB.format(name="one", epochs=EPOCHS, steps=STEPS_PER_EPOCH, tensorboard="true").replace(
        "model: {name: cnn, params: {filters: 8}}", "model: {name: code/slurm_user_net.py:build, params: {filters: 4}}")
    job = write_job(root / "one.yaml", text)
    script = rendered(root, job, "--nodes", "1", "--tasks-per-node", "2", distrain=forked_distrain)
    runs = root / "runs" / "one"
    box = {}
    waiter = threading.Thread(target=lambda: box.update(
        result=slurm_one_node.sbatch_wait(script, exports(), timeout=380, cwd=REPO)), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 240
    run_dir = None
    while time.monotonic() < deadline and waiter.is_alive():
        found = list(runs.glob("slurm-*"))
        run_dir = found[0] if found else None
        if run_dir and backup_step(run_dir) > 0:
            break
        time.sleep(0.1)
    assert run_dir and backup_step(run_dir) > 0, f"no backup within the time: {box}"
    job_id = run_dir.name.split("-", 1)[1]
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm_one_node.env, check=True, timeout=30)
    waiter.join(timeout=400)
    return OneNodeJob(root, job, script, model_file, box["result"], run_dir)


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_two_tasks_on_one_node(one_node_job):
    result, run_dir = one_node_job.result, one_node_job.run_dir
    assert result.returncode == 0, result.output
    assert run_dir == one_node_job.root / "runs" / "one" / f"slurm-{result.job_id}"
    assert_finished_run(run_dir, result.output, steps=EPOCHS * STEPS_PER_EPOCH)
    first = result.output.splitlines()[:3]
    job = one_node_job.job
    assert first == [f"distrain-launch: job {result.job_id}: {job}, 2 task(s) on n1, strategy multi_worker",
                     f"distrain-launch: run dir {run_dir}",
                     f"distrain-launch: TensorBoard logs: {run_dir}/tensorboard"], result.output
    assert "ssh -N -L 6006:127.0.0.1:6006 " in result.output
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    for rank in (0, 1):
        assert f"(local {rank}/2, launcher slurm" in (run_dir / "logs" / f"rank{rank}.log").read_text()


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_preempted_job_is_requeued_and_resumes_from_its_backup(one_node_job):
    """SIGUSR1 to the tasks (what --signal=USR1@90 sends) → exit 75 → scontrol requeue → resume."""
    result, run_dir = one_node_job.result, one_node_job.run_dir
    job_id = run_dir.name.split("-", 1)[1]
    assert result.returncode == 0, result.output
    assert result.job_id == job_id
    stopped = re.search(r"preempted \(SIGUSR1\) at step (\d+); backup written", result.output)
    assert stopped, result.output
    assert f"preempted (exit 75), backup written; requeueing job {job_id}" in result.output
    assert f"distrain-launch: job {job_id} (restart 1):" in result.output
    assert f"distrain-launch: resuming from {run_dir}/backup" in result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == EPOCHS * STEPS_PER_EPOCH and summary["epochs_completed"] == EPOCHS
    assert summary["resumed_from_step"] == int(stopped.group(1)) > 0
    assert not [p for p in run_dir.rglob("*") if "workertemp" in p.name]


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_user_model_file_two_tasks_and_a_reference_refused_before_srun(one_node_job, slurm_one_node, forked_distrain):
    """A job naming its own model file, as rendered (imported again by the requeued job); a
    reference that does not import stops on the node in `distrain slurm check`, before srun starts
    a task."""
    root, model_file, result = one_node_job.root, one_node_job.model_file, one_node_job.result
    assert f"#   your code, imported on every node: model.name {model_file}:build\n" in one_node_job.script.read_text()
    assert result.returncode == 0, result.output
    summary = json.loads((one_node_job.run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["launcher"], summary["strategy"], summary["steps"]) == (
        2, "slurm", "multi_worker", EPOCHS * STEPS_PER_EPOCH), summary
    assert f"name: {model_file}:build" in (one_node_job.run_dir / "job.yaml").read_text()

    text = one_node_job.job.read_text()
    bad = write_job(root / "bad.yaml", text.replace("name: one", "name: bad").replace(":build", ":biuld"))
    script = rendered(root, bad, "--nodes", "1", "--tasks-per-node", "2", distrain=forked_distrain)
    result = slurm_one_node.sbatch_wait(script, exports(), timeout=120, cwd=REPO)
    assert result.returncode == EXIT_USAGE, result.output
    assert (f"distrain: error: {bad}: model.name: {model_file}:biuld: {model_file} has no biuld; it defines: build"
            in result.output.splitlines()), result.output
    assert "distrain-launch: run dir" not in result.output  # stopped before srun
    assert not (root / "runs" / "bad").exists()


WORLD = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
for port in "" {port}; do
  DISTRAIN_PORT=$port srun --distribution=block {python} -c \
    'import json; from distrain.world import detect; print("WORLD", json.dumps(detect().as_dict()))'
done
"""


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_workers_are_addressed_by_node_addr_on_two_nodes(slurm_two_nodes, tmp_path):
    # n1 and n2 are not host names: only SLURM's NodeAddr (127.0.0.1 for both) reaches them.
    for node in ("n1", "n2"):
        with pytest.raises(OSError):
            socket.getaddrinfo(node, None)
    port = free_port_block(2)
    script = tmp_path / "world.sh"
    script.write_text(WORLD.format(port=port, python=sys.executable))
    result = slurm_two_nodes.sbatch_wait(script, timeout=100, cwd=REPO)
    assert result.returncode == 0, result.output
    worlds = [json.loads(line.split(" ", 1)[1]) for line in result.output.splitlines() if line.startswith("WORLD ")]
    assert len(worlds) == 4, result.output
    derived = job_port(result.job_id, "0")  # first step: the port comes from the job and step ids
    for step, (base, pair) in enumerate(((derived, worlds[:2]), (port, worlds[2:]))):
        expected = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]  # two nodes on one address: counted up
        assert sorted(w["rank"] for w in pair) == [0, 1]
        for w in pair:
            assert (w["launcher"], w["world_size"], w["nodes"]) == ("slurm", 2, ["n1", "n2"]), w
            assert w["worker_addresses"] == expected, (step, w)
            assert w["tf_config"]["task"] == {"type": "worker", "index": w["rank"]}


@pytest.mark.slurm
@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["mirrored with 2 tasks", "missing job file", "invalid override"])
def test_impossible_requests_fail_in_the_script_before_srun(slurm_one_node, tmp_path, case, forked_distrain):
    job = write_job(tmp_path / "bad.yaml", JOB.format(name="bad", epochs=1, steps=2, tensorboard="false"))
    sbatch_args = [exports()]
    if case == "mirrored with 2 tasks":
        script = rendered(tmp_path, job, "--nodes", "1", "--strategy", "mirrored", distrain=forked_distrain)
        sbatch_args.append("--ntasks-per-node=2")  # more tasks than the rendered layout
        message = ("distrain: error: --set distribute.strategy mirrored trains in one process, but the allocation "
                   "(SLURM_NTASKS=2, SLURM_JOB_NUM_NODES=1) makes 2 tasks on 1 node")
    elif case == "missing job file":
        script = rendered(tmp_path, job, "--nodes", "1", distrain=forked_distrain)
        job.unlink()
        message = f"distrain-launch: JOB={job}: no such job file"
    else:
        script = rendered(tmp_path, job, "--nodes", "1", distrain=forked_distrain)
        script.write_text(script.read_text().replace("SET=()", "SET=(train.epochs=0)"))
        message = "distrain: error: --set train.epochs: expected a positive integer, got 0"
    result = slurm_one_node.sbatch_wait(script, *sbatch_args, timeout=100, cwd=REPO)
    assert result.returncode == EXIT_USAGE, result.output
    assert result.output.startswith(message) and result.output.count("\n") == 1, result.output
    assert "srun" not in result.output and not (tmp_path / "runs").exists()
