"""``distrain.run.peer_lost_message`` and ``_error_reason``: the one line a worker prints when a
peer is lost (exit 76), from the TensorFlow error that ended its collective: the lost worker and its
address when the error names its task, every address when it does not, and the reason: the
innermost "Collective ops is aborted by:" cause, else the first line that says something. And
``open_run_dir``'s logging: which lines reach a worker's terminal."""
from __future__ import annotations

import pytest

import distrain  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf

from distrain.run import _error_reason, log, open_run_dir, peer_lost_message
from distrain.spec import spec_from_dict
from distrain.world import World

ADDRESSES = ("10.0.0.1:20000", "10.0.0.2:20000", "10.0.0.3:20000")
WORLD = World(launcher="tf_config", rank=0, world_size=3, worker_addresses=ADDRESSES)
RESUME = "; rerun with the same run dir to resume from the backup"

# What a collective whose peer died raises under MultiWorkerMirroredStrategy (shape of TF 2.21's text).
UNAVAILABLE = """Graph execution error:

Detected at node CollectiveReduceV2 defined at (most recent call last):
  File "distrain/run.py", line 280, in fit_and_evaluate
Collective ops is aborted by: Collective ops is aborted by: failed to connect to all addresses
Additional GRPC error information from remote target /job:worker/replica:0/task:2 while calling /tensorflow.WorkerService/RecvBuf:
:{"created":"@1700000000.0","description":"Failed to pick subchannel"}
The error could be from a previous operation. Restart your program to reset.
	 [[{{node CollectiveReduceV2}}]] [Op:__inference_train_function_1234]"""


def test_names_the_lost_worker_and_its_address_from_the_task_in_the_error():
    err = tf.errors.UnavailableError(None, None, UNAVAILABLE)
    assert peer_lost_message(err, WORLD) == ("lost worker 2 (10.0.0.3:20000): UnavailableError: failed to connect to "
                                             "all addresses" + RESUME)


@pytest.mark.parametrize("task, who", [("/job:worker/replica:0/task:1", "worker 1 (10.0.0.2:20000)"),
                                       ("/job:chief/replica:0/task:0", "worker 0 (10.0.0.1:20000)")])
def test_a_worker_or_chief_task_is_looked_up_by_its_index(task, who):
    err = tf.errors.AbortedError(None, None, f"Graph execution error:\nconnection to {task} reset by peer")
    assert peer_lost_message(err, WORLD) == f"lost {who}: AbortedError: connection to {task} reset by peer" + RESUME


@pytest.mark.parametrize("text, reason", [
    ("Collective ops is aborted by: heartbeat timeout", "heartbeat timeout"),  # no task at all
    # A task beyond the world; a task that is not a worker or the chief.
    ("failed to reach /job:worker/replica:0/task:7", "failed to reach /job:worker/replica:0/task:7"),
    ("failed to reach /job:ps/replica:0/task:1", "failed to reach /job:ps/replica:0/task:1"),
])
def test_without_a_task_of_the_world_every_address_is_named(text, reason):
    err = tf.errors.DeadlineExceededError(None, None, text)
    assert peer_lost_message(err, WORLD) == (
        f"lost a peer (one of 10.0.0.1:20000, 10.0.0.2:20000, 10.0.0.3:20000): DeadlineExceededError: {reason}{RESUME}")


def test_with_a_chief_in_tf_config_a_workers_rank_follows_the_chief():
    world = World(launcher="tf_config", rank=0, world_size=3, worker_addresses=ADDRESSES,
                  tf_config={"cluster": {"chief": [ADDRESSES[0]], "worker": list(ADDRESSES[1:])},
                             "task": {"type": "chief", "index": 0}})
    for task, who in (("/job:worker/replica:0/task:0", "worker 1 (10.0.0.2:20000)"),
                      ("/job:chief/replica:0/task:0", "worker 0 (10.0.0.1:20000)")):
        err = tf.errors.UnavailableError(None, None, f"lost {task}")
        assert peer_lost_message(err, world) == f"lost {who}: UnavailableError: lost {task}" + RESUME


