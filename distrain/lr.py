"""Learning-rate scaling, warmup and schedules, computed identically on every worker.

Data-parallel training multiplies the global batch by the number of replicas, so the learning rate
given in the job spec (``train.learning_rate``, meant for ``train.reference_batch``) is scaled to
the global batch, reached by a gradual warmup, then follows a schedule. Everything is decided once,
in an ``LRPlan``; ``lr_at(plan, step)`` is the definition in plain Python, and the Keras schedule
built by ``keras_schedule(plan)`` computes the same numbers with TensorFlow ops.

Importing this module does not import TensorFlow: the job is checked, and the plan logged, before
any worker pays for it. ``ScheduledLR`` (the Keras class) is created on first use.

Example:
    >>> plan = LRPlan(base_lr=1e-3, peak_lr=0.064, steps_per_epoch=10, total_steps=100,
    ...               warmup_steps=50)
    >>> round(lr_at(plan, 25), 6)
    0.0325
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

SCALING_RULES = ("linear", "sqrt", "none")
SCHEDULES = ("constant", "step", "cosine", "exponential")


def scale_lr(base_lr: float, reference_batch: int, global_batch: int, rule: str) -> float:
    """Scales a learning rate given for one batch size to another.

    Args:
        base_lr: The learning rate that works for ``reference_batch``.
        reference_batch: The global batch ``base_lr`` was tuned for.
        global_batch: The global batch actually trained with (per-replica batch x replicas).
        rule: ``linear``: ``base * global / reference`` (Goyal et al. 2017, "Accurate, Large
            Minibatch SGD", for SGD); ``sqrt``: ``base * sqrt(global / reference)`` (Krizhevsky
            2014, Hoffer et al. 2017; often better for Adam-like optimizers); ``none``: ``base``.

    Returns:
        The scaled learning rate.

    Raises:
        ValueError: an unknown rule or a batch size below 1.

    Example:
        >>> scale_lr(0.1, 256, 8192, "linear")
        3.2
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"lr scaling rule: expected one of {', '.join(SCALING_RULES)}, got {rule!r}")
    if reference_batch < 1 or global_batch < 1:
        raise ValueError(f"batch sizes must be positive, got reference {reference_batch}, global {global_batch}")
    ratio = global_batch / reference_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return float(base_lr)


