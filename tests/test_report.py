"""``distrain report`` on a real 2-worker run (conftest.py's ``two_worker_run``, which test_tensorboard.py reads too): valid PNGs with
the expected number of curves, several runs overlaid, report.md and the terminal table, bad
input as a one-line usage error, and event files read without TensorFlow (the same scalars as
TensorBoard's own reader)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_distrain, worker_env

pytestmark = pytest.mark.multiprocess

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Curves per run: accuracy and loss x train and validation; the LR; images/s global and per replica.
LINES_PER_RUN = {"accuracy_loss": 4, "lr": 1, "throughput": 2}


@pytest.fixture(scope="module")
def run_dir(two_worker_run) -> Path:
    return two_worker_run.run_dir


def copy_run(run_dir: Path, dest: Path, **history_changes) -> Path:
    """A second run dir: the same run, its metrics changed so the curves differ."""
    shutil.copytree(run_dir, dest)
    history = json.loads((dest / "history.json").read_text())
    for epoch in history:
        for key, factor in history_changes.items():
            epoch[key] *= factor
    (dest / "history.json").write_text(json.dumps(history))
    return dest


def assert_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.load()  # decodes every pixel
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        low, high = image.convert("L").getextrema()
        assert high - low > 100, f"{path} looks blank"


def report(run_dirs, out):
    from distrain import report as report_lib

    return report_lib.write_report(report_lib.load_runs(run_dirs), out)


def test_report_of_one_run(run_dir, tmp_path, capsys):
    from distrain.cli import main

    assert main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    terminal = capsys.readouterr().out
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"accuracy_loss.png", "lr.png", "throughput.png", "report.md"}
    for name in LINES_PER_RUN:
        assert_png(tmp_path / "out" / f"{name}.png")

    result = report([run_dir], tmp_path / "again")
    assert {name: plot.lines for name, plot in result.plots.items()} == LINES_PER_RUN
    summary = json.loads((run_dir / "summary.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    best = max(history, key=lambda e: e["val_accuracy"])
    for text in (terminal, result.markdown.read_text()):
        assert f"tbjob/{run_dir.name}" in text
        assert "multi_worker" in text and f"{best['epoch']} (val_accuracy {best['val_accuracy']:.4f})" in text
        assert f"{summary['test']['accuracy']:.4f}" in text and f"{summary['images_per_s']:.0f}" in text
    md = result.markdown.read_text()
    assert "](accuracy_loss.png)" in md and "](lr.png)" in md and "](throughput.png)" in md


def test_two_runs_overlay_with_twice_the_lines(run_dir, tmp_path):
    other = copy_run(run_dir, tmp_path / "runs" / "other", loss=1.5, val_loss=1.5)
    result = report([run_dir, other], tmp_path / "out")
    assert {name: plot.lines for name, plot in result.plots.items()} == {k: 2 * v for k, v in LINES_PER_RUN.items()}
    for plot in result.plots.values():
        assert_png(plot.path)
    lines = result.table.splitlines()
    assert len(lines) == 3 and f"tbjob/{run_dir.name}" in lines[1] and "tbjob/other" in lines[2]


def test_same_run_name_twice_gets_distinct_labels(run_dir, tmp_path):
    from distrain import report as report_lib

    twin = copy_run(run_dir, tmp_path / "elsewhere" / run_dir.name)
    labels = [r.label for r in report_lib.load_runs([run_dir, twin])]
    assert len(set(labels)) == 2


def test_run_without_event_files_plots_from_history(run_dir, tmp_path):
    bare = copy_run(run_dir, tmp_path / "bare")
    shutil.rmtree(bare / "tensorboard")  # logging.tensorboard: false
    result = report([bare], tmp_path / "out")
    assert {name: plot.lines for name, plot in result.plots.items()} == LINES_PER_RUN
    assert "no TensorBoard events" in result.markdown.read_text()
    # While the run is going there is no summary.json, so no replica count for images/s per replica.
    (bare / "summary.json").unlink()
    result = report([bare], tmp_path / "out")
    assert {name: plot.lines for name, plot in result.plots.items()} == {**LINES_PER_RUN, "throughput": 1}
    assert "(no summary: running or stopped)" in result.table


def test_plot_curves_keeps_its_signature(tmp_path):
    from distrain.report import plot_curves

    epochs = [{"epoch": i, "loss": 2.0 / i, "accuracy": 0.2 * i, "val_loss": 2.1 / i, "val_accuracy": 0.18 * i}
              for i in (1, 2, 3)]
    path = plot_curves(epochs, tmp_path / "curves.png", title="job")
    assert path == tmp_path / "curves.png"
    assert_png(path)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "a_file", "bad_json", "started_only", "runs_dir"])
def test_bad_input_is_a_one_line_usage_error(case, tmp_path):
    target = tmp_path / "target"
    if case == "empty_dir":
        target.mkdir()
    elif case == "a_file":
        target.write_text("x")
    elif case == "bad_json":
        target.mkdir()
        (target / "history.json").write_text("{not json")
    elif case == "started_only":
        (target / "logs").mkdir(parents=True)
        (target / "job.yaml").write_text("name: x\n")
    elif case == "runs_dir":
        (target / "job" / "run1").mkdir(parents=True)
        (target / "job" / "run1" / "history.json").write_text("[]")
    result = run_distrain(["report", str(target), "--out", str(tmp_path / "out")], timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("distrain: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(target) in result.stderr
    expected = {"missing": "no such run dir", "empty_dir": "not a run dir", "a_file": "not a run dir (a file)",
                "bad_json": "cannot read", "started_only": "no epoch has finished yet",
                "runs_dir": f"run dirs below it: {target / 'job' / 'run1'}"}[case]
    assert expected in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_step_written_again_after_a_resume_keeps_the_later_value(tmp_path):
    """A resumed run redoes the steps after its last backup and writes them into a newer file."""
    import distrain  # noqa: F401
    import tensorflow as tf

    from distrain.report import read_scalars

    for values in ({2: 1.0, 4: 2.0, 6: 3.0}, {4: 20.0, 6: 30.0, 8: 40.0}):  # stopped at 6, resumed from 2
        writer = tf.summary.create_file_writer(str(tmp_path / "train"))
        with writer.as_default():
            for step, value in values.items():
                tf.summary.scalar("batch_lr", value, step=step)
        writer.close()  # the next writer's file sorts after this one (time, then a counter, in its name)
    assert read_scalars(tmp_path) == {"train": {"batch_lr": [(2, 1.0), (4, 20.0), (6, 30.0), (8, 40.0)]}}


def _write_events(log_dir: Path) -> None:
    """Event files written by TensorFlow: v2 scalars (tensors), a TF1-style simple_value, a text."""
    import tensorflow as tf  # after distrain: tf-keras, whichever test imports Keras next

    writer = tf.summary.create_file_writer(str(log_dir / "train"))
    with writer.as_default():
        for step in (1, 2):
            tf.summary.scalar("batch_lr", 0.1 * step, step=step)
            tf.summary.text("note", "not a scalar", step=step)
        old_style = tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(tag="old", simple_value=0.5)])
        tf.summary.experimental.write_raw_pb(old_style.SerializeToString(), step=3)
    writer.close()


def test_event_files_are_read_without_tensorflow(tmp_path, capsys):
    from distrain.report import crc32c, read_scalars

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    _write_events(tmp_path)
    expected = {"train": {"batch_lr": [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))], "old": [(3, 0.5)]}}
    assert read_scalars(tmp_path) == expected
    events = next((tmp_path / "train").iterdir())
    data = events.read_bytes()
    with open(events, "ab") as f:  # a live run's writer is half-way through its next record
        f.write(data[:20])
    assert read_scalars(tmp_path) == expected
    assert capsys.readouterr().err == ""
    events.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])  # the last record's data damaged
    assert read_scalars(tmp_path) == {"train": {"batch_lr": expected["train"]["batch_lr"]}}
    err = capsys.readouterr().err
    assert err.startswith(f"distrain: warning: {events}: corrupt record at byte ") and err.count("\n") == 1


def test_scalars_are_those_tensorboard_reads(run_dir):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    from distrain.report import read_scalars

    log_dir = run_dir / "tensorboard"
    expected = {}
    for d in sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")}):
        acc = event_accumulator.EventAccumulator(str(d), size_guidance={event_accumulator.TENSORS: 0})
        acc.Reload()
        tags = {tag: sorted({e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
                            .items())
                for tag in acc.Tags()["tensors"] if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}
        if tags:
            expected[str(d.relative_to(log_dir))] = tags
    assert {"train", "validation"} <= set(expected) and len(expected["train"]["batch_lr"]) > 1
    assert read_scalars(log_dir) == expected


@pytest.mark.timeout(120)
def test_report_does_not_import_tensorflow_nor_print_its_start_up_lines(run_dir, tmp_path):
    from distrain.tf_startup import is_startup_notice

    code = ("import json, sys\n"
            "from distrain.cli import main\n"
            f"code = main(['report', {str(run_dir)!r}, '--out', {str(tmp_path / 'out')!r}])\n"
            "print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tf_keras', 'keras'))]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=worker_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [0, []]
    assert f"tbjob/{run_dir.name}" in done.stdout
    assert not [line for line in done.stderr.splitlines() if is_startup_notice(line)], done.stderr


def test_help_and_docs_describe_the_same_report():
    """``distrain report --help`` and docs/monitoring.md name the files the report writes, and the
    docs every option."""
    import argparse
    import re

    from distrain.report import PLOTS, add_report_parser

    subparsers = argparse.ArgumentParser(prog="distrain").add_subparsers()
    add_report_parser(subparsers)
    parser = subparsers.choices["report"]
    help_text = " ".join(parser.format_help().split())
    docs = (REPO / "docs" / "monitoring.md").read_text()
    section = docs.split("## Reports: `distrain report`", 1)[1].split("\n## ", 1)[0]
    written = {f"{name}.png" for name in PLOTS} | {"report.md"}
    assert set(re.findall(r"^\| `([\w.]+)` \|", section, re.MULTILINE)) == written
    assert [name for name in sorted(written) if name not in help_text] == []
    options = {o for action in parser._actions for o in action.option_strings if o not in ("-h", "--help")}
    assert options and [o for o in sorted(options) if o not in section] == []
