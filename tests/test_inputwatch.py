"""InputWatch: the fraction of training time steps wait for input, in the epoch logs, with a
warning when the model is input-bound."""
import logging
import time

import numpy as np
import pytest

import distrain  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf

from distrain.data.inputwatch import InputWatch, wait_time


def test_wait_time_is_how_late_the_last_batch_was():
    assert wait_time(10.0, [9.0, 9.5]) == 0.0
    assert wait_time(10.0, [9.0, 10.25]) == pytest.approx(0.25)
    assert wait_time(10.0, []) == 0.0


class SlowModel(tf.keras.callbacks.Callback):
    """Stands in for a model whose steps take ``seconds``: the pipeline has that long to get ahead."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_begin(self, batch, logs=None):
        time.sleep(self.seconds)


def fit(delay_s, caplog, model_s=0.0):
    def slow(x, y):
        def sleep(a):
            time.sleep(delay_s)
            return a
        return tf.numpy_function(sleep, [x], tf.float32, stateful=True), y

    ds = tf.data.Dataset.range(1000).map(lambda i: (tf.zeros([8, 4]), tf.zeros([8], tf.int32)))
    if delay_s:
        ds = ds.map(slow)
    watch = InputWatch(threshold=0.5)
    ds = watch.stamp(tf, ds).prefetch(2)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
    model.compile("sgd", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    caplog.set_level(logging.WARNING, "distrain")
    logging.getLogger("distrain").propagate = True
    callbacks = [SlowModel(model_s), watch] if model_s else [watch]
    history = model.fit(ds, epochs=2, steps_per_epoch=12, callbacks=callbacks, verbose=0)
    return history.history["input_wait_fraction"]


def test_a_slow_pipeline_is_reported_input_bound(caplog):
    fractions = fit(0.05, caplog)  # 50 ms per batch, steps of about a millisecond
    assert len(fractions) == 2 and min(fractions) > 0.6
    assert "input-bound: training steps waited for input" in caplog.text


def test_a_fast_pipeline_is_not(caplog):
    fractions = fit(0.0, caplog, model_s=0.02)
    assert max(fractions) < 0.5 and "input-bound" not in caplog.text


def test_the_marker_leaves_the_batches_alone():
    from distrain.data import sources
    from distrain.spec import spec_from_dict

    s = sources.load(spec_from_dict({}).data, seed=0)
    augment = spec_from_dict({}).data.augment
    ctx = tf.distribute.InputContext(1, 0, 1)
    plain = s.pipelines(16, 3, 0, (8, 8, 1), augment).train(ctx, 1)
    watched = s.pipelines(16, 3, 0, (8, 8, 1), augment, watch=InputWatch()).train(ctx, 1)
    for (a, y), (b, z) in zip(plain, watched):
        assert np.array_equal(a, b) and np.array_equal(y, z)
