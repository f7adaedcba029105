"""Sweeps (issue 28): the trials of a ``sweep:`` section (pure expansion), their validation before
anything starts (every bad input exits 2 with one line), ``sweep.yaml``, and a real local sweep of
4 trials of the quickstart job: stopped by SIGUSR1 in its third trial and resumed, run a third time
without training anything, ranked by ``distrain report``, listed by TensorBoard's HParams
dashboard, and its trial 3 bit-equal to ``distrain train --set`` of its overrides."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import DISTRAIN, REPO, Forked, free_ports, run_distrain, tf_config, worker_env
from distrain.cli import main
from distrain.errors import EXIT_NAN, EXIT_PREEMPTED, UsageError
from distrain.rundir import RunDir
from distrain.spec import TrainSpec, load_spec, parse_override, spec_from_dict, spec_to_dict
from distrain.sweeps import compare, launched
from distrain.sweeps import state as sweep_state
from distrain.sweeps import trials
from distrain.sweeps.plan import plan

QUICKSTART = REPO / "jobs" / "quickstart.yaml"


# ----------------------------------------------------------------------------- the expansion (pure)

def test_the_grid_is_every_combination_the_last_key_fastest():
    assert trials.expand({"a": [1, 2], "b": ["x", "y", "z"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
        {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]
    assert trials.expand({}) == [] and trials.grid_points({}) == [{}]


def test_random_trials_come_from_the_seed_and_repeat_the_grid_per_draw():
    distributions = {"lr": trials.Distribution("log_uniform", (1e-4, 1e-1)),
                     "units": trials.Distribution("integer", (4, 64))}
    first = trials.expand({"opt": ["adam", "sgd"]}, distributions, trials=3, seed=7)
    assert first == trials.expand({"opt": ["adam", "sgd"]}, distributions, trials=3, seed=7)
    assert first != trials.expand({"opt": ["adam", "sgd"]}, distributions, trials=3, seed=8)
    # Draw s of every grid point before draw s + 1 (Ray Tune's num_samples order), each trial its own draw.
    assert [t["opt"] for t in first] == ["adam", "sgd"] * 3
    assert len({(t["lr"], t["units"]) for t in first}) == 6
    # More trials of the same sweep keep the first ones, so a sweep dir can grow (--trials 5 after 3).
    assert trials.expand({"opt": ["adam", "sgd"]}, distributions, trials=5, seed=7)[:6] == first
    # The draws are Python's Mersenne Twister, the same on every platform: pin two values.
    assert trials.expand({}, {"x": trials.Distribution("uniform", (0.0, 1.0))}, trials=2, seed=0) == [
        {"x": 0.844421851525048}, {"x": 0.757954402940302}]


def test_every_distribution_stays_within_its_bounds_and_reaches_them():
    cases = {"uniform": (-1.0, 3.0), "log_uniform": (1e-5, 1e-1), "integer": (2, 5), "choice": ("a", [3, 7], 0.5)}
    for kind, values in cases.items():
        d = trials.Distribution(kind, values)
        drawn = [d.draw(u / 1000) for u in range(1000)] + [d.draw(0.9999999999)]
        if kind == "choice":
            assert all(v in values for v in drawn) and [v for v in values if v not in drawn] == []
        elif kind == "integer":
            assert set(drawn) == {2, 3, 4, 5}
        else:
            assert min(drawn) == values[0] and all(values[0] <= v <= values[1] for v in drawn)
    # log_uniform: uniform in the exponent; its values read back as written (0.001, not 0.000999...).
    d = trials.Distribution("log_uniform", (1e-4, 1e-2))
    assert d.draw(0.5) == 0.001 and d.draw(0.25) == pytest.approx(math.sqrt(1e-4 * 1e-3))


def test_overrides_read_back_as_set_reads_them():
    for value in (0.001, 1e-05, 0.844421851525048, 3, True, "adam", "true", "1e-3", None, [3, 7], [[1, 2]],
                  {"name": "step", "boundaries": [3, 7]}):
        key, back = parse_override(trials.override("train.x", value))
        assert (key, back) == ("train.x", value), trials.override("train.x", value)


def test_grid_flags_and_yaml_1_1_floats():
    assert trials.parse_grid_flag("train.learning_rate=1e-3, 3e-3,0.01") == ("train.learning_rate",
                                                                             [0.001, 0.003, 0.01])
    assert trials.parse_grid_flag("train.schedule.boundaries=[3,7],[5, 8]") == ("train.schedule.boundaries",
                                                                                 [[3, 7], [5, 8]])
    assert trials.parse_grid_flag("train.optimizer=adam,sgd") == ("train.optimizer", ["adam", "sgd"])
    assert trials.number("2E+3") == 2000.0 and trials.number("e3") == "e3" and trials.number(True) is True
    for bad in ("train.learning_rate", "=1,2", "train.learning_rate=", "train.learning_rate=1,,2"):
        with pytest.raises(trials.SweepError):
            trials.parse_grid_flag(bad)


@pytest.mark.parametrize("raw, path, message", [
    ({"uniform": [0.1, 0.1]}, "x.uniform", "expected low < high, got [0.1, 0.1]"),
    ({"uniform": [1, "a"]}, "x.uniform", "expected [low, high]"),
    ({"log_uniform": [0, 0.1]}, "x.log_uniform", "expected 0 < low < high"),
    ({"integer": [1.5, 4]}, "x.integer", "of integers"),
    ({"integer": [5, 2]}, "x.integer", "expected low < high, got [5, 2]"),
    ({"choice": []}, "x.choice", "non-empty"),
    ({"gauss": [0, 1]}, "x", "expected {uniform: [low, high]}"),
    ({"uniform": [0, 1], "choice": [1]}, "x", "expected {uniform"),
    ([0, 1], "x", "expected {uniform"),
])
def test_bad_distributions_name_their_path(raw, path, message):
    with pytest.raises(trials.SweepError) as err:
        trials.parse_distribution("x", raw)
    assert err.value.path == path and message in err.value.message


# ----------------------------------------------------------------------------- the section in a job

@pytest.mark.parametrize("sweep, expected", [
    ({"grid": {"train.learnin_rate": [0.1]}},
     "sweep.grid.train.learnin_rate: not a job key; valid keys in train: epochs"),
    ({"grid": {"trian.learning_rate": [0.1]}},
     "sweep.grid.trian.learning_rate: not a job key; valid keys at the top level"),
    ({"grid": {"train.epochs.x": [1]}}, "sweep.grid.train.epochs.x: train.epochs is a value, not a section of keys"),
    ({"grid": {"train.learning_rate": []}},
     "sweep.grid.train.learning_rate: expected a non-empty list of values, got []"),
    ({"grid": {"train.learning_rate": 0.1}},
     "sweep.grid.train.learning_rate: expected a non-empty list of values, got 0.1"),
    ({"grid": {"train.learning_rate": [0.1, 0.1]}}, "sweep.grid.train.learning_rate: 0.1 is listed twice"),
    ({"grid": {"sweep.metric": ["loss"]}}, "sweep.grid.sweep.metric: the sweep's own keys cannot be swept"),
    ({"random": {"trials": 2, "distributions": {"train.l2": {"uniform": [1e-3, 1e-4]}}}},
     "sweep.random.distributions.train.l2.uniform: expected low < high, got [0.001, 0.0001]"),
    ({"random": {"trials": 2, "distributions": {"train.l2": {"log_uniform": ["0", "1e-4"]}}}},
     "sweep.random.distributions.train.l2.log_uniform: expected [low, high]"),
    ({"random": {"trials": 2, "distributions": {"train.l3": {"uniform": [0, 1]}}}},
     "sweep.random.distributions.train.l3: not a job key"),
    ({"random": {"trials": 2}}, "sweep.random.distributions: expected a mapping of job keys to distributions"),
    ({"random": {"trials": 0, "distributions": {"train.l2": {"uniform": [0, 1]}}}},
     "sweep.random.trials: expected a positive integer, got 0"),
    ({"grid": {"train.l2": [0.0, 0.1]}, "random": {"distributions": {"train.l2": {"uniform": [0, 1]}}}},
     "sweep.random.distributions.train.l2: also in sweep.grid"),
    ({"mode": "best"}, "sweep.mode: expected one of auto, min, max"),
])
def test_a_bad_sweep_section_is_one_line_naming_its_key(sweep, expected):
    with pytest.raises(UsageError) as err:
        spec_from_dict({"sweep": sweep}, source="job.yaml")
    assert str(err.value).startswith(f"job.yaml: {expected}"), str(err.value)
    assert "\n" not in str(err.value)


def test_the_section_is_read_with_yaml_1_2_numbers_and_train_ignores_it():
    spec = spec_from_dict({"sweep": {"grid": {"train.learning_rate": ["1e-3", 3.0e-3],
                                               "train.schedule": [{"name": "cosine"}, {"name": "constant"}]}}})
    assert spec.sweep.grid["train.learning_rate"] == [0.001, 0.003] and spec.sweep.defined
    assert spec.train.learning_rate == TrainSpec().learning_rate  # the job itself: no trial's values
    assert not spec_from_dict({}).sweep.defined


# ----------------------------------------------------------------------------- planning

BASE = ["train.epochs=2", "model.params.filters=4"]


def test_each_trial_is_the_job_with_its_overrides_as_set_gives_it():
    planned = plan(QUICKSTART, BASE, grid=["train.learning_rate=0.001,0.003", "train.schedule.boundaries=[3,7],[5,8]"])
    assert planned.keys == ("train.learning_rate", "train.schedule.boundaries")
    assert [t.sets for t in planned.trials] == [
        ["train.learning_rate=0.001", "train.schedule.boundaries=[3, 7]"],
        ["train.learning_rate=0.001", "train.schedule.boundaries=[5, 8]"],
        ["train.learning_rate=0.003", "train.schedule.boundaries=[3, 7]"],
        ["train.learning_rate=0.003", "train.schedule.boundaries=[5, 8]"]]
    assert (planned.metric, planned.mode) == ("val_accuracy", "max")  # quickstart's checkpoint.monitor
    for trial in planned.trials:
        plain = load_spec(QUICKSTART, [*BASE, *trial.sets])
        assert {**spec_to_dict(trial.spec), "sweep": None} == {**spec_to_dict(plain), "sweep": None}
        assert compare.swept_keys(trial.spec.sweep).keys() == {"train.learning_rate", "train.schedule.boundaries"}
    assert planned.describe()[0] == "sweep: 4 trial(s), grid of 4, compared on val_accuracy (max)"
    assert planned.describe()[4] == "  trial-003  train.learning_rate=0.003 train.schedule.boundaries=[5, 8]"


def test_command_line_grid_and_trials_add_to_and_replace_the_files_section(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(QUICKSTART.read_text() + """
sweep:
  metric: val_loss
  grid: {train.optimizer: [adam, sgd], train.learning_rate: [0.001, 0.01]}
  random:
    trials: 2
    seed: 3
    distributions: {train.l2: {log_uniform: [1.0e-6, 1.0e-3]}, model.params.filters: {integer: [4, 16]}}
