"""``distrain slurm``: the sbatch script for any job, rendered by one function.

On a SLURM cluster, from the distrain checkout (which every node sees at the same path)::

    sbatch slurm/mobilenet.sh                                     a shipped render: 1 node, 4 GPUs
    distrain slurm render jobs/cnn.yaml --nodes 4 --gpus-per-node 2 > cnn-4x2.sh && sbatch cnn-4x2.sh

On one machine, with the local SLURM of ``cluster/slurm-local.sh`` (CPU only)::

    cluster/slurm-local.sh start && eval "$(cluster/slurm-local.sh env)"
    distrain slurm render jobs/quickstart.yaml --nodes 1 --gpus-per-node 0 --tasks-per-node 2 \\
        --distrain "$PWD/.venv/bin/distrain" > qs.sh && sbatch --wait qs.sh

``sbatch_script`` is the only place a script is written: its keyword arguments are the options of
``distrain slurm render``, it reads nothing but the job file and returns the text, with ``--sweep``
also the sweep it planned (``render_sbatch`` returns the text alone). The golden files in
``tests/golden/`` pin its output, and ``slurm/*.sh`` are renders of ``jobs/*.yaml``. Each script
holds the ``#SBATCH`` lines and a few settings, then sources ``slurm/distrain-launch.sh``, the
body every script shares: it runs ``distrain slurm check`` (the job and the allocation, before
anything starts), prints where TensorBoard's logs are and how to tunnel to them, runs
``srun ... distrain train``, and turns exit 75 (preempted) and 76 (peer lost) into
``scontrol requeue``; exit 74 (a write failed: disk full) it never requeues. See docs/slurm.md.

``--sweep SWEEP_DIR`` renders a job array instead: one array task per trial of the job's sweep
(``sweeps.plan``: its ``sweep:`` section, ``--grid``, ``--trials``), each a whole run of the layout
below in ``SWEEP_DIR/trial-NNN``. In the batch script, ``distrain slurm check --sweep --trial
$SLURM_ARRAY_TASK_ID`` marks the trial running (``sweeps.launched.begin``) or says it is finished
already, and ``distrain slurm record`` records how it ended (``launched.end``); exit 75 requeues
that task alone, which resumes its trial from the trial's backup.

Layouts (``--strategy`` or the job's ``distribute.strategy``; ``auto`` is resolved as the run will):

- one node, one task (``mirrored`` over its GPUs, or ``one_device``);
- several nodes (or several CPU tasks), ``multi_worker``: one task per node using all its GPUs;
- ``horovod``: one task per GPU (CPU only: ``--tasks-per-node`` tasks).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from distrain import startup
from distrain.backends.factory import choose_strategy
from distrain.errors import EXIT_FAILED, EXIT_USAGE, UsageError
from distrain.rundir import RunDir, write_atomically
from distrain.spec import STRATEGIES, load_spec, spec_to_dict
from distrain.sweeps import launched
from distrain.sweeps import state as sweep_state
from distrain.sweeps.local import add_sweep_args, write_sweep_config
from distrain.sweeps.plan import Plan, Trial
from distrain.sweeps.plan import plan as plan_sweep
from distrain.sweeps.trials import override as set_string
from distrain.user_code import references
from distrain.world import World

DEFAULT_TIME = "24:00:00"
DEFAULT_DISTRAIN = "distrain"
LAUNCHER = "slurm/distrain-launch.sh"  # relative to the directory sbatch runs in (the checkout)
CPUS_PER_GPU = 4  # --cpus-per-task default: input pipeline threads per GPU of a task
MAX_RESTARTS = 3  # requeues after a lost peer (exit 76), counted by SLURM_RESTART_COUNT
ONE_PROCESS = ("one_device", "mirrored")
SHOWN_TRIALS = 12  # trials a sweep script's header lists; `distrain validate` lists them all

_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # job names, partitions, accounts: one plain word


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_layout(strategy: str, *, nodes: int, tasks: int, gpus_per_node: int, source: str,
                 asked: str) -> str:
    """The strategy the run will use with this many tasks, or a ``UsageError`` when it cannot work.

    Pure; used for the request at render time and for the real allocation in the batch script
    (``distrain slurm check``), so both refuse the same things.

    Args:
        strategy: the requested strategy (``auto`` included).
        nodes, tasks, gpus_per_node: the layout (``tasks`` in all, over ``nodes`` nodes).
        source: what set the strategy, for the message (``--strategy``, ``JOB: distribute.strategy``).
        asked: how the layout was asked for, for the message (``--nodes 2``, ``the allocation``).

    Returns:
        one_device, mirrored, multi_worker or horovod.

    Raises:
        UsageError: one process strategies with several tasks; several tasks per node sharing GPUs.
    """
    if strategy in ONE_PROCESS and tasks > 1:
        raise UsageError(f"{source} {strategy} trains in one process, but {asked} makes "
                         f"{_plural(tasks, 'task')} on {_plural(nodes, 'node')}; use strategy multi_worker "
                         "(one task per node) or horovod (one per GPU), or one node with one task")
    if strategy in ("auto", "multi_worker") and gpus_per_node > 0 and tasks > nodes:
        raise UsageError(f"{source} {strategy}: {asked} makes {_plural(tasks, 'task')} on "
                         f"{_plural(nodes, 'node')} with GPUs, but a multi_worker task uses every GPU of "
                         "its node; use one task per node, or strategy horovod for one task per GPU")
    # What `auto` becomes is decided where every run decides it.
    return choose_strategy(strategy, World(launcher="slurm", world_size=tasks), gpus_per_node)


def _positive(value: Optional[int], flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{flag}: expected {'a positive integer' if minimum == 1 else f'an integer >= {minimum}'}, "
                         f"got {value}")


def _check_word(value: Optional[str], flag: str, what: str) -> None:
    if value is not None and not _NAME.match(value):
        raise UsageError(f"{flag}: expected {what} (letters, digits, _ . + -), got {value!r}")


def _description(job: Path) -> list[str]:
    """The job file's leading comment, up to its first indented (command) line."""
    lines = []
    for line in job.read_text().splitlines():
        if not line.startswith("#") or line.startswith("#  ") or not line[1:].strip():
            break
        lines.append(line[1:].strip())
    return lines


