"""Plots and summaries of finished runs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_curves(epochs: Sequence[dict], path: Path, title: str = "") -> Path:
    """Accuracy and loss per epoch, train vs validation, side by side (as the course draws them)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    x = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if any(key in e for e in epochs):
                ax.plot(x, [e.get(key, float("nan")) for e in epochs], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{title} {metric}".strip())
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_report_parser(subparsers) -> None:
    """Registers ``distrain report``."""
    p = subparsers.add_parser("report", help="plots and a summary of one or more run dirs")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help="directory for the PNGs and report.md (default: the first run dir)")
    p.set_defaults(handler=cmd_report)


def cmd_report(args) -> int:
    import json

    from distrain.errors import UsageError

    out = args.out or args.run_dirs[0]
    for run_dir in args.run_dirs:
        if not (run_dir / "history.json").exists():
            raise UsageError(f"{run_dir}: not a run dir (no history.json)")
    for run_dir in args.run_dirs:
        epochs = json.loads((run_dir / "history.json").read_text())
        plot_curves(epochs, Path(out) / f"curves-{run_dir.name}.png", title=run_dir.name)
    return 0
