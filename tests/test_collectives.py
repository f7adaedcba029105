"""multi_worker's collectives: the deadline is the watchdog's (no thread per collective), a
stalled peer still ends the run with exit 76, and a step reads no metric across workers."""
import re
import signal
import sys
import time

import pytest

from conftest import DISTRAIN, backup_step, free_ports, tf_config, worker_env, write_job
from distrain.errors import EXIT_PEER_LOST
from distrain.backends.watchdog import Watchdog

# 1150 training digits, 8 per replica x 2 workers: 71 steps/epoch.
JOB = """
name: collectives
seed: 3
model: {{name: cnn, params: {{filters: 16}}}}
data: {{source: digits, batch_size_per_replica: 8}}
train: {{epochs: {epochs}, optimizer: adam, learning_rate: 0.002}}
distribute: {{strategy: multi_worker, collective_timeout_s: {timeout}}}
checkpoint: {{every_epochs: 0, save_best: false, backup_every_steps: 10}}
logging: {{tensorboard: false, verbose: 0}}
"""


# Worker 1 stalls in Python at step 20: alive, its TensorFlow runtime still sending the
# coordination service's heartbeats, so only worker 0's watchdog can end the wait.
STALL_ON_RANK1 = """
import json, os, sys, time
from pathlib import Path
import distrain
import tensorflow as tf
from distrain.spec import load_spec
from distrain.errors import TrainingStopped
from distrain.run import train

class StallOnRank1(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1 and batch == 20:
            time.sleep(3600)

try:
    train(load_spec(sys.argv[1]), Path(sys.argv[2]), extra_callbacks=[StallOnRank1()])
except TrainingStopped as stopped:
    print("distrain:", stopped, file=sys.stderr)
    sys.exit(stopped.exit_code)
"""


def start_pair(tmp_path, workers_factory, *, epochs, timeout, python_code=None):
    job = write_job(tmp_path / "job.yaml", JOB.format(epochs=epochs, timeout=timeout))
    ports = free_ports(2)
    run_dir = tmp_path / "run"
    if python_code:
        cmd = [sys.executable, "-c", python_code, str(job), str(run_dir)]
    else:
        cmd = [*DISTRAIN, "train", str(job), "--run-dir", str(run_dir)]
    return workers_factory([cmd, cmd], [worker_env(TF_CONFIG=tf_config(ports, i)) for i in range(2)])


def wait_for_step(run_dir, step, pair, timeout=180):
    deadline = time.monotonic() + timeout
    while backup_step(run_dir) < step:
        if time.monotonic() > deadline or any(p.poll() is not None for p in pair.procs):
            pytest.fail(f"training did not reach step {step}:\n{pair.output()}")
        time.sleep(0.05)


def threads(pid) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"^Threads:\s+(\d+)", status.read(), re.M).group(1))


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_long_run_does_not_accumulate_threads(tmp_path, workers_factory):
    # With CommunicationOptions(timeout_seconds=300) each all-reduce left 2 threads asleep for
    # 300 s: ~4 per step here, ~15,000 after 1,200 steps, then "Resource temporarily unavailable".
    pair = start_pair(tmp_path, workers_factory, epochs=5, timeout=300)
    wait_for_step(tmp_path / "run", 40, pair)
    before = [threads(p.pid) for p in pair.procs]
    wait_for_step(tmp_path / "run", 240, pair)
    after = [threads(p.pid) for p in pair.procs]
    assert pair.wait(timeout=240) == [0, 0], pair.output()
    grown = [a - b for a, b in zip(after, before)]
    assert max(grown) < 40, f"threads grew by {grown} over 200 steps ({before} -> {after})"


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_stalled_peer_makes_the_other_exit_76_within_the_deadline(tmp_path, workers_factory):
    pair = start_pair(tmp_path, workers_factory, epochs=50, timeout=10)
    wait_for_step(tmp_path / "run", 20, pair)
    pair.procs[1].send_signal(signal.SIGSTOP)  # alive, holding its sockets, answering nothing
    stopped = time.monotonic()
    try:
        pair.procs[0].wait(timeout=120)
    finally:
        pair.procs[1].send_signal(signal.SIGKILL)
    elapsed = time.monotonic() - stopped
    assert pair.procs[0].returncode == EXIT_PEER_LOST, pair.output()
    assert elapsed < 10 + 30, f"the chief took {elapsed:.0f}s to give up"
    assert re.search(r"lost (worker 1|a peer)", pair.logs[0].read_text()), pair.output()


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_a_peer_stalled_in_python_is_caught_by_the_watchdog(tmp_path, workers_factory):
    pair = start_pair(tmp_path, workers_factory, epochs=50, timeout=10, python_code=STALL_ON_RANK1)
    wait_for_step(tmp_path / "run", 10, pair)
    started = time.monotonic()
    while "distrain: lost" not in pair.logs[0].read_text() and time.monotonic() - started < 120:
        time.sleep(0.05)
    waited = time.monotonic() - started  # the decision; the exit then waits for TensorFlow's shutdown
    pair.procs[0].wait(timeout=120)  # (up to ~30 s more: the stalled peer never leaves the coordination service)
    assert pair.procs[0].returncode == EXIT_PEER_LOST, pair.output()
    # Whichever watchdog fires first (worker 1's own, stuck outside a step, or worker 0's) names it.
    last_line = pair.logs[0].read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"distrain: lost (worker 1 \(127\.0\.0\.1:\d+\)|a peer \(one of [\d.:, ]+\)): UnavailableError: no step finished for 10 s "
                        r"\(distribute\.collective_timeout_s\): a peer is lost or stalled; rerun .*", last_line), last_line
    assert waited < 10 + 30, f"worker 0 took {waited:.0f}s to give up"


def test_watchdog_expires_once_when_not_beaten():
    expired = []
    dog = Watchdog(0.2, expired.append)
    with dog.armed():
        deadline = time.monotonic() + 10
        while not expired and time.monotonic() < deadline:
            time.sleep(0.02)
    dog.close()
    assert len(expired) == 1 and dog.expired
    assert "0.2 s (distribute.collective_timeout_s)" in expired[0]


def test_watchdog_beaten_or_disarmed_does_not_expire():
    expired = []
    dog = Watchdog(0.3, expired.append)
    with dog.armed():
        for _ in range(40):  # 0.8 s of beats every 0.02 s
            dog.beat()
            time.sleep(0.02)
        with dog.armed():  # nested (validation inside fit): still armed after the inner exit
            dog.beat()
    time.sleep(0.8)  # disarmed: no deadline
    dog.close()
    assert expired == [] and not dog.expired


def test_watchdog_counts_from_arming_not_from_creation():
    now = [0.0]
    expired = []
    dog = Watchdog(5.0, expired.append, clock=lambda: now[0])
    now[0] = 100.0  # long before arming: irrelevant
    with dog.armed():
        now[0] = 104.0
        time.sleep(0.4)  # several polls (every 0.25 s)
        assert expired == []
        now[0] = 105.5
        deadline = time.monotonic() + 10
        while not expired and time.monotonic() < deadline:
            time.sleep(0.02)
    dog.close()
    assert len(expired) == 1