def _strategy_source(job: str, overrides: Sequence[str], flag: Optional[str] = None) -> str:
    """Where the run's strategy comes from, for messages: the flag, a --set, or the job file."""
    if flag:
        return "--strategy"
    if any(o.split("=", 1)[0].strip() == "distribute.strategy" for o in overrides):
        return "--set distribute.strategy"
    return f"{job}: distribute.strategy"


def _q(value: str) -> str:
    return shlex.quote(str(value))


def _row(command: str, comment: str) -> str:
    """A header line ``#   COMMAND   COMMENT`` with the comments aligned where the commands allow."""
    return f"#   {command:<56} {comment}"


@dataclass(frozen=True)
class _Script:
    """Everything an sbatch script says, resolved from ``sbatch_script``'s options and the job."""

    job: str
    spec: Any
    nodes: int
    per_node: int
    gpus_per_node: int
    cpus: int
    time: str
    partition: Optional[str]
    account: Optional[str]
    requested: str
    resolved: str
    name: str
    runs_dir: Optional[str]
    run_overrides: tuple
    requeue: bool
    distrain: str
    output: Optional[str]
    command: tuple
    bench: bool = False
    sweep: Optional[str] = None
    grid: tuple = ()
    trials: Optional[int] = None
    parallel: Optional[int] = None
    max_array_size: Optional[int] = None
    plan: Optional[Plan] = None


class Rendered(NamedTuple):
    """``sbatch_script``'s result: the script, and the sweep it plans (None: not ``--sweep``)."""

    text: str
    plan: Optional[Plan]


def render_sbatch(job: str, **options) -> str:
    """The sbatch script's text (``sbatch_script``, which documents the options)."""
    return sbatch_script(job, **options).text


def sbatch_script(job: str, *, nodes: int, gpus_per_node: int, tasks_per_node: Optional[int] = None,
                  cpus_per_task: Optional[int] = None, time: str = DEFAULT_TIME,
                  partition: Optional[str] = None, account: Optional[str] = None,
                  strategy: Optional[str] = None, job_name: Optional[str] = None,
                  runs_dir: Optional[str] = None, overrides: Sequence[str] = (), requeue: bool = True,
                  distrain: str = DEFAULT_DISTRAIN, output: Optional[str] = None, bench: bool = False,
                  sweep: Optional[str] = None, grid: Sequence[str] = (), trials: Optional[int] = None,
                  parallel: Optional[int] = None, max_array_size: Optional[int] = None) -> str:
    """The sbatch script that trains JOB with this layout (``distrain slurm render``'s options).

    Reads only the job file (validated with its overrides); the result depends on nothing else.

    Args:
        job: the job's YAML file, as the script will name it (relative: to the directory sbatch
            runs in, normally the distrain checkout).
        nodes: ``--nodes``.
        gpus_per_node: ``--gres=gpu:G`` (0: CPU only, no gres line).
        tasks_per_node: tasks per node (default: one per node, one per GPU for horovod).
        cpus_per_task: ``--cpus-per-task`` (default: 4 per GPU of a task, 1 without GPUs).
        time: ``--time``, ``HH:MM:SS`` or ``D-HH:MM:SS``.
        partition, account: ``--partition``/``--account`` (left as a comment when not given).
        strategy: ``--set distribute.strategy=...`` for the run (default: the job's).
        job_name: ``--job-name`` (default: the job's name).
        runs_dir: the run dir is ``RUNS_DIR/NAME/slurm-JOBID`` (default: the job's output_dir).
        overrides: ``key.path=value`` overrides passed to every ``distrain`` call.
        requeue: turn exit 75/76 into ``scontrol requeue`` (``--no-requeue``: pass them through).
        distrain: the ``distrain`` command on the nodes (e.g. a venv's ``bin/distrain``).
        output: where the script will be (``--output``), for the commands in its header.
        bench: run ``distrain bench JOB`` instead of training (synthetic data, fixed steps, images/s
            and scaling efficiency in the job's output); never requeued.
        sweep: a job array over the job's sweep instead: array task k trains trial k in
            ``SWEEP/trial-NNN`` with this layout (relative: to the directory sbatch runs in).
        grid, trials: ``--grid KEY=A,B`` and ``--trials N``, as ``distrain sweep`` takes them.
        parallel: ``--array=...%P``: at most P trials at once (default: as many as SLURM schedules).
        max_array_size: the cluster's ``MaxArraySize`` (array indices are below it); None: not
            checked, which the header says.

    Returns:
        The script's text, and with ``sweep`` the sweep it planned (the launcher checks the sweep
        dir against it).

    Raises:
        UsageError: the job is invalid, a trial of its sweep is, or the request cannot work (one line
            naming the flag, key or trial).

    Example:
        >>> print(sbatch_script("jobs/cnn.yaml", nodes=2, gpus_per_node=4).text)  # doctest: +SKIP
    """

    _check_options(nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node,
                   cpus_per_task=cpus_per_task, time=time, partition=partition, account=account,
                   job_name=job_name, strategy=strategy, distrain=distrain)
    _check_sweep_options(sweep=sweep, grid=grid, trials=trials, parallel=parallel, bench=bench, runs_dir=runs_dir,
                         max_array_size=max_array_size)
    run_overrides = [*overrides, *([f"distribute.strategy={strategy}"] if strategy else [])]
    spec = load_spec(job, run_overrides)
    requested = spec.distribute.strategy
    per_node = _tasks_per_node(requested, gpus_per_node, tasks_per_node)
    asked = f"--nodes {nodes}" + (f" --tasks-per-node {tasks_per_node}" if tasks_per_node else "")
    resolved = check_layout(requested, nodes=nodes, tasks=nodes * per_node, gpus_per_node=gpus_per_node,
                            source=_strategy_source(job, overrides, strategy), asked=asked)
    planned = None
    if sweep is not None:
        planned = plan_sweep(job, run_overrides, grid=list(grid), trials=trials)
        for trial in planned.trials:  # a trial may sweep distribute.strategy
            check_layout(trial.spec.distribute.strategy, nodes=nodes, tasks=nodes * per_node,
                         gpus_per_node=gpus_per_node,
                         source=f"{job}: sweep trial {trial.index} ({' '.join(trial.sets)}):"
                         " distribute.strategy", asked=asked)
        check_array_size(len(planned.trials), max_array_size)
    if bench:
        requeue = False  # a benchmark that failed is read, not resumed
    if job_name is None and not _NAME.match(spec.name):
        raise UsageError(f"--job-name: the job's name {spec.name!r} is no SLURM job name (letters, digits, "
                         "_ . + -); give one")
    command = _render_command(job, nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node,
                              cpus_per_task=cpus_per_task, time=time, partition=partition, account=account,
                              strategy=strategy, job_name=job_name, runs_dir=runs_dir, overrides=overrides,
                              requeue=requeue, distrain=distrain, output=output, bench=bench, sweep=sweep,
                              grid=grid, trials=trials, parallel=parallel)
    script = _Script(job=job, spec=spec, nodes=nodes, per_node=per_node, gpus_per_node=gpus_per_node,
                     cpus=cpus_per_task or _default_cpus(requested, gpus_per_node, per_node), time=time,
                     partition=partition, account=account, requested=requested, resolved=resolved,
                     name=job_name or (f"{spec.name}-bench" if bench else spec.name), runs_dir=runs_dir,
                     run_overrides=tuple(run_overrides), requeue=requeue, distrain=distrain, output=output,
                     command=tuple(command), bench=bench, sweep=sweep, grid=tuple(grid), trials=trials,
                     parallel=parallel, max_array_size=max_array_size, plan=planned)
    header = _bench_header(script) if bench else _sweep_header(script) if sweep is not None else _header(script)
    out = [*header, *_directives(script), "", *_settings(script)]
    return Rendered("\n".join(line for line in out if line is not None) + "\n", planned)


