"""Plots and summaries of runs: ``distrain report`` and ``distrain tensorboard``.

``distrain report RUN_DIR [RUN_DIR ...] [--out DIR]`` reads each run's ``history.json``,
``summary.json``, ``job.yaml`` and its TensorBoard event files (read directly, without importing
TensorFlow, so a report takes about a second) and writes, one line per run per series so that runs
compare on one figure:

- ``accuracy_loss.png``: accuracy and loss per epoch, train (solid) vs validation (dashed);
- ``lr.png``: the learning rate applied at each logged step;
- ``throughput.png``: images/s per logged step, for the whole job and per replica;
- ``report.md``: a table of the runs (final and best metrics, images/s, wall time) and the plots.

The same table goes to the terminal. A run without event files (``logging.tensorboard: false``)
still gets every plot, from the per-epoch ``lr`` and ``images_per_s`` of ``history.json``.

``distrain report SWEEP_DIR`` (a dir ``distrain sweep`` wrote) compares the sweep's trials
instead: a table of the trials sorted by the sweep's metric (best first) with each trial's
overrides, ``sweep.png`` (the metric against each swept key), ``accuracy_loss.png`` of every trial
overlaid, and ``report.md``; by default into ``SWEEP_DIR/report``.

``distrain tensorboard RUNS_DIR [--port P]`` serves TensorBoard on 127.0.0.1 only and prints the
``ssh -L`` command that brings it to a laptop; given a sweep dir, its HParams dashboard lists the
trials with their swept keys and the sweep's metric.

Example:
    distrain report runs/quickstart/20261127-101500
    distrain report runs/cnn/slurm-81 runs/cnn/slurm-82 --out compare/
    distrain tensorboard runs/ --port 6006
    distrain report runs/lr-sweep
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from distrain.errors import UsageError
from distrain.rundir import RunDir, replacing
from distrain.sweeps import state as sweep_state
from distrain.sweeps.compare import axis, format_number, ranked, table_rows
from distrain.tf_startup import python_command

TRAIN, VALIDATION = RunDir.TB_TRAIN, RunDir.TB_VALIDATION
PLOTS = {"accuracy_loss": "accuracy and loss per epoch, train vs validation",
         "lr": "learning rate applied per step", "throughput": "images/s per step, global and per replica"}
SWEEP_PLOTS = {"sweep": "the sweep's metric against each swept key",
               "accuracy_loss": "accuracy and loss per epoch of every trial, train vs validation"}


@dataclass
class Run:
    """What the report knows of one run dir.

    Attributes:
        path: the run dir.
        label: the run's name in legends and tables: ``<job>/<run dir name>``.
        epochs: ``history.json``: one dict per finished epoch (``epoch``, ``step``, metrics).
        summary: ``summary.json``; empty while the run is still going (or after it failed).
        job: ``job.yaml`` as a dict (empty if missing).
        scalars: ``{tensorboard sub-dir: {tag: [(step, value), ...]}}``, empty without event files.
    """

    path: Path
    label: str
    epochs: list
    summary: dict = field(default_factory=dict)
    job: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)

    def series(self, run: str, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(run, {}).get(tag, [])

    @property
    def replicas(self) -> Optional[int]:
        return self.summary.get("replicas")


@dataclass
class Plot:
    """A written figure and the number of curves drawn on it (``matplotlib.lines.Line2D``)."""

    path: Path
    lines: int


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: cannot read ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def _not_a_run_dir(path: Path, why: str) -> UsageError:
    """The error for a directory that is not a run dir, naming run dirs below it (a runs dir?)."""
    below = sorted(p.parent for pattern in (f"*/{RunDir.HISTORY}", f"*/*/{RunDir.HISTORY}") for p in path.glob(pattern))
    more = " ..." if len(below) > 3 else ""
    hint = f"; run dirs below it: {' '.join(str(p) for p in below[:3])}{more}" if below else ""
    return UsageError(f"{path}: not a run dir ({why}){hint}")


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, bit-reversed
        table.append(crc)
    return table


_CRC32C = _crc32c_table()
_RECORD_HEADER = struct.Struct("<QI")  # the data's length, the masked CRC of those 8 bytes
_RECORD_FOOTER = struct.Struct("<I")  # the masked CRC of the data


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, the checksum of TFRecord framing.

    Example:
        >>> hex(crc32c(b"123456789"))
        '0xe3069283'
    """
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC TFRecord framing stores: rotated and offset, so data holding its own CRC still checks."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord-framed file (TensorBoard event files are), checksums verified.

    Each record is ``uint64 length, uint32 masked_crc32c(length), data, uint32 masked_crc32c(data)``,
    little-endian. A record cut short at the end is where a live run is still writing: reading
    stops there quietly. A checksum that does not match ends the file with one warning line.
    """
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + _RECORD_HEADER.size <= len(data):
        length, length_crc = _RECORD_HEADER.unpack_from(data, offset)
        start = offset + _RECORD_HEADER.size
        end = start + length
        if masked_crc32c(data[offset:offset + 8]) != length_crc:
            _warn_corrupt(path, offset)
            return
        if end + _RECORD_FOOTER.size > len(data):
            return
        record = data[start:end]
        if masked_crc32c(record) != _RECORD_FOOTER.unpack_from(data, end)[0]:
            _warn_corrupt(path, offset)
            return
        yield record
        offset = end + _RECORD_FOOTER.size


def _warn_corrupt(path: Path, offset: int) -> None:
    print(f"distrain: warning: {path}: corrupt record at byte {offset} (checksum mismatch); "
          "the points after it are left out", file=sys.stderr)


def read_scalars(log_dir: Path) -> dict:
    """Every scalar under a TensorBoard log dir, read from the event files without TensorFlow.

    What TensorBoard's ``EventAccumulator`` gives for the same files, at a fraction of the start-up
    time: importing TensorFlow alone takes seconds (the accumulator imports it when it is
    installed). Scalars are the values whose tag's first summary metadata names the ``scalars``
    plugin (``tf.summary.scalar`` writes a ``tensor``), or TF1-style ``simple_value`` ones.

    Args:
        log_dir: ``RUN_DIR/tensorboard``; each directory with event files is one run.

    Returns:
        ``{run: {tag: [(step, value), ...]}}``, run being the directory relative to ``log_dir``
        (``"."``, ``"train"``, ...), steps increasing. A step written twice (a resumed run redoes
        the steps after its last backup, in a newer event file) keeps the value written last.
    """
    result: dict = {}
    files: dict = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        files.setdefault(path.parent, []).append(path)
    for d in sorted(files):
        # Files by name, i.e. by creation time (TensorBoard's order), so later values win.
        tags = _dir_scalars(files[d])
        if tags:
            result[str(d.relative_to(log_dir))] = tags
    return result


def _dir_scalars(paths: Sequence[Path]) -> dict:
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util  # numpy and TensorBoard's TF stub only

    plugin: dict = {}  # tag -> plugin of its first metadata, as the accumulator keeps it
    tensors: dict = {}
    simple: dict = {}
    for path in paths:
        for record in read_records(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("metadata"):
                    plugin.setdefault(value.tag, value.metadata.plugin_data.plugin_name)
                if value.HasField("tensor"):
                    tensors.setdefault(value.tag, []).append((event.step, value.tensor))
                elif value.HasField("simple_value"):
                    simple.setdefault(value.tag, []).append((event.step, value.simple_value))
    tags = {tag: _last_per_step((step, float(tensor_util.make_ndarray(t))) for step, t in points)
            for tag, points in tensors.items() if plugin.get(tag) == "scalars"}
    for tag, points in simple.items():  # TF1-style summaries, if someone wrote any
        tags.setdefault(tag, _last_per_step((step, float(v)) for step, v in points))
    return tags


def _last_per_step(points) -> list[tuple[int, float]]:
    # Points in the order they were written: the last value of a step wins.
    return sorted(dict(points).items())


def load_run(path: Path) -> Run:
    """Reads one run dir.

    Raises:
        UsageError: ``path`` is not a run dir, no epoch has finished yet, or a file is unreadable.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such run dir")
    if not path.is_dir():
        raise UsageError(f"{path}: not a run dir (a file)")
    run_dir = RunDir(path)
    history = run_dir.history
    if not history.exists():
        if run_dir.is_started():
            raise UsageError(f"{path}: no epoch has finished yet (no {RunDir.HISTORY})")
        raise _not_a_run_dir(path, f"no {RunDir.HISTORY}")
    epochs = _read_json(history)
    if not isinstance(epochs, list) or not all(isinstance(e, dict) and "epoch" in e for e in epochs):
        raise UsageError(f"{history}: expected a list of epochs, each with an 'epoch' key")
    summary = _read_json(run_dir.summary) if run_dir.summary.exists() else {}
    job = {}
    if run_dir.job.exists():
        try:
            job = yaml.safe_load(run_dir.job.read_text()) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"{run_dir.job}: not YAML ({str(err).splitlines()[0]})") from None
    name = summary.get("job") or job.get("name") or path.parent.name
    scalars = read_scalars(run_dir.tensorboard) if run_dir.tensorboard.is_dir() else {}
    return Run(path=path, label=f"{name}/{path.name}", epochs=epochs, summary=summary, job=job, scalars=scalars)


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """``load_run`` for each; labels made unique (``#2``, ...) so legends tell the runs apart."""
    runs = [load_run(p) for p in paths]
    seen: dict = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"
    return runs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Plot:
    plt = _pyplot()
    lines = sum(len(ax.get_lines()) for ax in fig.axes)
    fig.tight_layout()
    path = Path(path)
    # Replaced atomically, as every run-dir file: a full disk is a WriteFailed (exit 74, one line)
    # that leaves the old picture, not a traceback and half a PNG.
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return Plot(path, lines)