""")
    from_file = plan(job)
    assert len(from_file.trials) == 8 and (from_file.metric, from_file.mode) == ("val_loss", "min")
    assert from_file.keys == ("train.optimizer", "train.learning_rate", "train.l2", "model.params.filters")
    # --grid replaces the file's key (here one of its distributions) and adds new ones; --trials the draws.
    flags = plan(job, grid=["train.learning_rate=0.003", "model.params.filters=8,16"], trials=3)
    assert flags.keys == ("train.optimizer", "train.learning_rate", "model.params.filters", "train.l2")
    assert len(flags.trials) == 2 * 1 * 2 * 3
    assert {t.overrides["train.learning_rate"] for t in flags.trials} == {0.003}
    assert all(t.spec.model.params["filters"] == t.overrides["model.params.filters"] for t in flags.trials)
    assert all(1e-6 <= t.spec.train.l2 <= 1e-3 for t in flags.trials)
    # Each trial's job carries the sweep in effect (its TensorBoard hparams), not the file's.
    assert flags.trials[0].spec.sweep.random.trials == 3 and "model.params.filters" in flags.trials[0].spec.sweep.grid
    # The Python API's mapping is the same as the flags.
    api = plan(job, grid={"train.learning_rate": [0.003], "model.params.filters": [8, 16]}, trials=3)
    assert [t.overrides for t in api.trials] == [t.overrides for t in flags.trials]


@pytest.mark.parametrize("overrides, grid, trials_, expected", [
    ((), ["train.learnin_rate=0.1,0.2"], None, "--grid train.learnin_rate: not a job key"),
    ((), ["train.learning_rate="], None, "--grid train.learning_rate: expected a non-empty list"),
    ((), ["train.learning_rate=0.1,0.1"], None, "--grid train.learning_rate: 0.1 is listed twice"),
    ((), ["sweep.metric=loss"], None, "--grid sweep.metric: the sweep's own keys cannot be swept"),
    ((), ["train.learning_rate=0.1,-0.1"], None,
     "sweep trial 1 (train.learning_rate=-0.1): train.learning_rate: expected a positive number, got -0.1"),
    ((), ["data.validation_split=0.2,0.9"], None,
     "sweep trial 1 (data.validation_split=0.9): data.validation_split: validation_split + test_split must leave "
     "training data"),
    ((), ["model.params.units=8,16"], None, "sweep trial 0 (model.params.units=8): model.params.units: unknown "
                                             "parameter of model cnn"),
    ((), ["train.optimizer=adam,adamw"], None, "sweep trial 1 (train.optimizer=adamw): train.optimizer: expected "
                                               "one of adam, sgd, rmsprop"),
    ((), ["train.learning_rate=0.1"], 3, "--trials: the sweep draws nothing at random"),
    ((), None, None, "sweep: no trials: give sweep.grid or sweep.random.distributions"),
    (("sweep.metric=val_auc",), ["train.learning_rate=0.1"], None,
     "sweep.metric: no run logs 'val_auc': an epoch logs loss, accuracy and, with a validation split, val_loss"),
    (("data.validation_split=0",), ["train.learning_rate=0.1"], None,
     "sweep.metric (default: checkpoint.monitor): val_accuracy needs a validation split, and the job has none"),
    (("sweep.metric=loss",), ["train.metrics=[accuracy],[]"], None, None),
    (("sweep.metric=accuracy",), ["train.metrics=[accuracy],[]"], None,
     "sweep trial 1 (train.metrics=[]): sweep.metric: no run logs 'accuracy'"),
])
def test_planning_refuses_bad_input_with_one_line(overrides, grid, trials_, expected):
    if expected is None:
        assert len(plan(QUICKSTART, overrides, grid=grid, trials=trials_).trials) == 2
        return
    with pytest.raises(UsageError) as err:
        plan(QUICKSTART, overrides, grid=grid, trials=trials_)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    if expected.startswith("sweep"):  # the job's sweep, not a flag: the job file first
        assert message.startswith(f"{QUICKSTART}: "), message


def test_metric_names_of_the_users_metrics(tmp_path):
    (tmp_path / "metrics.py").write_text(
        "import tensorflow as tf\n"
        "def top_two(y_true, y_pred):\n"
        "    return tf.keras.metrics.sparse_top_k_categorical_accuracy(y_true, y_pred, k=2)\n"
        "class MeanIoUish(tf.keras.metrics.Metric):\n"
        "    pass\n"
        "class Total(tf.keras.metrics.Mean):\n"
        "    pass\n"
        "class Named(tf.keras.metrics.Mean):\n"
        "    def __init__(self, name='hits', **kwargs):\n"
        "        super().__init__(name=name, **kwargs)\n")
    job = tmp_path / "job.yaml"
    job.write_text("train: {metrics: [accuracy, metrics.py:top_two, metrics.py:MeanIoUish, metrics.py:Total, "
                   "metrics.py:Named]}\n"
                   "sweep: {metric: val_hits, grid: {train.learning_rate: [0.01]}}\n")
    from tf_keras.src.utils.generic_utils import to_snake_case

    from distrain.sweeps.plan import _snake_case, logged_metrics

    # Keras's names: a function's, a class's snake case, its constructor's default name (Mean's "mean").
    assert logged_metrics(load_spec(job)) == ["loss", "accuracy", "top_two", to_snake_case("MeanIoUish"), "mean",
                                              "hits"]
    assert [_snake_case(n) for n in ("MeanIoUish", "TopK", "_Private", "AUC")] == [
        to_snake_case(n) for n in ("MeanIoUish", "TopK", "_Private", "AUC")]
    assert plan(job).metric == "val_hits"


# ----------------------------------------------------------------------------- comparing

@dataclass
class Record:
    index: int
    result: float | None
    overrides: dict
    state: str = "finished"
    exit_code: int | None = None

    @property
    def name(self):
        return f"trial-{self.index:03d}"


def test_ranking_is_mode_aware_and_trials_without_a_result_come_last():
    records = [Record(0, 0.5, {}), Record(1, None, {}, "failed", EXIT_NAN), Record(2, 0.9, {}), Record(3, 0.5, {}),
               Record(4, 0.1, {})]
    assert [r.index for r in compare.ranked(records, "max")] == [2, 0, 3, 4, 1]
    assert [r.index for r in compare.ranked(records, "min")] == [4, 0, 3, 2, 1]
    rows = compare.table_rows(records, ["train.learning_rate"], "val_loss", "min",
                              {4: {"epochs_completed": 2, "test": {"loss": 1.25}, "wall_time_s": 61}})
    assert rows[0] == {"rank": "1", "trial": "trial-004", "train.learning_rate": "null", "val_loss (min)": "0.1000",
                       "state": "finished", "epochs": "2", "test loss": "1.2500", "wall time": "1m01s"}
    assert rows[-1]["rank"] == "-" and rows[-1]["state"] == "failed (NaN loss)"


def test_metric_mode_result_and_hparams():
    spec = load_spec(QUICKSTART, ["checkpoint.monitor=val_loss"])
    assert compare.metric_and_mode(spec) == ("val_loss", "min")
    assert compare.metric_and_mode(load_spec(QUICKSTART, ["checkpoint.mode=min"])) == ("val_accuracy", "min")
    assert compare.metric_and_mode(load_spec(QUICKSTART, ["sweep.metric=loss", "sweep.mode=max"])) == ("loss", "max")
    assert compare.result({"history": {"val_loss": [2.0, 1.5]}}, "val_loss") == 1.5
    assert compare.result({"history": {"val_loss": [2.0, float("nan")]}}, "val_loss") is None
    assert compare.result({"history": {}}, "val_loss") is None
    spec = plan(QUICKSTART, grid=["train.learning_rate=0.01", "train.schedule.boundaries=[3,7]"]).trials[0].spec
    # The run's resolved values (boundaries are floats in the job), one line of YAML when not a scalar.
    assert compare.swept_hparams(spec) == {"train.learning_rate": 0.01, "train.schedule.boundaries": "[3.0, 7.0]"}
    assert compare.axis([0.001, 0.01]) == "log" and compare.axis([4, 8]) == "linear"


# ----------------------------------------------------------------------------- sweep.yaml

def test_a_rerun_must_be_the_same_sweep_and_may_add_trials(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(QUICKSTART.read_text() + "sweep:\n  random: {trials: 2, seed: 1, distributions: "
                                            "{train.learning_rate: {log_uniform: [1.0e-4, 1.0e-2]}}}\n")
    sweep_dir = tmp_path / "sweep"
    two = plan(job, BASE)
    state = sweep_state.open_sweep(sweep_dir, two)
    assert [t.state for t in state.trials] == ["pending", "pending"]
    state.update(0, sweep_state.FINISHED, result=0.5)
    # The same sweep again: its states kept. More draws of it: the first two kept, two added.
    assert sweep_state.open_sweep(sweep_dir, plan(job, BASE)).trials[0].result == 0.5
    four = sweep_state.open_sweep(sweep_dir, plan(job, BASE, trials=4))
    assert [t.state for t in four.trials] == ["finished", "pending", "pending", "pending"]
    assert sweep_state.load(sweep_dir).trials == four.trials
    refused = {
        "another seed": (plan(job, [*BASE, "sweep.random.seed=2"], trials=4), "its trial 0 is train.learning_rate="),
        "another job": (plan(job, [*BASE, "train.epochs=3"], trials=4), "trial 0 ran another job"),
        "fewer trials": (two, "it has 4 trials, this sweep 2"),
        "another metric": (plan(job, [*BASE, "sweep.metric=loss"], trials=4),
                           "it compares on val_accuracy (max), this sweep on loss (min)"),
    }
    for case, (other, why) in refused.items():
        with pytest.raises(UsageError) as err:
            sweep_state.open_sweep(sweep_dir, other)
        assert why in str(err.value) and "give a new --run-dir" in str(err.value), case
    assert sweep_state.load(sweep_dir).trials == four.trials  # nothing changed by a refused sweep
    # A trial's job.yaml names the key that changed.
    ran = sweep_state.trial_dir(sweep_dir, 0) / RunDir.JOB
    ran.parent.mkdir()
    ran.write_text(yaml.safe_dump(spec_to_dict(two.trials[0].spec)))
    assert sweep_state.changed_key(ran, plan(job, [*BASE, "train.epochs=3"]).trials[0].spec) == "train.epochs: 2 → 3"
    assert sweep_state.changed_key(ran, plan(job, BASE, trials=4).trials[0].spec) is None


def test_an_unreadable_sweep_yaml_is_one_line(tmp_path):
    (tmp_path / sweep_state.SWEEP_FILE).write_text("trials: [{index: 1, state: done}]\n")
    with pytest.raises(UsageError, match="sweep.yaml: not a sweep's sweep.yaml .*restore it, or run the sweep in a new"):
        sweep_state.load(tmp_path)
    with pytest.raises(UsageError, match="not a sweep dir"):
        sweep_state.load(tmp_path / "missing")


def test_a_nan_loss_is_a_result_not_retried():
    record = sweep_state.TrialRecord(0, {}, "x", state=sweep_state.FAILED, exit_code=EXIT_NAN)
    assert not record.to_run
    assert sweep_state.TrialRecord(0, {}, "x", state=sweep_state.FAILED, exit_code=1).to_run
    assert sweep_state.TrialRecord(0, {}, "x", state=sweep_state.STOPPED).to_run
    assert sweep_state.TrialRecord(0, {}, "x", state=sweep_state.RUNNING).to_run
    assert not sweep_state.TrialRecord(0, {}, "x", state=sweep_state.FINISHED).to_run


# ----------------------------------------------------------------------------- the command's bad input

@pytest.mark.parametrize("case", ["not a job key", "empty list", "a trial's value", "a later trial's value",
                                  "bad bounds", "no run logs the metric", "no validation split", "devices differ",
                                  "a run dir", "another sweep"])
def test_distrain_sweep_bad_input_exits_2_with_one_line_before_anything_starts(case, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    job = tmp_path / "job.yaml"
    job.write_text(QUICKSTART.read_text())
    args = {
        "not a job key": ["--grid", "train.learnin_rate=0.1,0.2"],
        "empty list": ["--grid", "train.learning_rate=0.1", "--set", "sweep.grid={train.l2: []}"],
        "a trial's value": ["--grid", "train.learning_rate=-0.1,0.1"],
        "a later trial's value": ["--grid", "data.augment.zoom=0.1,1.0", "--grid", "train.epochs=1,2"],
        "bad bounds": ["--set", "sweep.random={trials: 2, distributions: {train.l2: {log_uniform: [0, 1]}}}"],
        "no run logs the metric": ["--grid", "train.learning_rate=0.1", "--set", "sweep.metric=val_top_k"],
        "no validation split": ["--grid", "train.learning_rate=0.1", "--set", "data.validation_split=0"],
        "devices differ": ["--grid", "distribute.cpu_devices=1,2"],
        "a run dir": ["--grid", "train.learning_rate=0.1"],
        "another sweep": ["--grid", "train.learning_rate=0.1"],
    }[case]
    expected = {
        "not a job key": "--grid train.learnin_rate: not a job key",
        "empty list": "--set sweep.grid.train.l2: expected a non-empty list of values, got []",
        "a trial's value": "sweep trial 0 (train.learning_rate=-0.1): train.learning_rate: expected a positive number",
        "a later trial's value": "sweep trial 2 (data.augment.zoom=1.0 train.epochs=1): data.augment.zoom: expected a "
                                 "number >= 0 and < 1, got 1.0",
        "bad bounds": "sweep.random.distributions.train.l2.log_uniform: expected 0 < low < high",
        "no run logs the metric": "sweep.metric: no run logs 'val_top_k'",
        "no validation split": "val_accuracy needs a validation split",
        "devices differ": "distribute.cpu_devices: differs between the trials (1, 2), but distrain sweep runs them in "
                          "one process",
        "a run dir": f"--run-dir: {sweep_dir} holds a run, not a sweep",
        "another sweep": "another sweep ran here (its trial 0 is train.learning_rate=0.2, this sweep's "
                         "train.learning_rate=0.1)",
    }[case]
    if case == "a run dir":
        (sweep_dir / RunDir.LOGS).mkdir(parents=True)
        (sweep_dir / RunDir.JOB).write_text("name: x\n")
    if case == "another sweep":
        sweep_state.open_sweep(sweep_dir, plan(job, grid=["train.learning_rate=0.2"]))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(["sweep", str(job), "--run-dir", str(sweep_dir), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("distrain: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_a_sweep_runs_in_one_process_not_under_a_launcher_of_several():
    from distrain.sweeps.local import check_one_process
    from distrain.world import detect

    planned = plan(QUICKSTART, grid=["train.learning_rate=0.1,0.2"])
    with pytest.raises(UsageError, match="runs its trials in one process, but this is one of 2 workers"):
        check_one_process(planned, detect({"TF_CONFIG": tf_config([23456, 23457], 0)}))
    assert check_one_process(planned, detect({})).world_size == 1


def test_validate_lists_the_trials_of_a_sweep(capsys):
    assert main(["validate", str(QUICKSTART), "--grid", "train.learning_rate=1e-3,3e-3", "--set",
                 "sweep.random={trials: 2, seed: 5, distributions: {train.l2: {uniform: [0, 1.0e-4]}}}"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("#")]
    assert listed[0] == "# sweep: 4 trial(s), grid of 2 x 2 random draw(s) (seed 5), compared on val_accuracy (max)"
    assert [line.split()[1] for line in listed[1:]] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert listed[1].startswith("#   trial-000  train.learning_rate=0.001 train.l2=")
    assert yaml.safe_load(out)["sweep"]["grid"] == {"train.learning_rate": [0.001, 0.003]}  # still the job's YAML
    assert main(["validate", str(QUICKSTART), "--quiet"]) == 0 and capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- a real sweep, on this machine

# 4 trials of the quickstart job, tiny: 3 steps per epoch; trials 2 and 3 train 10 epochs, so that
# trial 2 is still training when its first backup appears and the test stops it.
SETS = ["train.steps_per_epoch=3", "model.params.filters=4", "logging.verbose=0", "checkpoint.every_epochs=0",
        "checkpoint.backup_every_steps=2", "distribute.preemption_check_every=1"]
GRID = ["train.epochs=2,10", "train.learning_rate=0.002,0.02"]
EXPECTED_OVERRIDES = [{"train.epochs": e, "train.learning_rate": lr} for e in (2, 10) for lr in (0.002, 0.02)]


def _args(sweep_dir: Path) -> list[str]:
    return ["sweep", str(QUICKSTART), "--run-dir", str(sweep_dir), *(a for s in SETS for a in ("--set", s)),
            *(a for g in GRID for a in ("--grid", g))]


@dataclass
class SweepRuns:
    sweep_dir: Path
    first: tuple  # (exit code, output, sweep.yaml) of the run stopped in trial 2
    stopped_at: int  # trial 2's backup step when it was stopped
    second: subprocess.CompletedProcess  # the run that resumed it and finished
    third: subprocess.CompletedProcess  # the same sweep once more
    before_third: dict
    after_third: dict


def _snapshot(sweep_dir: Path) -> dict:
    """Every file of the sweep dir (sweep.yaml, every trial's): its size and modification time."""
    return {str(p.relative_to(sweep_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(sweep_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SweepRuns:
    sweep_dir = tmp_path_factory.mktemp("sweep") / "lr"
    log = sweep_dir.parent / "first.log"
    # Forked (conftest.Forked): three runs of the sweep, none of whose points is a process's start-up.
    proc = Forked(_args(sweep_dir), log)
    try:
        trial2 = RunDir(sweep_dir / "trial-002")
        deadline = time.monotonic() + 240
        while not trial2.committed_backups():
            assert proc.poll() is None, "the sweep ended before trial 2 had a backup:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "trial 2 wrote no backup in time:\n" + log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)  # a preemption notice, as SLURM's --signal=USR1@90 sends it
        code = proc.wait(timeout=120).returncode
    finally:
        proc.kill()
    first = (code, log.read_text(), sweep_state.load(sweep_dir))
    stopped_at = trial2.backup_step()
    second = run_distrain(_args(sweep_dir), timeout=300, forked=True)
    before = _snapshot(sweep_dir)
    third = run_distrain(_args(sweep_dir), timeout=120, forked=True)
    return SweepRuns(sweep_dir, first, stopped_at, second, third, before, _snapshot(sweep_dir))


@pytest.mark.timeout(600)
def test_a_stopped_trial_resumes_and_the_sweep_completes(runs):
    code, output, first = runs.first
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert [t.state for t in first.trials] == ["finished", "finished", "stopped", "pending"], output[-3000:]
    assert first.trials[2].exit_code == EXIT_PREEMPTED and "preempted (SIGUSR1)" in first.trials[2].error
    assert 0 < runs.stopped_at < 30
    assert runs.second.returncode == 0, runs.second.stderr[-3000:]
    done = sweep_state.load(runs.sweep_dir)
    assert [t.overrides for t in done.trials] == EXPECTED_OVERRIDES
    assert [t.state for t in done.trials] == ["finished"] * 4 and all(t.result is not None for t in done.trials)
    assert "4 trial(s): 2 finished, 1 stopped, 1 pending; 2 to run" in runs.second.stderr
    for trial, steps in zip(done.trials, (6, 6, 30, 30)):
        summary = json.loads((done.trial_dir(trial.index) / RunDir.SUMMARY).read_text())
        assert summary["steps"] == steps
        assert trial.result == compare.result(summary, "val_accuracy") == summary["history"]["val_accuracy"][-1]
    # Trial 2 went on from its backup, in a second segment of the same run dir.
    resumed = json.loads((done.trial_dir(2) / RunDir.SUMMARY).read_text())
    assert resumed["resumed_from_step"] == runs.stopped_at
    assert [s["start_step"] for s in resumed["segments"]] == [0, runs.stopped_at]


@pytest.mark.timeout(600)
def test_running_the_sweep_again_trains_nothing(runs):
    assert runs.third.returncode == 0, runs.third.stderr[-3000:]
    assert "4 trial(s): 4 finished; 0 to run" in runs.third.stderr
    assert runs.after_third == runs.before_third  # no file written again, none added, sweep.yaml included
    assert "sweep.yaml" in runs.before_third and "trial-003/summary.json" in runs.before_third
    for index in range(4):
        segments = json.loads((runs.sweep_dir / f"trial-{index:03d}" / RunDir.SEGMENTS).read_text())
        assert len(segments) == (2 if index == 2 else 1)


@pytest.mark.timeout(600)
def test_the_report_ranks_the_trials(runs, capsys):
    out = runs.sweep_dir / "report"
    assert main(["report", str(runs.sweep_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "trial", "train.epochs", "train.learning_rate", "val_accuracy", "(max)",
                                "state", "epochs", "test", "loss", "wall", "time"]
    done = sweep_state.load(runs.sweep_dir)
    best_first = sorted(done.trials, key=lambda t: (-t.result, t.index))
    rows = [line.split() for line in table[1:5]]
    assert [r[1] for r in rows] == [t.name for t in best_first]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert [float(r[4]) for r in rows] == [pytest.approx(t.result, abs=5e-5) for t in best_first]
    assert [(int(r[2]), float(r[3])) for r in rows] == [
        (t.overrides["train.epochs"], t.overrides["train.learning_rate"]) for t in best_first]
    for name in ("sweep.png", "accuracy_loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert all(f"| {t.name} |" in markdown for t in done.trials) and "](sweep.png)" in markdown


@pytest.mark.timeout(600)
def test_trial_3_is_distrain_train_with_its_overrides_bit_for_bit(runs, tmp_path):
    trial = sweep_state.load(runs.sweep_dir).trials[3]
    plain = tmp_path / "plain"
    done = run_distrain(["train", str(QUICKSTART), "--run-dir", str(plain),
                         *(a for s in [*SETS, *trial.sets] for a in ("--set", s))], timeout=300,
                        forked=True)
    assert done.returncode == 0, done.stderr[-3000:]
    swept = json.loads((runs.sweep_dir / trial.name / RunDir.SUMMARY).read_text())
    alone = json.loads((plain / RunDir.SUMMARY).read_text())
    assert swept["test"]["loss"] == alone["test"]["loss"] and swept["test"] == alone["test"]
    assert swept["history"]["loss"] == alone["history"]["loss"] and swept["steps"] == alone["steps"] == 30


def _post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.timeout(600)
def test_tensorboard_hparams_dashboard_lists_every_trial(runs, tmp_path):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import metadata

    from distrain.report import read_records

    # The sweep's own config, read from its event file without TensorFlow: the swept keys, its metric first.
    (events,) = (runs.sweep_dir / RunDir.TENSORBOARD).glob("events.out.tfevents.*")
    values = [v for r in read_records(events) for v in event_pb2.Event.FromString(r).summary.value]
    (config,) = [v for v in values if v.tag == metadata.EXPERIMENT_TAG]
    experiment = metadata.parse_experiment_plugin_data(config.metadata.plugin_data.content)
    assert {"train.epochs", "train.learning_rate", "model", "peak_lr"} <= {h.name for h in experiment.hparam_infos}
    assert (experiment.metric_infos[0].name.group, experiment.metric_infos[0].name.tag) == ("validation",
                                                                                              "epoch_accuracy")

    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}/data/plugin/hparams"
    with open(tmp_path / "tensorboard.log", "w") as out:
        server = subprocess.Popen([*DISTRAIN, "tensorboard", str(runs.sweep_dir), "--port", str(port)], stdout=out,
                                  stderr=subprocess.STDOUT, env=worker_env(), cwd=REPO, start_new_session=True)
    query = {"experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
             "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]}
    try:
        deadline, groups = time.monotonic() + 90, []
        while len(groups) < 4:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "tensorboard.log").read_text()
            try:
                groups = _post(f"{base}/session_groups", query).get("sessionGroups", [])
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(0.5)
        served = _post(f"{base}/experiment", {"experimentName": ""})
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert {"train.epochs", "train.learning_rate"} <= {h["name"] for h in served["hparamInfos"]}
    assert served["metricInfos"][0]["description"] == "the sweep's metric: val_accuracy, max is best"
    done = sweep_state.load(runs.sweep_dir)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {f"quickstart/{t.name}" for t in done.trials}
    for trial in done.trials:
        group = by_name[f"quickstart/{trial.name}"]
        assert {k: group["hparams"][k] for k in trial.overrides} == pytest.approx(trial.overrides)
        (value,) = [m["value"] for m in group["metricValues"]
                    if (m["name"]["group"], m["name"]["tag"]) == ("validation", "epoch_accuracy")]
        assert value == pytest.approx(trial.result, rel=1e-6)


# ----------------------------------------------------------------------------- the Python API

def notebook_model(input_shape, num_classes, units=8):
    import tensorflow as tf

    inputs = tf.keras.Input(shape=input_shape)
    x = tf.keras.layers.Dense(units, activation="relu")(tf.keras.layers.Flatten()(inputs))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes, activation="softmax")(x))


@pytest.mark.timeout(300)
def test_the_python_api_sweeps_a_notebooks_model_and_returns_the_best(tmp_path):
    import distrain

    job = {"name": "api", "train": {"epochs": 1, "steps_per_epoch": 2},
           "checkpoint": {"every_epochs": 0, "save_best": False, "backup_every_steps": 0},
           "logging": {"tensorboard": False, "verbose": 0}}
    out = distrain.sweep(job, model=notebook_model, run_dir=tmp_path / "api", grid={"model.params.units": [4, 8]},
                         overrides=["sweep.metric=val_loss"])
    assert (out["metric"], out["mode"]) == ("val_loss", "min")
    assert [t["state"] for t in out["trials"]] == ["finished", "finished"]
    assert out["best"] == min(out["trials"], key=lambda t: t["result"])
    assert [t["overrides"] for t in out["trials"]] == [{"model.params.units": 4}, {"model.params.units": 8}]
    assert all(Path(t["run_dir"], RunDir.SUMMARY).is_file() for t in out["trials"])
    again = distrain.sweep(job, model=notebook_model, run_dir=tmp_path / "api", grid={"model.params.units": [4, 8]},
                           overrides=["sweep.metric=val_loss"])
    assert again["trials"] == out["trials"]
    with pytest.raises(UsageError, match="distrain.sweep: grid: expected a dict"):
        distrain.sweep(job, run_dir=tmp_path / "x", grid=["model.params.units=4"])


# ----------------------------------------------------------------------------- trials a launcher trains

def test_how_a_launched_trial_ended_is_recorded_from_its_exit_code():
    summary = {"history": {"val_accuracy": [0.5, 0.75]}}
    assert launched.outcome(0, summary, "val_accuracy") == ("finished", 0.75, None)
    assert launched.outcome(0, None, "val_accuracy")[0] == "failed"
    for code in (74, 75, 76):
        state, value, error = launched.outcome(code, None, "val_accuracy")
        assert state == "stopped" and value is None and "resumes from its backup" in error
    assert launched.outcome(EXIT_NAN, None, "val_accuracy")[:2] == ("failed", None)
    assert launched.outcome(2, None, "loss")[2].startswith("bad input") and launched.outcome(1, None, "loss")[0] == "failed"


def test_a_launched_trial_is_begun_and_ended_in_the_sweep_yaml(tmp_path):
    sweep = plan(QUICKSTART, BASE, grid=["train.learning_rate=0.01,0.02,0.03"])
    root = tmp_path / "sweep"
    with pytest.raises(UsageError, match=r"^--trial 3: the sweep has 3 trial\(s\), 0 to 2$"):
        launched.begin(sweep, root, 3)
    assert not root.exists()  # refused before the sweep dir is made
    started = launched.begin(sweep, root, 1)
    assert started.done is None and started.run_dir == root / "trial-001" and started.record.state == "running"
    assert [t.state for t in sweep_state.load(root).trials] == ["pending", "running", "pending"]
    started.run_dir.mkdir()
    (started.run_dir / RunDir.SUMMARY).write_text(json.dumps({"history": {"val_accuracy": [0.25, 0.5]}}))
    assert launched.end(root, 1, 0).result == 0.5
    assert launched.end(root, 2, EXIT_PREEMPTED).state == "stopped"
    again = launched.begin(sweep, root, 1)
    assert again.done == "trial-001 finished already (val_accuracy 0.5000)" and again.record.state == "finished"
    assert launched.begin(sweep, root, 2).done is None  # a stopped trial is trained again (resumed)
    with pytest.raises(UsageError, match="another sweep ran here .* give a new --sweep"):
        launched.begin(plan(QUICKSTART, BASE, grid=["train.learning_rate=0.5"]), root, 0)


def _record_many(root: str, index: int, rounds: int) -> None:
    state = sweep_state.load(Path(root))
    for n in range(rounds):
        state.update(index, sweep_state.RUNNING if n % 2 else sweep_state.STOPPED, error=f"{index}:{n}")
    state.update(index, sweep_state.FINISHED, result=float(index))


def test_processes_recording_their_trials_at_once_lose_no_record(tmp_path):
    # The tasks of a job array record their own trials in one sweep.yaml; without the lock a task's
    # read-modify-write puts back another's older record.
    import multiprocessing

    sweep = plan(QUICKSTART, BASE, grid=["train.learning_rate=0.01,0.02,0.03,0.04"])
    sweep_state.open_sweep(tmp_path, sweep)
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_record_many, args=(str(tmp_path), i, 40)) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 4
    done = sweep_state.load(tmp_path)
    assert [(t.state, t.result) for t in done.trials] == [("finished", float(i)) for i in range(4)]
