"""Streamed image folders and TFRecord shards: listing without decoding, the header check and bad
input, the index stream over files (disjoint, covering, equal to one process, resumable), the
decoded cache, pack/read of TFRecord shards, and ``distrain data inspect``."""
import json
import logging

import numpy as np
import pytest

import distrain  # noqa: F401  (tf-keras before TensorFlow)
import tensorflow as tf

from distrain import cli
from distrain.data import imagefiles, tfrecord
from distrain.data import sources
from distrain.data.pipelines import steps_per_epoch
from distrain.data.splits import split_indices
from distrain.errors import UsageError
from distrain.spec import spec_from_dict
from helpers import CLASSES, COUNT, solid_folder

NO_AUGMENT = spec_from_dict({}).data.augment


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return solid_folder(tmp_path_factory.mktemp("folder") / "imgs")


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "tfr"
    assert cli.main(["data", "pack", str(folder), str(out), "--shards", "4", "--seed", "5"]) == 0
    return out


def spec_for(path, source="image_folder", **extra):
    return spec_from_dict({"data": {"source": source, "path": str(path), "image_size": [8, 8], "rescale": 1.0,
                                    **extra}}).data


def ids(ds):
    """Per batch: the sorted ids (pixel values) of its images."""
    return [sorted(x[:, 0, 0, 0].astype(int).tolist()) for x, _ in ds.as_numpy_iterator()]


def image_ids(source, positions):
    """The pixel values of the files at these positions (file ``0042.png`` holds value 42)."""
    return sorted(int(source.files[p].rsplit("/", 1)[1][:4]) for p in positions)


def pipelines(source, global_batch=16, seed=7):
    return source.pipelines(global_batch, steps_per_epoch(source.train_size, global_batch), seed, source.input_shape,
                            NO_AUGMENT)


