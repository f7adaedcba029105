"""Who am I in the job: rank, world size, local rank, chief, the other workers' addresses.

The launcher's environment is read here and nowhere else. Each launcher has a ``detect_*``
function with the same result type; ``detect()`` tries them in this order:

1. Horovod / MPI (``HOROVOD_RANK``, ``OMPI_COMM_WORLD_*``, ``PMI_*``): ``horovodrun`` and
   ``mpirun`` may run inside a SLURM allocation, and then their ranks, not SLURM's, are the truth.
2. ``TF_CONFIG``: set on purpose by a user or by Ray Train, possibly inside SLURM; it wins there.
3. SLURM, but only inside an ``srun`` step (``SLURM_STEP_NUM_TASKS``): the batch script itself is
   one process even when the allocation has many tasks, and treating it as rank 0 of N would
   hang in the first collective.
4. A plain single process.

``TF_CONFIG`` for SLURM is built here (``slurm_tf_config``), not with TensorFlow's
``SlurmClusterResolver``: that one calls ``nvidia-smi`` (missing on CPU nodes) and fails with
``gpus_per_node=0``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from distrain.errors import UsageError
from distrain.nodelist import expand_hostlist, expand_tasks_per_node

# Where job-derived ports land: above most services and below Linux's ephemeral range (32768-60999 by
# default), from which the kernel picks the local port of every outgoing connection. A job port in
# that range can be taken by any client on the node (srun, a gRPC peer) before the worker binds it.
PORT_RANGE = (20000, 32768)


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    launcher: str  # local | tf_config | slurm | horovod | mpi (| ray, set by distrain ray)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    worker_addresses: tuple[str, ...] = ()  # host:port of every process, in rank order
    tf_config: Optional[dict] = None
    gpus: tuple[str, ...] = ()  # GPU ids the launcher made visible to this process
    job_id: Optional[str] = None
    nodes: tuple[str, ...] = field(default=())
    tasks_per_node: tuple[int, ...] = ()  # SLURM: tasks on each of ``nodes`` (Horovod's srun bootstrap)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def num_workers(self) -> int:
        return self.world_size

    def describe(self) -> str:
        """One log line: who this process is."""
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_size}, "
                f"launcher {self.launcher}{', chief' if self.is_chief else ''}"
                f"{', job ' + self.job_id if self.job_id else ''})")

    def as_dict(self) -> dict:
        return {"launcher": self.launcher, "rank": self.rank, "world_size": self.world_size,
                "local_rank": self.local_rank, "local_size": self.local_size,
                "is_chief": self.is_chief, "num_workers": self.num_workers,
                "worker_addresses": list(self.worker_addresses), "gpus": list(self.gpus),
                "job_id": self.job_id, "nodes": list(self.nodes), "tf_config": self.tf_config}


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise UsageError(f"environment: {name} is not set (expected an integer)")
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment: {name}: expected an integer, got {value!r}") from None


def visible_gpus(env: Mapping[str, str]) -> tuple[str, ...]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES``, else SLURM's count on the node."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return tuple(g for g in (x.strip() for x in cvd.split(",")) if g and g != "-1")
    count = env.get("SLURM_GPUS_ON_NODE")
    if count and count.isdigit():
        return tuple(str(i) for i in range(int(count)))
    return ()


def detect_horovod(env: Mapping[str, str]) -> Optional[World]:
    """Horovod's own launcher (``horovodrun``), Open MPI's ``mpirun`` or an MPICH/PMI launcher."""
    for launcher, prefix_rank, prefix_size, local_rank, local_size in (
        ("horovod", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
        ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("mpi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ):
        if prefix_rank in env:
            rank, size = _int(env, prefix_rank), _int(env, prefix_size)
            _check_rank(rank, size, prefix_rank)
            return World(launcher=launcher, rank=rank, world_size=size,
                         local_rank=_int(env, local_rank, 0), local_size=_int(env, local_size, 1),
                         gpus=visible_gpus(env), job_id=env.get("SLURM_JOB_ID"))
    return None


def _check_rank(rank: int, size: int, name: str) -> None:
    if size < 1 or not 0 <= rank < size:
        raise UsageError(f"environment: {name}={rank} is not a rank of a world of size {size}")


def parse_tf_config(text: str) -> World:
    """A ``TF_CONFIG`` for MultiWorkerMirroredStrategy: ``chief`` (optional) and ``worker`` tasks.

    Ranks follow TensorFlow's order: the chief is rank 0 and the workers follow; without a chief,
    worker 0 is the chief.
    """
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        task_type, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError):
        raise UsageError("environment: TF_CONFIG: expected JSON with cluster and task {type, index}") from None
    unsupported = set(cluster) - {"chief", "worker"}
    if unsupported:
        raise UsageError(f"environment: TF_CONFIG: cluster roles {sorted(unsupported)} are not supported "
                         "(distrain trains data-parallel with chief/worker tasks only)")
    addresses = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
    if task_type not in ("chief", "worker"):
        raise UsageError(f"environment: TF_CONFIG: task type {task_type!r} is not supported")
    rank = index + (len(cluster.get("chief", [])) if task_type == "worker" else 0)
    _check_rank(rank, len(addresses), "TF_CONFIG task.index")
    hosts = [a.rsplit(":", 1)[0] for a in addresses]
    return World(launcher="tf_config", rank=rank, world_size=len(addresses),
                 local_rank=hosts[:rank].count(hosts[rank]), local_size=hosts.count(hosts[rank]),
                 worker_addresses=tuple(addresses), tf_config=config)


def job_port(job_id: Optional[str], step_id: Optional[str] = None, override: Optional[int] = None) -> int:
    """The first worker port of a job: the override, else derived from the job (and step) id.

    Deterministic, so every task computes the same port without talking to the others, and
    different for consecutive jobs sharing a node. ``DISTRAIN_PORT`` or ``distribute.port`` override it.
    """
    if override:
        return override
    digits = re.sub(r"\D", "", f"{job_id or 0}{step_id or ''}") or "0"
    span = PORT_RANGE[1] - PORT_RANGE[0]
    # Leave room for up to 64 tasks per node above the base port.
    return PORT_RANGE[0] + (int(digits) * 64) % (span - 64)


def slurm_tf_config(env: Mapping[str, str], node_addresses: Sequence[str], base_port: int) -> dict:
    """``TF_CONFIG`` for this SLURM task (pure: the environment and addresses go in, a dict comes out).

    Tasks are laid out by SLURM's default block distribution: the first node's tasks get the first
    ranks. Each task listens on ``base_port + its index among the tasks at its address``.

    Args:
        env: The task's environment (``SLURM_PROCID``, ``SLURM_STEP_NODELIST``, ...).
        node_addresses: Network address of each node in the step's node list, in that order.
        base_port: First port on every node.
    """
    nodes = _slurm_nodes(env)
    tasks = _slurm_tasks_per_node(env, len(nodes))
    if len(node_addresses) != len(nodes):
        raise UsageError(f"environment: {len(node_addresses)} addresses for {len(nodes)} SLURM nodes")
    workers, used = [], {}
    for addr, count in zip(node_addresses, tasks):
        for _ in range(count):
            # Counted per address, not per node: two SLURM nodes may share one address (a test
            # host running two slurmd), and their tasks must not share a port.
            workers.append(f"{addr}:{base_port + used.get(addr, 0)}")
            used[addr] = used.get(addr, 0) + 1
    rank = _int(env, "SLURM_PROCID")
    _check_rank(rank, len(workers), "SLURM_PROCID")
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}


def _slurm_nodes(env: Mapping[str, str]) -> list[str]:
    text = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    try:
        nodes = expand_hostlist(text)
    except ValueError as err:
        raise UsageError(f"environment: SLURM_STEP_NODELIST: {err}") from None
    if not nodes:
        raise UsageError("environment: SLURM_STEP_NODELIST is empty")
    return nodes


def _slurm_tasks_per_node(env: Mapping[str, str], num_nodes: int) -> list[int]:
    text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    try:
        tasks = expand_tasks_per_node(text)
    except ValueError as err:
        raise UsageError(f"environment: SLURM_STEP_TASKS_PER_NODE: {err}") from None
    if len(tasks) != num_nodes:
        raise UsageError(f"environment: SLURM_STEP_TASKS_PER_NODE={text!r} does not match {num_nodes} nodes")
    return tasks


def scontrol_node_addresses(nodes: Sequence[str]) -> list[str]:
    """Each node's ``NodeAddr`` as SLURM knows it, falling back to the node name.

    Node names need not be host names (``n1`` may live at ``10.0.0.7`` or, on a test machine,
    127.0.0.1); SLURM's own NodeAddr is what its daemons reach the node by.
    """
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", ",".join(nodes)], capture_output=True,
                             text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return list(nodes)
    addr = {}
    for line in out.splitlines():
        name = re.search(r"NodeName=(\S+)", line)
        node_addr = re.search(r"NodeAddr=(\S+)", line)
        if name and node_addr:
            addr[name.group(1)] = node_addr.group(1)
    return [addr.get(n, n) for n in nodes]


def detect_slurm(env: Mapping[str, str], port_override: Optional[int] = None,
                 resolve: Callable[[Sequence[str]], list[str]] = scontrol_node_addresses) -> Optional[World]:
    """A task of an ``srun`` step; ``None`` outside one (including the batch script itself)."""
    if "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return None
    size = _int(env, "SLURM_STEP_NUM_TASKS")
    rank = _int(env, "SLURM_PROCID")
    _check_rank(rank, size, "SLURM_PROCID")
    nodes = _slurm_nodes(env)
    tasks = _slurm_tasks_per_node(env, len(nodes))
    local_rank = _int(env, "SLURM_LOCALID", 0)
    node_index = _int(env, "SLURM_NODEID", 0)
    tf_config = None
    addresses: tuple[str, ...] = ()
    if size > 1:
        env_port = env.get("DISTRAIN_PORT")
        override = port_override or (int(env_port) if env_port and env_port.isdigit() else None)
        base = job_port(env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID"), override)
        tf_config = slurm_tf_config(env, resolve(nodes), base)
        addresses = tuple(tf_config["cluster"]["worker"])
        expected_node = sum(1 for start in _cumulative(tasks) if start <= rank) - 1
        if expected_node != node_index:
            raise UsageError("environment: SLURM placed tasks cyclically; distrain needs the default "
                             "block distribution (srun --distribution=block)")
    return World(launcher="slurm", rank=rank, world_size=size, local_rank=local_rank,
                 local_size=tasks[node_index] if node_index < len(tasks) else 1,
                 worker_addresses=addresses, tf_config=tf_config, gpus=visible_gpus(env),
                 job_id=env.get("SLURM_JOB_ID"), nodes=tuple(nodes),
                 tasks_per_node=tuple(tasks))


def _cumulative(counts: Sequence[int]) -> list[int]:
    starts, total = [], 0
    for c in counts:
        starts.append(total)
        total += c
    return starts


def detect(env: Optional[Mapping[str, str]] = None, *, port_override: Optional[int] = None,
           resolve: Callable[[Sequence[str]], list[str]] = scontrol_node_addresses) -> World:
    """This process's world, from the launcher's environment (see the module docstring for the order)."""
    env = os.environ if env is None else env
    found = detect_horovod(env)
    if found:
        return found
    if env.get("TF_CONFIG"):
        world = parse_tf_config(env["TF_CONFIG"])
        return World(**{**world.__dict__, "gpus": visible_gpus(env), "job_id": env.get("SLURM_JOB_ID")})
    found = detect_slurm(env, port_override, resolve)
    if found:
        return found
    return World(launcher="local", gpus=visible_gpus(env), job_id=env.get("SLURM_JOB_ID"))
