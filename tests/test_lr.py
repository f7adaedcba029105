"""Learning-rate scaling, warmup and schedules: hand-computed values, and the Keras schedule agreeing.

Expected numbers are written out as literals, worked by hand from the formulas in ``distrain/lr.py``
(Goyal et al. 2017 linear scaling and gradual warmup), so a change of formula cannot pass by
changing the expectation with it.
"""
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

import distrain  # noqa: F401  (selects tf-keras before anything imports TensorFlow)
from distrain.lr import SCHEDULES, LRPlan, describe, lr_at, scale_lr
from distrain.spec import ScheduleSpec, TrainSpec

REPO = Path(__file__).resolve().parents[1]
PER_REPLICA = 32
SPE = 10  # steps per epoch in every plan below


def plan_for(workers, *, scaling="linear", epochs=10, warmup_epochs=0.0, warmup_steps=0, reference=None,
             lr=1e-3, **schedule):
    train = TrainSpec(epochs=epochs, learning_rate=lr, reference_batch=reference, lr_scaling=scaling,
                      warmup_epochs=warmup_epochs, warmup_steps=warmup_steps, schedule=ScheduleSpec(**schedule))
    return LRPlan.from_spec(train, global_batch=PER_REPLICA * workers, per_replica_batch=PER_REPLICA,
                            steps_per_epoch=SPE)


# --- scaling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, base, reference, global_batch, expected", [
    ("linear", 1e-3, 32, 32, 1e-3),
    ("linear", 1e-3, 32, 2048, 0.064),
    ("linear", 0.1, 256, 8192, 3.2),          # Goyal et al.: 0.1 per 256 images, 8k batch
    ("sqrt", 1e-3, 32, 2048, 0.008),          # sqrt(64) = 8
    ("sqrt", 1e-3, 32, 128, 0.002),           # sqrt(4) = 2
    ("sqrt", 1e-3, 32, 64, 0.0014142135623730951),
    ("none", 1e-3, 32, 2048, 1e-3),
    ("linear", 1e-3, 64, 32, 5e-4),           # a smaller batch than the reference scales down
])
def test_scale_lr(rule, base, reference, global_batch, expected):
    assert scale_lr(base, reference, global_batch, rule) == pytest.approx(expected, rel=1e-12)


def test_scale_lr_rejects_unknown_rule_and_bad_batch():
    with pytest.raises(ValueError, match="expected one of linear, sqrt, none, got 'cube'"):
        scale_lr(1e-3, 32, 64, "cube")
    with pytest.raises(ValueError, match="batch sizes must be positive"):
        scale_lr(1e-3, 0, 64, "linear")


# --- the plan from the spec --------------------------------------------------------------------

def test_from_spec_fields():
    plan = plan_for(64, warmup_epochs=5, name="step", boundaries=[6, 8], factors=[1, 0.1, 0.01])
    assert plan == LRPlan(base_lr=1e-3, peak_lr=0.064, steps_per_epoch=10, total_steps=100, warmup_steps=50,
                          schedule="step", boundaries=(6.0, 8.0), factors=(1.0, 0.1, 0.01), min_factor=0.0,
                          decay_rate=0.9, decay_epochs=1.0, scaling="linear", reference_batch=32,
                          global_batch=2048)


def test_from_spec_reference_batch_and_warmup_conversion():
    assert plan_for(4, reference=64).peak_lr == pytest.approx(2e-3)       # 1e-3 * 128 / 64
    assert plan_for(1, warmup_epochs=1.5).warmup_steps == 15
    assert plan_for(1, warmup_epochs=0.26).warmup_steps == 3               # round(2.6)
    assert plan_for(1, warmup_steps=7).warmup_steps == 7
    assert plan_for(1).warmup_steps == 0
    assert plan_for(3, epochs=4).total_steps == 40


def test_plan_validation():
    with pytest.raises(ValueError, match="expected 3 factors"):
        LRPlan(1e-3, 1e-3, 10, 100, schedule="step", boundaries=(3, 7), factors=(1, 0.1))
    with pytest.raises(ValueError, match="schedule: expected one of constant, step, cosine, exponential"):
        LRPlan(1e-3, 1e-3, 10, 100, schedule="linear")
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
        LRPlan(1e-3, 1e-3, 0, 100)
    with pytest.raises(ValueError, match="boundaries must increase"):
        LRPlan(1e-3, 1e-3, 10, 100, schedule="step", boundaries=(7, 3), factors=(1, 0.1, 0.01))