def test_a_folder_is_listed_and_checked_not_decoded(folder, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("load() decoded an image")
    monkeypatch.setattr(tf.io, "decode_image", refuse)
    s = sources.load(spec_for(folder), seed=5)
    assert (s.train_size, s.val_size, s.test_size) == (64, 16, 20)
    assert s.input_shape == (8, 8, 3) and s.num_classes == 4 and len(s.files) == COUNT
    # Positions of files, labels from the class folder, the splits disjoint and complete.
    assert sorted(np.concatenate([s.train, s.validation, s.test]).tolist()) == list(range(COUNT))
    assert image_ids(s, range(COUNT)) == list(range(COUNT))
    assert all(CLASSES[s.labels[x]] in s.files[x] for x in s.train)


@pytest.mark.parametrize("num_pipelines,replicas_per_pipeline", [(2, 1), (4, 1), (2, 2)])
def test_streamed_folder_shards_are_disjoint_cover_each_epoch_and_equal_one_process(folder, num_pipelines,
                                                                                    replicas_per_pipeline):
    s = sources.load(spec_for(folder), seed=5)
    pipes, epochs = pipelines(s), 2
    steps = pipes.steps
    single = ids(pipes.train(tf.distribute.InputContext(1, 0, 1), epochs))
    replicas = num_pipelines * replicas_per_pipeline
    shards = [ids(pipes.train(tf.distribute.InputContext(num_pipelines, i, replicas), epochs))
              for i in range(num_pipelines)]
    train_ids = image_ids(s, s.train)
    for epoch in range(epochs):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            union = sorted(sum((shard[step * replicas_per_pipeline + r] for shard in shards
                                for r in range(replicas_per_pipeline)), []))
            assert union == single[step], f"global step {step} differs from one process"
            seen += union
        assert sorted(seen) == train_ids  # disjoint and every training image exactly once
    assert single[:steps] != single[steps:]


def test_streamed_folder_resumes_at_any_step(folder):
    pipes = pipelines(sources.load(spec_for(folder), seed=5), global_batch=8)
    ctx = tf.distribute.InputContext(2, 1, 2)
    full = ids(pipes.train(ctx, 3))
    assert len(full) == 3 * pipes.steps
    for start in (1, 5, pipes.steps, 2 * pipes.steps + 3):
        assert ids(pipes.train(ctx, 3, start_step=start)) == full[start:]


@pytest.mark.parametrize("num_pipelines", [1, 2, 3])
def test_streamed_evaluation_deals_each_worker_its_share(folder, num_pipelines):
    s = sources.load(spec_for(folder), seed=5)
    pipes = pipelines(s, global_batch=6)
    for which, expected in (("validation", s.validation), ("test", s.test)):
        shares = [sum(ids(pipes.evaluation(tf.distribute.InputContext(num_pipelines, i, num_pipelines), which)), [])
                  for i in range(num_pipelines)]
        assert sorted(sum(shares, [])) == image_ids(s, expected)
        for i, share in enumerate(shares):
            assert sorted(share) == image_ids(s, expected[i::num_pipelines])


def test_folder_labels_follow_the_class_folders(folder):
    s = sources.load(spec_for(folder), seed=5)
    x, y = next(pipelines(s).train(tf.distribute.InputContext(1, 0, 1), 1).as_numpy_iterator())
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert (x[:, 0, 0, 0].astype(int) % 4 == y).all()  # image k is in class folder k % 4


@pytest.mark.parametrize("cache", ["memory", "dir"])
def test_decoded_cache_serves_later_epochs_bit_identical_without_the_files(tmp_path, cache):
    root = solid_folder(tmp_path / "imgs")
    where = str(tmp_path / "cache") if cache == "dir" else "memory"
    s = sources.load(spec_for(root, cache=where), seed=5)
    streamed = pipelines(sources.load(spec_for(root), seed=5))
    ctx = tf.distribute.InputContext(1, 0, 1)
    expected = ids(streamed.train(ctx, 2))
    pipes = pipelines(s)
    first = ids(pipes.train(ctx, 1))
    for f in root.rglob("*.png"):  # from here on only the cache can serve the training images
        f.unlink()
    second = ids(pipes.train(ctx, 2, start_step=pipes.steps))
    assert first + second == expected
    if cache == "dir":
        # A later run (a requeue) on this node finds every training image decoded already.
        again = pipelines(s)
        assert int(again.decoded_cache.filled.sum()) == 64
        assert ids(again.train(ctx, 3, start_step=2 * pipes.steps)) != []


def test_a_cache_that_cannot_fit_is_a_usage_error(folder, tmp_path):
    with pytest.raises(UsageError, match=r"data.cache: memory would need .* GiB for 100 decoded examples of \[40000, 40000, 3\]"):
        sources.load(spec_for(folder, cache="memory", image_size=[40000, 40000]), seed=5)
    with pytest.raises(UsageError, match=r"data.cache: .* GiB free, the cache needs up to"):
        sources.load(spec_for(folder, cache=str(tmp_path / "c"), image_size=[400000, 400000]), seed=5)


def test_cache_only_for_streamed_sources():
    with pytest.raises(UsageError, match="data.cache: only used with source image_folder or tfrecord"):
        spec_from_dict({"data": {"source": "digits", "cache": "memory"}})


# --- bad input --------------------------------------------------------------------------------

def test_header_check_reads_formats_sizes_and_channels(tmp_path):
    from PIL import Image

    cases = {"rgb.jpg": ("RGB", "JPEG", 3), "gray.jpg": ("L", "JPEG", 1), "rgba.png": ("RGBA", "PNG", 4),
             "gray.png": ("L", "PNG", 1), "pal.gif": ("P", "GIF", 3), "rgb.bmp": ("RGB", "BMP", 3)}
    for name, (mode, fmt, _) in cases.items():
        Image.new(mode, (13, 7)).save(tmp_path / name, fmt)
    for name, (_, fmt, channels) in cases.items():
        info = imagefiles.read_header(str(tmp_path / name))
        assert (info.format, info.height, info.width, info.channels, info.problem) == (fmt.lower(), 7, 13, channels, None), name
    whole = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "cut.png").write_bytes((tmp_path / "rgba.png").read_bytes()[:-20])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    problems = {n: imagefiles.read_header(str(tmp_path / n)).problem for n in ("cut.jpg", "cut.png", "text.jpg", "empty.png")}
    assert problems == {"cut.jpg": "truncated JPEG (no end-of-image marker)", "cut.png": "truncated PNG (no IEND chunk)",
                        "text.jpg": "not a JPEG, PNG, GIF or BMP image", "empty.png": "empty file"}