def test_a_world_without_addresses_says_how_many_workers():
    world = World(launcher="horovod", rank=0, world_size=4)
    err = tf.errors.UnavailableError(None, None, "Gloo connection closed")
    assert peer_lost_message(err, world) == ("lost a peer (one of the 4 workers): UnavailableError: Gloo connection "
                                             "closed" + RESUME)


def test_the_error_type_is_the_exceptions_own():
    err = tf.errors.CancelledError(None, None, "Cancelled by /job:worker/replica:0/task:0")
    assert peer_lost_message(err, WORLD) == (
        "lost worker 0 (10.0.0.1:20000): CancelledError: Cancelled by /job:worker/replica:0/task:0" + RESUME)


# ----------------------------------------------------------------------------- _error_reason

@pytest.mark.parametrize("text, reason", [
    # The innermost reason when aborts are nested on one line; trailing spaces dropped.
    ("Graph execution error:\nCollective ops is aborted by: Collective ops is aborted by: peer 1 is gone  \nmore",
     "peer 1 is gone"),
    ("Collective ops is aborted by: no step finished for 10 s (distribute.collective_timeout_s)",
     "no step finished for 10 s (distribute.collective_timeout_s)"),
    # Aborts on several lines: the first abort line's reason (lines before it do not count).
    ("Graph execution error:\nsomething first\n[Derived]Collective ops is aborted by: A\n"
     "Collective ops is aborted by: B", "A"),
    # Without an abort: the first line that is not only "Graph execution error:".
    ("Graph execution error:\n\n   \n  Socket closed  \nDetected at node X", "Socket closed"),
    ("Connection reset by peer", "Connection reset by peer"),
    # Horovod's: the traceback of the node first, the reason after it.
    ("Graph execution error:\n\nDetected at node DistributedSGD_Allreduce/HorovodAllreduce_grads_0 defined at (most "
     "recent call last):\n  File \"distrain/run.py\", line 280, in fit_and_evaluate\n\n  File \"<string>\", line "
     "111, in horovod_allreduce\n\n"
     "Horovod has been shut down. This was caused by an exception on one of the ranks.\n"
     "\t [[{{node HorovodAllreduce_grads_0}}]] [Op:__inference_train_function_99]",
     "Horovod has been shut down. This was caused by an exception on one of the ranks."),
    # Nothing to say.
    ("Graph execution error:\n\n", "no message"),
    ("", "no message"),
])
def test_error_reason(text, reason):
    assert _error_reason(text) == reason


def test_error_reason_is_cut_to_300_characters():
    assert _error_reason("x" * 500) == "x" * 300
    assert _error_reason("Collective ops is aborted by: " + "y" * 500) == "y" * 300


@pytest.mark.parametrize("rank", [0, 1])
def test_every_workers_start_up_line_is_info_and_reaches_its_terminal(tmp_path, capsys, rank):
    world = World(launcher="tf_config", rank=rank, world_size=2, worker_addresses=ADDRESSES[:2])
    try:
        open_run_dir(spec_from_dict({}), tmp_path, world)
        log.info("an ordinary line")
        log.warning("a warning")
        log.info("a step line", extra={"terminal": False})  # beside a progress bar: the file only
    finally:
        handlers = list(log.handlers)
        log.handlers.clear()
        log.propagate = True
        for handler in handlers:
            handler.close()
    terminal = [line.split(" ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    start = f"[rank {rank}] INFO distrain worker {world.describe()}"
    chief_only = [f"[rank {rank}] INFO an ordinary line"] if rank == 0 else []
    assert terminal == [start, *chief_only, f"[rank {rank}] WARNING a warning"]
    in_file = [line.split(" ", 1)[1] for line in (tmp_path / "logs" / f"rank{rank}.log").read_text().splitlines()]
    assert in_file == [start, f"[rank {rank}] INFO an ordinary line", f"[rank {rank}] WARNING a warning",
                       f"[rank {rank}] INFO a step line"]
