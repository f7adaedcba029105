"""A plain tf-keras MultiWorkerMirroredStrategy script, written the way TensorFlow's multi-worker
tutorial ("Multi-worker training with Keras") writes one: TF_CONFIG from the environment, the
global batch = per-worker batch x workers, a from_tensor_slices -> shuffle -> repeat -> batch
dataset left to TensorFlow's auto-sharding, the model built and compiled in the strategy's scope,
then fit. The course models stand in for the tutorial's, random images for MNIST/CIFAR (offline).

    python benchmarks/peers/mwms_keras.py --model cnn --batch 64                  one process
    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:20000", "127.0.0.1:20001"]}, "task": {"type": "worker", "index": 0}}' \
        python benchmarks/peers/mwms_keras.py --model cnn --batch 64              each worker

The only addition is the benchmark harness (StepTimer, the JSON line): step times after warm-up.
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf-keras (Keras 2), as the course uses it
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SHAPES = {"cnn": (28, 28, 1), "mobilenet_v2": (32, 32, 3)}


def dataset(batch_size, shape, examples=8192):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, size=(examples, *shape), dtype=np.uint8) / np.float32(255)
    y_train = rng.integers(0, 10, size=examples).astype(np.int64)
    return tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(examples).repeat().batch(batch_size)


def build_and_compile_model(name, shape):
    if name == "cnn":
        model = tf.keras.Sequential([
            tf.keras.layers.Input(shape=shape),
            tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10, activation="softmax"),
        ])
    else:
        model = tf.keras.applications.MobileNetV2(input_shape=shape, weights=None, classes=10)
    model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                  optimizer=tf.keras.optimizers.Adam(learning_rate=0.001), metrics=["accuracy"])
    return model


class StepTimer(tf.keras.callbacks.Callback):  # benchmark harness
    _supports_tf_logs = True  # no per-step conversion of the logs: timing only

    def on_train_begin(self, logs=None):
        self.times, self.last = [], None

    def on_train_batch_begin(self, batch, logs=None):
        if self.last is None:
            self.last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cnn", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=64, help="per worker")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()

    per_worker_batch_size = args.batch
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    num_workers = len(tf_config.get("cluster", {}).get("worker", [])) or 1
    # The tutorial trains a single worker without a strategy first; with TF_CONFIG, MWMS.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if tf_config else tf.distribute.get_strategy()
    global_batch_size = per_worker_batch_size * num_workers
    multi_worker_dataset = dataset(global_batch_size, SHAPES[args.model])
    with strategy.scope():
        multi_worker_model = build_and_compile_model(args.model, SHAPES[args.model])
    timer = StepTimer()
    multi_worker_model.fit(multi_worker_dataset, epochs=1, steps_per_epoch=args.warmup + args.steps,
                           callbacks=[timer], verbose=0)
    if tf_config.get("task", {}).get("index", 0) == 0:
        timed = timer.times[args.warmup:]
        print(json.dumps({"images_per_s": global_batch_size * len(timed) / sum(timed),
                          "step_time_s": sorted(timed)[len(timed) // 2], "workers": num_workers}))


if __name__ == "__main__":
    main()