def test_a_few_corrupt_files_are_skipped_on_every_worker_with_a_warning(tmp_path, caplog):
    root = solid_folder(tmp_path / "imgs", count=120, size=(4, 4))
    good = (root / "ant" / "0000.png").read_bytes()
    (root / "bee" / "zz-cut.png").write_bytes(good[:-20])
    caplog.set_level(logging.WARNING, "distrain")
    logging.getLogger("distrain").propagate = True
    spec = spec_for(root)
    s = sources.load(spec, seed=5)
    assert len(s.files) == 120 and not any("zz-cut" in f for f in s.files)
    assert "skipping 1 of 121 images that cannot be decoded, on every worker alike" in caplog.text
    assert "zz-cut.png: truncated PNG" in caplog.text
    # Every worker lists, checks and splits alike: the same files in the same positions.
    assert np.array_equal(sources.load(spec, seed=5, shard=(1, 2)).files, s.files)
    x, _ = next(pipelines(s).train(tf.distribute.InputContext(1, 0, 1), 1).as_numpy_iterator())
    assert x.shape == (16, 8, 8, 3)


def test_many_corrupt_files_are_a_usage_error(tmp_path):
    root = solid_folder(tmp_path / "imgs", count=20, size=(4, 4))
    for k in range(3):
        (root / "ant" / f"bad{k}.jpg").write_text("oops")
    with pytest.raises(UsageError) as info:
        sources.load(spec_for(root), seed=5)
    assert str(info.value).startswith("data.path: 3 of 23 images in ") and "distrain data inspect" in str(info.value)
    assert "\n" not in str(info.value)


def test_an_empty_class_folder_is_a_usage_error(tmp_path):
    root = solid_folder(tmp_path / "imgs", count=8, size=(4, 4))
    (root / "eel").mkdir()
    with pytest.raises(UsageError, match=r"data.path: class folder .*eel has no images"):
        sources.load(spec_for(root), seed=5)


def test_a_folder_with_more_classes_than_model_num_classes_is_a_usage_error_naming_the_class(folder, caplog):
    caplog.set_level(logging.INFO, "distrain")
    logging.getLogger("distrain").propagate = True
    s = sources.load(spec_for(folder), seed=5)
    assert s.num_classes == 4
    assert f"data.path: {folder}: 4 classes, from the class folders: ant, bee, cat, dog" in caplog.text
    dogs = int(np.sum(s.labels[s.train] == 3))
    with pytest.raises(UsageError) as info:
        sources.load(spec_for(folder), seed=5, num_classes=3)
    assert str(info.value) == (f"data.path: {folder}: {dogs} train labels outside 0 .. 2 (3 classes, from "
                               f"model.num_classes): 3 = dog ({dogs} labels); set model.num_classes to at least 4, or "
                               "remove it to take the data's count")


def test_a_class_folder_without_a_training_example_is_named_in_one_warning(tmp_path, caplog):
    from PIL import Image

    root = solid_folder(tmp_path / "imgs", count=12, size=(4, 4))
    (root / "eel").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "eel" / "only.png")
    # A seed whose split puts eel's one image (the last file) into the test split.
    seed = next(k for k in range(100) if 12 in split_indices(13, (0.2, 0.16), k)[0])
    caplog.set_level(logging.WARNING, "distrain")
    logging.getLogger("distrain").propagate = True
    sources.load(spec_for(root), seed=seed)
    warnings = [r.getMessage() for r in caplog.records if "training example" in r.getMessage()]
    assert warnings == [f"data.path: {root}: class 4 (eel) has no training example (5 classes, from the class "
                        "folders); the model cannot learn to predict it"]