def _color(i: int) -> str:
    return f"C{i % 10}"


def plot_accuracy_loss(runs: Sequence[tuple[str, Sequence[dict]]], path: Path, title: str = "") -> Plot:
    """Accuracy and loss per epoch, train vs validation, side by side (as the course draws them).

    Args:
        runs: ``(label, epochs)`` per run, epochs as in ``history.json``.
        path: the PNG to write.
        title: prefix of the panel titles.

    Returns:
        The plot: one line per run per series found (train and validation accuracy and loss).
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for i, (label, epochs) in enumerate(runs):
            x = [e["epoch"] for e in epochs]
            for key, split, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "--s")):
                if any(key in e for e in epochs):
                    name = split if len(runs) == 1 else f"{label} {split}"
                    ax.plot(x, [e.get(key, math.nan) for e in epochs], style, color=_color(i), label=name,
                            markersize=4)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_title(f"{title} {metric}".strip())
        if ax.get_lines():
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_curves(epochs: Sequence[dict], path: Path, title: str = "") -> Path:
    """Accuracy and loss per epoch of one run, train vs validation (``RUN_DIR/curves.png``)."""
    return plot_accuracy_loss([(title or "run", epochs)], path, title=title).path


def _lr_points(run: Run) -> list[tuple[int, float]]:
    points = run.series(TRAIN, "batch_lr")
    return points or [(e["step"], e["lr"]) for e in run.epochs if "lr" in e and "step" in e]


def _throughput_points(run: Run) -> list[tuple[int, float]]:
    points = run.series(TRAIN, "batch_images_per_s")
    return points or [(e["step"], e["images_per_s"]) for e in run.epochs if "images_per_s" in e and "step" in e]


def plot_lr(runs: Sequence[Run], path: Path) -> Plot:
    """The LR applied per step (``train/batch_lr``; else ``lr`` per epoch from history.json)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(runs):
        points = _lr_points(run)
        if points:
            ax.plot(*zip(*points), "-", color=_color(i), label=run.label, marker="." if len(points) < 50 else None)
    ax.set_xlabel("global step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate applied")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if ax.get_lines():
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_throughput(runs: Sequence[Run], path: Path) -> Plot:
    """Images/s per logged step for the whole job and per replica (the first point includes
    compiling the train step)."""
    plt = _pyplot()
    fig, (ax_all, ax_rep) = plt.subplots(1, 2, figsize=(10, 4))
    for i, run in enumerate(runs):
        points = _throughput_points(run)
        if not points:
            continue
        steps, rates = zip(*points)
        ax_all.plot(steps, rates, "-", color=_color(i), label=run.label, marker=".")
        per_replica = run.series(TRAIN, "batch_images_per_s_per_replica")
        if per_replica:
            ax_rep.plot(*zip(*per_replica), "-", color=_color(i), label=run.label, marker=".")
        elif run.replicas:
            ax_rep.plot(steps, [r / run.replicas for r in rates], "-", color=_color(i), label=run.label, marker=".")
    for ax, title in ((ax_all, "images/s, all replicas"), (ax_rep, "images/s per replica")):
        ax.set_xlabel("global step")
        ax.set_ylabel("images/s")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        if ax.get_lines():
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def best_epoch(epochs: Sequence[dict]) -> Optional[tuple[int, str, float]]:
    """``(epoch, metric, value)`` of the best epoch: highest val_accuracy, else lowest val_loss,
    else highest accuracy, else lowest loss; ``None`` without any of them."""
    for key, better in (("val_accuracy", max), ("val_loss", min), ("accuracy", max), ("loss", min)):
        scored = [e for e in epochs if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]
        if scored:
            best = better(scored, key=lambda e: e[key])
            return best["epoch"], key, best[key]
    return None


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def summary_rows(runs: Sequence[Run]) -> list[dict]:
    """One row per run: the world, final and best metrics, test metrics, images/s, wall time."""
    rows = []
    for run in runs:
        s, last = run.summary, (run.epochs[-1] if run.epochs else {})
        best = best_epoch(run.epochs)
        images = s.get("images_per_s")
        rows.append({
            "run": run.label,
            "model": (run.job.get("model") or {}).get("name", "-"),
            "strategy": s.get("strategy", "-"),
            "workers": s.get("world_size", "-"),
            "replicas": s.get("replicas", "-"),
            "global batch": s.get("global_batch", "-"),
            "epochs": f"{len(run.epochs)}" + ("" if s else " (no summary: running or stopped)"),
            "best epoch": f"{best[0]} ({best[1]} {best[2]:.4f})" if best else "-",
            "train acc": _fmt(last.get("accuracy")),
            "val acc": _fmt(last.get("val_accuracy")),
            "val loss": _fmt(last.get("val_loss")),
            "test acc": _fmt(s.get("test", {}).get("accuracy")),
            "test loss": _fmt(s.get("test", {}).get("loss")),
            "images/s": _fmt(images, 0),
            "images/s/replica": _fmt(images / s["replicas"], 0) if images and s.get("replicas") else "-",
            "wall time": _duration(s.get("wall_time_s")),
        })
    return rows


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """The rows as a markdown table, or as aligned columns for a terminal."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [keys] + [[str(r[k]) for k in keys] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in keys) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in cells)


@dataclass
class Report:
    """What ``write_report`` wrote."""

    out: Path
    plots: dict  # name -> Plot
    markdown: Path
    table: str  # the terminal table


def write_report(runs: Sequence[Run], out: Path) -> Report:
    """Writes the plots and ``report.md`` of ``runs`` (overlaid when several) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = runs[0].label if len(runs) == 1 else ""
    plots = {
        "accuracy_loss": plot_accuracy_loss([(r.label, r.epochs) for r in runs], out / "accuracy_loss.png", title),
        "lr": plot_lr(runs, out / "lr.png"),
        "throughput": plot_throughput(runs, out / "throughput.png"),
    }
    rows = summary_rows(runs)
    sources = [f"- `{r.label}`: `{r.path}`" + ("" if r.scalars else " (no TensorBoard events: per-epoch values "
                                                                     "from history.json)") for r in runs]
    md = ["# distrain report", "", *sources, "", format_table(rows, markdown=True), "",
          "Best epoch: highest val_accuracy (else lowest val_loss). images/s: trained images over the "
          "epochs' wall time (validation included), from summary.json; wall time: the whole run, "
          "start-up and test evaluation included.", ""]
    for name, plot in plots.items():
        md += [f"## {PLOTS[name]}", "", f"![{PLOTS[name]}]({plot.path.name})", ""]
    markdown = out / "report.md"
    markdown.write_text("\n".join(md))
    return Report(out, plots, markdown, format_table(rows))


