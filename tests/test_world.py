"""World discovery for each launcher's environment, node lists, TF_CONFIG from SLURM, strategy choice."""
import json
import os
from unittest import mock

import pytest

from distrain.errors import UsageError
from distrain.nodelist import expand_hostlist, expand_tasks_per_node
from distrain.backends.factory import choose_strategy
from distrain.world import World, detect, job_port, parse_tf_config, slurm_tf_config

IDENTITY = lambda nodes: list(nodes)  # noqa: E731 - node names are their addresses in these tests


@pytest.mark.parametrize("text,hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a[1-2]-ib,b3", ["a1-ib", "a2-ib", "b3"]),
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu-[008-010]", ["gpu-008", "gpu-009", "gpu-010"]),
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
    ("x[9-11],y", ["x9", "x10", "x11", "y"]),
    ("a,a,b", ["a", "b"]),
    ("", []),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node1-3]", "node[a-b]", "node[3-1]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


@pytest.mark.parametrize("text,counts", [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,1", [1, 1]), ("", [])])
def test_expand_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


def slurm_env(procid, ntasks=4, nodelist="node[01-02]", tasks_per_node="2(x2)", localid=None, nodeid=None, **extra):
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
           "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NODELIST": nodelist,
           "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": tasks_per_node}
    per_node = expand_tasks_per_node(tasks_per_node)
    starts = [sum(per_node[:i]) for i in range(len(per_node))]
    node = max(i for i, s in enumerate(starts) if s <= procid) if nodeid is None else nodeid
    env["SLURM_NODEID"] = str(node)
    env["SLURM_LOCALID"] = str(procid - starts[node] if localid is None else localid)
    env.update(extra)
    return env


def test_slurm_tf_config_block_layout():
    config = slurm_tf_config(slurm_env(3), ["10.0.0.1", "10.0.0.2"], 23000)
    assert config == {"cluster": {"worker": ["10.0.0.1:23000", "10.0.0.1:23001", "10.0.0.2:23000", "10.0.0.2:23001"]},
                      "task": {"type": "worker", "index": 3}}


def test_slurm_uneven_tasks_per_node():
    env = slurm_env(2, ntasks=3, nodelist="a[1-2]-ib", tasks_per_node="2,1")
    config = slurm_tf_config(env, ["a1-ib", "a2-ib"], 30000)
    assert config["cluster"]["worker"] == ["a1-ib:30000", "a1-ib:30001", "a2-ib:30000"]


def test_detect_slurm_step():
    world = detect(slurm_env(1, ntasks=2, nodelist="n[1-2]", tasks_per_node="1(x2)", DISTRAIN_PORT="25000"),
                   resolve=lambda nodes: ["127.0.0.1"] * len(nodes))
    assert (world.launcher, world.rank, world.world_size, world.local_rank, world.is_chief) == ("slurm", 1, 2, 0, False)
    # Two nodes behind one address (two slurmd on a test host) must not share a port.
    assert world.worker_addresses == ("127.0.0.1:25000", "127.0.0.1:25001")
    assert world.tf_config["task"] == {"type": "worker", "index": 1}
    assert world.nodes == ("n1", "n2")


def test_detect_slurm_resolves_node_addresses_through_the_resolver():
    seen = []

    def resolve(nodes):
        seen.append(list(nodes))
        return [f"10.1.0.{i + 1}" for i in range(len(nodes))]

    world = detect(slurm_env(0, ntasks=2, nodelist="n[1-2]", tasks_per_node="1(x2)"), resolve=resolve)
    assert seen == [["n1", "n2"]]
    assert [a.split(":")[0] for a in world.worker_addresses] == ["10.1.0.1", "10.1.0.2"]


def test_slurm_batch_script_is_one_process():
    # sbatch's batch step has the allocation's task count but is a single process.
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}
    world = detect(env)
    assert (world.launcher, world.world_size, world.job_id) == ("local", 1, "7")


def test_slurm_cyclic_distribution_is_refused():
    env = slurm_env(1, nodeid=1, localid=0)  # rank 1 placed on the second node: cyclic
    with pytest.raises(UsageError, match="block distribution"):
        detect(env, resolve=IDENTITY)


def test_slurm_gpus_from_environment():
    world = detect(slurm_env(0, ntasks=1, nodelist="g1", tasks_per_node="1", SLURM_GPUS_ON_NODE="4"), resolve=IDENTITY)
    assert world.gpus == ("0", "1", "2", "3")
    world = detect(slurm_env(0, ntasks=1, nodelist="g1", tasks_per_node="1", CUDA_VISIBLE_DEVICES="2,3",
                             SLURM_GPUS_ON_NODE="4"), resolve=IDENTITY)
    assert world.gpus == ("2", "3")


