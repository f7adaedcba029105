"""What distrain's stop agreement costs under multi_worker: 2 pinned workers (course CNN, 64 per
replica, 1 intra-op thread) with the default `distribute.preemption_check_every: 10`, with the
agreement every 100,000 steps (never within the run), and the plain MWMS script, alternated.

    .venv/bin/python benchmarks/agreement.py [--repeats 2] [--record]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record  # noqa: E402
from pinned import PEERS, PY, env, free_ports, parse_rate, pin, run_group, tf_config, write_job  # noqa: E402

STEPS, WARMUP, BATCH = 150, 10, 64


def two_workers(cmd: list[str]) -> float:
    ports = free_ports(2)
    return parse_rate(run_group([pin(r, cmd) for r in range(2)],
                                [{**env(1), "TF_CONFIG": tf_config(ports, r)} for r in range(2)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        job = write_job(Path(tmp), "cnn", BATCH, "multi_worker")
        bench = [PY, "-m", "distrain.cli", "bench", str(job), "--steps", str(STEPS), "--warmup", str(WARMUP),
                 "--baseline", "none", "--json"]
        variants = {
            "distrain multi_worker, agreement every 10 steps (default)": bench,
            "distrain multi_worker, agreement every 100000 steps": [*bench, "--set", "distribute.preemption_check_every=100000"],
            "plain MWMS (TF tutorial)": [PY, str(PEERS / "mwms_keras.py"), "--model", "cnn", "--batch", str(BATCH),
                                         "--steps", str(STEPS), "--warmup", str(WARMUP)],
        }
        for i in range(args.repeats):
            for name, cmd in variants.items():
                loads.append(os.getloadavg()[0])
                rates.setdefault(name, []).append(two_workers(cmd))
                print(f"repeat {i + 1}: {name}: {rates[name][-1]:.0f} img/s (load {loads[-1]:.2f})", file=sys.stderr)
    rows = "\n".join(f"| {name} | {' / '.join(f'{r:.0f}' for r in v)} | {statistics.median(v):.0f} |" for name, v in rates.items())
    text = (f"2 workers pinned to cores 0 and 1, course CNN, {BATCH} per replica, {WARMUP} + {STEPS} steps, "
            f"{args.repeats} alternating repeats; `.venv/bin/python benchmarks/agreement.py --repeats {args.repeats}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; shared machine, load average "
            f"{min(loads):.1f}-{max(loads):.1f} on 2 cores.\n\n| setup | images/s per repeat | median |\n"
            f"| --- | --- | --- |\n{rows}\n\nMachine: {machine()}.")
    print(text)
    if args.record:
        record("agreement", text)


if __name__ == "__main__":
    main()
