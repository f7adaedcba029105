"""The local SLURM of cluster/slurm-local.sh: multi-task and multi-node steps, exit codes, requeue.

Run: cluster/slurm-local.sh install   (once, as root)
     .venv/bin/python -m pytest tests/test_slurm_cluster.py -q
"""
import os
import re
import textwrap
from pathlib import Path

import pytest

from slurm_cluster import local_slurm

pytestmark = pytest.mark.slurm  # the clusters: conftest's slurm_one_node and slurm_two_nodes, one each per session


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    return path


def ranks(output: str) -> dict[int, str]:
    """{SLURM_PROCID: SLURM_STEP_NODELIST} from lines 'rank <procid> <nodelist>'."""
    return {int(m[1]): m[2] for m in re.finditer(r"^rank (\d+) (\S+)$", output, re.MULTILINE)}


@pytest.mark.timeout(60)
def test_two_tasks_on_one_node(slurm_one_node, tmp_path):
    script = write_script(tmp_path / "two_tasks.sh", """
        #SBATCH --ntasks=2
        srun bash -c 'echo rank $SLURM_PROCID $SLURM_STEP_NODELIST'
    """)
    result = slurm_one_node.sbatch_wait(script, timeout=40)
    assert result.returncode == 0, result.output + result.stderr
    assert ranks(result.output) == {0: "n1", 1: "n1"}, result.output


@pytest.mark.timeout(60)
def test_exit_code_of_a_failed_job(slurm_one_node, tmp_path):
    script = write_script(tmp_path / "fails.sh", """
        echo about to fail
        exit 3
    """)
    result = slurm_one_node.sbatch_wait(script, timeout=40)
    assert result.returncode == 3, result.output + result.stderr
    assert "about to fail" in result.output


@pytest.mark.timeout(60)
def test_requeue_runs_the_job_again_with_restart_count(slurm_one_node, tmp_path):
    # Requeued, the job waits for BeginTime = requeue + cred_expire (10 s here) + 1 before it runs again.
    script = write_script(tmp_path / "requeue.sh", """
        #SBATCH --open-mode=append
        echo "run restart_count=${SLURM_RESTART_COUNT:-unset}"
        if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
          scontrol requeue "$SLURM_JOB_ID" || exit 99
          sleep 60
          echo "not killed by the requeue"
          exit 98
        fi
        echo finished
    """)
    result = slurm_one_node.sbatch_wait(script, timeout=45)
    assert result.returncode == 0, result.output + result.stderr
    runs = re.findall(r"^run restart_count=(\S+)$", result.output, re.MULTILINE)
    assert runs == ["unset", "1"], result.output
    assert "DUE TO JOB REQUEUE" in result.output
    assert "not killed" not in result.output and result.output.rstrip().endswith("finished")


@pytest.mark.timeout(60)
def test_two_nodes_one_task_each(slurm_two_nodes, tmp_path):
    script = write_script(tmp_path / "two_nodes.sh", """
        #SBATCH --nodes=2
        #SBATCH --ntasks=2
        srun bash -c 'echo rank $SLURM_PROCID $SLURM_STEP_NODELIST; echo node $SLURM_PROCID $SLURMD_NODENAME'
    """)
    result = slurm_two_nodes.sbatch_wait(script, timeout=40)
    assert result.returncode == 0, result.output + result.stderr
    assert ranks(result.output) == {0: "n[1-2]", 1: "n[1-2]"}, result.output
    nodes = dict(re.findall(r"^node (\d+) (\S+)$", result.output, re.MULTILINE))
    assert nodes == {"0": "n1", "1": "n2"}, result.output


@pytest.mark.timeout(30)
def test_nodes_are_addressed_on_loopback(slurm_two_nodes):
    for node in ("n1", "n2"):
        shown = slurm_two_nodes.scontrol("show", "node", node)
        assert "NodeAddr=127.0.0.1 " in shown, shown
        assert re.search(r"State=IDLE\b", shown), shown


@pytest.mark.timeout(60)
def test_stop_leaves_no_daemons(tmp_path):
    with local_slurm(1, tmp_path) as cluster:
        pidfiles = sorted((cluster.dir / "run").glob("*.pid"))
        pids = {f.name: int(f.read_text()) for f in pidfiles}
        assert set(pids) == {"munged.pid", "slurmctld.pid", "slurmd-n1.pid"}
        assert all(Path(f"/proc/{pid}").exists() for pid in pids.values())
        munge_socket = cluster.dir / "munge" / "munge.socket.2"
        assert munge_socket.is_socket()
    still_running = {name: pid for name, pid in pids.items() if _is_daemon(pid)}
    assert not still_running
    assert not munge_socket.exists()


def _is_daemon(pid: int) -> bool:
    """True if PID is alive and is (still) a slurm daemon or munged, not a reused pid."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm in ("slurmctld", "slurmd", "munged", "slurmscriptd") and os.path.exists(f"/proc/{pid}")