def test_job_port_is_deterministic_in_range_and_overridable():
    assert job_port("4242", "0") == job_port("4242", "0")
    assert job_port("4242", "0") != job_port("4243", "0")
    for job in ("1", "99999999", "123456789012", "32767"):
        # The whole block (64 tasks a node) stays below Linux's ephemeral range, 32768 and up.
        assert 20000 <= job_port(job) and job_port(job) + 64 <= 32768
    assert job_port("4242", override=31000) == 31000


def test_tf_config_with_and_without_chief():
    cluster = {"chief": ["h0:1"], "worker": ["h1:1", "h1:2"]}
    world = parse_tf_config(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert (world.rank, world.world_size, world.local_rank, world.local_size) == (2, 3, 1, 2)
    world = parse_tf_config(json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}))
    assert world.is_chief and world.world_size == 2


@pytest.mark.parametrize("text", ["not json", json.dumps({"cluster": {"ps": ["a:1"], "worker": ["b:1"]},
                                                         "task": {"type": "worker", "index": 0}}),
                                  json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 5}})])
def test_bad_tf_config(text):
    with pytest.raises(UsageError, match="TF_CONFIG"):
        parse_tf_config(text)


def test_tf_config_wins_over_slurm():
    env = slurm_env(0, ntasks=2, nodelist="n[1-2]", tasks_per_node="1(x2)")
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": ["r1:5000", "r2:5000"]}, "task": {"type": "worker", "index": 1}})
    world = detect(env, resolve=IDENTITY)
    assert (world.launcher, world.rank, world.job_id) == ("tf_config", 1, "4242")


@pytest.mark.parametrize("env,launcher,rank,size,local", [
    ({"HOROVOD_RANK": "3", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"}, "horovod", 3, 4, 1),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, "mpi", 1, 2, 1),
    ({"PMI_RANK": "0", "PMI_SIZE": "8", "MPI_LOCALRANKID": "0"}, "mpi", 0, 8, 0),
])
def test_horovod_and_mpi(env, launcher, rank, size, local):
    world = detect(env)
    assert (world.launcher, world.rank, world.world_size, world.local_rank) == (launcher, rank, size, local)
    assert world.tf_config is None


def test_mpi_inside_slurm_uses_mpi_ranks():
    env = {**slurm_env(0, ntasks=1, nodelist="n1", tasks_per_node="1"), "OMPI_COMM_WORLD_RANK": "2",
           "OMPI_COMM_WORLD_SIZE": "4"}
    world = detect(env)
    assert (world.launcher, world.rank, world.world_size) == ("mpi", 2, 4)


def test_bad_rank_values():
    with pytest.raises(UsageError, match="HOROVOD_RANK"):
        detect({"HOROVOD_RANK": "x", "HOROVOD_SIZE": "2"})
    with pytest.raises(UsageError, match="not a rank"):
        detect({"HOROVOD_RANK": "2", "HOROVOD_SIZE": "2"})


def test_plain_process():
    with mock.patch.dict(os.environ, {}, clear=True):
        world = detect()
    assert world == World(launcher="local")
    assert world.is_chief and world.num_workers == 1


@pytest.mark.parametrize("requested,launcher,size,gpus,expected", [
    ("auto", "local", 1, 0, "one_device"),
    ("auto", "local", 1, 1, "one_device"),
    ("auto", "local", 1, 4, "mirrored"),
    ("auto", "slurm", 2, 4, "multi_worker"),
    ("auto", "tf_config", 3, 0, "multi_worker"),
    ("auto", "horovod", 2, 0, "horovod"),
    ("multi_worker", "local", 1, 0, "multi_worker"),
    ("mirrored", "local", 1, 0, "mirrored"),
    ("horovod", "local", 1, 0, "horovod"),
])
def test_choose_strategy(requested, launcher, size, gpus, expected):
    assert choose_strategy(requested, World(launcher=launcher, world_size=size), gpus) == expected


@pytest.mark.parametrize("requested,launcher,match", [
    ("mirrored", "slurm", "mirrored trains in one process, but the slurm launcher started 4"),
    ("one_device", "tf_config", "one_device trains in one process"),
    ("multi_worker", "horovod", "use strategy horovod"),
    ("horovod", "tf_config", "must be started by horovodrun, mpirun or srun"),
])
def test_strategy_conflicts(requested, launcher, match):
    with pytest.raises(UsageError, match=match):
        choose_strategy(requested, World(launcher=launcher, world_size=4), 0)
