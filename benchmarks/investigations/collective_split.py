"""Where a 2-worker MultiWorkerMirroredStrategy step spends its communication time, from the profiler.

Two workers, each pinned to its own core with 1 intra-op thread, train the course CNN (64 per
replica, Adam, synthetic data) with a custom loop: forward, backward, one gradient all-reduce (the
same step distrain's multi_worker runs, without Keras around it). The TensorFlow profiler then
records some steps on both workers, and the trace gives, per all-reduce:

  complete params   CollectiveExecutor::CompleteParams: resolving the collective's group and
                    instance before it can run. On a worker that is not the group leader (task 0),
                    TensorFlow asks the leader over gRPC whenever the instance is not in its cache,
                    and that cache is keyed by (step id, instance key): every call of a tf.function
                    gets a new step id, so a call with one training step asks every time.
  ring              the ring all-reduce itself ("Loop"), from this worker's start to its end,
                    waiting for the other worker included.

It runs this with 1 and with 4 training steps per tf.function call (a loop inside the function,
as Keras's steps_per_execution does), to show the cache at work: from the second step of a call
on, the instance is cached and the non-leader does not ask. Then once more with distrain's own
gradient all-reduce (distrain/backends/allreduce.py, the multi_worker default on CPU): TensorFlow's V1
collective op, resolved on its first step only, so no step asks. The split comes from the profiler and
repeats from run to run; "ms a step" is one run's, and moves by about a millisecond between runs
on this 2-core VM (use benchmarks/pinned.py for throughput).

    .venv/bin/python benchmarks/investigations/collective_split.py [--steps 200] [--profiled 40] [--record]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import REPO, bare_cnn_step, busy_share, env, free_ports, machine, record, run_group  # noqa: E402

PY = sys.executable
BATCH = 64


def worker(steps_per_call: int, all_reduce: str, steps: int, profiled: int, trace_dir: str) -> dict:
    """One worker's run: timed steps, then profiled steps; returns its split (medians, ms)."""
    sys.path.insert(0, str(REPO))
    from distrain.tf_startup import import_tensorflow
    tf = import_tensorflow()
    config = json.loads(os.environ["TF_CONFIG"])
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    replica_step, batches = bare_cnn_step(tf, strategy, setup_once=all_reduce == "setup_once", batch=BATCH)

    @tf.function
    def train(iterator):
        loss = tf.constant(0.0)
        for _ in tf.range(steps_per_call):
            loss = strategy.run(replica_step, args=next(iterator))
        return loss

    def run(calls):
        for _ in range(calls):
            loss = train(batches)
        float(strategy.experimental_local_results(loss)[0])  # waits for the last step

    run(max(1, 40 // steps_per_call))  # warm-up: tracing, the group's resolution, caches
    calls = max(1, steps // steps_per_call)
    start = time.perf_counter()
    run(calls)
    ms_per_step = 1000 * (time.perf_counter() - start) / (calls * steps_per_call)
    tf.profiler.experimental.start(trace_dir)
    run(max(1, profiled // steps_per_call))
    tf.profiler.experimental.stop()
    return {"task": config["task"]["index"], "ms_per_step": ms_per_step, **trace_split(trace_dir)}


def trace_split(trace_dir: str) -> dict:
    """Medians (ms) of CompleteParams and of the ring loop over the profiled all-reduces."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(glob.glob(f"{trace_dir}/plugins/profile/*/*.xplane.pb")[0]).read_bytes())
    host = next(p for p in space.planes if p.name == "/host:CPU")
    names = {key: meta.name for key, meta in host.event_metadata.items()}
    durations: dict[str, list[float]] = {"CollectiveExecutor::CompleteParams": [], "Loop": []}
    for line in host.lines:
        for event in line.events:
            name = names.get(event.metadata_id)
            if name in durations:
                durations[name].append(event.duration_ps / 1e9)
    params, ring = durations["CollectiveExecutor::CompleteParams"], durations["Loop"]
    asked = sum(d > 0.2 for d in params)  # a gRPC round trip here is ~0.5 ms, a cache hit ~0.05
    # Resolved once: no CompleteParams at all after the first step.
    return {"all_reduces": len(ring), "complete_params_ms": statistics.median(params) if params else 0.0,
            "complete_params_slow": asked, "ring_ms": statistics.median(ring)}


def measure(steps_per_call: int, all_reduce: str, steps: int, profiled: int) -> list[dict]:
    """Starts the two pinned workers and returns their reports, task 0 first."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    tmp = tempfile.mkdtemp(prefix="collective-split-")
    commands, envs = [], []
    for task in range(2):
        commands.append(["taskset", "-c", str(task), PY, __file__, "--worker", "--steps-per-call", str(steps_per_call),
                         "--all-reduce", all_reduce, "--steps", str(steps), "--profiled", str(profiled), "--trace-dir", f"{tmp}/task{task}"])
        envs.append(env(1, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": task}}),
                        TF_CPP_MIN_LOG_LEVEL=3))
    reports = [json.loads(out.strip().splitlines()[-1]) for out in run_group(commands, envs, timeout=600, every=True)]
    return sorted(reports, key=lambda r: r["task"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed steps (after 40 warm-up steps)")
    parser.add_argument("--profiled", type=int, default=40, help="steps recorded by the profiler")
    parser.add_argument("--record", action="store_true",
                        help="write the table into docs/performance-log.md (section collective-split)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps-per-call", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--trace-dir", help=argparse.SUPPRESS)
    parser.add_argument("--all-reduce", default="tensorflow", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps_per_call, args.all_reduce, args.steps, args.profiled, args.trace_dir)),
              flush=True)
        return

    busy = busy_share()
    rows = ["| gradient all-reduce | steps per tf.function call | ms a step | task | complete params, median ms | "
            "complete params over 0.2 ms | ring, median ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
    names = {"tensorflow": "MultiWorkerMirroredStrategy's (V2)", "setup_once": "distrain's, resolved once (V1)"}
    for all_reduce, steps_per_call in (("tensorflow", 1), ("tensorflow", 4), ("setup_once", 1)):
        for r in measure(steps_per_call, all_reduce, args.steps, args.profiled):
            role = "0 (group leader)" if r["task"] == 0 else str(r["task"])
            rows.append(f"| {names[all_reduce]} | {steps_per_call} | {r['ms_per_step']:.2f} | {role} | "
                        f"{r['complete_params_ms']:.2f} | {r['complete_params_slow']} of {r['all_reduces']} | "
                        f"{r['ring_ms']:.2f} |")
            print(rows[-1], flush=True)
    text = (f"2 MultiWorkerMirroredStrategy workers on 127.0.0.1, each pinned to its own core, "
            f"`TF_NUM_INTRAOP_THREADS=1`; course CNN, {BATCH} per replica, custom loop, {args.steps} timed steps, "
            f"{args.profiled} profiled. Command: `.venv/bin/python benchmarks/investigations/collective_split.py --steps {args.steps} "
            f"--profiled {args.profiled}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; cores "
            f"{busy:.0%} busy at most in the second before.\n\n" + "\n".join(rows) + f"\n\nMachine: {machine()}.")
    print()
    print(text)
    if args.record:
        record("collective-split", text)


if __name__ == "__main__":
    main()