@pytest.mark.parametrize("layout,message", [
    ("loose", "holds 3 images but no class folders; expected one folder per class, {root}/<class_name>/<image>"),
    ("one", "has one class folder (ant, 3 images); training needs at least two classes"),
])
def test_loose_images_or_one_class_folder_say_the_layout_expected(tmp_path, capsys, layout, message):
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "ant").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(root / ("ant" if layout == "one" else "") / f"{k}.png")
    if layout == "loose":
        (root / "ant").rmdir()
    expected = f"data.path: {root} " + message.format(root=root)
    with pytest.raises(UsageError) as info:
        sources.load(spec_for(root), seed=5)
    assert str(info.value).startswith(expected)
    # distrain data inspect said "0 images" (exit 0) for loose images: now the same one line, exit 2.
    assert cli.main(["data", "inspect", str(root)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"distrain: error: {expected}") and captured.err.count("\n") == 1
    assert captured.out == ""


def test_a_path_this_node_cannot_see_is_a_usage_error(tmp_path):
    spec = spec_for(solid_folder(tmp_path / "imgs", count=8, size=(4, 4)))
    (tmp_path / "imgs").rename(tmp_path / "elsewhere")  # validated on the login node, gone on this one
    with pytest.raises(UsageError, match=r"is not a directory on .*every node must see the data"):
        sources.load(spec, seed=5)


def test_mixed_channels_are_converted_with_a_warning(tmp_path, caplog):
    from PIL import Image

    root = solid_folder(tmp_path / "imgs", count=8, size=(4, 4))
    Image.new("L", (4, 4), 200).save(root / "ant" / "gray.png")
    caplog.set_level(logging.WARNING, "distrain")
    logging.getLogger("distrain").propagate = True
    s = sources.load(spec_for(root), seed=0, channels=3)
    assert "mixes colour modes (1 with 1 channel, 8 with 3 channels); every image is converted to 3 channels" in caplog.text
    pipes = s.pipelines(1, 1, 0, (8, 8, 3), NO_AUGMENT)
    shapes = {x.shape for which in ("validation", "test") for x, _ in pipes.evaluation(tf.distribute.InputContext(1, 0, 1), which)}
    assert shapes == {(1, 8, 8, 3)}


# --- TFRecord -----------------------------------------------------------------------------------

def test_pack_writes_equal_shards_and_metadata(packed, folder):
    meta = json.loads((packed / tfrecord.METADATA).read_text())
    assert meta["classes"] == list(CLASSES) and meta["encoding"] == "original"
    assert {s: meta["splits"][s]["count"] for s in tfrecord.SPLITS} == {"train": 64, "val": 16, "test": 20}
    assert [s["count"] for s in meta["splits"]["train"]["shards"]] == [16, 16, 16, 16]
    # The split is the one the image_folder source makes with the same seed.
    s = sources.load(spec_for(folder), seed=5)
    records = sources.load(spec_for(packed, "tfrecord"), seed=5)
    pipes = pipelines(records)
    val = sum(ids(pipes.evaluation(tf.distribute.InputContext(1, 0, 1), "validation")), [])
    assert sorted(val) == image_ids(s, s.validation)


@pytest.mark.parametrize("num_pipelines", [1, 2, 4])
def test_tfrecord_shards_are_disjoint_and_cover_each_epoch(packed, folder, num_pipelines):
    s = sources.load(spec_for(packed, "tfrecord"), seed=5, shard=(0, num_pipelines))
    pipes, epochs = pipelines(s), 2
    shards = [ids(pipes.train(tf.distribute.InputContext(num_pipelines, i, num_pipelines), epochs))
              for i in range(num_pipelines)]
    whole = sources.load(spec_for(folder), seed=5)
    train_ids = image_ids(whole, whole.train)
    for shard in shards:
        assert len(shard) == epochs * pipes.steps  # every worker runs the same number of steps
    for epoch in range(epochs):
        per_epoch = slice(epoch * pipes.steps, (epoch + 1) * pipes.steps)
        seen = sum((sum(shard[per_epoch], []) for shard in shards), [])
        assert sorted(seen) == train_ids  # disjoint, every example once
    assert shards[0][:pipes.steps] != shards[0][pipes.steps:]  # reshuffled each epoch


def test_tfrecord_resumes_at_the_same_step(packed):
    pipes = pipelines(sources.load(spec_for(packed, "tfrecord"), seed=5, shard=(1, 2)), global_batch=8)
    ctx = tf.distribute.InputContext(2, 1, 2)
    full = ids(pipes.train(ctx, 3))
    for start in (3, pipes.steps, 2 * pipes.steps + 5):
        assert ids(pipes.train(ctx, 3, start_step=start)) == full[start:]


def test_tfrecord_cache_gives_the_same_batches(packed):
    ctx = tf.distribute.InputContext(1, 0, 1)
    streamed = ids(pipelines(sources.load(spec_for(packed, "tfrecord"), seed=5)).train(ctx, 2))
    cached = pipelines(sources.load(spec_for(packed, "tfrecord", cache="memory"), seed=5))
    assert ids(cached.train(ctx, 2)) == streamed
    assert int(cached.decoded_cache.filled.sum()) == 64  # every training record, by its example number


def test_tfrecord_evaluation_covers_every_example_once(packed):
    s = sources.load(spec_for(packed, "tfrecord"), seed=5)
    pipes = pipelines(s, global_batch=6)
    seen = [sum(ids(pipes.evaluation(tf.distribute.InputContext(3, i, 3), "test")), []) for i in range(3)]
    assert len(sum(seen, [])) == len(set(sum(seen, []))) == s.test_size == 20


def test_tfrecord_bad_directories_are_usage_errors(packed, tmp_path):
    with pytest.raises(UsageError, match="has no distrain-data.json"):
        spec_from_dict({"data": {"source": "tfrecord", "path": str(tmp_path)}})
    with pytest.raises(UsageError, match="data.path: .* has 4 training shards for 8 input pipelines"):
        sources.load(spec_for(packed, "tfrecord"), seed=5, shard=(0, 8))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / tfrecord.METADATA).write_text((packed / tfrecord.METADATA).read_text())
    with pytest.raises(UsageError, match=r"shard .*train-00000-of-00004.tfrecord listed in .* is missing on "):
        sources.load(spec_for(copy, "tfrecord"), seed=5)


