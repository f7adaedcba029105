"""Step time against network bandwidth: 2 distrain multi_worker workers on two simulated hosts
(cluster/netns-pair.sh: network namespaces, a veth pair shaped with tc, one core each), for the
course CNN and MobileNetV2, fp32 and fp16 gradient all-reduce; then the cost model fitted to the
points, with its prediction error per point and its projections to larger clusters.

    sudo .venv/bin/python benchmarks/network.py [--rates 100mbit,1gbit,unlimited] [--record]

Per point: `distrain bench` on each host (pinned to cores 0 and 1, 1 intra-op thread), the
1-replica baseline measured first as two independent processes at once on cores 0 and 1 (each core
busy as in the distributed run; `--baseline FILE`), so step time = compute (the baseline's) +
communication and waiting (the rest). With `--repeats N` each point is the median of N runs,
the points alternated. The link's TCP throughput is measured with a
plain socket transfer through the same pair.

The cost model (docs/performance.md; the fit in docs/performance-log.md):
t_step = t_compute + a + k x S + 2(N-1)/N x S / (e x B), with S the gradient bytes all-reduced per
step (4 bytes a trainable parameter, 2 with fp16), B the link's bandwidth, a a fixed per-step cost
(collective launch, latency, the stop agreement), k the host's work per byte (gRPC serialisation
and copies, on the same core as the compute) and e the fraction of the link the all-reduce
achieves; a, k and e are fitted here by least squares.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, busy_share, env, machine, record  # noqa: E402

PY = sys.executable
NETNS = REPO / "cluster" / "netns-pair.sh"
PORT = 23456  # inside the namespaces only, where nothing else listens
MODELS = {  # model -> (shape, params, trainable parameters, (warm-up, timed) steps)
    "cnn": ([28, 28, 1], "{filters: 64}", 126_090, (5, 60)),
    "mobilenet_v2": ([32, 32, 3], "{alpha: 1.0}", 2_236_682, (3, 12)),
}
JOB = """
name: net-{model}
seed: 1
model: {{name: {model}, params: {params}}}
data: {{source: synthetic, synthetic: {{shape: {shape}, classes: 10}}, batch_size_per_replica: {batch}}}
train: {{epochs: 1, optimizer: adam, learning_rate: 1e-3, lr_scaling: none}}
distribute: {{strategy: {strategy}, gradient_compression: {compression}}}
"""
RATE_BITS = {"100mbit": 100e6, "300mbit": 300e6, "1gbit": 1e9, "10gbit": 10e9}
SOCKET_TEST = r"""
import os, socket, sys, time
n = int(sys.argv[1])
if os.environ["NETNS_INDEX"] == "1":
    l = socket.socket(); l.bind(("0.0.0.0", %d)); l.listen(1); c, _ = l.accept(); got = 0
    while got < n:
        d = c.recv(1 << 20)
        if not d: break
        got += len(d)
    c.sendall(b"k")
else:
    for _ in range(200):
        try:
            s = socket.create_connection((os.environ["NETNS_PEER"], %d)); break
        except OSError: time.sleep(0.05)
    t = time.perf_counter(); s.sendall(b"x" * n); s.recv(1); dt = time.perf_counter() - t
    os.write(1, ("%%f\n" %% (n * 8 / dt)).encode())
