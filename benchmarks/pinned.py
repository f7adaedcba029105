"""Clean local scaling: one process per core, 1 intra-op thread, against the peers, in one run.

Every process is pinned to its own core (taskset), the 1-process baselines to core 0 alike, so the
ideal 2-process efficiency is exactly 1.0 and what is lost is synchronisation and communication,
not CPU contention. Side by side, for each model and per-replica batch:

  distrain, 1 process                 `distrain bench` (one_device), the baseline of the distrain rows
  distrain multi_worker               2 x `distrain bench` with TF_CONFIG on 127.0.0.1
  distrain horovod                    `horovodrun -np 2 --gloo` around `distrain bench`
  plain MWMS (TF tutorial)            benchmarks/peers/mwms_keras.py: alone, then 2 TF_CONFIG workers
  Horovod Keras example               benchmarks/peers/horovod_keras.py: alone, then horovodrun -np 2
  Ray Train TensorflowTrainer         benchmarks/peers/ray_train_tf.py: 1 worker, then 2

All measure the same thing: images/s over the steps after a warm-up, from the chief's step times.

    .venv/bin/python benchmarks/pinned.py [--models cnn,mobilenet_v2] [--batches 64,256] [--no-ray] [--record]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, env, free_ports, machine, record  # noqa: E402

PY = sys.executable
HOROVODRUN = str(Path(sys.executable).with_name("horovodrun"))
PEERS = REPO / "benchmarks" / "peers"
SHAPES = {"cnn": [28, 28, 1], "mobilenet_v2": [32, 32, 3]}
PARAMS = {"cnn": "{filters: 64}", "mobilenet_v2": "{alpha: 1.0}"}
# (warm-up, timed) steps: a few seconds of timed steps each on one core of this machine.
STEPS = {("cnn", 64): (10, 150), ("cnn", 256): (5, 60), ("mobilenet_v2", 64): (5, 30),
         ("mobilenet_v2", 256): (3, 12)}

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


def run_group(commands: list[list[str]], envs: list[dict], timeout: float = 900) -> str:
    """Starts the processes together, waits for all, returns the first one's output (the chief's)."""
    procs = [subprocess.Popen(c, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, e in zip(commands, envs)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"benchmark timed out: {' '.join(commands[0])}")
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"benchmark process failed ({p.returncode}): {' '.join(p.args)}\n{err[-3000:]}")
    return outs[0][0]


def parse_rate(stdout: str) -> float:
    """images/s from the last JSON object of a run's output (horovodrun prefixes lines with [rank])."""
    text = "\n".join(re.sub(r"^\[\d+\]<stdout>:", "", line) for line in stdout.splitlines()
                     if not re.match(r"^\[[1-9]\d*\]<stdout>:", line))
    start = text.rfind("\n{") + 1
    return float(json.loads(text[start:])["images_per_s"])