def test_pack_splits_by_default_as_a_job_with_the_default_seed_reads_the_folder(folder, tmp_path, capsys):
    out = tmp_path / "tfr"
    assert cli.main(["data", "pack", str(folder), str(out), "--shards", "2"]) == 0
    meta = json.loads((out / tfrecord.METADATA).read_text())
    job = spec_from_dict({"data": {"source": "image_folder", "path": str(folder)}})
    assert meta["seed"] == job.seed == 42
    direct = sources.load(job.data, job.seed)
    records = sources.load(spec_for(out, "tfrecord"), seed=job.seed)
    pipes = pipelines(records)
    for split, positions in (("validation", direct.validation), ("test", direct.test)):
        packed_ids = sum(ids(pipes.evaluation(tf.distribute.InputContext(1, 0, 1), split)), [])
        assert sorted(packed_ids) == image_ids(direct, positions), split
    # The classes per split are in the metadata, so a pack's labels are checked like a folder's.
    assert meta["label_counts"] == {packed: np.bincount(direct.labels[positions], minlength=4).tolist() for
                                    packed, positions in (("train", direct.train), ("val", direct.validation),
                                                          ("test", direct.test))}
    with pytest.raises(UsageError, match=r"^data.path: .*: \d+ train labels outside 0 .. 2 \(3 classes, from "
                                         r"model.num_classes\): 3 = dog"):
        sources.load(spec_for(out, "tfrecord"), seed=job.seed, num_classes=3)


