"""TensorBoard logging of a real 2-worker run (2 processes, TF_CONFIG on 127.0.0.1): every scalar,
the text and the hparams come from the chief alone, TensorBoard's own reader and a real
TensorBoard server read them back, and ``distrain tensorboard`` serves a runs dir."""
import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import DISTRAIN, REPO, files_written, free_ports, worker_env
from distrain.tf_startup import is_startup_notice
from helpers import accumulate, scalars, text

pytestmark = pytest.mark.multiprocess

# Of conftest.TWO_WORKER_JOB: 12 steps, scalars every 2; lr peak 0.1 after 3 warmup steps, then cosine.
STEPS, EVERY = 12, 2
EPOCH_TAGS = {"epoch_loss", "epoch_accuracy", "epoch_lr", "epoch_images_per_s", "epoch_step_time_s"}
STEP_TAGS = {"batch_loss", "batch_accuracy", "batch_lr", "batch_step_time_s", "batch_images_per_s",
             "batch_images_per_s_per_replica"}
TENSORBOARD = REPO / ".venv" / "bin" / "tensorboard"


@pytest.fixture(scope="module")
def run(two_worker_run):
    return two_worker_run


def test_every_scalar_per_epoch_and_per_step(run):
    history = json.loads((run.run_dir / "history.json").read_text())
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["replicas"], summary["global_batch"], summary["steps"]) == (2, 2, 32, STEPS)
    train = accumulate(run.run_dir / "tensorboard" / "train")
    validation = accumulate(run.run_dir / "tensorboard" / "validation")
    assert EPOCH_TAGS | STEP_TAGS <= set(train.Tags()["tensors"])
    assert {"epoch_loss", "epoch_accuracy"} <= set(validation.Tags()["tensors"])

    # Per epoch (numbered from 1, as in history.json): exactly the epoch-end logs.
    for tag in EPOCH_TAGS:
        assert scalars(train, tag) == pytest.approx({e["epoch"]: e[tag[len("epoch_"):]] for e in history}, rel=1e-6)
    for metric in ("loss", "accuracy"):
        assert scalars(validation, f"epoch_{metric}") == pytest.approx(
            {e["epoch"]: e[f"val_{metric}"] for e in history}, rel=1e-6)

    # Every EVERY global steps.
    steps = list(range(EVERY, STEPS + 1, EVERY))
    for tag in STEP_TAGS:
        assert sorted(scalars(train, tag)) == steps, tag
    lr = scalars(train, "batch_lr")
    # The LR applied at an epoch's last step is the one the epoch end logs; warmup peaks at 0.1.
    assert [lr[e["step"]] for e in history] == pytest.approx([e["lr"] for e in history], rel=1e-6)
    assert max(lr.values()) == pytest.approx(0.1, rel=1e-6) and lr[4] == pytest.approx(0.1, rel=1e-6)
    assert lr[STEPS] < lr[6] < lr[4]  # cosine decay after the warmup
    # Each value is the formula's for the step just applied (0-based step s - 1): Goyal's warmup from
    # the unscaled 0.05 over 3 steps, then cosine from the peak 0.1 down to 0.1 x 0.1 over 9 steps.
    def formula(step):
        if step < 3:
            return 0.05 + (0.1 - 0.05) * step / 3
        return 0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 3) / 9)))
    assert lr == pytest.approx({s: formula(s - 1) for s in steps}, rel=1e-6)
    # Keras' running mean at an epoch's last step equals the epoch's value (not 2x: see StepScalars).
    for metric in ("loss", "accuracy"):
        per_step = scalars(train, f"batch_{metric}")
        assert [per_step[e["step"]] for e in history] == pytest.approx([e[metric] for e in history], rel=1e-5)
    step_time, images, per_replica = (scalars(train, t) for t in
                                      ("batch_step_time_s", "batch_images_per_s", "batch_images_per_s_per_replica"))
    for step in steps:
        assert step_time[step] > 0
        assert images[step] == pytest.approx(32 / step_time[step], rel=1e-5)
        assert per_replica[step] == pytest.approx(images[step] / 2, rel=1e-5)