@dataclass(frozen=True)
class LRPlan:
    """Everything that decides the learning rate of every step; the same on every worker.

    Attributes:
        base_lr: The unscaled learning rate of the spec; warmup starts here.
        peak_lr: ``base_lr`` scaled to the global batch; warmup ends here, the schedule starts here.
        steps_per_epoch: Optimizer steps per epoch (epochs in the schedule are counted in these).
        total_steps: Optimizer steps of the whole run (``epochs * steps_per_epoch``).
        warmup_steps: Steps of linear warmup from ``base_lr`` to the schedule; 0 for none.
        schedule: One of ``SCHEDULES``.
        boundaries: step: epochs at which the factor changes, increasing.
        factors: step: multipliers of ``peak_lr``, one more than ``boundaries``.
        min_factor: cosine: the final LR as a fraction of ``peak_lr``.
        decay_rate: exponential: the factor applied every ``decay_epochs``.
        decay_epochs: exponential: epochs over which the LR is multiplied by ``decay_rate``.
        scaling: The rule that turned ``base_lr`` into ``peak_lr`` (for the log line).
        reference_batch: The batch ``base_lr`` is given for (for the log line).
        global_batch: The global batch trained with (for the log line).
    """

    base_lr: float
    peak_lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "constant"
    # Defaults are the neutral values (a step schedule without boundaries is constant), not the
    # spec's defaults: a plan built by hand should say what it means.
    boundaries: tuple[float, ...] = ()
    factors: tuple[float, ...] = (1.0,)
    min_factor: float = 0.0
    decay_rate: float = 0.9
    decay_epochs: float = 1.0
    scaling: str = "none"
    reference_batch: Optional[int] = None
    global_batch: Optional[int] = None

    def __post_init__(self):
        # Normalise here so that a plan read back from a Keras config (JSON lists) compares equal
        # to the one it was saved from. object.__setattr__ because the dataclass is frozen.
        set_ = functools.partial(object.__setattr__, self)
        for name in ("base_lr", "peak_lr", "min_factor", "decay_rate", "decay_epochs"):
            set_(name, float(getattr(self, name)))
        for name in ("steps_per_epoch", "total_steps", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"LRPlan.{name}: expected an integer, got {value!r}")
            set_(name, value)
        set_("boundaries", tuple(float(b) for b in self.boundaries))
        set_("factors", tuple(float(f) for f in self.factors))
        problems = []
        if not self.base_lr > 0 or not self.peak_lr > 0:
            problems.append(f"learning rates must be positive, got base {self.base_lr}, peak {self.peak_lr}")
        if self.steps_per_epoch < 1:
            problems.append(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.total_steps < 0 or self.warmup_steps < 0:
            problems.append(f"step counts must be >= 0, got total {self.total_steps}, warmup {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.scaling not in SCALING_RULES:
            problems.append(f"scaling: expected one of {', '.join(SCALING_RULES)}, got {self.scaling!r}")
        if list(self.boundaries) != sorted(self.boundaries):
            problems.append(f"boundaries must increase, got {list(self.boundaries)}")
        if len(self.factors) != len(self.boundaries) + 1:
            problems.append(f"expected {len(self.boundaries) + 1} factors (one more than boundaries), "
                            f"got {len(self.factors)}")
        if not 0.0 <= self.min_factor <= 1.0:
            problems.append(f"min_factor must be in [0, 1], got {self.min_factor}")
        if not self.decay_rate > 0 or not self.decay_epochs > 0:
            problems.append(f"decay_rate and decay_epochs must be positive, got {self.decay_rate}, {self.decay_epochs}")
        if problems:
            raise ValueError("LRPlan: " + "; ".join(problems))

    @classmethod
    def from_spec(cls, train_spec: Any, *, global_batch: int, per_replica_batch: int,
                  steps_per_epoch: int) -> "LRPlan":
        """The plan of a job's ``train`` section.

        Args:
            train_spec: A ``distrain.spec.TrainSpec`` (already validated).
            global_batch: Per-replica batch x replicas, over all workers.
            per_replica_batch: ``data.batch_size_per_replica``; the reference batch when
                ``train.reference_batch`` is not set (so one replica trains at the spec's LR).
            steps_per_epoch: Optimizer steps per epoch, as training will run them.

        Returns:
            The plan. ``warmup_epochs`` becomes ``round(warmup_epochs * steps_per_epoch)`` steps
            (Python's ``round``: halves go to the even integer).
        """
        reference = train_spec.reference_batch or per_replica_batch
        if train_spec.warmup_steps:
            warmup = int(train_spec.warmup_steps)
        else:
            warmup = int(round(train_spec.warmup_epochs * steps_per_epoch))
        s = train_spec.schedule
        return cls(
            base_lr=train_spec.learning_rate,
            peak_lr=scale_lr(train_spec.learning_rate, reference, global_batch, train_spec.lr_scaling),
            steps_per_epoch=steps_per_epoch, total_steps=train_spec.epochs * steps_per_epoch,
            warmup_steps=warmup, schedule=s.name, boundaries=tuple(s.boundaries), factors=tuple(s.factors),
            min_factor=s.min_factor, decay_rate=s.decay_rate, decay_epochs=s.decay_epochs,
            scaling=train_spec.lr_scaling, reference_batch=reference, global_batch=global_batch)

    def to_config(self) -> dict:
        """The plan as JSON-ready data; ``LRPlan(**config)`` rebuilds an equal plan."""
        config = dataclasses.asdict(self)
        config["boundaries"] = list(self.boundaries)
        config["factors"] = list(self.factors)
        return config


def _schedule_value(plan: LRPlan, step: int) -> float:
    """The schedule alone (no warmup) at ``step``; ``ScheduledLR`` repeats these formulas op for op."""
    peak = plan.peak_lr
    if plan.schedule == "constant":
        return peak
    if plan.schedule == "step":
        # Constant within an epoch, like Keras' LearningRateScheduler(decay(epoch)).
        epoch = step // plan.steps_per_epoch
        return peak * plan.factors[bisect.bisect_right(plan.boundaries, epoch)]
    if plan.schedule == "cosine":
        t = step - plan.warmup_steps
        # At least one step, so warmup >= total (a cosine that never starts) divides by 1, not 0.
        span = max(plan.total_steps - plan.warmup_steps, 1)
        p = min(max(t / span, 0.0), 1.0)
        return peak * (plan.min_factor + (1.0 - plan.min_factor) * 0.5 * (1.0 + math.cos(math.pi * p)))
    # exponential (the plan has checked the name)
    t = max(step - plan.warmup_steps, 0)
    return peak * plan.decay_rate ** (t / (plan.decay_epochs * plan.steps_per_epoch))


def lr_at(plan: LRPlan, step: int) -> float:
    """The learning rate applied by the optimizer step ``step`` (when ``optimizer.iterations == step``).

    Warmup (Goyal et al.'s gradual warmup) goes linearly from the unscaled ``base_lr`` at step 0 to
    the schedule's value at ``warmup_steps``: ``base + (s(step) - base) * step / warmup_steps``.
    Negative steps count as step 0 (the metrics callback asks for ``iterations - 1`` before the
    first step).

    Args:
        plan: The plan.
        step: 0-based optimizer step.

    Returns:
        The learning rate, a Python float.
    """
    step = max(int(step), 0)
    s = _schedule_value(plan, step)
    if step < plan.warmup_steps:
        return plan.base_lr + (s - plan.base_lr) * step / plan.warmup_steps
    return s


def scheduled_lr_tensor(tf, p: LRPlan, step):
    """``lr_at(p, step)`` with TensorFlow ops (float64 inside, float32 out): ``ScheduledLR``'s body."""
    with tf.name_scope("ScheduledLR"):
        step_i = tf.maximum(tf.cast(step, tf.int64), 0)
        step_f = tf.cast(step_i, tf.float64)
        peak = tf.constant(p.peak_lr, tf.float64)
        # Python branches: the schedule is fixed when the graph is built.
        if p.schedule == "constant":
            s = peak * tf.ones_like(step_f)
        elif p.schedule == "step":
            # Integer division, like lr_at: exact at every epoch boundary.
            epoch = tf.cast(step_i // p.steps_per_epoch, tf.float64)
            bounds = tf.constant(p.boundaries, tf.float64, shape=[len(p.boundaries)])
            index = tf.reduce_sum(tf.cast(bounds <= epoch[..., None], tf.int32), axis=-1)
            s = peak * tf.gather(tf.constant(p.factors, tf.float64), index)
        elif p.schedule == "cosine":
            t = step_f - float(p.warmup_steps)
            span = float(max(p.total_steps - p.warmup_steps, 1))
            frac = tf.clip_by_value(t / span, 0.0, 1.0)
            s = peak * (p.min_factor + (1.0 - p.min_factor) * 0.5 * (1.0 + tf.cos(math.pi * frac)))
        else:
            t = tf.maximum(step_f - float(p.warmup_steps), 0.0)
            s = peak * tf.pow(tf.constant(p.decay_rate, tf.float64), t / (p.decay_epochs * p.steps_per_epoch))
        if p.warmup_steps > 0:
            base = tf.constant(p.base_lr, tf.float64)
            warm = base + (s - base) * step_f / float(p.warmup_steps)
            s = tf.where(step_i < p.warmup_steps, warm, s)
        return tf.cast(s, tf.float32)


@functools.lru_cache(maxsize=None)
def _scheduled_lr_class() -> type:
    """Creates the Keras schedule class once per process, importing TensorFlow only now."""
    import tensorflow as tf

    class ScheduledLR(tf.keras.optimizers.schedules.LearningRateSchedule):
        """``lr_at(plan, step)`` as a Keras ``LearningRateSchedule``.

        Computes in float64 (the same formulas, in the same order, as ``lr_at``) and returns
        float32, so it agrees with the Python function to float32 rounding.

        The class is registered with Keras as ``distrain>ScheduledLR`` when it is created (on
        first access of ``distrain.lr.ScheduledLR``): a model saved with it reloads in any process
        that has touched the class first, as ``distrain.models.load_trained_model`` does, or with
        ``custom_objects={"ScheduledLR": distrain.lr.ScheduledLR}``. Without either, tf-keras's
        compile-config loader replaces the unknown class by its name and the optimizer fails to build.
        """

        def __init__(self, plan: LRPlan):
            super().__init__()
            self.plan = plan

        def __call__(self, step):
            return scheduled_lr_tensor(tf, self.plan, step)

        def get_config(self) -> dict:
            return self.plan.to_config()

        @classmethod
        def from_config(cls, config: dict) -> "ScheduledLR":
            return cls(LRPlan(**config))

    # Keras serialises the module and class name; make them point at the lazy attribute below.
    ScheduledLR.__module__ = __name__
    ScheduledLR.__qualname__ = "ScheduledLR"
    # Registered, so a saved model names it "distrain>ScheduledLR" and any process that has
    # created the class (``distrain.models.load_trained_model`` does) can load it in safe mode.
    return tf.keras.saving.register_keras_serializable(package="distrain")(ScheduledLR)


def __getattr__(name: str) -> Any:
    # PEP 562: `distrain.lr.ScheduledLR` imports TensorFlow on first access only.
    if name == "ScheduledLR":
        return _scheduled_lr_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keras_schedule(plan: LRPlan):
    """The Keras ``LearningRateSchedule`` for ``plan`` (a ``ScheduledLR``), to give an optimizer.

    Example:
        >>> opt = tf.keras.optimizers.SGD(keras_schedule(plan))  # doctest: +SKIP
    """
    return _scheduled_lr_class()(plan)


def describe(plan: LRPlan) -> str:
    """One log line: base and peak LR, the scaling rule, warmup and schedule.

    Example:
        >>> describe(LRPlan(1e-3, 0.064, 10, 100, warmup_steps=50, scaling="linear",
        ...                 reference_batch=32, global_batch=2048))  # doctest: +NORMALIZE_WHITESPACE
        'lr: base 0.001 for batch 32, peak 0.064 for batch 2048 (linear scaling);
         warmup 50 steps (5 epochs) from 0.001; schedule constant; 100 steps'
    """
    base = f"lr: base {plan.base_lr:g}"
    if plan.reference_batch:
        base += f" for batch {plan.reference_batch}"
    peak = f"peak {plan.peak_lr:g}"
    if plan.global_batch:
        peak += f" for batch {plan.global_batch}"
    if plan.warmup_steps:
        warmup = (f"warmup {plan.warmup_steps} steps ({plan.warmup_steps / plan.steps_per_epoch:g} epochs)"
                  f" from {plan.base_lr:g}")
    else:
        warmup = "no warmup"
    if plan.schedule == "step":
        changes = ", ".join(f"x{f:g} from epoch {b:g}" for b, f in zip(plan.boundaries, plan.factors[1:]))
        schedule = f"schedule step x{plan.factors[0]:g}" + (f", {changes}" if changes else "")
    elif plan.schedule == "cosine":
        schedule = f"schedule cosine to x{plan.min_factor:g}"
    elif plan.schedule == "exponential":
        schedule = f"schedule exponential x{plan.decay_rate:g} every {plan.decay_epochs:g} epochs"
    else:
        schedule = "schedule constant"
    return f"{base}, {peak} ({plan.scaling} scaling); {warmup}; {schedule}; {plan.total_steps} steps"
