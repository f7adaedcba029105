"""Clean local scaling: one process per core, 1 intra-op thread, against the peers, in one run.

Every process is pinned to its own core (taskset), the 1-process baselines to core 0 alike. Side
by side, for each model and per-replica batch:

  distrain, 1 process                 `distrain bench` (one_device), the baseline of the distrain rows
  distrain, 2 independent processes   the same twice at once, on cores 0 and 1, no communication
  distrain, 2 independent 1-worker    the same as 2 independent 1-worker multi_worker runs (TF_CONFIG of one
    multi_worker processes            worker each): MultiWorkerMirroredStrategy's step without communication
  distrain multi_worker               2 x `distrain bench` with TF_CONFIG on 127.0.0.1
  ..., TensorFlow's all-reduce        the same with `distribute.gradient_all_reduce: tensorflow`
  distrain horovod                    `horovodrun -np 2 --gloo` around `distrain bench`
  plain MWMS (TF tutorial)            benchmarks/peers/mwms_keras.py: alone, 2 independent, 2 TF_CONFIG workers
  Horovod Keras example               benchmarks/peers/horovod_keras.py: alone, 2 independent, horovodrun -np 2
  Ray Train TensorflowTrainer         benchmarks/peers/ray_train_tf.py: 1 worker, then 2

Two efficiencies: against 2 x one process alone (the usual definition), and against 2 independent
processes at once. The second is the one whose ideal is 1.0 here: two pinned processes that never
communicate each run ~20% slower than one alone on this VM's 2 cores (shared caches and memory
bandwidth), so "2 x alone" cannot be reached by any distributed setup on this machine.

All measure the same thing: images/s over the steps after a warm-up, from the chief's step times.

    .venv/bin/python benchmarks/pinned.py [--models cnn,mobilenet_v2] [--batches 64,256] [--no-ray] [--record]

With --record, each (model, batch) table replaces its own section (`pinned-<model>-<batch>`, in
docs/performance-log.md) when it is done, and docs/images/pinned-efficiency.png is redrawn from
every recorded table. `--plot-only` redraws that chart from the recorded tables, measuring nothing:

    .venv/bin/python benchmarks/pinned.py --plot-only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PERFORMANCE_LOG, PERFORMANCE_MD, REPO, busy_share, env, free_ports, machine, record, run_group  # noqa: E402

PY = sys.executable
HOROVODRUN = str(Path(sys.executable).with_name("horovodrun"))
PEERS = REPO / "benchmarks" / "peers"
SHAPES = {"cnn": [28, 28, 1], "mobilenet_v2": [32, 32, 3]}
PARAMS = {"cnn": "{filters: 64}", "mobilenet_v2": "{alpha: 1.0}"}
# (warm-up, timed) steps: 6-10 s of timed steps each on one core of this machine. With 2-3 s (150,
# 60, 30, 12 before 2026-11-30) one hiccup of the shared VM moved a run's efficiency by up to 0.07.
STEPS = {("cnn", 64): (10, 400), ("cnn", 256): (5, 200), ("mobilenet_v2", 64): (5, 60),
         ("mobilenet_v2", 256): (3, 24)}

JOB = """
name: pinned-{model}
seed: 1
model: {{name: {model}, params: {params}}}
data: {{source: synthetic, synthetic: {{shape: {shape}, classes: 10}}, batch_size_per_replica: {batch}}}
train: {{epochs: 1, optimizer: adam, learning_rate: 1e-3, lr_scaling: none}}
distribute: {{strategy: {strategy}{extra}}}
"""


def write_job(tmp: Path, model: str, batch: int, strategy: str, extra: str = "") -> Path:
    path = tmp / f"{model}-{batch}-{strategy}{abs(hash(extra)) % 1000 if extra else ''}.yaml"
    path.write_text(JOB.format(model=model, params=PARAMS[model], shape=SHAPES[model], batch=batch,
                               strategy=strategy, extra=extra))
    return path


def tf_config(ports, index) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}})


def pin(core: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *cmd]


def horovod_pinned(cmd: list[str], n: int = 2) -> list[str]:
    # horovodrun does not pin; each rank pins itself to the core of its local rank.
    inner = "exec taskset -c $HOROVOD_LOCAL_RANK " + " ".join(cmd)
    return [HOROVODRUN, "-np", str(n), "-H", f"localhost:{n}", "--gloo", "--network-interface", "lo", "sh", "-c", inner]


def parse_rate(stdout: str) -> float:
    """images/s from the last JSON object of a run's output (horovodrun prefixes lines with [rank])."""
    text = "\n".join(re.sub(r"^\[\d+\]<stdout>:", "", line) for line in stdout.splitlines()
                     if not re.match(r"^\[[1-9]\d*\]<stdout>:", line))
    start = text.rfind("\n{") + 1
    return float(json.loads(text[start:])["images_per_s"])