def plot_sweep(state: sweep_state.SweepState, path: Path) -> Plot:
    """The sweep's metric against each swept key, one panel per key: a point per trial with a
    result, the best one starred, a cross at the bottom for each failed trial (a NaN loss: no
    result). Numbers on a linear or log axis (``compare.axis``), other values (lists, strings) as
    categories."""
    plt = _pyplot()
    scored = [t for t in state.trials if t.result is not None]
    failed = [t for t in state.trials if t.result is None and t.state == sweep_state.FAILED]
    best = ranked(scored, state.mode)[0] if scored else None
    keys = state.keys or ["(no key)"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        shown = scored + failed
        values = [t.overrides.get(key) for t in shown]
        kind = axis(values)
        if kind == "category":
            labels = list(dict.fromkeys(format_number(v) for v in values))
            x = [labels.index(format_number(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels), default=0) > 8 else 0)
        else:
            x = values
            ax.set_xscale("log" if kind == "log" else "linear")
        if scored:
            ax.plot(x[:len(scored)], [t.result for t in scored], "o", color=_color(0), label="trials")
            at = scored.index(best)
            ax.plot([x[at]], [best.result], "*", color=_color(3), markersize=14, label=f"best: {best.name}")
        if failed:  # at the bottom of the panel: x in data, y in axes coordinates
            ax.plot(x[len(scored):], [0.03] * len(failed), "x", color=_color(3), markersize=9,
                    transform=ax.get_xaxis_transform(), label="failed (no result)")
        if scored or failed:
            ax.legend(fontsize="small")
        ax.set_xlabel(key)
        ax.set_ylabel(state.metric)
        ax.set_title(f"{state.metric} ({state.mode} is best)" if scored else "no trial has a result yet")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def write_sweep_report(path: Path, out: Path) -> Report:
    """Writes ``sweep.png``, ``accuracy_loss.png`` (every trial with an epoch) and ``report.md``
    of the sweep in ``path`` into ``out``.

    Raises:
        UsageError: ``path/sweep.yaml`` is unreadable, or a trial's files are.
    """
    state = sweep_state.load(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {t.index: _read_json(state.trial_dir(t.index) / RunDir.SUMMARY) for t in state.trials
                 if (state.trial_dir(t.index) / RunDir.SUMMARY).exists()}
    rows = table_rows(state.trials, state.keys, state.metric, state.mode, summaries)
    plots = {"sweep": plot_sweep(state, out / "sweep.png")}
    runs = [load_run(state.trial_dir(t.index)) for t in ranked(state.trials, state.mode)
            if RunDir(state.trial_dir(t.index)).history.exists()]
    if runs:
        plots["accuracy_loss"] = plot_accuracy_loss([(r.path.name, r.epochs) for r in runs], out / "accuracy_loss.png")
    md = ["# distrain sweep report", "", f"`{path}`: {sweep_state.describe(state)}; the trials by {state.metric} at "
          f"their last epoch ({state.mode} is best), each a run dir `{path}/trial-NNN`.", "",
          format_table(rows, markdown=True), ""]
    for name, plot in plots.items():
        md += [f"## {SWEEP_PLOTS[name]}", "", f"![{SWEEP_PLOTS[name]}]({plot.path.name})", ""]
    markdown = out / "report.md"
    markdown.write_text("\n".join(md))
    return Report(out, plots, markdown, format_table(rows))


# ---------------------------------------------------------------------------------------------
# Commands


def add_report_parser(subparsers) -> None:
    """Registers ``distrain report`` and ``distrain tensorboard``."""
    p = subparsers.add_parser("report", help="plots and a summary of one or more run dirs (overlaid)",
                              description="Writes accuracy_loss.png (accuracy and loss per epoch, train vs "
                                          "validation), lr.png (LR per step), throughput.png (images/s per "
                                          "step) and report.md for one or more runs (several overlay on each "
                                          "figure), and prints the summary table. Reads each run's "
                                          "history.json, summary.json, job.yaml and TensorBoard event files, "
                                          "without TensorFlow.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a run dir (the one holding history.json, e.g. runs/quickstart/20261127-101500), or one "
                        "sweep dir: its trials ranked by the sweep's metric, sweep.png (the metric against each "
                        "swept key) and every trial's curves")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where the PNGs and report.md go (default: RUN_DIR/report for one run, "
                        "./report for several)")
    p.set_defaults(handler=cmd_report)

    p = subparsers.add_parser("tensorboard", help="serve TensorBoard for a runs dir on 127.0.0.1",
                              description="Starts TensorBoard on 127.0.0.1 (never on a public address) "
                                          "and prints the ssh -L command to reach it from a laptop.")
    p.add_argument("runs_dir", type=Path, metavar="RUNS_DIR",
                   help="a runs dir (e.g. runs/), a sweep dir (its trials in the HParams dashboard) or one run dir")
    p.add_argument("--port", type=int, default=6006, help="port on 127.0.0.1 (default: 6006)")
    p.add_argument("--via", metavar="LOGIN_HOST",
                   help="login node to tunnel through (default: $SLURM_SUBMIT_HOST inside a SLURM job)")
    p.set_defaults(handler=cmd_tensorboard)


def cmd_report(args) -> int:
    if len(args.run_dirs) == 1 and sweep_state.is_sweep_dir(args.run_dirs[0]):
        report = write_sweep_report(args.run_dirs[0], args.out or args.run_dirs[0] / "report")
        print(report.table)
        print(f"wrote {report.markdown} and " + ", ".join(p.path.name for p in report.plots.values()))
        return 0
    runs = load_runs(args.run_dirs)
    out = args.out or (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    report = write_report(runs, out)
    print(report.table)
    print(f"wrote {report.markdown} and " + ", ".join(p.path.name for p in report.plots.values()))
    return 0


def tunnel_commands(port: int, host: str, user: str, via: Optional[str] = None) -> list[str]:
    """The ``ssh -L`` command(s) that bring ``127.0.0.1:port`` on ``host`` to a laptop's localhost.

    TensorBoard listens on the loopback of ``host`` only, so the tunnel must end on ``host``
    itself; behind a login node, ssh jumps through it (``-J``).

    Example:
        >>> tunnel_commands(6006, "node17", "ada", via="login1")
        ['ssh -N -L 6006:127.0.0.1:6006 -J ada@login1 ada@node17']
    """
    jump = f"-J {user}@{via} " if via and via != host else ""
    return [f"ssh -N -L {port}:127.0.0.1:{port} {jump}{user}@{host}"]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tensorboard_program() -> str:
    # The console script of this environment, so that TensorBoard runs with this environment's
    # packages (its plugins, the profile plugin if installed) whatever is first on PATH.
    import shutil

    script = Path(sys.executable).with_name("tensorboard")
    found = str(script) if script.exists() else shutil.which("tensorboard")
    if not found:
        raise UsageError("tensorboard: not installed in this environment (pip install tensorboard)")
    return found


def cmd_tensorboard(args) -> int:
    import getpass

    logdir = args.runs_dir
    if not logdir.is_dir():
        raise UsageError(f"{logdir}: no such directory (give a runs dir, e.g. runs/)")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port: expected 1..65535, got {args.port}")
    if not _port_free(args.port):
        raise UsageError(f"--port: 127.0.0.1:{args.port} is in use (another TensorBoard?); pick another --port")
    if not any(logdir.rglob("events.out.tfevents.*")):
        print(f"distrain: no event files under {logdir} yet; TensorBoard picks them up as runs write them "
              "(runs with logging.tensorboard false write none)", file=sys.stderr)
    via = args.via or os.environ.get("SLURM_SUBMIT_HOST")  # set by SLURM inside a job: the login node
    host = socket.gethostname()
    print(f"TensorBoard for {logdir} at http://127.0.0.1:{args.port}/ (this machine only; Ctrl-C stops it)")
    print("on your laptop, open a tunnel, then browse http://localhost:%d/ :" % args.port)
    for command in tunnel_commands(args.port, host, getpass.getuser(), via):
        print("  " + command)
    sys.stdout.flush()
    _tensorboard_program()  # installed in this environment, or a one-line error
    # TensorBoard of this environment, started through `import distrain`: its TensorFlow start-up notices filtered.
    argv = [*python_command("tensorboard.main"), "--logdir", str(logdir), "--host", "127.0.0.1", "--port",
            str(args.port)]
    os.execv(argv[0], argv)  # TensorBoard replaces this process: Ctrl-C and signals go straight to it
    return 0  # not reached
