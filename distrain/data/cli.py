"""``distrain data``: look at a dataset before spending GPU hours on it, and pack it into shards.

    distrain data inspect data/flowers                  classes, counts, sizes, unreadable files
    distrain data inspect data/flowers --decode         also decode every image (slower, finds more)
    distrain data pack data/flowers /scratch/flowers-tfr --shards 16 --image-size 224 224
    distrain data inspect /scratch/flowers-tfr          what a packed directory holds
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from distrain.data import imagefiles, tfrecord
from distrain.data.tfrecord import DEFAULTS
from distrain.errors import UsageError


def add_parser(subparsers) -> None:
    """Registers ``distrain data pack`` and ``distrain data inspect``."""
    p = subparsers.add_parser("data", help="inspect an image folder or shard directory; pack a folder into TFRecord",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    q = sub.add_parser("inspect", help="what a class_name/image folder or a packed directory holds")
    q.add_argument("path", type=Path, metavar="PATH")
    q.add_argument("--decode", action="store_true",
                   help="folder: decode every image with TensorFlow, as training will; packed directory: count "
                        "every shard's records against the metadata")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(handler=cmd_inspect)

    q = sub.add_parser("pack", help="write an image folder as TFRecord shards (data.source: tfrecord)")
    q.add_argument("folder", type=Path, metavar="IMAGE_FOLDER")
    q.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    q.add_argument("--shards", type=int, required=True,
                   help="training shards: a multiple of the number of workers (input pipelines) you will use")
    q.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="resize and store as JPEG (default: store the files' own bytes)")
    q.add_argument("--channels", type=int, choices=(1, 3), default=3, help="with --image-size (default: 3)")
    q.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help=f"split seed: the job's `seed` (default: {DEFAULTS.seed}, a job's default)")
    q.add_argument("--validation-split", type=float, default=DEFAULTS.data.validation_split,
                   help=f"as data.validation_split (default: {DEFAULTS.data.validation_split})")
    q.add_argument("--test-split", type=float, default=DEFAULTS.data.test_split,
                   help=f"as data.test_split (default: {DEFAULTS.data.test_split})")
    q.add_argument("--quality", type=int, default=95, help="JPEG quality with --image-size (default: 95)")
    q.set_defaults(handler=cmd_pack)


def cmd_pack(args) -> int:
    if args.shards < 1:
        raise UsageError(f"--shards: expected a positive number, got {args.shards}")
    if not args.folder.is_dir():
        raise UsageError(f"IMAGE_FOLDER: no such directory: {args.folder}")
    if args.image_size and min(args.image_size) < 1:
        raise UsageError(f"--image-size: expected positive H W, got {args.image_size}")
    for flag, value in (("--validation-split", args.validation_split), ("--test-split", args.test_split)):
        if not 0 <= value < 1:
            raise UsageError(f"{flag}: expected a fraction in [0, 1), got {value}")
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality: expected 1..100, got {args.quality}")

    with log_to_stderr():
        meta = tfrecord.pack(str(args.folder), str(args.out_dir), shards=args.shards, image_size=args.image_size,
                             channels=args.channels, seed=args.seed, validation_split=args.validation_split,
                             test_split=args.test_split, quality=args.quality)
    s = meta["splits"]
    print(f"wrote {args.out_dir}: {len(meta['classes'])} classes; train {s['train']['count']} in "
          f"{len(s['train']['shards'])} shards, validation {s['val']['count']}, test {s['test']['count']}")
    print(f"train with: data: {{source: tfrecord, path: {args.out_dir}}}")
    return 0


@contextlib.contextmanager
def log_to_stderr(level: int = logging.INFO):
    """distrain's log lines from ``level`` up (files left out, the class count, ...) on stderr while a
    command runs (``data pack``, ``validate``)."""
    log = logging.getLogger("distrain")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.setLevel(level)
    saved = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved)


def inspect_folder(path: str, decode: bool = False) -> dict:
    """Classes, counts, formats, sizes and channels seen, and unreadable files of an image folder.

    Args:
        path: a ``class_name/image`` folder.
        decode: also decode every header-valid image with TensorFlow (what training does).

    Raises:
        UsageError: not a folder of at least two class folders (loose images, one class), in one
            line saying the layout expected (``imagefiles.layout_problem``).
    """

    files, labels, classes = imagefiles.list_image_folder(path, strict=False)
    infos = imagefiles.scan(files)
    bad = {f: info.problem for f, info in zip(files, infos) if info.problem}
    if decode:
        bad.update(_decode_failures([f for f in files if f not in bad]))
    ok = [info for f, info in zip(files, infos) if f not in bad]
    per_class = Counter(int(y) for f, y in zip(files, labels) if f not in bad)
    return {
        "path": str(path), "kind": "image_folder", "images": len(files), "readable": len(ok),
        "classes": {name: per_class.get(i, 0) for i, name in enumerate(classes)},
        "formats": dict(Counter(i.format for i in ok).most_common()),
        "channels": {str(c): n for c, n in sorted(Counter(i.channels for i in ok).items())},
        "sizes": {f"{h}x{w}": n for (h, w), n in Counter((i.height, i.width) for i in ok).most_common(10)},
        "distinct_sizes": len({(i.height, i.width) for i in ok}),
        "unreadable": bad,
    }


def _decode_failures(files: list[str]) -> dict:
    import tensorflow as tf

    def check(i, path):
        image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        return i, tf.shape(image)[0]

    ds = tf.data.Dataset.from_tensor_slices((list(range(len(files))), files or [""])).take(len(files))
    ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=False)
    decoded = {int(i) for i, _ in ds.as_numpy_iterator()}
    return {files[i]: "TensorFlow cannot decode it" for i in range(len(files)) if i not in decoded}


def inspect_records(path: str, verify: bool = False) -> dict:
    """What a directory written by ``distrain data pack`` holds (with ``verify``: records counted)."""

    records = tfrecord.read_metadata(path)
    meta = records.metadata
    out = {"path": str(path), "kind": "tfrecord", "classes": records.classes, "counts": records.counts,
           "shards": {s: len(records.shards.get(s, [])) for s in tfrecord.SPLITS},
           "image_size": meta.get("image_size"), "encoding": meta.get("encoding"), "seed": meta.get("seed"),
           "source": meta.get("source"), "failed_to_decode": meta.get("failed_to_decode", [])}
    if verify:
        import tensorflow as tf

        wrong = {}
        for split in tfrecord.SPLITS:
            for (name, count), f in zip(records.shards.get(split, []), records.files(split)):
                found = sum(1 for _ in tf.data.TFRecordDataset(f))
                if found != count:
                    wrong[name] = f"{found} records, metadata says {count}"
        out["mismatched_shards"] = wrong
    return out


def cmd_inspect(args) -> int:

    if not args.path.is_dir():
        raise UsageError(f"PATH: no such directory: {args.path}")
    packed = (args.path / tfrecord.METADATA).exists()
    info = inspect_records(str(args.path), verify=args.decode) if packed else inspect_folder(str(args.path), args.decode)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    if packed:
        c = info["counts"]
        print(f"{info['path']}: TFRecord ({info['encoding']}, image size {info['image_size'] or 'as packed'}), "
              f"{len(info['classes'])} classes, packed from {info['source']} with seed {info['seed']}")
        for split in tfrecord.SPLITS:
            print(f"  {split:<5} {c[split]:>9} examples in {info['shards'][split]} shards")
        print(f"  classes: {', '.join(info['classes'][:20])}{' ...' if len(info['classes']) > 20 else ''}")
        if info["failed_to_decode"]:
            print(f"  left out when packing: {len(info['failed_to_decode'])} images that failed to decode")
        for name, problem in info.get("mismatched_shards", {}).items():
            print(f"  MISMATCH {name}: {problem}")
        return 0
    print(f"{info['path']}: {info['images']} images in {len(info['classes'])} classes, {info['readable']} readable")
    width = max((len(n) for n in info["classes"]), default=0)
    for name, n in info["classes"].items():
        print(f"  {name:<{width}} {n:>9}" + ("  (no readable images: training refuses an empty class)" if not n else ""))
    print("  formats: " + ", ".join(f"{k} {v}" for k, v in info["formats"].items()))
    print("  channels: " + ", ".join(f"{k}: {v}" for k, v in info["channels"].items())
          + ("  (mixed: converted to the model's channels when training)" if len(info["channels"]) > 1 else ""))
    print(f"  sizes (HxW, {info['distinct_sizes']} distinct): " + ", ".join(f"{k} {v}" for k, v in info["sizes"].items()))
    if info["unreadable"]:
        print(f"  unreadable: {len(info['unreadable'])}")
        for f, problem in list(info["unreadable"].items())[:50]:
            print(f"    {f}: {problem}")
        if len(info["unreadable"]) > 50:
            print(f"    ... {len(info['unreadable']) - 50} more (--json lists all)")
    else:
        print("  unreadable: none")
    return 0