def _render_command(job: str, *, nodes, gpus_per_node, tasks_per_node, cpus_per_task, time, partition, account,
                    strategy, job_name, runs_dir, overrides, requeue, distrain, output, bench, sweep=None, grid=(),
                    trials=None, parallel=None) -> list:
    """The ``distrain slurm render`` command that makes the script, for its header (defaults left out)."""
    command = ["distrain", "slurm", "render", job, "--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node)]
    for flag, value, default in (("--tasks-per-node", tasks_per_node, None), ("--cpus-per-task", cpus_per_task, None),
                                 ("--time", time, DEFAULT_TIME), ("--partition", partition, None),
                                 ("--account", account, None), ("--strategy", strategy, None),
                                 ("--job-name", job_name, None), ("--runs-dir", runs_dir, None)):
        if value != default:
            command += [flag, str(value)]
    for override in overrides:
        command += ["--set", override]
    if sweep is not None:
        command += ["--sweep", sweep]
        for flag in grid:
            command += ["--grid", flag]
        for flag, value in (("--trials", trials), ("--parallel", parallel)):
            if value is not None:
                command += [flag, str(value)]
    if bench:
        command.append("--bench")
    elif not requeue:
        command.append("--no-requeue")
    if distrain != DEFAULT_DISTRAIN:
        command += ["--distrain", distrain]
    if output is not None:
        command += ["--output", output]
    return command


def _check_options(*, nodes, gpus_per_node, tasks_per_node, cpus_per_task, time, partition, account, job_name,
                   strategy, distrain) -> None:
    """The flags that can be checked without the job file."""

    _positive(nodes, "--nodes")
    _positive(gpus_per_node, "--gpus-per-node", minimum=0)
    _positive(tasks_per_node, "--tasks-per-node")
    _positive(cpus_per_task, "--cpus-per-task")
    if not _TIME.match(time):
        raise UsageError(f"--time: expected HH:MM:SS or D-HH:MM:SS, got {time!r}")
    _check_word(partition, "--partition", "a partition name")
    _check_word(account, "--account", "an account name")
    _check_word(job_name, "--job-name", "a job name")
    if strategy is not None and strategy not in STRATEGIES:
        raise UsageError(f"--strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not distrain.strip():
        raise UsageError("--distrain: expected the distrain command, got ''")


def _check_sweep_options(*, sweep, grid, trials, parallel, bench, runs_dir, max_array_size) -> None:
    """The flags of a sweep that can be checked without the job file."""
    if sweep is None:
        for flag, value in (("--grid", list(grid)), ("--trials", trials), ("--parallel", parallel)):
            if value not in (None, []):
                raise UsageError(f"{flag}: only with --sweep SWEEP_DIR (a job array of the job's sweep)")
        return
    if not str(sweep).strip():
        raise UsageError("--sweep: expected the sweep dir, got ''")
    if bench:
        raise UsageError("--sweep: not with --bench: a benchmark measures the job's layout on synthetic data, it "
                         "trains no trials; render one without --sweep")
    if runs_dir is not None:
        raise UsageError("--runs-dir: not with --sweep: trial k's run dir is SWEEP_DIR/trial-NNN")
    _positive(parallel, "--parallel")
    _positive(max_array_size, "--max-array-size", minimum=0)


def check_array_size(trials: int, max_array_size: Optional[int]) -> None:
    """A job array of ``trials`` tasks (indices 0 to trials-1) fits the cluster's ``MaxArraySize``.

    Pure. SLURM refuses array indices of ``MaxArraySize`` or more (0 disables job arrays).

    Raises:
        UsageError: one line naming --sweep/--trials, the numbers and how to make them fit.
    """
    if max_array_size is None or trials <= max_array_size:
        return
    arrays = "job arrays are disabled" if max_array_size == 0 else f"array indices must be below {max_array_size}"
    raise UsageError(f"--sweep/--trials: {trials} trials need array indices 0-{trials - 1}, but the cluster's "
                     f"MaxArraySize is {max_array_size} ({arrays}): raise MaxArraySize in slurm.conf "
                     "(the cluster's admins), or split the sweep into sweep dirs of fewer trials (fewer --grid "
                     "values or --trials each)")


def array_spec(trials: int, parallel: Optional[int]) -> str:
    """``--array``'s value: every trial's index, at most ``parallel`` at once (``0-7%2``)."""
    indices = "0" if trials == 1 else f"0-{trials - 1}"
    return indices + (f"%{parallel}" if parallel else "")


def _default_cpus(requested: str, gpus_per_node: int, per_node: int) -> int:
    """``--cpus-per-task`` by default: ``CPUS_PER_GPU`` per GPU of a task, 1 without GPUs."""
    gpus_per_task = gpus_per_node // per_node if requested != "horovod" else min(gpus_per_node, 1)
    return CPUS_PER_GPU * gpus_per_task if gpus_per_task else 1


def _tasks_per_node(requested: str, gpus_per_node: int, tasks_per_node: Optional[int]) -> int:
    """Tasks per node: as asked; by default one per GPU for horovod, else one."""
    if requested != "horovod":
        return tasks_per_node or 1
    if gpus_per_node and tasks_per_node not in (None, gpus_per_node):
        raise UsageError(f"--tasks-per-node: horovod runs one task per GPU, so {gpus_per_node} with "
                         f"--gpus-per-node {gpus_per_node}, got {tasks_per_node} (leave it out)")
    if not gpus_per_node and tasks_per_node is None:
        raise UsageError("--tasks-per-node: horovod without GPUs (--gpus-per-node 0) needs the number of "
                         "CPU tasks per node, e.g. --tasks-per-node 2")
    return tasks_per_node or gpus_per_node


def _header(s: _Script) -> list:
    """The comment at the top: what the script trains and the commands that run it."""
    me = _q(s.output) if s.output else "SCRIPT"
    what = f"{_plural(s.per_node, 'task')} each ({'horovod' if s.requested == 'horovod' else 'multi_worker'})"
    if s.requested in ONE_PROCESS:
        several = ["#   several nodes need strategy multi_worker (or horovod): render again, e.g.",
                   f"#     distrain slurm render {_q(s.job)} --nodes 4 --gpus-per-node {s.gpus_per_node} "
                   "--strategy multi_worker --output SCRIPT4"]
    else:
        more = 2 * s.nodes if s.nodes > 1 else 4
        several = [_row(f"sbatch --nodes={more} {me}", f"{more} nodes, {what}")]

    # The user's code is imported by every task: `distrain slurm check` tries it on the first node
    # before srun; files must be on storage every node sees, modules on the PYTHONPATH sbatch passes on.
    yours = [f"#   your code, imported on every node: {key} {ref}" for key, ref in references(s.spec).items()]
    return [
        "#!/bin/bash",
        _layout_line(s, s.job),
        *[f"#   {line}" for line in _description(Path(s.job))],
        *yours,
        "#",
        "# Run from the distrain checkout or any other directory (every node must see the checkout, the job",
        f"# file and the runs dir at the same paths){'' if s.output else ', SCRIPT being this file'}:",
        _row(f"sbatch {me}", f"as rendered ({_plural(s.nodes, 'node')})"),
        _row(f"sbatch --nodes=1 {me}", "one node") if s.nodes > 1 else None,
        *several,
        _row(f"DISTRAIN=$PWD/.venv/bin/distrain sbatch {me}", "a distrain not on PATH"),
        _row(f"distrain train {_q(s.job)}", "one machine, no SLURM"),
        "# Output: slurm-<job name>-<job id>.out, with the TensorBoard tunnel command at its top. The run",
        f"# dir is RUNS_DIR/{s.spec.name}/slurm-<job id>, the same when the job is requeued, which resumes from",
        "# the run's backup: exit 75 (preempted) and 76 (peer lost) requeue the job (docs/slurm.md).",
        "# A requeued job may get fewer nodes (sbatch --nodes=MIN-MAX): it keeps the run's global batch and",
        "# takes more micro-batches per optimizer step (train.accumulation_steps), so the numbers continue.",
        "# Training writes one line per epoch and a step line every logging.update_every_steps steps to the",
        "# output (logging.verbose: 1 gives Keras's progress bar, made for terminals; docs/monitoring.md).",
        "#",
        f"# Generated by: {shlex.join(s.command)}",
        "# Edit the #SBATCH lines and the settings below freely; slurm/regenerate.sh rewrites slurm/*.sh.",
    ]


def _layout_line(s: _Script, what: str) -> str:
    """The script's first comment: what it runs, on how many nodes and tasks, with which strategy and
    precision (``train.precision``; XLA when ``train.jit_compile``)."""
    gpus = f"{s.gpus_per_node} GPU{'s' if s.gpus_per_node > 1 else ''} per node" if s.gpus_per_node else "CPU only"
    return (f"# {s.name}: {what} on SLURM: {_plural(s.nodes, 'node')} x {_plural(s.per_node, 'task')}, {gpus}, "
            f"strategy {s.resolved}{' (auto)' if s.requested == 'auto' else ''}, precision {s.spec.train.precision}"
            f"{', XLA' if s.spec.train.jit_compile else ''}.")


def _bench_header(s: _Script) -> list:
    """The comment at the top of a ``--bench`` script."""
    me = _q(s.output) if s.output else "SCRIPT"
    return [
        "#!/bin/bash",
        _layout_line(s, f"`distrain bench {s.job}`"),
        "#   The job's model, batch, optimizer and strategy on synthetic data of the job's shape, for a fixed",
        "#   number of steps; first each task alone as one replica (the baseline), then all together. The",
        "#   output file gets images/s, step time (compute vs communication) and the scaling efficiency;",
        "#   BENCH_ARGS=(--json) below makes it one JSON object (docs/bench.md).",
        "#",
        "# Run from the distrain checkout or any other directory (every node must see both and the job file",
        "# at the same paths):",
        _row(f"sbatch {me}", f"as rendered ({_plural(s.nodes, 'node')})"),
        _row(f"sbatch --nodes=1 {me}", "one node: the efficiency within a node") if s.nodes > 1 else None,
        _row(f"DISTRAIN=$PWD/.venv/bin/distrain sbatch {me}", "a distrain not on PATH"),
        _row(f"distrain bench {_q(s.job)}", "one machine, no SLURM"),
        f"# Output: slurm-<job name>-<job id>.out. Run dir (scratch): RUNS_DIR/{s.spec.name}/bench-slurm-<job id>.",
        "# Never requeued: a failed benchmark is read, not resumed.",
        "#",
        f"# Generated by: {shlex.join(s.command)}",
        "# Edit the #SBATCH lines and the settings below freely.",
    ]


def _sweep_header(s: _Script) -> list:
    """The comment at the top of a ``--sweep`` script: the trials, and how to submit, resubmit and
    compare them."""
    me = _q(s.output) if s.output else "SCRIPT"
    sweep = _q(s.sweep)
    trials = s.plan.trials
    n = len(trials)
    at_once = f"{s.parallel} at once" if s.parallel else "as many at once as SLURM schedules"
    gpus = f"{s.gpus_per_node} GPU{'s' if s.gpus_per_node > 1 else ''} per node" if s.gpus_per_node else "CPU only"
    flags = [*(a for g in s.grid for a in ("--grid", g)), *(["--trials", str(s.trials)] if s.trials else [])]
    local = shlex.join(["distrain", "sweep", s.job, "--run-dir", s.sweep,
                        *(a for o in s.run_overrides for a in ("--set", o)), *flags])
    if s.max_array_size is None:
        limit = (f"# MaxArraySize: not checked (no cluster to ask when rendered); {n} trials need it above {n - 1}: "
                 "scontrol show config | grep MaxArraySize")
    else:
        limit = f"# MaxArraySize: {s.max_array_size}; {n} trials (array indices 0-{n - 1}) fit."
    yours = [f"#   your code, imported on every node: {key} {ref}" for key, ref in references(s.spec).items()]
    return [
        "#!/bin/bash",
        f"# {s.name}: a sweep of {s.job} on SLURM, {_plural(n, 'trial')} as a job array ({at_once}); each trial "
        f"{_plural(s.nodes, 'node')} x {_plural(s.per_node, 'task')}, {gpus}, strategy {s.resolved}"
        f"{' (auto)' if s.requested == 'auto' else ''}, precision {s.spec.train.precision}"
        f"{', XLA' if s.spec.train.jit_compile else ''}.",
        *[f"#   {line}" for line in _description(Path(s.job))],
        *yours,
        f"#   Compared on {s.plan.metric} ({s.plan.mode}); array task k trains trial k:",
        *[f"#     {t.name}  {' '.join(t.sets)}" for t in trials[:SHOWN_TRIALS]],
        f"#     ... {n - SHOWN_TRIALS} more: distrain validate lists them all" if n > SHOWN_TRIALS else None,
        "#",
        f"# Sweep dir: {sweep}: sweep.yaml (every trial's state and result) and trial-NNN/, an ordinary run dir",
        "# per trial. Run from the directory the sweep dir is relative to (every node must see the checkout,",
        f"# the job file and the sweep dir at the same paths){'' if s.output else ', SCRIPT being this file'}:",
        _row(f"sbatch {me}", f"every trial, {at_once}"),
        _row(f"sbatch --array=1,3 {me}", "only trials 1 and 3"),
        _row(f"sbatch {me}", "again: trains nothing finished; stopped trials resume"),
        _row(f"DISTRAIN=$PWD/.venv/bin/distrain sbatch {me}", "a distrain not on PATH"),
        _row(f"distrain report {sweep}", f"the trials ranked by {s.plan.metric}"),
        f"#   {local}",
        "#     the same trials one after another on one machine, no SLURM (the same sweep dir)",
        "# Output: slurm-<job name>-<array job id>_<trial>.out for each trial. A task whose trial is finished",
        "# already says so and exits 0. Exit 75 (preempted) and 76 (peer lost) requeue that task alone: it",
        "# resumes its trial from the trial's backup (docs/slurm.md#sweeps-job-arrays).",
        limit,
        "#",
        f"# Generated by: {shlex.join(s.command)}",
        f"# Edit the #SBATCH lines freely; --array must stay within 0-{n - 1}, the trials of SET, GRID and TRIALS.",
    ]


def _directives(s: _Script) -> list:
    """The ``#SBATCH`` lines."""
    return [
        f"#SBATCH --job-name={s.name}",
        f"#SBATCH --array={array_spec(len(s.plan.trials), s.parallel)}" if s.plan else None,
        f"#SBATCH --nodes={s.nodes}",
        f"#SBATCH --ntasks-per-node={s.per_node}",
        f"#SBATCH --gres=gpu:{s.gpus_per_node}" if s.gpus_per_node else None,
        f"#SBATCH --cpus-per-task={s.cpus}",
        f"#SBATCH --time={s.time}",
        f"#SBATCH --partition={s.partition}" if s.partition else "##SBATCH --partition=PARTITION",
        f"#SBATCH --account={s.account}" if s.account else "##SBATCH --account=ACCOUNT",
        "#SBATCH --output=slurm-%x-%A_%a.out" if s.plan else "#SBATCH --output=slurm-%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue" if s.requeue else "#SBATCH --no-requeue",
        "#SBATCH --signal=USR1@90",
    ]


def _settings(s: _Script) -> list:
    """The shell settings the common launcher reads, and the lines that find and source it."""
    elsewhere = _launcher_elsewhere(s.output)
    return [
        "# Settings (relative paths are from the directory sbatch ran in; JOB, if not there, from the checkout).",
        f"JOB={_q(s.job)}",
        f"SET=({' '.join(_q(o) for o in s.run_overrides)})" if s.run_overrides else
        "SET=()  # --set overrides for every run, e.g. SET=(train.epochs=3 data.batch_size_per_replica=128)",
        *(_sweep_settings(s) if s.plan else
          [f"RUNS_DIR={_q(s.runs_dir or s.spec.output_dir)}  # the run dir: RUNS_DIR/<job name>/"
           f"{'bench-' if s.bench else ''}slurm-$SLURM_JOB_ID"]),
        f"DISTRAIN=${{DISTRAIN:-{_q(s.distrain)}}}  # the distrain command on every node",
        f"REQUEUE={1 if s.requeue else 0}  # 1: exit 75 (preempted) and 76 (peer lost) requeue the "
        f"{'array task' if s.plan else 'job'}",
        f"MAX_RESTARTS={MAX_RESTARTS}  # after a lost peer, requeue only while SLURM_RESTART_COUNT is below this",
        "SRUN_ARGS=()  # more srun options, e.g. (--mpi=pmix) for an MPI build of Horovod",
        *(["MODE=bench  # distrain bench instead of distrain train",
           "BENCH_ARGS=()  # more distrain bench options, e.g. (--steps 100 --json)"] if s.bench else
          ["MODE=train  # set here, so a MODE in the submitting environment cannot change it"]),
        "",
        "# The common launcher: checks, TensorBoard hints, srun, requeue (read it for the details). It is",
        "# looked for beside this script (sbatch runs a copy; SLURM's Command= names the original),",
        *(["# then in the checkout this script was rendered from,"] if elsewhere else []),
        "# then in ./slurm/ of the directory sbatch ran in; DISTRAIN_LAUNCH=/path/to/distrain-launch.sh overrides.",
        'script=${BASH_SOURCE[0]}',
        '[[ -n ${SLURM_JOB_ID:-} ]] && script=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null |',
        "  sed -n 's/^ *Command=\\([^ ]*\\).*/\\1/p' | grep . || echo \"$script\")",
        'launch=${DISTRAIN_LAUNCH:-}',
        "for found in \"$(dirname \"$script\")/distrain-launch.sh\" "
        + (f"{_q(str(elsewhere))} " if elsewhere else "") + f"{LAUNCHER}; do",
        '  [[ -z $launch && -f $found ]] && launch=$found',
        "done",
        '[[ -f $launch ]] || { echo "distrain-launch.sh: not found${launch:+ at $launch} (looked beside $script and in' +
        ' $PWD/slurm); set DISTRAIN_LAUNCH=/path/to/distrain/slurm/distrain-launch.sh" >&2; exit 2; }',
        f"# shellcheck source={LAUNCHER}",
        'source "$launch"',
    ]


def _sweep_settings(s: _Script) -> list:
    """``SWEEP``, ``GRID`` and ``TRIALS``: with ``JOB`` and ``SET``, the sweep the array's tasks plan."""
    return [
        f"SWEEP={_q(s.sweep)}  # the sweep dir: array task k trains trial k in SWEEP/trial-NNN",
        # Quoted always (a word shlex leaves bare has only safe characters: repr quotes it): bare,
        # shellcheck takes key=a,b in an array for a mistyped list (SC2054).
        f"GRID=({' '.join(_q(g) if _q(g) != g else repr(g) for g in s.grid)})  # --grid flags"
        if s.grid else "GRID=()  # --grid flags: none",
        f"TRIALS={s.trials if s.trials else ''}  # --trials (empty: the job's sweep.random.trials)",
    ]


def _launcher_elsewhere(output: Optional[str]) -> Optional[Path]:
    """The checkout's launcher, for a script written outside the checkout (a user's project: with
    ``--output``, or printed while the current directory is outside it); None for a script the
    checkout's ``slurm/`` or ``./slurm/`` finds."""
    checkout = Path(__file__).resolve().parents[2]
    launcher = checkout / LAUNCHER
    if not launcher.is_file():  # an installed distrain without its checkout
        return None
    if output is not None:
        return None if Path(output).resolve().parent == launcher.parent else launcher
    here = Path.cwd().resolve()
    return None if here == checkout or checkout in here.parents else launcher


def check_allocation(job: str, *, nodes: int, tasks: int, gpus_per_node: int,
                     overrides: Sequence[str] = (), runs_dir: Optional[str] = None, bench: bool = False,
                     env: Mapping[str, str] = os.environ) -> dict:
    """What the batch script needs before ``srun``: the job is valid, fits the allocation, and (unless
    ``bench``) its data and model pass the checks every task makes at start (``startup.preflight``).

    Args:
        runs_dir: the script's ``RUNS_DIR``; given, the result names the run dir too
            (``RunDir.for_slurm_launcher``: ``$DISTRAIN_RUN_DIR`` or ``RUNS_DIR/NAME/[bench-]slurm-JOBID``).
        bench: the script runs ``distrain bench`` (``MODE=bench``).

    Returns:
        ``{"name", "strategy", "tensorboard"}`` and, with ``runs_dir``, ``"run_dir"``: the run's
        name, the strategy the run will use, whether it writes TensorBoard logs, where it writes.

    Raises:
        UsageError: the job is invalid or cannot run on this allocation.
    """

    # On the node, before srun: the user's code (model.name, data.source, ...) must import here.
    spec = startup.check(job, overrides)
    asked = f"the allocation (SLURM_NTASKS={tasks}, SLURM_JOB_NUM_NODES={nodes})"
    strategy = check_layout(spec.distribute.strategy, nodes=nodes, tasks=tasks, gpus_per_node=gpus_per_node,
                            source=_strategy_source(job, overrides), asked=asked)
    info = {"name": spec.name, "strategy": strategy, "tensorboard": str(spec.logging.tensorboard).lower()}
    if runs_dir is not None:
        if not env.get("SLURM_JOB_ID") and not env.get("DISTRAIN_RUN_DIR"):
            raise UsageError("--runs-dir: the run dir is keyed by SLURM_JOB_ID, which is not set: run this inside "
                             "an sbatch job, or set DISTRAIN_RUN_DIR")
        info["run_dir"] = str(RunDir.for_slurm_launcher(runs_dir, spec.name, bench=bench, env=env))
    if not bench:  # a benchmark trains on synthetic data
        # The data and the model as every task checks them at start: once here, before srun starts any.
        startup.preflight(spec, pipelines=tasks)
    return info


# ---------------------------------------------------------------------------------------------
# Sweeps: an array task's trial


def trial_sets(sweep: Plan, trial: Trial, *, section: bool) -> list[str]:
    """The ``--set`` overrides after the job's own that make ``distrain train JOB`` train exactly
    ``trial.spec``: the sweep section in effect when ``--grid``/``--trials`` changed the job's
    (``section``; the run logs the swept keys as hparams from it), then the trial's overrides."""
    return [*([set_string("sweep", spec_to_dict(sweep.spec)["sweep"])] if section else []), *trial.sets]


def check_trial(job: str, *, nodes: int, tasks: int, gpus_per_node: int, sweep_dir: str, trial: int,
                overrides: Sequence[str] = (), grid: Sequence[str] = (), trials: Optional[int] = None) -> dict:
    """What an array task's batch script needs before ``srun``: the sweep planned (every trial
    valid), trial ``trial`` fits the allocation and is marked running (``launched.begin``), its
    data and model pass the checks every task makes at start; or the trial needs no training.

    Args:
        sweep_dir: the script's ``SWEEP``; the trial's run dir is ``SWEEP/trial-NNN`` (absolute).
        trial: the array task's ``SLURM_ARRAY_TASK_ID``.
        overrides, grid, trials: the script's ``SET``, ``GRID`` and ``TRIALS``.

    Returns:
        ``check_allocation``'s keys with ``run_dir``, and ``trial`` (its name and overrides, to
        print), ``set`` (``trial_sets``: the ``--set`` values of its ``distrain train``) and, when
        there is nothing to train, ``done`` (why: ``trial-002 finished already (val_accuracy 0.9132)``).

    Raises:
        UsageError: the sweep or the trial is invalid, no such trial, the sweep dir holds a run or
            another sweep, or the trial cannot run on this allocation (then it is recorded failed).
    """
    sweep = plan_sweep(job, overrides, grid=list(grid), trials=trials)
    count = len(sweep.trials)
    if not 0 <= trial < count:
        raise UsageError(f"--trial {trial}: the sweep has {_plural(count, 'trial')}, 0 to {count - 1}: its "
                         f"array is --array=0-{count - 1}")
    chosen = sweep.trials[trial]
    asked = f"the allocation (SLURM_NTASKS={tasks}, SLURM_JOB_NUM_NODES={nodes})"
    strategy = check_layout(chosen.spec.distribute.strategy, nodes=nodes, tasks=tasks, gpus_per_node=gpus_per_node,
                            source=_strategy_source(job, [*overrides, *chosen.sets]), asked=asked)
    root = Path(os.path.abspath(sweep_dir))
    started = launched.begin(sweep, root, trial)
    info = {"name": chosen.spec.name, "strategy": strategy, "tensorboard": str(chosen.spec.logging.tensorboard).lower(),
            "run_dir": str(started.run_dir), "trial": f"{chosen.name} {' '.join(chosen.sets)}".rstrip(),
            "set": trial_sets(sweep, chosen, section=bool(grid) or trials is not None)}
    if started.done:
        return {**info, "done": started.done}
    try:
        startup.preflight(chosen.spec, pipelines=tasks)
    except UsageError:
        launched.end(root, trial, EXIT_USAGE)
        raise
    if sweep.spec.logging.tensorboard:
        with sweep_state.locked(root):  # the first task of the array writes it, once
            write_sweep_config(root / RunDir.TENSORBOARD, sweep)
    return info


def ended_line(record: sweep_state.TrialRecord, metric: str) -> str:
    """``trial-001 finished (val_accuracy 0.9132)``, ``trial-001 stopped: preempted (exit 75); ...``."""
    if record.state == sweep_state.FINISHED:
        return f"{record.name} finished ({metric} {'-' if record.result is None else f'{record.result:.4f}'})"
    return f"{record.name} {record.state}: {record.error}"


def parse_max_array_size(config: str) -> Optional[int]:
    """``MaxArraySize`` from ``scontrol show config``'s output (None: not in it)."""
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", config, re.MULTILINE)
    return int(found.group(1)) if found else None


def cluster_max_array_size(timeout: float = 20) -> Optional[int]:
    """The ``MaxArraySize`` of the cluster ``scontrol`` reaches (None: no scontrol here, or no
    cluster answers it)."""
    if shutil.which("scontrol") is None:
        return None
    try:
        done = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_max_array_size(done.stdout) if done.returncode == 0 else None


EPILOG = """\
examples:
  distrain slurm render jobs/mobilenet.yaml --nodes 1 --gpus-per-node 4 > mobilenet.sh
  distrain slurm render jobs/cnn.yaml --nodes 4 --gpus-per-node 2 --time 04:00:00 --partition gpu
  distrain slurm render jobs/mobilenet.yaml --nodes 2 --gpus-per-node 4 --strategy horovod
  distrain slurm render jobs/quickstart.yaml --nodes 1 --gpus-per-node 0 --tasks-per-node 2   (CPU)
  distrain slurm render jobs/examples/mobilenet_sweep.yaml --nodes 1 --gpus-per-node 4 \\
      --sweep runs/mobilenet-sweep --parallel 2     (a job array: one task per trial of the job's sweep)
then: sbatch mobilenet.sh (from the distrain checkout; see docs/slurm.md)
exit codes: 0 rendered, 1 --check found FILE out of date, 2 an invalid job or an impossible request (one line)
"""


def add_parser(subparsers) -> None:
    """Registers ``distrain slurm render``, ``distrain slurm check`` and ``distrain slurm record``."""
    p = subparsers.add_parser("slurm", help="sbatch scripts for a job (render)",
                              description="SLURM launch: render an sbatch script for a job.")
    sub = p.add_subparsers(dest="slurm_command", required=True, metavar="SUBCOMMAND")

    r = sub.add_parser("render", help="print an sbatch script that trains a job",
                       description="Print a complete sbatch script that trains JOB with this layout.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("job", help="the job's YAML file, as the script will name it (relative: to where sbatch runs)")
    r.add_argument("--nodes", type=int, required=True, metavar="N")
    r.add_argument("--gpus-per-node", type=int, required=True, metavar="G", help="GPUs per node (0: CPU only)")
    r.add_argument("--tasks-per-node", type=int, metavar="T",
                   help="tasks per node (default: 1; horovod: one per GPU, required without GPUs)")
    r.add_argument("--cpus-per-task", type=int, metavar="C",
                   help=f"CPUs per task (default: {CPUS_PER_GPU} per GPU of a task, 1 without GPUs)")
    r.add_argument("--time", default=DEFAULT_TIME, metavar="HH:MM:SS", help=f"time limit (default: {DEFAULT_TIME})")
    r.add_argument("--partition", metavar="P")
    r.add_argument("--account", metavar="A")
    r.add_argument("--strategy", metavar="S", help="the run's distribute.strategy (default: the job's)")
    r.add_argument("--job-name", metavar="NAME", help="SLURM job name (default: the job's name)")
    r.add_argument("--runs-dir", metavar="DIR", help="runs go to DIR/NAME/slurm-JOBID (default: the job's output_dir)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the job in every run of the script (repeatable)")
    r.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="exit 75/76 end the job instead of requeueing it")
    r.add_argument("--bench", action="store_true",
                   help="a script that runs `distrain bench JOB` on the nodes (throughput and scaling "
                        "efficiency on synthetic data) instead of training; never requeued")
    r.add_argument("--distrain", default=DEFAULT_DISTRAIN, metavar="COMMAND",
                   help="the distrain command on the nodes, e.g. /path/.venv/bin/distrain (default: distrain)")
    r.add_argument("--sweep", metavar="SWEEP_DIR",
                   help="a job array over the job's sweep: task k trains trial k in SWEEP_DIR/trial-NNN with this "
                        "layout (relative: to where sbatch runs); submit it again to resume (docs/slurm.md)")
    add_sweep_args(r)
    r.add_argument("--parallel", type=int, metavar="P", help="with --sweep: at most P trials at once (--array=...%%P)")
    r.add_argument("--max-array-size", type=int, metavar="N",
                   help="with --sweep: the cluster's MaxArraySize (default: from `scontrol show config` when it "
                        "answers)")
    r.add_argument("--output", metavar="FILE",
                   help="write the script to FILE (named in its header) instead of printing it")
    r.add_argument("--check", action="store_true",
                   help="with --output: write nothing, exit 1 if FILE is not this render (stale)")
    r.set_defaults(handler=cmd_render)
    _add_launcher_parsers(sub)


def _add_launcher_parsers(sub) -> None:
    """``distrain slurm check`` and ``distrain slurm record``: what ``slurm/distrain-launch.sh`` runs."""
    c = sub.add_parser("check", help="(used by slurm/distrain-launch.sh) check a job against the allocation",
                       description="Check JOB and its overrides against a SLURM allocation; print "
                                   "name=, strategy=, tensorboard= (and with --runs-dir, run_dir=) lines. Exit 2 with "
                                   "one line if it cannot run.")
    c.add_argument("job")
    c.add_argument("--runs-dir", help="the script's RUNS_DIR: print the run dir of this sbatch job too")
    c.add_argument("--bench", action="store_true", help="the run dir of a benchmark (MODE=bench)")
    c.add_argument("--nodes", type=int, required=True)
    c.add_argument("--tasks", type=int, required=True)
    c.add_argument("--gpus-per-node", type=int, default=0)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    c.add_argument("--sweep", metavar="SWEEP_DIR", help="the script's SWEEP: check trial --trial of the sweep, mark it "
                                                         "running and print its run_dir=, set= (and done=) lines")
    c.add_argument("--trial", type=int, metavar="K", help="with --sweep: the trial ($SLURM_ARRAY_TASK_ID)")
    add_sweep_args(c)
    c.set_defaults(handler=cmd_check)

    d = sub.add_parser("record", help="(used by slurm/distrain-launch.sh) record how an array task's trial ended",
                       description="Record in SWEEP_DIR/sweep.yaml how trial K ended, from its training's exit code "
                                   "and its summary.json; print one line.")
    d.add_argument("sweep", metavar="SWEEP_DIR")
    d.add_argument("--trial", type=int, required=True, metavar="K")
    d.add_argument("--exit-code", type=int, required=True, metavar="RC", help="srun's exit code")
    d.set_defaults(handler=cmd_record)


def render_from_args(args: argparse.Namespace, max_array_size: Optional[int] = None) -> str:
    """The script's text for the parsed options of ``distrain slurm render`` (``script_from_args``)."""
    return script_from_args(args, max_array_size).text


def script_from_args(args: argparse.Namespace, max_array_size: Optional[int] = None) -> Rendered:
    """``sbatch_script`` called with the parsed options of ``distrain slurm render`` (``max_array_size``:
    the cluster's, when ``--max-array-size`` does not give it)."""
    if args.max_array_size is not None:
        max_array_size = args.max_array_size
    return sbatch_script(args.job, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
                         partition=args.partition, account=args.account, strategy=args.strategy,
                         job_name=args.job_name, runs_dir=args.runs_dir, overrides=args.overrides,
                         requeue=args.requeue, distrain=args.distrain, output=args.output, bench=args.bench,
                         sweep=args.sweep, grid=args.grid, trials=args.trials, parallel=args.parallel,
                         max_array_size=max_array_size)


def cmd_render(args) -> int:
    if args.check and args.output is None:
        raise UsageError("--check: compares with the file of --output; give --output FILE")
    if args.max_array_size is not None and args.sweep is None:
        raise UsageError("--max-array-size: only with --sweep SWEEP_DIR")
    asked = args.sweep is not None and args.max_array_size is None
    text, planned = script_from_args(args, max_array_size=cluster_max_array_size() if asked else None)
    if planned is not None:  # what the array's tasks would refuse, refused before it is submitted
        sweep_state.check_sweep_dir(Path(args.sweep), planned, flag="--sweep")
    if args.output is None:
        print(text, end="")
        return 0
    out = Path(args.output)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"distrain: {out} is not the render of its command; rewrite it with: slurm/regenerate.sh",
                  file=sys.stderr)
            return EXIT_FAILED
        return 0
    if not out.parent.is_dir():
        raise UsageError(f"--output: no such directory: {out.parent}")
    write_atomically(out, text, mode=0o755)
    return 0


def cmd_check(args) -> int:
    if args.sweep is None:
        for flag, value in (("--trial", args.trial), ("--grid", args.grid or None), ("--trials", args.trials)):
            if value is not None:
                raise UsageError(f"{flag}: only with --sweep SWEEP_DIR")
        info = check_allocation(args.job, nodes=args.nodes, tasks=args.tasks, gpus_per_node=args.gpus_per_node,
                                overrides=args.overrides, runs_dir=args.runs_dir, bench=args.bench)
    else:
        for flag, value in (("--runs-dir", args.runs_dir), ("--bench", args.bench or None)):
            if value is not None:
                raise UsageError(f"{flag}: not with --sweep: trial k's run dir is SWEEP_DIR/trial-NNN")
        if args.trial is None:
            raise UsageError("--sweep: give the trial, --trial $SLURM_ARRAY_TASK_ID")
        info = check_trial(args.job, nodes=args.nodes, tasks=args.tasks, gpus_per_node=args.gpus_per_node,
                           sweep_dir=args.sweep, trial=args.trial, overrides=args.overrides, grid=args.grid,
                           trials=args.trials)
    print("\n".join(f"{key}={v}" for key, value in info.items()
                    for v in (value if isinstance(value, list) else [value])))
    return 0


def cmd_record(args) -> int:
    record = launched.end(Path(args.sweep), args.trial, args.exit_code)
    print(ended_line(record, sweep_state.load(Path(args.sweep)).metric))
    return 0