# --- linear scaling + warmup + step decay, per worker count -------------------------------------
# global batch = 32 x workers, reference 32, base 1e-3, 10 steps/epoch, 10 epochs (100 steps),
# warmup 5 epochs = 50 steps, step decay x0.1 from epoch 6 (step 60), x0.01 from epoch 8 (step 80).
# warmup value = 0.001 + (peak - 0.001) * step / 50.

WORKER_TABLE = {
    # workers: {step: lr}
    1: {0: 0.001, 10: 0.001, 25: 0.001, 49: 0.001, 50: 0.001, 59: 0.001,
        60: 0.0001, 79: 0.0001, 80: 0.00001, 99: 0.00001},
    2: {0: 0.001, 10: 0.0012, 25: 0.0015, 49: 0.00198, 50: 0.002, 59: 0.002,
        60: 0.0002, 79: 0.0002, 80: 0.00002, 99: 0.00002},
    8: {0: 0.001, 10: 0.0024, 25: 0.0045, 49: 0.00786, 50: 0.008, 59: 0.008,
        60: 0.0008, 79: 0.0008, 80: 0.00008, 99: 0.00008},
    64: {0: 0.001, 10: 0.0136, 25: 0.0325, 49: 0.06274, 50: 0.064, 59: 0.064,
         60: 0.0064, 79: 0.0064, 80: 0.00064, 99: 0.00064},
}


@pytest.mark.parametrize("workers", sorted(WORKER_TABLE))
def test_linear_scaling_warmup_and_step_decay(workers):
    plan = plan_for(workers, warmup_epochs=5, name="step", boundaries=[6, 8], factors=[1, 0.1, 0.01])
    assert plan.peak_lr == pytest.approx(0.001 * workers, rel=1e-12)
    got = {step: lr_at(plan, step) for step in WORKER_TABLE[workers]}
    assert got == pytest.approx(WORKER_TABLE[workers], rel=1e-12)


@pytest.mark.parametrize("workers, peak, mid_warmup", [
    (1, 0.001, 0.001),
    (4, 0.002, 0.0015),      # sqrt(4) = 2; 0.001 + 0.001 * 25/50
    (64, 0.008, 0.0045),     # sqrt(64) = 8; 0.001 + 0.007 * 25/50
])
def test_sqrt_scaling_with_warmup(workers, peak, mid_warmup):
    plan = plan_for(workers, scaling="sqrt", warmup_epochs=5)
    assert plan.peak_lr == pytest.approx(peak, rel=1e-12)
    assert lr_at(plan, 0) == pytest.approx(0.001, rel=1e-12)
    assert lr_at(plan, 25) == pytest.approx(mid_warmup, rel=1e-12)
    assert lr_at(plan, 50) == pytest.approx(peak, rel=1e-12)
    assert lr_at(plan, 99) == pytest.approx(peak, rel=1e-12)


def test_no_scaling_keeps_base_lr_and_warmup_is_flat():
    plan = plan_for(64, scaling="none", warmup_epochs=5)
    assert plan.peak_lr == 0.001
    assert [lr_at(plan, s) for s in (0, 25, 50, 99)] == pytest.approx([0.001] * 4, rel=1e-12)


def test_without_warmup_step_zero_is_already_peak():
    assert lr_at(plan_for(64), 0) == pytest.approx(0.064, rel=1e-12)


def test_negative_step_counts_as_zero():
    # The metrics callback asks for iterations - 1, which is -1 before the first step.
    plan = plan_for(64, warmup_epochs=5)
    assert lr_at(plan, -1) == lr_at(plan, 0) == pytest.approx(0.001)


# --- the course's step decay ---------------------------------------------------------------------

def course_decay(epoch):
    """The course's LearningRateScheduler function."""
    if epoch < 3:
        return 1e-3
    elif epoch < 7:
        return 1e-4
    else:
        return 1e-5