def variants(tmp: Path, model: str, batch: int, warmup: int, steps: int, ray: bool) -> dict:
    """name -> function returning images/s of one run of that setup."""
    e = env(1)
    bench = ["-m", "distrain.cli", "bench", "--steps", str(steps), "--warmup", str(warmup), "--baseline", "none", "--json"]
    one, mw, hvd = (write_job(tmp, model, batch, s) for s in ("one_device", "multi_worker", "horovod"))
    mw_tf = write_job(tmp, model, batch, "multi_worker", ", gradient_all_reduce: tensorflow")
    peer = ["--model", model, "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]

    def alone(cmd):
        return lambda: parse_rate(run_group([pin(0, cmd)], [e]))

    def side_by_side(cmd):
        # Two independent processes at once, one per core: what 2 cores give with no communication.
        return lambda: sum(parse_rate(out) for out in run_group([pin(0, cmd), pin(1, cmd)], [e, e], every=True))

    def side_by_side_one_worker_each(cmd):
        # Two 1-worker MultiWorkerMirroredStrategy runs at once, one per core: the strategy's
        # per-step machinery without any communication.
        def run():
            ports = free_ports(2)
            runs = [pin(r, [*cmd, "--run-dir", tempfile.mkdtemp(dir=tmp)]) for r in range(2)]
            envs = [{**e, "TF_CONFIG": tf_config([p], 0)} for p in ports]
            return sum(parse_rate(out) for out in run_group(runs, envs, every=True))
        return run

    def two_workers(cmd, shared_run_dir=False):
        def run():
            ports = free_ports(2)
            # distrain's start-up rendezvous keeps its secret in the run dir: a fresh one both share.
            full = [*cmd, "--run-dir", tempfile.mkdtemp(dir=tmp)] if shared_run_dir else cmd
            return parse_rate(run_group([pin(r, full) for r in range(2)],
                                        [{**e, "TF_CONFIG": tf_config(ports, r)} for r in range(2)]))
        return run

    def horovod(cmd):
        return lambda: parse_rate(run_group([horovod_pinned(cmd)], [e]))

    distrain_one, plain, hvd_example = [PY, *bench, str(one)], [PY, str(PEERS / "mwms_keras.py"), *peer], \
        [PY, str(PEERS / "horovod_keras.py"), *peer]
    out = {
        "distrain, 1 process": alone(distrain_one),
        "distrain, 2 independent processes": side_by_side(distrain_one),
        "distrain, 2 independent 1-worker multi_worker processes": side_by_side_one_worker_each([PY, *bench, str(mw)]),
        "distrain multi_worker": two_workers([PY, *bench, str(mw)], shared_run_dir=True),
        "distrain multi_worker, TensorFlow's all-reduce": two_workers([PY, *bench, str(mw_tf)], shared_run_dir=True),
        "distrain horovod": lambda: parse_rate(run_group(
            [horovod_pinned([PY, *bench, str(hvd), "--run-dir", tempfile.mkdtemp(dir=tmp)])], [e])),
        "plain MWMS, 1 process": alone(plain),
        "plain MWMS, 2 independent processes": side_by_side(plain),
        "plain MWMS (TF tutorial)": two_workers(plain),
        "Horovod example, 1 process": alone(hvd_example),
        "Horovod example, 2 independent processes": side_by_side(hvd_example),
        "Horovod Keras example": horovod(hvd_example),
    }
    if ray:
        ray_cmd = [PY, str(PEERS / "ray_train_tf.py"), *peer, "--pin", "--storage", str(tmp / "ray")]
        out["Ray Train, 1 worker"] = lambda: parse_rate(run_group([[*ray_cmd, "--workers", "1"]], [e]))
        out["Ray Train TensorflowTrainer"] = lambda: parse_rate(run_group([[*ray_cmd, "--workers", "2"]], [e]))
    return out


# Each 2-process setup: (its 1-process baseline, its 2 independent processes).
BASELINE_OF = {
    "distrain, 2 independent 1-worker multi_worker processes": ("distrain, 1 process",
                                                                "distrain, 2 independent processes"),
    "distrain multi_worker": ("distrain, 1 process", "distrain, 2 independent processes"),
    "distrain multi_worker, TensorFlow's all-reduce": ("distrain, 1 process", "distrain, 2 independent processes"),
    "distrain horovod": ("distrain, 1 process", "distrain, 2 independent processes"),
    "plain MWMS (TF tutorial)": ("plain MWMS, 1 process", "plain MWMS, 2 independent processes"),
    "Horovod Keras example": ("Horovod example, 1 process", "Horovod example, 2 independent processes"),
    "Ray Train TensorflowTrainer": ("Ray Train, 1 worker", None),
}


def measure(model: str, batch: int, repeats: int, ray: bool, only: list[str]) -> tuple[dict, list[float]]:
    warmup, steps = STEPS[(model, batch)]
    rates: dict[str, list[float]] = {}
    busy = []
    with tempfile.TemporaryDirectory() as tmp:
        table = variants(Path(tmp), model, batch, warmup, steps, ray)
        if only:
            table = {name: v for name, v in table.items() if any(o in name for o in only)}
        for i in range(repeats):  # alternate, so drift in the machine's load hits every row alike
            for name, run in table.items():
                busy.append(busy_share())
                started = time.time()
                rates.setdefault(name, []).append(run())
                print(f"{model} {batch} repeat {i + 1}: {name}: {rates[name][-1]:.0f} img/s "
                      f"({time.time() - started:.0f} s, cores {100 * busy[-1]:.0f}% busy before)", file=sys.stderr,
                      flush=True)
    return {name: statistics.median(v) for name, v in rates.items()}, busy


def table(model: str, batch: int, rates: dict, busy: list[float], repeats: int) -> str:
    warmup, steps = STEPS[(model, batch)]
    dmw = rates.get("distrain multi_worker")
    rows = []
    for name, rate in rates.items():
        alone, together = BASELINE_OF.get(name, (None, None))
        if alone is None:
            rows.append(f"| {name} | {2 if 'independent' in name else 1} | {rate:.0f} | baseline | baseline | |")
            continue
        eff_alone = f"{rate / (2 * rates[alone]):.2f}" if alone in rates else "-"
        eff_together = f"**{rate / rates[together]:.2f}**" if together in rates else "-"
        ratio = f"{dmw / rate:.2f}" if dmw and "independent" not in name else ""
        rows.append(f"| {name} | 2 | {rate:.0f} | {eff_alone} | {eff_together} | {ratio} |")
    strategy_alone = rates.get("distrain, 2 independent 1-worker multi_worker processes")
    split = ""
    if dmw and strategy_alone and "distrain, 2 independent processes" in rates:
        split = (f"\n\ndistrain multi_worker's {dmw / rates['distrain, 2 independent processes']:.2f} = "
                 f"{strategy_alone / rates['distrain, 2 independent processes']:.2f} (MultiWorkerMirroredStrategy's "
                 f"step without communication, against TensorFlow's default strategy) x {dmw / strategy_alone:.2f} "
                 "(communication and waiting for the other worker).")
    return (f"**{model}, {batch} per replica** ({warmup} warm-up + {steps} timed steps; median of {repeats}; "
            f"cores {100 * max(busy):.0f}% busy at most in the second before a run)\n\n"
            "| setup | processes | images/s | efficiency vs 2 x 1 process alone | efficiency vs 2 independent "
            "processes at once | distrain multi_worker / this |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + split)


# The chart: efficiency against 2 independent processes, per recorded table, for these rows.
CHART_ROWS = ("distrain multi_worker", "distrain horovod", "plain MWMS (TF tutorial)", "Horovod Keras example")
CHART = REPO / "docs" / "images" / "pinned-efficiency.png"
GOALS = {64: 0.80, 256: 0.90}  # efficiency goals per replica batch (docs/performance.md)


def recorded_tables() -> list[dict]:
    """Every recorded pinned table: model, batch, when (date), machine (its "Machine:" line) and
    cells {row: efficiency vs 2 independent processes} for the CHART_ROWS."""
    text = "\n".join(p.read_text() for p in (PERFORMANCE_MD, PERFORMANCE_LOG) if p.exists())
    tables = []
    for model, batch, body in re.findall(r"<!-- pinned-(\w+)-(\d+) -->(.*?)<!-- /pinned-", text, re.S):
        cells = {}
        for line in body.splitlines():
            parts = [c.strip().strip("*") for c in line.strip("|").split("|")]
            if len(parts) == 6 and parts[0] in CHART_ROWS and parts[4] not in ("-", ""):
                cells[parts[0]] = float(parts[4])
        when = re.search(r"(\d{4}-\d\d-\d\d) \d\d:\d\d UTC", body)
        stamp = re.search(r"^Machine: (.+?)\.?$", body, re.M)
        tables.append({"model": model, "batch": int(batch), "cells": cells, "when": when.group(1) if when else "?",
                       "machine": stamp.group(1) if stamp else "machine not recorded"})
    return tables


def plot(tables: list[dict] | None = None, path: Path = CHART) -> None:
    """Grouped bars: one group per recorded (model, per-replica batch), one bar per setup, the goal
    of each batch as a dotted line, 1.0 = synchronisation and communication cost nothing. The title
    names the machine and versions of the recorded tables (their "Machine:" lines) and their dates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = recorded_tables() if tables is None else tables
    if not tables:
        sys.exit("no recorded pinned tables (<!-- pinned-MODEL-BATCH --> sections) to plot")
    names = {"cnn": "CNN", "mobilenet_v2": "MobileNetV2"}
    width = 0.8 / len(CHART_ROWS)
    fig, ax = plt.subplots(figsize=(8.4, 4.2), dpi=110)
    for i, row in enumerate(CHART_ROWS):
        xs = [g + (i - (len(CHART_ROWS) - 1) / 2) * width for g in range(len(tables))]
        values = [t["cells"].get(row, float("nan")) for t in tables]
        bars = ax.bar(xs, values, width, label=row)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1,
                     bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.4})  # legible over a goal line
    for g, t in enumerate(tables):
        if t["batch"] in GOALS:
            ax.hlines(GOALS[t["batch"]], g - 0.45, g + 0.45, colors="black", linewidths=1, linestyles=":",
                      zorder=0, label="goal" if g == 0 else None)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(tables)), [f"{names.get(t['model'], t['model'])}\n{t['batch']} per replica"
                                      for t in tables])
    ax.set_xlabel("course model, images per replica (2 processes: twice the global batch)", fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("efficiency vs 2 independent\nprocesses at once (1.0 = ideal)", fontsize=9)
    machines = sorted({t["machine"] for t in tables})
    dates = sorted({t["when"] for t in tables})
    ax.set_title("2 processes, each pinned to its own core, 1 thread: higher is better\n"
                 f"{'; '.join(machines)} (CPU only, no GPU); recorded {', '.join(dates)}", fontsize=8.5)
    ax.legend(fontsize=7, ncol=5, loc="upper center", frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def peer_versions() -> str:
    """"; Horovod 0.28.1, Ray 2.60.0": the versions of the peers installed here, for the table's stamp."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist, name in (("horovod", "Horovod"), ("ray", "Ray")):
        try:
            found.append(f"{name} {version(dist)}")
        except PackageNotFoundError:
            pass
    return "; " + ", ".join(found) if found else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,mobilenet_v2")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-ray", action="store_true", help="leave out Ray Train (its start-up takes ~40 s a run)")
    parser.add_argument("--only", default="", help="comma-separated parts of row names to keep (for investigation; "
                        "not with --record)")
    parser.add_argument("--record", action="store_true", help="write the tables into the docs and redraw the chart")
    parser.add_argument("--plot-only", action="store_true", help="redraw docs/images/pinned-efficiency.png from the "
                        "recorded tables, measuring nothing")
    args = parser.parse_args()
    if args.plot_only:
        plot()
        return
    if args.only and args.record:
        parser.error("--only measures part of the table; it cannot --record")
    if (os.cpu_count() or 1) < 2:
        sys.exit("pinned.py needs 2 cores")
    machine_line = f"Machine: {machine()}{peer_versions()}."
    for model in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            rates, busy = measure(model, batch, args.repeats, not args.no_ray,
                                  [o for o in args.only.split(",") if o])
            text = ("Each process pinned to its own core (`taskset -c`), `TF_NUM_INTRAOP_THREADS=1`, "
                    "`TF_NUM_INTEROP_THREADS=1`; the 1-process rows pinned to core 0. Command: `.venv/bin/python "
                    f"benchmarks/pinned.py --models {model} --batches {batch} --repeats {args.repeats}"
                    f"{' --no-ray' if args.no_ray else ''}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
                    + table(model, batch, rates, busy, args.repeats) + f"\n\n{machine_line}")
            print(text + "\n", flush=True)
            if args.record:
                # One section per table, written as soon as it is measured: a partial run (one model,
                # or a run stopped half-way) replaces only the tables it measured.
                record(f"pinned-{model}-{batch}", text)
                plot()


if __name__ == "__main__":
    main()