def test_world_spec_and_hparams_from_the_chief(run):
    from tensorboard.plugins.hparams import metadata

    root = accumulate(run.run_dir / "tensorboard")
    tags = set(root.Tags()["tensors"])
    assert {"world", "job_spec", "lr_plan", "_hparams_/experiment", "_hparams_/session_start_info",
            "_hparams_/session_end_info"} <= tags
    world = text(root, "world")
    assert "| strategy | multi_worker |" in world and "| workers | 2 (launcher tf_config) |" in world
    assert "| replicas | 2 " in world and "| global batch | 32 = 16 per replica x 2 |" in world
    assert "name: tbjob" in text(root, "job_spec") and "warmup_steps: 3" in text(root, "job_spec")
    assert "peak 0.1" in text(root, "lr_plan")

    start = metadata.parse_session_start_info_plugin_data(
        root.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
    hparams = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    assert hparams == {"model": "cnn", "data": "digits", "strategy": "multi_worker", "workers": 2, "replicas": 2,
                       "batch_per_replica": 16, "global_batch": 32, "optimizer": "sgd",
                       "base_lr": pytest.approx(0.05), "peak_lr": pytest.approx(0.1), "schedule": "cosine",
                       "warmup_steps": 3, "epochs": 2, "steps_per_epoch": 6, "precision": "float32"}
    assert start.group_name == f"tbjob/{run.run_dir.name}"
    experiment = metadata.parse_experiment_plugin_data(root.SummaryMetadata("_hparams_/experiment").plugin_data.content)
    assert {i.name for i in experiment.hparam_infos} == set(hparams)
    assert ("validation", "epoch_accuracy") in {(m.name.group, m.name.tag) for m in experiment.metric_infos}


def test_no_event_file_from_another_worker(run):
    """Every event file in the whole run dir (hidden dirs such as .workertemp included) is the
    chief's (TensorFlow names them ``events.out.tfevents.<time>.<host>.<pid>.<n>.v2``), and the
    other worker wrote none anywhere, not even one it deleted again."""
    event_files = list(run.run_dir.rglob("*tfevents*"))
    assert {f.parent.relative_to(run.run_dir).as_posix() for f in event_files} == {
        "tensorboard", "tensorboard/train", "tensorboard/validation", "tensorboard/test"}
    pids = {int(re.search(r"\.(\d+)\.\d+\.v2$", f.name).group(1)) for f in event_files}
    assert pids == {run.chief_pid}

    written = files_written(run.other_trace)
    run_dir = str(run.run_dir.resolve())
    in_run_dir = {p for p in written if p.startswith(run_dir)}
    assert any("/.workertemp/rank1/" in p for p in in_run_dir), "the trace saw no scratch write: is it empty?"
    assert not [p for p in written if "tfevents" in p or p.endswith(".xplane.pb")
                or p.startswith(f"{run_dir}/tensorboard")]
    assert not (run.run_dir / ".workertemp").exists()
    # Profiling steps 3-4 on CPU: the chief's trace.
    traces = list((run.run_dir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def _get(url: str, data: bytes = None, timeout: float = 5):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_for(url: str, ready, server: subprocess.Popen, timeout: float = 60):
    """Polls ``url`` until ``ready(json)``; TensorBoard answers before its first load is complete."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited with {server.returncode}"
        try:
            last = _get(url)
            if ready(last):
                return last
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not ready within {timeout}s; last answer {last}")


def _start(cmd, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=worker_env(), cwd=REPO,
                                start_new_session=True)


def _stop(server: subprocess.Popen) -> None:
    """Kills the server's process group (TensorBoard and its data server): nothing to save."""
    import os
    import signal

    try:
        os.killpg(server.pid, signal.SIGKILL)  # also when TensorBoard is gone: its data server may not be
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


@pytest.mark.timeout(120)
def test_tensorboard_server_serves_the_chiefs_scalars(run, tmp_path):
    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    server = _start([str(TENSORBOARD), "--logdir", str(run.run_dir / "tensorboard"), "--host", "127.0.0.1",
                     "--port", str(port), "--reload_interval", "1"], tmp_path / "tensorboard.log")
    try:
        tags = _wait_for(f"{base}/data/plugin/scalars/tags",
                         lambda t: EPOCH_TAGS | STEP_TAGS <= set(t.get("train", {}))
                         and {"epoch_loss", "epoch_accuracy"} <= set(t.get("validation", {})), server)
        assert set(tags) == {"train", "validation", "test"}
        history = json.loads((run.run_dir / "history.json").read_text())
        # Answers are [wall_time, step, value] rows.
        val_acc = _get(f"{base}/data/plugin/scalars/scalars?run=validation&tag=epoch_accuracy")
        assert {s: v for _, s, v in val_acc} == pytest.approx({e["epoch"]: e["val_accuracy"] for e in history})
        lr = _get(f"{base}/data/plugin/scalars/scalars?run=train&tag=batch_lr")
        assert [s for _, s, _ in lr] == list(range(EVERY, STEPS + 1, EVERY))
        per_replica = _get(f"{base}/data/plugin/scalars/scalars?run=train&tag=batch_images_per_s_per_replica")
        assert len(per_replica) == STEPS // EVERY and all(v > 0 for _, _, v in per_replica)
        text_tags = _get(f"{base}/data/plugin/text/tags")
        assert {"world", "job_spec"} <= set(text_tags["."])
        experiment = _get(f"{base}/data/plugin/hparams/experiment", data=json.dumps({"experimentName": ""}).encode())
        assert {"model", "strategy", "replicas", "global_batch", "peak_lr"} <= {h["name"] for h in
                                                                              experiment["hparamInfos"]}
    finally:
        _stop(server)


@pytest.mark.timeout(120)
def test_distrain_tensorboard_serves_a_runs_dir_on_loopback(run, tmp_path):
    (port,) = free_ports(1)
    log = tmp_path / "distrain-tensorboard.log"
    server = _start([*DISTRAIN, "tensorboard", str(run.run_dir.parent), "--port", str(port)], log)
    try:
        runs = _wait_for(f"http://127.0.0.1:{port}/data/runs", lambda r: "run/tensorboard/train" in r, server)
        assert {"run/tensorboard", "run/tensorboard/train", "run/tensorboard/validation"} <= set(runs)
        output = log.read_text()
        assert f"at http://127.0.0.1:{port}/" in output
        assert re.search(rf"ssh -N -L {port}:127\.0\.0\.1:{port} \S+@\S+", output)
        # TensorBoard imported TensorFlow (it serves the runs with it): none of its start-up lines show.
        assert not [line for line in output.splitlines() if is_startup_notice(line)], output
    finally:
        _stop(server)


def test_distrain_tensorboard_bad_input(tmp_path):
    import socket

    from conftest import run_distrain

    result = run_distrain(["tensorboard", str(tmp_path / "missing")], timeout=60)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "no such directory" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_distrain(["tensorboard", str(tmp_path), "--port", str(busy.getsockname()[1])], timeout=60)
    assert result.returncode == 2 and "is in use" in result.stderr, result.stderr


def test_tunnel_commands():
    from distrain.report import tunnel_commands

    assert tunnel_commands(6006, "node17", "ada") == ["ssh -N -L 6006:127.0.0.1:6006 ada@node17"]
    assert tunnel_commands(6007, "node17", "ada", via="login1") == [
        "ssh -N -L 6007:127.0.0.1:6007 -J ada@login1 ada@node17"]
    assert tunnel_commands(6006, "login1", "ada", via="login1") == ["ssh -N -L 6006:127.0.0.1:6006 ada@login1"]


def test_write_test_metrics(tmp_path):
    from distrain.rundir import RunDir
    from distrain.tensorboard_log import write_test_metrics

    write_test_metrics(RunDir(tmp_path), {"loss": 0.5, "accuracy": 0.75}, epoch=3)
    assert not (tmp_path / "tensorboard").exists()  # logging.tensorboard false: nothing to add to
    (tmp_path / "tensorboard").mkdir()
    write_test_metrics(RunDir(tmp_path), {"loss": 0.5, "accuracy": 0.75}, epoch=3)
    test = accumulate(tmp_path / "tensorboard" / "test")
    assert scalars(test, "epoch_loss") == {3: 0.5} and scalars(test, "epoch_accuracy") == {3: 0.75}