def test_course_step_decay():
    plan = plan_for(1, name="step")  # the spec's defaults: boundaries [3, 7], factors [1, 0.1, 0.01]
    assert (plan.boundaries, plan.factors) == ((3.0, 7.0), (1.0, 0.1, 0.01))
    # Constant within an epoch: first and last step of epochs 2, 3, 6, 7.
    assert [lr_at(plan, s) for s in (20, 29, 30, 39, 60, 69, 70, 79)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5], rel=1e-12)
    for step in range(plan.total_steps):
        assert lr_at(plan, step) == pytest.approx(course_decay(step // SPE), rel=1e-12)


def test_fractional_boundary_applies_from_the_next_whole_epoch():
    plan = plan_for(1, name="step", boundaries=[2.5], factors=[1, 0.5])
    assert [lr_at(plan, s) for s in (20, 29, 30)] == pytest.approx([1e-3, 1e-3, 5e-4], rel=1e-12)


# --- cosine and exponential ----------------------------------------------------------------------

def test_cosine_without_warmup():
    plan = plan_for(64, name="cosine")  # peak 0.064, 100 steps
    assert lr_at(plan, 0) == pytest.approx(0.064, rel=1e-12)
    assert lr_at(plan, 50) == pytest.approx(0.032, rel=1e-12)
    assert lr_at(plan, 25) == pytest.approx(0.064 * 0.5 * (1 + math.sqrt(0.5)), rel=1e-12)  # cos(pi/4)
    assert lr_at(plan, 100) == 0.0
    assert lr_at(plan, 150) == 0.0  # clipped after the end


def test_cosine_with_warmup_and_min_factor():
    # warmup 20 steps, cosine over the remaining 80: midpoint at step 60, end at step 100.
    plan = plan_for(64, warmup_epochs=2, name="cosine", min_factor=0.1)
    assert lr_at(plan, 0) == pytest.approx(0.001, rel=1e-12)
    assert lr_at(plan, 10) == pytest.approx(0.0325, rel=1e-12)  # 0.001 + 0.063 * 10/20
    assert lr_at(plan, 20) == pytest.approx(0.064, rel=1e-12)
    assert lr_at(plan, 60) == pytest.approx(0.0352, rel=1e-12)  # 0.064 * (0.1 + 0.9 * 0.5)
    assert lr_at(plan, 99) == pytest.approx(0.064 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 79 / 80))), rel=1e-12)
    assert lr_at(plan, 100) == pytest.approx(0.0064, rel=1e-12)


def test_exponential():
    # 1e-3 halved every 2 epochs (20 steps), after a 1-epoch warmup; 1 worker: base == peak.
    plan = plan_for(1, warmup_epochs=1, name="exponential", decay_rate=0.5, decay_epochs=2)
    assert [lr_at(plan, s) for s in (0, 5, 10, 20, 30, 50, 90)] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 1e-3 * math.sqrt(0.5), 5e-4, 2.5e-4, 6.25e-5], rel=1e-12)
    # 8 workers: warmup from 0.001 towards the schedule, which is still the peak 0.008 during warmup.
    plan = plan_for(8, warmup_epochs=1, name="exponential", decay_rate=0.5, decay_epochs=2)
    assert [lr_at(plan, s) for s in (5, 10, 30)] == pytest.approx([0.0045, 0.008, 0.004], rel=1e-12)


# --- warmup as long as (or longer than) the run -------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("warmup", [100, 150])
def test_warmup_covering_the_whole_run(name, warmup):
    plan = plan_for(64, warmup_steps=warmup, name=name, boundaries=[], factors=[1])
    values = [lr_at(plan, s) for s in range(plan.total_steps + 1)]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert values[0] == pytest.approx(0.001, rel=1e-12)
    # Halfway through a 100-step warmup: 0.001 + 0.063 / 2; the schedule is at its peak until it starts.
    if warmup == 100:
        assert values[50] == pytest.approx(0.0325, rel=1e-12)
        assert values[100] == pytest.approx(0.064, rel=1e-12)
    else:
        assert values[75] == pytest.approx(0.0325, rel=1e-12)


# --- the log line --------------------------------------------------------------------------------

def test_describe():
    plan = plan_for(64, warmup_epochs=5, name="step", boundaries=[6, 8], factors=[1, 0.1, 0.01])
    assert describe(plan) == ("lr: base 0.001 for batch 32, peak 0.064 for batch 2048 (linear scaling); "
                              "warmup 50 steps (5 epochs) from 0.001; "
                              "schedule step x1, x0.1 from epoch 6, x0.01 from epoch 8; 100 steps")
    assert "no warmup; schedule cosine to x0.1" in describe(plan_for(2, name="cosine", min_factor=0.1))
    assert "schedule exponential x0.5 every 2 epochs" in describe(
        plan_for(2, name="exponential", decay_rate=0.5, decay_epochs=2))
    assert "(sqrt scaling)" in describe(plan_for(2, scaling="sqrt"))


# --- TensorFlow stays out until the Keras schedule is wanted ------------------------------------