def variants(tmp: Path, model: str, batch: int, warmup: int, steps: int, ray: bool) -> dict:
    """name -> (processes, function returning (commands, envs))."""
    e = env(1)
    bench = ["-m", "distrain.cli", "bench", "--steps", str(steps), "--warmup", str(warmup), "--baseline", "none", "--json"]
    one, mw, hvd = (write_job(tmp, model, batch, s) for s in ("one_device", "multi_worker", "horovod"))
    peer = ["--model", model, "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]

    def two_tf_config(cmd):
        ports = free_ports(2)
        return [pin(r, cmd) for r in range(2)], [{**e, "TF_CONFIG": tf_config(ports, r)} for r in range(2)]

    out = {
        "distrain, 1 process": (1, lambda: ([pin(0, [PY, *bench, str(one)])], [e])),
        "distrain multi_worker": (2, lambda: two_tf_config([PY, *bench, str(mw)])),
        "distrain horovod": (2, lambda: ([horovod_pinned([PY, *bench, str(hvd)])], [e])),
        "plain MWMS, 1 process": (1, lambda: ([pin(0, [PY, str(PEERS / "mwms_keras.py"), *peer])], [e])),
        "plain MWMS (TF tutorial)": (2, lambda: two_tf_config([PY, str(PEERS / "mwms_keras.py"), *peer])),
        "Horovod example, 1 process": (1, lambda: ([pin(0, [PY, str(PEERS / "horovod_keras.py"), *peer])], [e])),
        "Horovod Keras example": (2, lambda: ([horovod_pinned([PY, str(PEERS / "horovod_keras.py"), *peer])], [e])),
    }
    if ray:
        ray_cmd = [PY, str(PEERS / "ray_train_tf.py"), *peer, "--pin", "--storage", str(tmp / "ray")]
        out["Ray Train, 1 worker"] = (1, lambda: ([[*ray_cmd, "--workers", "1"]], [e]))
        out["Ray Train TensorflowTrainer"] = (2, lambda: ([[*ray_cmd, "--workers", "2"]], [e]))
    return out


BASELINE_OF = {"distrain multi_worker": "distrain, 1 process", "distrain horovod": "distrain, 1 process",
               "plain MWMS (TF tutorial)": "plain MWMS, 1 process", "Horovod Keras example": "Horovod example, 1 process",
               "Ray Train TensorflowTrainer": "Ray Train, 1 worker"}


def measure(model: str, batch: int, repeats: int, ray: bool) -> tuple[dict, list[float]]:
    warmup, steps = STEPS[(model, batch)]
    rates: dict[str, list[float]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        table = variants(Path(tmp), model, batch, warmup, steps, ray)
        for i in range(repeats):  # alternate, so drift in the machine's load hits every row alike
            for name, (_, make) in table.items():
                loads.append(os.getloadavg()[0])
                started = time.time()
                rates.setdefault(name, []).append(parse_rate(run_group(*make())))
                print(f"{model} {batch} repeat {i + 1}: {name}: {rates[name][-1]:.0f} img/s "
                      f"({time.time() - started:.0f} s, load {loads[-1]:.2f})", file=sys.stderr, flush=True)
    return {name: statistics.median(v) for name, v in rates.items()}, loads


def table(model: str, batch: int, rates: dict, loads: list[float], repeats: int) -> str:
    warmup, steps = STEPS[(model, batch)]
    dmw = rates.get("distrain multi_worker")
    rows = []
    for name, rate in rates.items():
        base = BASELINE_OF.get(name)
        eff = f"{rate / (2 * rates[base]):.2f}" if base in rates else "1 (baseline)"
        ratio = f"{dmw / rate:.2f}" if dmw and base else ""
        procs = 2 if base else 1
        rows.append(f"| {name} | {procs} | {rate:.0f} | {eff} | {ratio} |")
    return (f"**{model}, {batch} per replica** ({warmup} warm-up + {steps} timed steps; median of {repeats}; "
            f"load average during the runs {min(loads):.1f}-{max(loads):.1f} on 2 cores: shared machine)\n\n"
            "| setup | processes | images/s | efficiency vs own 1 process | distrain multi_worker / this |\n"
            "| --- | --- | --- | --- | --- |\n" + "\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,mobilenet_v2")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-ray", action="store_true", help="leave out Ray Train (its start-up takes ~40 s a run)")
    parser.add_argument("--record", action="store_true", help="write the tables into docs/performance.md")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("pinned.py needs 2 cores")
    sections = []
    for model in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            rates, loads = measure(model, batch, args.repeats, not args.no_ray)
            sections.append(table(model, batch, rates, loads, args.repeats))
            print(sections[-1] + "\n", flush=True)
    text = ("Each process pinned to its own core (`taskset -c`), `TF_NUM_INTRAOP_THREADS=1`, "
            "`TF_NUM_INTEROP_THREADS=1`; the 1-process rows pinned to core 0. Command: `.venv/bin/python "
            f"benchmarks/pinned.py --models {args.models} --batches {args.batches} --repeats {args.repeats}"
            f"{' --no-ray' if args.no_ray else ''}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
            + "\n\n".join(sections) + f"\n\nMachine: {machine()}.")
    print(text)
    if args.record:
        record("pinned", text)


if __name__ == "__main__":
    main()
