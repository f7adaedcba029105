"""Horovod's own Keras example (examples/tensorflow2/tensorflow2_keras_mnist.py), as its users write
it: hvd.init, a from_tensor_slices -> repeat -> shuffle -> batch dataset per rank, the LR scaled by
hvd.size(), hvd.DistributedOptimizer, and Horovod's callbacks (broadcast of rank 0's variables,
of which only the broadcast works with tf-keras on TF 2.21, see below), verbose on rank 0 only. The course models stand in for the
example's, random images for MNIST/CIFAR (offline).

    python benchmarks/peers/horovod_keras.py --model cnn --batch 64                 one process
    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/peers/horovod_keras.py --model cnn --batch 64

The only addition is the benchmark harness (StepTimer, the JSON line): step times after warm-up.
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Horovod's Keras glue needs Keras 2
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import horovod.tensorflow.keras as hvd  # noqa: E402

SHAPES = {"cnn": (28, 28, 1), "mobilenet_v2": (32, 32, 3)}


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
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--fp16", action="store_true", help="hvd.Compression.fp16 for the allreduce")
    args = parser.parse_args()
    shape = SHAPES[args.model]

    hvd.init()
    gpus = tf.config.experimental.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.experimental.set_visible_devices(gpus[hvd.local_rank()], "GPU")

    rng = np.random.default_rng(hvd.rank())
    images = rng.integers(0, 256, size=(8192, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, size=8192)
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.cast(images / 255.0, tf.float32), tf.cast(labels, tf.int64)))
    dataset = dataset.repeat().shuffle(8192).batch(args.batch)

    if args.model == "cnn":
        model = tf.keras.Sequential([
            tf.keras.layers.Input(shape=shape),
            tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10, activation="softmax"),
        ])
    else:
        model = tf.keras.applications.MobileNetV2(input_shape=shape, weights=None, classes=10)

    scaled_lr = 0.001 * hvd.size()
    opt = tf.optimizers.Adam(scaled_lr)
    opt = hvd.DistributedOptimizer(opt, backward_passes_per_step=1, average_aggregated_gradients=True,
                                   compression=hvd.Compression.fp16 if args.fp16 else hvd.Compression.none)
    model.compile(loss=tf.losses.SparseCategoricalCrossentropy(), optimizer=opt, metrics=["accuracy"],
                  experimental_run_tf_function=False)

    timer = StepTimer()
    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # The example's MetricAverageCallback and LearningRateWarmupCallback are left out: Horovod
        # 0.28.1 imports Keras 3's backend for them (`from keras import backend as K`), so with
        # tf-keras they fail at the first step (AttributeError: module 'keras.backend' has no
        # attribute 'constant' / 'get_value'); a user on TF 2.21 has to drop them.
        timer,
    ]
    verbose = 1 if hvd.rank() == 0 else 0
    model.fit(dataset, steps_per_epoch=args.warmup + args.steps, callbacks=callbacks, epochs=1,
              verbose=0 if verbose else 0)  # harness: no progress bar in the timed steps
    if hvd.rank() == 0:
        timed = timer.times[args.warmup:]
        print(json.dumps({"images_per_s": args.batch * hvd.size() * len(timed) / sum(timed),
                          "step_time_s": sorted(timed)[len(timed) // 2], "workers": hvd.size()}))


if __name__ == "__main__":
    main()
