"""Scaling on one host: the course CNN, 1 process x 1 intra-op thread vs 2 processes x 1 thread
each (multi_worker over TF_CONFIG on 127.0.0.1, and Horovod over Gloo when it is installed).
Weak scaling: the per-replica batch is fixed, so 2 workers train a twice larger global batch.

    .venv/bin/python benchmarks/scaling.py [--repeats 3] [--record]

Scaling efficiency = images/s with 2 workers / (2 x images/s with 1 worker).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env, free_ports, machine, record, run_all, steady_images_per_s, write_job  # noqa: E402

DISTRAIN = [sys.executable, "-m", "distrain.cli", "train"]


def tf_config(ports, index):
    import json

    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}})


def one_process(tmp: Path, job: Path, i: int) -> float:
    run_dir = tmp / f"one{i}"
    run_all([[*DISTRAIN, str(job), "--run-dir", str(run_dir)]], [env(1)])
    return steady_images_per_s(run_dir)


def multi_worker(tmp: Path, job: Path, i: int) -> float:
    run_dir = tmp / f"mw{i}"
    ports = free_ports(2)
    cmd = [*DISTRAIN, str(job), "--run-dir", str(run_dir)]
    run_all([cmd, cmd], [env(1, TF_CONFIG=tf_config(ports, r)) for r in range(2)])
    return steady_images_per_s(run_dir)


def horovod(tmp: Path, job: Path, i: int) -> float:
    run_dir = tmp / f"hvd{i}"
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    run_all([[horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", *DISTRAIN, str(job), "--run-dir", str(run_dir)]],
            [env(1)])
    return steady_images_per_s(run_dir)


def horovod_available() -> bool:
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError:
        return False
    return shutil.which("horovodrun", path=str(Path(sys.executable).parent)) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64, help="per replica")
    parser.add_argument("--examples", type=int, default=8192)
    parser.add_argument("--record", action="store_true",
                        help="write the table into docs/performance-log.md (section scaling-batch<N>)")
    args = parser.parse_args()
    import distrain  # noqa: F401

    with_horovod = horovod_available()
    rates: dict[str, list[float]] = {"1 process": [], "2 processes, multi_worker": []}
    if with_horovod:
        rates["2 processes, horovod (Gloo)"] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kw = dict(batch=args.batch, epochs=args.epochs, examples=args.examples)
        one_job = write_job(tmp / "one.yaml", strategy="one_device", **kw)
        mw_job = write_job(tmp / "mw.yaml", strategy="multi_worker", **kw)
        hvd_job = write_job(tmp / "hvd.yaml", strategy="horovod", **kw)
        for i in range(args.repeats):  # alternate, so drift in the machine's load hits all columns alike
            rates["1 process"].append(one_process(tmp, one_job, i))
            rates["2 processes, multi_worker"].append(multi_worker(tmp, mw_job, i))
            if with_horovod:
                rates["2 processes, horovod (Gloo)"].append(horovod(tmp, hvd_job, i))
            print(f"repeat {i + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), file=sys.stderr)
    base = statistics.median(rates["1 process"])
    rows = [f"| {name} | {1 if name == '1 process' else 2} x {args.batch} | {statistics.median(v):.0f} | "
            + ("1.000 (baseline)" if name == "1 process" else f"{statistics.median(v) / (2 * base):.3f}") + " |"
            for name, v in rates.items()]
    table = (f"Course CNN (Conv64), synthetic 28x28x1, {args.batch} images per replica, 1 intra-op thread per "
             f"process, median of {args.repeats} alternating runs (epochs 2-{args.epochs} of each).\n\n"
             "| setup | global batch | images/s | scaling efficiency |\n| --- | --- | --- | --- |\n"
             + "\n".join(rows) + f"\n\nMachine: {machine()}."
             + ("" if with_horovod else "\nHorovod is not installed here (scripts/install-horovod.sh): no Horovod column."))
    print(table)
    if args.record:
        record(f"scaling-batch{args.batch}", table)


if __name__ == "__main__":
    main()