def test_import_does_not_import_tensorflow():
    code = ("import sys, distrain.lr as lr; "
            "lr.lr_at(lr.LRPlan(1e-3, 1e-3, 10, 100), 5); lr.describe(lr.LRPlan(1e-3, 1e-3, 10, 100)); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- the Keras schedule --------------------------------------------------------------------------

KERAS_PLANS = {
    "constant": dict(workers=64, warmup_epochs=5),
    "step": dict(workers=8, warmup_epochs=2, name="step"),
    "cosine": dict(workers=64, warmup_epochs=1.5, name="cosine", min_factor=0.05),
    "exponential": dict(workers=2, scaling="sqrt", warmup_epochs=1, name="exponential",
                        decay_rate=0.7, decay_epochs=1.5),
}


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


@pytest.mark.parametrize("name", SCHEDULES)
def test_keras_schedule_equals_lr_at(tf, name):
    from distrain.lr import ScheduledLR, keras_schedule

    options = dict(KERAS_PLANS[name])
    plan = plan_for(options.pop("workers"), **options)
    assert plan.schedule == name
    schedule = keras_schedule(plan)
    assert isinstance(schedule, ScheduledLR)
    assert isinstance(schedule, tf.keras.optimizers.schedules.LearningRateSchedule)
    rng = random.Random(name)
    steps = [0, plan.warmup_steps - 1, plan.warmup_steps, plan.total_steps - 1, plan.total_steps]
    steps += [rng.randrange(0, plan.total_steps + 20) for _ in range(200)]
    for step in steps:
        got = schedule(tf.constant(step))
        assert got.dtype == tf.float32
        assert float(got) == pytest.approx(lr_at(plan, step), rel=1e-7, abs=0), step


def test_keras_schedule_as_the_optimizer_sees_it(tf):
    """optimizer.iterations is an int64 variable and the update runs in a tf.function."""
    from distrain.lr import keras_schedule

    plan = plan_for(64, warmup_epochs=5, name="step", boundaries=[6, 8], factors=[1, 0.1, 0.01])
    schedule = keras_schedule(plan)
    iterations = tf.Variable(0, dtype=tf.int64)
    traced = tf.function(lambda: schedule(iterations))
    for step, expected in WORKER_TABLE[64].items():
        iterations.assign(step)
        assert float(traced()) == pytest.approx(expected, rel=1e-7)
    assert float(schedule(tf.constant(-1, tf.int64))) == pytest.approx(0.001, rel=1e-7)


def test_keras_schedule_config_round_trip(tf):
    from distrain.lr import ScheduledLR, keras_schedule

    plan = plan_for(8, warmup_epochs=2, name="step", boundaries=[3, 7], factors=[1, 0.1, 0.01])
    schedule = keras_schedule(plan)
    config = schedule.get_config()
    assert config["boundaries"] == [3.0, 7.0] and config["warmup_steps"] == 20
    again = ScheduledLR.from_config(config)
    assert again.plan == plan and again.get_config() == config
    serialized = tf.keras.optimizers.schedules.serialize(schedule)
    again = tf.keras.optimizers.schedules.deserialize(serialized, custom_objects={"ScheduledLR": ScheduledLR})
    assert isinstance(again, ScheduledLR) and again.plan == plan
    assert float(again(tf.constant(35))) == pytest.approx(lr_at(plan, 35), rel=1e-7)


def test_model_saved_with_schedule_reloads(tf, tmp_path):
    from distrain.lr import ScheduledLR, keras_schedule

    plan = plan_for(64, warmup_epochs=5, name="cosine", min_factor=0.1)
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    model.compile(optimizer=tf.keras.optimizers.SGD(keras_schedule(plan)), loss="mse")
    x = tf.zeros((4, 3))
    model.fit(x, tf.zeros((4, 2)), batch_size=2, epochs=1, verbose=0)  # two optimizer steps: 0 and 1
    # tf-keras keeps the LR of the last applied step in optimizer.learning_rate.
    assert float(model.optimizer.learning_rate) == pytest.approx(lr_at(plan, 1), rel=1e-7)
    path = tmp_path / "model.keras"
    model.save(str(path))
    loaded = tf.keras.models.load_model(str(path), custom_objects={"ScheduledLR": ScheduledLR})
    # optimizer.learning_rate is the current value; the schedule itself is in the config.
    config = loaded.optimizer.get_config()["learning_rate"]
    assert config["class_name"] == "ScheduledLR" and LRPlan(**config["config"]) == plan
    assert int(loaded.optimizer.iterations) == 2
