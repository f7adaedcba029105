"""Ray Train's TensorflowTrainer with the train function of Ray's TensorFlow/Keras tutorial
("Get started with distributed training using TensorFlow/Keras"): MultiWorkerMirroredStrategy
inside train_func, the global batch = per-worker batch x ray.train.get_context().get_world_size(),
the model built and compiled in the strategy's scope, fit with ReportCheckpointCallback;
ScalingConfig(num_workers=N, use_gpu=False). The course models stand in for the tutorial's,
random images for MNIST/CIFAR (offline).

    python benchmarks/peers/ray_train_tf.py --model cnn --batch 64 --workers 2

The benchmark harness adds: StepTimer and the result line, and each worker pins itself to core
`world rank` when --pin is given (Ray has no option for it).
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train import ScalingConfig  # noqa: E402
from ray.train.tensorflow import TensorflowTrainer  # noqa: E402

SHAPES = {"cnn": (28, 28, 1), "mobilenet_v2": (32, 32, 3)}


def pin_to(core):  # benchmark harness: every thread of this worker process on one core
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:
            pass


def mnist_dataset(batch_size, shape, examples=8192):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, size=(examples, *shape), dtype=np.uint8) / np.float32(255)
    y_train = rng.integers(0, 10, size=examples).astype(np.int64)
    return tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(examples).repeat().batch(batch_size)


def build_cnn_model(name, shape):
    import tensorflow as tf

    if name == "cnn":
        return tf.keras.Sequential([
            tf.keras.layers.Input(shape=shape),
            tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10, activation="softmax"),
        ])
    return tf.keras.applications.MobileNetV2(input_shape=shape, weights=None, classes=10)


def train_func(config: dict):
    import tensorflow as tf
    from ray.train.tensorflow.keras import ReportCheckpointCallback

    if config["pin"]:
        pin_to(ray.train.get_context().get_world_rank() % os.cpu_count())
    per_worker_batch_size = config.get("batch_size", 64)
    epochs = config.get("epochs", 1)
    steps_per_epoch = config.get("steps_per_epoch", 70)
    shape = SHAPES[config["model"]]

    num_workers = ray.train.get_context().get_world_size()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    global_batch_size = per_worker_batch_size * num_workers
    multi_worker_dataset = mnist_dataset(global_batch_size, shape)

    with strategy.scope():
        multi_worker_model = build_cnn_model(config["model"], shape)
        learning_rate = config.get("lr", 0.001)
        multi_worker_model.compile(
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            optimizer=tf.keras.optimizers.Adam(learning_rate=learning_rate),
            metrics=["accuracy"])

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

    timer = StepTimer()
    multi_worker_model.fit(multi_worker_dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
                           callbacks=[timer, ReportCheckpointCallback()], verbose=0)
    timed = timer.times[config["warmup"]:]
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["result"], "w") as out:
            json.dump({"images_per_s": global_batch_size * len(timed) / sum(timed),
                       "step_time_s": sorted(timed)[len(timed) // 2], "workers": num_workers}, out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cnn", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=64, help="per worker")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pin", action="store_true")
    parser.add_argument("--storage", default="/tmp/ray-bench")
    args = parser.parse_args()
    result = os.path.join(args.storage, f"result-{os.getpid()}.json")
    os.makedirs(args.storage, exist_ok=True)
    ray.init(runtime_env={"env_vars": {k: os.environ[k] for k in (
        "TF_USE_LEGACY_KERAS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "CUDA_VISIBLE_DEVICES")
        if k in os.environ}})
    config = {"batch_size": args.batch, "epochs": 1, "steps_per_epoch": args.warmup + args.steps,
              "model": args.model, "warmup": args.warmup, "pin": args.pin, "result": result}
    trainer = TensorflowTrainer(train_func, train_loop_config=config,
                                scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
                                run_config=ray.train.RunConfig(storage_path=args.storage))
    trainer.fit()
    with open(result) as f:
        print(f.read())


if __name__ == "__main__":
    main()
