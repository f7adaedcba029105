"""What a pinned 2-worker step of the course CNN could reach on this machine, and how far one
measurement of it moves.

Every process is pinned to its own core (cores 0 and 1), with 1 intra-op thread, as in
benchmarks/pinned.py. Three measurements:

  rounds      R rounds, each alternating four runs: 2 independent processes, then 2
              MultiWorkerMirroredStrategy workers, of a bare training step (the course CNN, 64 per
              replica, Adam, a custom loop; the workers sum gradients with distrain's all-reduce,
              distrain/backends/allreduce.py); then the same pair as `distrain bench`. Per round, each
              pair's efficiency (2 workers against 2 independent processes) and, from the
              independent processes' step times, the lockstep ceiling: their mean step over the
              mean of max(one's step, the other's step), step by step. That is what 2 workers
              lose only by waiting for the slower one at every step, with communication free.
  all-reduce  the gradient all-reduce alone, nothing computed between calls: the CNN's gradients
              and 16 floats; and the same all-gathered, then summed on each worker (one exchange
              of the whole vector instead of two of half).
  matrix step a step of matrix products about as long as the CNN's, alone and followed by the
              CNN's all-reduce: the efficiency of a step whose only extra is one all-reduce of
              the same bytes, no Keras, no input pipeline.

    .venv/bin/python benchmarks/investigations/ceiling.py [--rounds 5] [--steps 1000] [--record]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import REPO, bare_cnn_step, busy_share, env, free_ports, machine, record, run_group  # noqa: E402
from pinned import tf_config, variants  # noqa: E402

PY = sys.executable
BATCH = 64
MATRIX = 384  # a 384x384 float32 product chain: ~1 ms a product on one core of this machine
MATRIX_PRODUCTS = 9
WARMUP = 40


def worker(mode: str, steps: int, elements: int) -> dict:
    """One process's run of ``mode``; returns its step times (s) or the all-reduce's median (ms)."""
    sys.path.insert(0, str(REPO))
    from distrain.tf_startup import import_tensorflow
    tf = import_tensorflow()
    from distrain.backends.allreduce import keep_collectives_apart

    together = bool(os.environ.get("TF_CONFIG"))
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if together else tf.distribute.get_strategy()

    if mode == "cnn":
        replica_step, batches = bare_cnn_step(tf, strategy, batch=BATCH)

        @tf.function
        def step():
            return strategy.experimental_local_results(strategy.run(replica_step, args=next(batches)))[0]
        return {"step_times": _timed(step, steps)}

    from tensorflow.python.ops import collective_ops
    if together:
        keep_collectives_apart()
        extended = strategy.extended
        group_key = extended._collective_keys.get_group_key(list(extended.worker_devices))
        device = extended.worker_devices[0]
    vector = tf.ones([elements])
    matrix = tf.random.stateless_normal([MATRIX, MATRIX], seed=[1, 2]) / MATRIX ** 0.5

    @tf.function
    def exchange(values):
        with tf.device(device):
            if mode == "gather":
                gathered = collective_ops.all_gather(values, 2, group_key, (1 << 30) + 1, communication_hint="ring")
                return tf.reduce_sum(tf.reshape(gathered, [2, elements]), axis=0)
            return collective_ops.all_reduce(values, 2, group_key, 1 << 30, merge_op="Add", final_op="Id",
                                             communication_hint="ring")

    if mode in ("allreduce", "gather"):
        times = _timed(lambda: exchange(vector)[:1], steps)
        return {"median_ms": 1e3 * statistics.median(times)}

    @tf.function
    def matrix_step():
        product = matrix
        for _ in range(MATRIX_PRODUCTS):
            product = tf.matmul(product, matrix)
        # The products feed the reduced vector, so the all-reduce cannot start before them.
        values = vector + 0.0 * tf.reduce_sum(product)
        return (exchange(values) if together else values)[:1]
    return {"step_times": _timed(matrix_step, steps)}


def _timed(step, steps: int) -> list[float]:
    """Wall time of each call of ``step`` after the warm-up, each waited for."""
    for _ in range(WARMUP):
        step().numpy()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step().numpy()
        times.append(time.perf_counter() - started)
    return times


def pair(mode: str, steps: int, together: bool, elements: int = 0) -> list[dict]:
    """Runs ``mode`` in 2 pinned processes: 2 workers of one cluster, or 2 independent processes."""
    ports = free_ports(2)
    commands = [["taskset", "-c", str(core), PY, __file__, "--worker", mode, "--steps", str(steps),
                 "--elements", str(elements)] for core in range(2)]
    envs = [env(1, TF_CPP_MIN_LOG_LEVEL=3, **({"TF_CONFIG": tf_config(ports, core)} if together else {}))
            for core in range(2)]
    return [json.loads(out.strip().splitlines()[-1]) for out in run_group(commands, envs, timeout=600, every=True)]


def lockstep_ceiling(a: list[float], b: list[float]) -> float:
    """Mean step of two independent processes over the mean of their step-by-step maximum.

    >>> lockstep_ceiling([1.0, 3.0], [3.0, 1.0])
    0.6666666666666666
    """
    n = min(len(a), len(b))
    return statistics.mean(a[:n] + b[:n]) / statistics.mean(max(x, y) for x, y in zip(a, b))


def mean_step(reports: list[dict]) -> float:
    """Mean step time (s) over the processes of a pair, each process's mean first."""
    return statistics.mean(statistics.mean(r["step_times"]) for r in reports)


