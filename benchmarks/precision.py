"""Mixed precision and XLA on this CPU: images/s and CPU time per image of `distrain train` in
float32 (the baseline), mixed_float16, mixed_bfloat16, float32 + XLA and mixed_bfloat16 + XLA,
for each course model on one device, and float32 with and without XLA for the CNN under mirrored
over 2 logical CPUs; variants alternated round by round, each a ratio to float32 in its round.

    .venv/bin/python benchmarks/precision.py [--models mlp,cnn,residual] [--repeats 3] [--quick] [--record]

These are CPU figures. Mixed float16 is slow on CPUs without AVX512-FP16 (tensorflow/tensorflow#45441),
bfloat16 can be fast where the CPU has AVX512_BF16 or AMX, and XLA on a CPU compiles for a CPU:
none of it says anything about a GPU (docs/precision.md; `distrain doctor` measures a GPU node).
About 19 minutes with 3 repeats on 2 busy cores (2026-12-04); `--quick` about 3 minutes. `--record`
writes the table into docs/performance.md (section `precision-cpu`).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, busy_share, env, machine, record, steady_images_per_s, write_job  # noqa: E402

MODELS = ("mlp", "cnn", "residual", "inception", "mobilenet_v2")
DEFAULT_MODELS = ("mlp", "cnn", "residual")
# (row name, train.precision, train.jit_compile); the first is the baseline of its group.
VARIANTS = (("float32", "float32", False), ("mixed_float16", "mixed_float16", False),
            ("mixed_bfloat16", "mixed_bfloat16", False), ("float32 + XLA", "float32", True),
            ("mixed_bfloat16 + XLA", "mixed_bfloat16", True))
MIRRORED_VARIANTS = VARIANTS[0], VARIANTS[3]
# Synthetic examples and epochs per model: the slowest variant (mixed_float16, ~3x slower than float32
# for the CNN and ~7x for the residual net on this CPU) stays under ~2 minutes a run; the MLP needs
# many examples for an epoch to last about a second. Inception's and MobileNetV2's sizes are the
# residual net's, not yet timed here. --quick divides the examples by 4, 2 epochs.
EXAMPLES = {"mlp": 32768, "cnn": 4096, "residual": 1024, "inception": 1024, "mobilenet_v2": 1024}
EPOCHS = {"mlp": 4, "cnn": 4, "residual": 3, "inception": 3, "mobilenet_v2": 3}
TIMEOUT_S = 1800  # one run; mixed_float16 of the residual net takes ~2 min on busy cores


@dataclass(frozen=True)
class Group:
    """Runs compared with each other: one model under one strategy, its variants."""

    title: str
    model: str
    strategy: str
    sets: tuple[str, ...]
    variants: tuple[tuple[str, str, bool], ...]


@dataclass(frozen=True)
class Run:
    images_per_s: float  # steady: median over the epochs after the first
    cpu_ms_per_image: float  # steady, all the process's threads
    other_cpu_s: float  # the process's CPU outside the steady epochs: start-up, tracing, XLA, evaluation


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def child(job: str, run_dir: str, sets: list[str]) -> None:
    """``distrain train`` in this process with its RunMetrics callback timed; prints one line
    ``EPOCHS [[images, wall s, CPU s], ...]``, CPU of all threads (getrusage of the process)."""
    import distrain.callbacks as callbacks
    from distrain import cli

    epochs = []
    begin, end = callbacks.RunMetrics.on_epoch_begin, callbacks.RunMetrics.on_epoch_end

    def on_epoch_begin(self, epoch, logs=None):
        self._marks = (time.perf_counter(), _cpu_s(resource.RUSAGE_SELF))
        begin(self, epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        epochs.append((self._steps * self.state.ctx.global_batch, time.perf_counter() - self._marks[0],
                       _cpu_s(resource.RUSAGE_SELF) - self._marks[1]))
        end(self, epoch, logs)

    callbacks.RunMetrics.on_epoch_begin, callbacks.RunMetrics.on_epoch_end = on_epoch_begin, on_epoch_end
    code = cli.main(["train", job, "--run-dir", run_dir, *(a for s in sets for a in ("--set", s))])
    if code:
        sys.exit(code)
    print("EPOCHS " + json.dumps(epochs), flush=True)


def measure(job: Path, run_dir: Path, sets: list[str], threads: int) -> Run:
    """One ``distrain train`` process (this script's child mode) and what it measured."""
    command = [sys.executable, __file__, "--child", "--job", str(job), "--run-dir", str(run_dir),
               *(a for s in sets for a in ("--set", s))]
    before = _cpu_s(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(command, env=env(threads), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"benchmark timed out after {TIMEOUT_S} s: {' '.join(command)}")
    if done.returncode != 0:
        raise SystemExit(f"benchmark process failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    whole = _cpu_s(resource.RUSAGE_CHILDREN) - before
    epochs = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("EPOCHS "))[7:])
    steady = epochs[1:]  # epoch 1 traces (and under XLA compiles) the step
    return Run(images_per_s=steady_images_per_s(run_dir),
               cpu_ms_per_image=statistics.median(cpu * 1000 / images for images, _, cpu in steady),
               other_cpu_s=whole - sum(cpu for _, _, cpu in steady))


def check_variant(run_dir: Path, precision: str, jit: bool) -> None:
    """The run trained what was asked (a key that did not take would make a ratio of 1.00 a lie)."""
    from distrain.rundir import RunDir

    summary = json.loads(RunDir(run_dir).summary.read_text())
    if (summary["precision"], summary["jit_compile"]) != (precision, jit):
        raise SystemExit(f"{run_dir}: trained precision {summary['precision']}, jit_compile "
                         f"{summary['jit_compile']}; asked for {precision}, {jit}")


def groups_of(models: list[str], mirrored: bool) -> list[Group]:
    groups = [Group(f"{m}, one_device", m, "one_device", (), VARIANTS) for m in models]
    if mirrored:
        groups.append(Group("cnn, mirrored over 2 logical CPUs", "cnn", "mirrored", ("distribute.cpu_devices=2",),
                            MIRRORED_VARIANTS))
    return groups


def table(groups: list[Group], runs: dict, args, busy: list[float], started: time.struct_time) -> str:
    """The markdown table: per variant the medians over rounds, and ratios to float32 taken round by round."""
    rows = []
    for g in groups:
        base = runs[g.title, g.variants[0][0]]
        for name, _, _ in g.variants:
            mine = runs[g.title, name]
            speed = [m.images_per_s / b.images_per_s for m, b in zip(mine, base)]
            work = [b.cpu_ms_per_image / m.cpu_ms_per_image for m, b in zip(mine, base)]
            rows.append(f"| {g.title} | {name} | {statistics.median(m.images_per_s for m in mine):.0f} | "
                        f"{statistics.median(speed):.2f} | {statistics.median(m.cpu_ms_per_image for m in mine):.3f} | "
                        f"**{statistics.median(work):.2f}** | {', '.join(f'{w:.2f}' for w in work)} | "
                        f"{statistics.median(m.other_cpu_s for m in mine):.1f} |")
    sizes = "; ".join(f"{m}: {examples(m, args):,} examples, {epochs(m, args)} epochs"
                      for m in dict.fromkeys(g.model for g in groups))
    command = " ".join(["benchmarks/precision.py", *(a for a in sys.argv[1:] if a != "--record")])
    return (
        "**CPU figures**, not GPU ones: on this CPU a mixed policy or XLA can be slower than float32, which says "
        "nothing about a GPU ([precision.md](precision.md); measure a GPU node with `distrain doctor`).\n\n"
        f"`distrain train` on synthetic images of each model's input shape, batch {args.batch} per replica, "
        f"{args.threads} intra-op thread(s), one process; {sizes}. Speed against float32 in the same round, "
        "median over the rounds (higher is faster), from the steady epochs (all but the first); by CPU work: "
        "float32's CPU ms per image over the variant's, all the process's threads (getrusage). CPU work is the "
        "robust column on a busy machine: images/s moves with whatever else runs on the 2 cores, CPU time per "
        f"image far less. Busy share of both cores before each round (others' work): "
        f"{', '.join(f'{b:.2f}' for b in busy)}. {args.repeats} round(s), variants alternated (reversed every "
        f"other round). Command: `.venv/bin/python {command}`, {time.strftime('%Y-%m-%d %H:%M', started)}-"
        f"{time.strftime('%H:%M UTC', time.gmtime())}.\n\n"
        "| model, strategy | variant | images/s | speed vs float32, by images/s | CPU ms per image | "
        "speed vs float32, by CPU work | each round, by CPU work | CPU s outside the steady epochs |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + f"\n\nMachine: {machine()}.")


def examples(model: str, args) -> int:
    return args.examples or (EXAMPLES[model] // 4 if args.quick else EXAMPLES[model])


def epochs(model: str, args) -> int:
    return 2 if args.quick else EPOCHS[model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every variant once")
    parser.add_argument("--batch", type=int, default=64, help="per replica")
    parser.add_argument("--examples", type=int, default=0, help="synthetic examples (default: per model, "
                        + ", ".join(f"{m} {n}" for m, n in EXAMPLES.items()) + ")")
    parser.add_argument("--threads", type=int, default=1, help="TF intra-op threads")
    parser.add_argument("--no-mirrored", dest="mirrored", action="store_false",
                        help="leave out the CNN under mirrored over 2 logical CPUs")
    parser.add_argument("--quick", action="store_true", help="a check of the script: 1/4 of the examples, "
                        "2 epochs, 1 round (unless --repeats is given)")
    parser.add_argument("--record", action="store_true", help="write the table into docs/performance.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measured process
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.job, args.run_dir, args.set)
        return
    if args.quick and "--repeats" not in sys.argv:
        args.repeats = 1
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    if args.repeats < 1:
        parser.error("--repeats: expected at least 1")

    from distrain.models import MODELS as REGISTRY

    groups = groups_of(models, args.mirrored)
    started = time.gmtime()
    runs = {(g.title, name): [] for g in groups for name, _, _ in g.variants}
    busy = []
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        tmp = Path(tmp)
        jobs = {g.title: write_job(tmp / f"{g.model}-{g.strategy}.yaml", strategy=g.strategy, batch=args.batch,
                                   epochs=epochs(g.model, args), examples=examples(g.model, args), model=g.model,
                                   shape=REGISTRY[g.model].default_input_shape) for g in groups}
        for round_ in range(args.repeats):
            busy.append(busy_share())
            print(f"round {round_ + 1}/{args.repeats}: busy share of both cores {busy[-1]:.2f}", file=sys.stderr,
                  flush=True)
            for g in groups:
                order = g.variants if round_ % 2 == 0 else g.variants[::-1]
                for name, precision, jit in order:
                    run_dir = tmp / f"{g.model}-{g.strategy}-{precision}-{jit}-{round_}"
                    sets = [*g.sets, f"train.precision={precision}", f"train.jit_compile={str(jit).lower()}"]
                    run = measure(jobs[g.title], run_dir, sets, args.threads)
                    check_variant(run_dir, precision, jit)
                    runs[g.title, name].append(run)
                    print(f"  {g.title}, {name}: {run.images_per_s:.0f} images/s, {run.cpu_ms_per_image:.3f} CPU ms "
                          f"per image, {run.other_cpu_s:.1f} CPU s outside the steady epochs", file=sys.stderr,
                          flush=True)
    text = table(groups, runs, args, busy, started)
    print(text)
    if args.record:
        record("precision-cpu", text)


if __name__ == "__main__":
    main()