def test_pack_resized_jpeg_trains_at_its_size(folder, tmp_path):
    out = tmp_path / "tfr"
    tfrecord.pack(str(folder), str(out), shards=2, image_size=[6, 6], progress=False)
    s = sources.load(spec_for(out, "tfrecord", image_size=[6, 6]), seed=0)
    x, y = next(pipelines(s).train(tf.distribute.InputContext(1, 0, 1), 1).as_numpy_iterator())
    assert x.shape == (16, 6, 6, 3)
    # JPEG of a solid image decodes to within a step of its value; the label follows the class folder.
    assert (np.round(x[:, 0, 0, 0]).astype(int) % 4 == y).mean() > 0.9
    with pytest.raises(UsageError, match="already holds a packed dataset"):
        tfrecord.pack(str(folder), str(out), shards=2, progress=False)


# --- distrain data inspect ----------------------------------------------------------------------

def test_inspect_a_folder_lists_classes_sizes_and_unreadable_files(tmp_path, capsys):
    from PIL import Image

    root = solid_folder(tmp_path / "imgs", count=12, size=(4, 4))
    Image.new("L", (9, 5)).save(root / "ant" / "gray.jpg")
    (root / "bee" / "broken.jpg").write_text("x")
    (root / "eel").mkdir()  # training refuses it; inspect shows it
    assert cli.main(["data", "inspect", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 14 and info["readable"] == 13
    assert info["classes"] == {"ant": 4, "bee": 3, "cat": 3, "dog": 3, "eel": 0}
    assert info["sizes"] == {"4x4": 12, "5x9": 1} and info["channels"] == {"1": 1, "3": 12}
    assert list(info["unreadable"]) == [str(root / "bee" / "broken.jpg")]
    assert cli.main(["data", "inspect", str(root)]) == 0
    text = capsys.readouterr().out
    assert "14 images in 5 classes, 13 readable" in text and "broken.jpg: not a JPEG" in text
    assert "eel         0  (no readable images" in text


def test_inspect_a_packed_directory(packed, capsys):
    assert cli.main(["data", "inspect", str(packed), "--decode"]) == 0
    text = capsys.readouterr().out
    assert "TFRecord (original" in text and "train        64 examples in 4 shards" in text and "MISMATCH" not in text


def test_data_commands_reject_bad_arguments(tmp_path, capsys):
    assert cli.main(["data", "inspect", str(tmp_path / "nope")]) == 2
    assert "PATH: no such directory" in capsys.readouterr().err
    assert cli.main(["data", "pack", str(tmp_path), str(tmp_path / "out"), "--shards", "0"]) == 2
    assert "--shards: expected a positive number" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_data_pack_prints_none_of_tensorflows_start_up_lines(folder, tmp_path):
    """`distrain data pack` imports TensorFlow to write the shards: its start-up notices (the E0000
    cuInit line among them) stay off the user's terminal, as for every other command."""
    import os
    import subprocess
    import sys

    from distrain.tf_startup import is_startup_notice

    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "DISTRAIN_TF_LOG")}
    done = subprocess.run([sys.executable, "-m", "distrain.cli", "data", "pack", str(folder), str(tmp_path / "tfr"),
                           "--shards", "2"], capture_output=True, text=True, timeout=100, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tfr").is_dir()
    assert not [line for line in done.stderr.splitlines() if is_startup_notice(line)], done.stderr
    assert "cuInit" not in done.stderr + done.stdout