""" % (PORT, PORT)


def write_job(tmp: Path, model: str, batch: int, strategy: str, compression: str) -> Path:
    shape, params, _, _ = MODELS[model]
    path = tmp / f"{model}-{strategy}-{compression}.yaml"
    path.write_text(JOB.format(model=model, params=params, shape=shape, batch=batch, strategy=strategy,
                               compression=compression))
    return path


def netns(rate: str, cmd_a: str, cmd_b: str, timeout: float = 900) -> None:
    args = [str(NETNS), "--cpus-a", "0", "--cpus-b", "1"] + ([] if rate == "unlimited" else ["--rate", rate])
    done = subprocess.run([*args, "--", cmd_a, cmd_b], env=env(1), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"netns run failed ({done.returncode}) at {rate}:\n{done.stderr[-3000:]}")


def link_bits_per_s(tmp: Path, rate: str) -> float:
    script = tmp / "socket_test.py"
    script.write_text(SOCKET_TEST)
    size = int(min(RATE_BITS.get(rate, 10e9), 2e9) / 8 * 0.5)  # about half a second at the nominal rate
    out = tmp / "link.txt"
    netns(rate, f"{PY} {script} {size} > {out}", f"{PY} {script} {size}")
    return float(out.read_text().strip())


def baseline(tmp: Path, model: str, batch: int) -> Path:
    """One replica on each core at once (no communication), core 0's result written where
    `--baseline FILE` reads it."""
    warmup, steps = MODELS[model][3]
    out = tmp / f"{model}-baseline.json"
    job = write_job(tmp, model, batch, "one_device", "none")
    cmd = [PY, "-m", "distrain.cli", "bench", str(job), "--steps", str(steps), "--warmup", str(warmup),
           "--baseline", "none", "--json"]
    procs = [subprocess.Popen(["taskset", "-c", str(core), *cmd], env=env(1), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for core in (0, 1)]
    done = [p.communicate(timeout=900) for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise SystemExit(f"baseline failed:\n{done[0][1][-3000:]}{done[1][1][-3000:]}")
    out.write_text(done[0][0])
    return out


def two_hosts(tmp: Path, model: str, batch: int, rate: str, compression: str, base: Path, attempt: int = 0) -> dict:
    warmup, steps = MODELS[model][3]
    job = write_job(tmp, model, batch, "multi_worker", compression)
    cluster = {"worker": [f"10.213.0.1:{PORT}", f"10.213.0.2:{PORT}"]}
    out = tmp / f"{model}-{rate}-{compression}-{attempt}.json"
    run_dir = tmp / f"run-{model}-{rate}-{compression}-{attempt}"  # fresh and shared: the rendezvous secret lives there
    cmds = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        redirect = f"> {out} 2> {out}.err" if index == 0 else f"> /dev/null 2> {out}.err{index}"
        cmds.append(f"TF_CONFIG='{tf_config}' exec {PY} -m distrain.cli bench {job} --steps {steps} "
                    f"--warmup {warmup} --baseline {base} --run-dir {run_dir} --json {redirect}")
    netns(rate, *cmds)
    return json.loads(out.read_text())


def fit(points: list[dict]) -> tuple[float, float, float]:
    """Least squares of (t_step - t_compute) = a + k x S + (1/e) x S / B over the points, each row
    divided by its measured step time: the fit minimises the relative error, the model's criterion.

    Returns:
        (a seconds per step, k seconds per byte of host work, e the share of the link reached).
    """
    import numpy as np

    rows = [[1.0, p["bytes"], p["bytes"] / (p["link_bits_per_s"] / 8)] for p in points]
    ys = [p["step_s"] - p["compute_s"] for p in points]
    w = np.array([1 / p["step_s"] for p in points])
    (a, k, inv_e), *_ = np.linalg.lstsq(np.array(rows) * w[:, None], np.array(ys) * w, rcond=None)
    return float(a), float(k), float(1 / inv_e)


def predict(p: dict, a: float, k: float, e: float) -> float:
    return p["compute_s"] + a + k * p["bytes"] + p["bytes"] / (e * p["link_bits_per_s"] / 8)


# Projection assumptions (stated in the table): GPU compute per step of 64 images, from an assumed
# A100 throughput for these small models; per-hop latency of a ring step; the share of the link an
# NCCL ring achieves on RDMA. None of them is measured here (no GPU, no RDMA on this machine).
ASSUMED_GPU_STEP_S = {"cnn": 64 / 50_000, "mobilenet_v2": 64 / 5_000}
ASSUMED_HOP_LATENCY_S = 10e-6
ASSUMED_NCCL_LINK_SHARE = 0.85


def ring_all_reduce_s(n: int, grad_bytes: float, bits_per_s: float, hop_latency_s: float, link_share: float) -> float:
    """Ring all-reduce: 2(N-1) steps, each a hop's latency, moving 2(N-1)/N of the gradient bytes.

    >>> round(ring_all_reduce_s(2, 1e6, 8e6, 0.0, 1.0), 6)
    1.0
    """
    return 2 * (n - 1) * hop_latency_s + 2 * (n - 1) / n * grad_bytes / (link_share * bits_per_s / 8)


def projections() -> str:
    rows = []
    for model, (_, _, params, _) in MODELS.items():
        compute = ASSUMED_GPU_STEP_S[model]
        for gbit in (25, 100):
            cells = []
            for n in (8, 64, 256):
                for nbytes in (4, 2):
                    comm = ring_all_reduce_s(n, params * nbytes, gbit * 1e9, ASSUMED_HOP_LATENCY_S,
                                             ASSUMED_NCCL_LINK_SHARE)
                    no_overlap, overlap = compute / (compute + comm), compute / max(compute, comm)
                    cells.append(f"{no_overlap:.2f}-{overlap:.2f}")
            rows.append(f"| {model} | {gbit} Gbit/s | " + " | ".join(cells) + " |")
    return ("| model | link | 8 GPUs fp32 | 8 fp16 | 64 fp32 | 64 fp16 | 256 fp32 | 256 fp16 |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows)
            + "\n\nEach cell: efficiency without overlap of all-reduce and backward pass (MWMS's single pack) - "
            "with full overlap (Horovod's fusion at best). Assumed: GPU compute per 64-image step "
            + ", ".join(f"{m} {t * 1e3:.2f} ms" for m, t in ASSUMED_GPU_STEP_S.items())
            + f" (an A100's order of magnitude for these small inputs, not measured), {ASSUMED_HOP_LATENCY_S * 1e6:.0f} us "
            f"per ring hop, NCCL reaching {ASSUMED_NCCL_LINK_SHARE:.0%} of the link, one link per GPU in the ring, "
            "weak scaling (64 images per GPU).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="100mbit,1gbit,unlimited")
    parser.add_argument("--models", default="cnn,mobilenet_v2")
    parser.add_argument("--compressions", default="none,fp16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="runs per point (the median is kept)")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--points", type=Path, help="refit and report the JSON lines an earlier run printed "
                        "on stderr, without measuring")
    parser.add_argument("--busy", default="nan", help="with --points: the busiest share of the cores that run printed")
    args = parser.parse_args()
    if args.points:
        points = [json.loads(line) for line in args.points.read_text().splitlines() if line.startswith("{")]
        text = report(points, fit(points), [float(args.busy)], args) + "\n\n" + projections()
        print(text)
        if args.record:
            record("network", text)
        return
    if os.geteuid() != 0 or not shutil.which("ip"):
        sys.exit("network.py needs root and iproute2 (network namespaces)")
    points = []
    runs: dict[tuple, list[dict]] = {}
    busy = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        links = {rate: link_bits_per_s(tmp, rate) for rate in args.rates.split(",")}
        print("link TCP throughput: " + ", ".join(f"{r} {b / 1e6:.0f} Mbit/s" for r, b in links.items()), file=sys.stderr)
        for model in args.models.split(","):
            base_file = baseline(tmp, model, args.batch)
            base = json.loads(base_file.read_text())
            for i in range(args.repeats):  # alternated, so drift hits every point alike
                for rate in args.rates.split(","):
                    for compression in args.compressions.split(","):
                        busy.append(busy_share())
                        r = two_hosts(tmp, model, args.batch, rate, compression, base_file, attempt=i)
                        runs.setdefault((model, rate, compression), []).append(r)
                        print("run " + json.dumps({"model": model, "rate": rate, "compression": compression,
                                                   "repeat": i + 1, "step_s": r["step_time_s"]["median"]}),
                              file=sys.stderr, flush=True)
            for rate in args.rates.split(","):
                for compression in args.compressions.split(","):
                    results = runs[(model, rate, compression)]
                    step = statistics.median(r["step_time_s"]["median"] for r in results)
                    point = {"model": model, "rate": rate, "compression": compression,
                             "link_bits_per_s": RATE_BITS.get(rate, links[rate]),
                             "measured_link_bits_per_s": links[rate],
                             "bytes": MODELS[model][2] * (2 if compression == "fp16" else 4),
                             "compute_s": base["step_time_s"]["median"], "step_s": step,
                             "step_s_runs": [r["step_time_s"]["median"] for r in results],
                             "efficiency": statistics.median(r["efficiency"] for r in results),
                             "images_per_s": statistics.median(r["images_per_s"] for r in results)}
                    points.append(point)
                    print(json.dumps(point), file=sys.stderr, flush=True)
    if len(points) < 3:
        sys.exit("the cost model needs 3 points or more")
    a, k, e = fit(points)
    text = report(points, (a, k, e), busy, args) + "\n\n" + projections()
    print(text)
    if args.record:
        record("network", text)


def report(points: list[dict], params: tuple, busy: list[float], args) -> str:
    a, k, e = params
    rows = []
    for p in points:
        pred = predict(p, a, k, e)
        runs = "/".join(f"{t * 1e3:.1f}" for t in p.get("step_s_runs", [p["step_s"]]))
        rows.append(f"| {p['model']} | {p['rate']} ({p['measured_link_bits_per_s'] / 1e6:.0f} Mbit/s TCP) | "
                    f"{p['compression']} | {p['bytes'] / 1e6:.2f} | {p['compute_s'] * 1e3:.1f} | {p['step_s'] * 1e3:.1f} "
                    f"({runs}) | "
                    f"{(p['step_s'] - p['compute_s']) * 1e3:.1f} | {p['efficiency']:.2f} | {pred * 1e3:.1f} | "
                    f"{(pred - p['step_s']) / p['step_s'] * 100:+.0f}% |")
    return (f"2 workers on two network namespaces (cluster/netns-pair.sh), one core each, 1 intra-op thread, "
            f"{args.batch} per replica, median step time (of each run: the runs in brackets); command "
            f"`sudo .venv/bin/python benchmarks/network.py --rates {args.rates} --models {args.models} "
            f"--compressions {args.compressions} --repeats {args.repeats}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; cores at most {100 * max(busy):.0f}% busy in the "
            "second before a run. Compute: one replica on each core at once, without communication.\n\n"
            "| model | link | all-reduce | MB per step | compute ms | step ms (runs) | comm.+wait ms | efficiency | "
            "model ms | model error |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
            + "\n".join(rows)
            + f"\n\nFitted: a = {a * 1e3:.1f} ms per step, k = {k * 1e9:.1f} ns per gradient byte of host work "
            f"(gRPC serialisation and copies on the worker's own core), e = {e:.2f} of the link's bandwidth "
            f"(unlimited: the veth pair's measured TCP throughput taken as B).\n\nMachine: {machine()}.")


if __name__ == "__main__":
    main()