def cnn_parameters() -> int:
    """The course CNN's parameter count: the floats its gradient all-reduce sums."""
    sys.path.insert(0, str(REPO))
    from distrain.tf_startup import import_tensorflow
    import_tensorflow()
    from distrain.models import build_model
    return build_model("cnn", (28, 28, 1), 10, filters=64).count_params()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000, help="timed steps of each run")
    parser.add_argument("--record", action="store_true",
                        help="write the tables into docs/performance-log.md (section ceiling)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--elements", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.elements)), flush=True)
        return

    elements = cnn_parameters()
    busy = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        distrain_runs = variants(Path(tmp), "cnn", BATCH, 10, args.steps, ray=False)
        for i in range(args.rounds):
            busy.append(busy_share())
            alone, workers = pair("cnn", args.steps, False), pair("cnn", args.steps, True)
            independent, together = (distrain_runs[name]() for name in ("distrain, 2 independent processes",
                                                                         "distrain multi_worker"))
            rows.append({"loop": mean_step(alone) / mean_step(workers),
                         "ceiling": lockstep_ceiling(alone[0]["step_times"], alone[1]["step_times"]),
                         "loop_ms": (1e3 * mean_step(alone), 1e3 * mean_step(workers)),
                         "distrain": together / independent, "distrain_rates": (independent, together)})
            print(f"round {i + 1}: {rows[-1]}", file=sys.stderr, flush=True)

    lines = ["| round | bare loop: step, 2 independent / 2 workers | bare loop: efficiency | `distrain bench`: "
             "images/s, 2 independent / 2 workers | `distrain bench`: efficiency | lockstep ceiling |",
             "| --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rows):
        lines.append(f"| {i + 1} | {r['loop_ms'][0]:.2f} / {r['loop_ms'][1]:.2f} ms | {r['loop']:.2f} | "
                     f"{r['distrain_rates'][0]:.0f} / {r['distrain_rates'][1]:.0f} | {r['distrain']:.2f} | "
                     f"{r['ceiling']:.3f} |")
    median = {k: statistics.median(r[k] for r in rows) for k in ("loop", "distrain", "ceiling")}
    lines.append(f"| **median** | | **{median['loop']:.2f}** | | **{median['distrain']:.2f}** | "
                 f"**{median['ceiling']:.3f}** |")

    busy.append(busy_share())
    exchanges = ["| exchanged alone | elements | median ms |", "| --- | --- | --- |"]
    for mode, name in (("allreduce", "all-reduce (ring: 2 exchanges of half)"),
                       ("gather", "all-gather, then sum (1 exchange of the whole)")):
        for n in (elements, 16):
            exchanges.append(f"| {name} | {n:,} | {pair(mode, args.steps, True, n)[0]['median_ms']:.2f} |")
    matrix_alone, matrix_workers = (mean_step(pair("matrix", args.steps, t, elements)) for t in (False, True))
    exchanges.append(f"\nA step of {MATRIX_PRODUCTS} {MATRIX}x{MATRIX} matrix products: {1e3 * matrix_alone:.2f} ms "
                     f"on 2 independent processes, {1e3 * matrix_workers:.2f} ms on 2 workers with the all-reduce "
                     f"of {elements:,} floats after it: efficiency **{matrix_alone / matrix_workers:.2f}**.")

    text = (f"Course CNN, {BATCH} per replica, each process pinned to its own core, `TF_NUM_INTRAOP_THREADS=1`; "
            f"{args.steps} timed steps a run. Command: `.venv/bin/python benchmarks/investigations/ceiling.py --rounds {args.rounds} "
            f"--steps {args.steps}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; cores "
            f"{max(busy):.0%} busy at most in the second before a round.\n\n" + "\n".join(lines) + "\n\n"
            + "\n".join(exchanges) + f"\n\nMachine: {machine()}.")
    print(text)
    if args.record:
        record("ceiling", text)


if __name__ == "__main__":
    main()
