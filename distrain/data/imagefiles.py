"""Image files on disk: listing a ``class_name/image`` folder, a cheap header check of every file,
decoding inside ``tf.data``, and the decoded-example cache (``data.cache``).

The check reads each file's header and its last bytes only (no decoding): enough to find files
that are not images, are truncated, or are in a format TensorFlow cannot decode, and to learn
their size and channels. Every worker runs it on the same sorted list and so drops the same
files: the index stream stays identical on every worker and no worker waits on a peer that
skipped something.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from distrain.errors import UsageError

log = logging.getLogger("distrain")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# More unreadable files than this fraction is a broken copy of the dataset, not a few bad files.
MAX_BAD_FRACTION = 0.01
_HEAD_BYTES = 2048  # holds a JPEG's frame header unless a large EXIF block comes first
_SCAN_THREADS = 16
_SCAN_CHUNK = 256  # the check is I/O-bound (open, two small reads); threads hide shared-FS latency


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says; ``problem`` is set when the file cannot be decoded."""

    format: Optional[str] = None
    height: int = 0
    width: int = 0
    channels: int = 0  # 0: not in the part of the header read
    size: int = 0
    mtime_ns: int = 0
    problem: Optional[str] = None


def _jpeg(read, head: bytes, tail: bytes) -> ImageInfo:
    if not tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return ImageInfo("jpeg", problem="truncated JPEG (no end-of-image marker)")
    pos = 2
    # Walk the segments to the frame header (SOFn), over APPn blocks such as EXIF; past the
    # bytes already read (a large EXIF block), read on from the file.
    while True:
        seg = head[pos:pos + 10] if pos + 10 <= len(head) else read(pos, 10)
        if len(seg) < 4 or seg[0] != 0xFF:
            return ImageInfo("jpeg", problem="damaged JPEG header")
        marker = seg[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if len(seg) < 10:
                return ImageInfo("jpeg", problem="damaged JPEG header")
            height, width = struct.unpack(">HH", seg[5:9])
            channels = seg[9]
            if channels not in (1, 3):
                return ImageInfo("jpeg", height, width, channels,
                                 problem=f"JPEG with {channels} colour components (CMYK?), which TensorFlow cannot decode")
            return ImageInfo("jpeg", height, width, channels)
        if marker == 0xDA:  # start of scan before any frame header
            return ImageInfo("jpeg", problem="damaged JPEG header")
        pos += 2 + struct.unpack(">H", seg[2:4])[0]


_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _png(head: bytes, tail: bytes) -> ImageInfo:
    if len(head) < 26 or head[12:16] != b"IHDR":
        return ImageInfo("png", problem="damaged PNG header")
    if b"IEND" not in tail[-12:]:
        return ImageInfo("png", problem="truncated PNG (no IEND chunk)")
    width, height = struct.unpack(">II", head[16:24])
    return ImageInfo("png", height, width, _PNG_CHANNELS.get(head[25], 0))


def _gif(head: bytes, tail: bytes) -> ImageInfo:
    if not tail.rstrip(b"\x00").endswith(b"\x3b"):
        return ImageInfo("gif", problem="truncated GIF (no trailer)")
    width, height = struct.unpack("<HH", head[6:10])
    return ImageInfo("gif", height, width, 3)


def _bmp(head: bytes, size: int) -> ImageInfo:
    if len(head) < 30:
        return ImageInfo("bmp", problem="damaged BMP header")
    declared = struct.unpack("<I", head[2:6])[0]
    if declared > size:
        return ImageInfo("bmp", problem=f"truncated BMP ({size} of {declared} bytes)")
    width, height = struct.unpack("<ii", head[18:26])
    bits = struct.unpack("<H", head[28:30])[0]
    return ImageInfo("bmp", abs(height), width, {8: 1, 24: 3, 32: 4}.get(bits, 0))


def read_header(path: str) -> ImageInfo:
    """The format, size and channels of one image file, from its first and last bytes.

    Args:
        path: the file.

    Returns:
        An ``ImageInfo``; ``problem`` names why the file cannot be decoded, if it cannot.
    """
    try:
        # Raw reads at offsets: a few system calls per file, during which other threads run.
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            head = os.pread(fd, _HEAD_BYTES, 0)
            tail = os.pread(fd, 64, max(0, st.st_size - 64))
            if head.startswith(b"\xff\xd8\xff"):
                info = _jpeg(lambda offset, n: os.pread(fd, n, offset), head, tail)
            elif head.startswith(b"\x89PNG\r\n\x1a\n"):
                info = _png(head, tail)
            elif head[:6] in (b"GIF87a", b"GIF89a"):
                info = _gif(head, tail)
            elif head.startswith(b"BM"):
                info = _bmp(head, st.st_size)
            elif not head:
                info = ImageInfo(problem="empty file")
            else:
                info = ImageInfo(problem="not a JPEG, PNG, GIF or BMP image")
        finally:
            os.close(fd)
    except OSError as err:
        return ImageInfo(problem=f"unreadable ({err.strerror or err})")
    return ImageInfo(info.format, info.height, info.width, info.channels, st.st_size, st.st_mtime_ns, info.problem)


def _images_under(folder: str) -> list[str]:
    """Image files below ``folder`` (os.walk: several times faster than Path.rglob on big folders)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


def layout_problem(path: str, classes: list[str], counts: list[int], loose: int) -> Optional[str]:
    """Why a folder is not a ``class_name/image`` folder training can use, in one line, or None.

    Args:
        path: the folder, for the message.
        classes: its class folders, sorted.
        counts: images in each class folder.
        loose: images directly in the folder, outside any class folder.
    """
    expected = f"expected one folder per class, {path}/<class_name>/<image> ({', '.join(IMAGE_EXTENSIONS)})"
    if not classes and loose:
        return f"data.path: {path} holds {loose} images but no class folders; {expected}, at least two classes"
    if not classes:
        return f"data.path: {path} has no class folders and no images; {expected}, at least two classes"
    if len(classes) == 1:
        return (f"data.path: {path} has one class folder ({classes[0]}, {counts[0]} images); training needs at least "
                f"two classes: {expected}")
    return None


def _loose_images(root: Path) -> int:
    return sum(1 for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
               and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_image_folder(path: str, strict: bool = True) -> tuple[list[str], np.ndarray, list[str]]:
    """Files and labels of a ``class_name/image.jpg`` folder, classes in sorted order.

    Same order as ``tf.keras.utils.image_dataset_from_directory`` (sorted class names, sorted
    files), so labels agree with a model trained by the course's code on the same folder.

    Args:
        path: the folder.
        strict: refuse a class folder without images (``False``: list it, for ``distrain data inspect``).

    Raises:
        UsageError: not a directory, not a folder of class folders (``layout_problem``: loose
            images, no class folder, one class); with ``strict``: a class folder without images.
    """
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"data.path: {path} is not a directory on {socket.gethostname()} (every node must "
                         f"see the data at the same path: a shared filesystem or a copy on each node)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels, counts = [], [], []
    for label, name in enumerate(classes):
        found = sorted(_images_under(str(root / name)))
        if not found and strict:
            raise UsageError(f"data.path: class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                             f"add images or remove the folder")
        files += found
        labels += [label] * len(found)
        counts.append(len(found))
    loose = _loose_images(root)
    problem = layout_problem(path, classes, counts, loose)
    if problem:
        raise UsageError(problem)
    if loose:
        log.warning("data.path: %d images directly in %s are in no class folder: not used", loose, path)
    return files, np.asarray(labels, np.int32), classes


def scan(files: list[str]) -> list[ImageInfo]:
    """``read_header`` of every file, in the files' order (threaded: the work is I/O)."""
    # Chunks of files per task: per-file futures would cost more than a header check on local disk.
    chunks = [files[i:i + _SCAN_CHUNK] for i in range(0, len(files), _SCAN_CHUNK)]
    if len(chunks) <= 1:
        return [read_header(f) for f in files]
    with ThreadPoolExecutor(min(_SCAN_THREADS, len(chunks))) as pool:
        return [info for chunk in pool.map(lambda c: [read_header(f) for f in c], chunks) for info in chunk]


def drop_unreadable(files: list[str], labels: np.ndarray, infos: list[ImageInfo], where: str,
                    max_bad_fraction: float = MAX_BAD_FRACTION):
    """Removes the files whose header check failed, with one warning naming them and a count.

    Returns:
        (files, labels, infos) of the readable files.

    Raises:
        UsageError: more than ``max_bad_fraction`` of the files are unreadable.
    """
    bad = [i for i, info in enumerate(infos) if info.problem]
    if not bad:
        return files, labels, infos
    names = "; ".join(f"{files[i]}: {infos[i].problem}" for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
    if len(bad) > max_bad_fraction * len(files):
        raise UsageError(f"data.path: {len(bad)} of {len(files)} images in {where} cannot be decoded (more than "
                         f"{max_bad_fraction:.0%}): {names}; run `distrain data inspect {where}`")
    log.warning("data.path: skipping %d of %d images that cannot be decoded, on every worker alike: %s",
                len(bad), len(files), names)
    keep = np.setdiff1d(np.arange(len(files)), bad)
    return [files[i] for i in keep], labels[keep], [infos[i] for i in keep]


def warn_mixed_channels(infos: list[ImageInfo], channels: int, where: str) -> None:
    """Mixed colour modes are converted to the model's channels (as Keras's loaders do); say so once."""
    counts: dict[int, int] = {}
    for info in infos:
        if info.channels:
            counts[info.channels] = counts.get(info.channels, 0) + 1
    if len(counts) > 1:
        seen = ", ".join(f"{n} with {c} channel{'s' * (c > 1)}" for c, n in sorted(counts.items()))
        log.warning("data.path: %s mixes colour modes (%s); every image is converted to %d channel%s", where, seen,
                    channels, "s" * (channels > 1))


def decode(tf, contents, image_size, channels: int):
    """Encoded bytes → ``image_size`` uint8 image with ``channels`` channels (a TensorFlow op)."""
    image = tf.io.decode_image(contents, channels=channels, expand_animations=False)
    image = tf.cast(tf.image.resize(image, image_size), tf.uint8)
    image.set_shape([*image_size, channels])
    return image


def cache_key(files: list[str], infos: list[ImageInfo], image_size, channels: int) -> str:
    """Changes when a file is added, removed, replaced or touched, or the decoded shape changes."""
    h = hashlib.sha256(f"{list(image_size)} {channels}\n".encode())
    for f, info in zip(files, infos):
        h.update(f"{f}\0{info.size}\0{info.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def check_cache_room(where: str, count: int, shape) -> None:
    """Fails early when ``data.cache`` cannot hold every example it may be asked to keep.

    Raises:
        UsageError: ``memory`` beyond this node's RAM, or a directory without the disk space.
    """
    if where == "none":
        return
    need = count * int(np.prod(shape))
    gib = 2 ** 30
    if where == "memory":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > 0.8 * ram:
            raise UsageError(f"data.cache: memory would need {need / gib:.1f} GiB for {count} decoded examples of "
                             f"{list(shape)}; this node has {ram / gib:.1f} GiB: use a node-local directory or none")
        return
    folder = Path(where).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise UsageError(f"data.cache: cannot use {folder} on {socket.gethostname()}: {err.strerror or err}") from None
    if need > free:
        raise UsageError(f"data.cache: {folder} has {free / gib:.1f} GiB free, the cache needs up to {need / gib:.1f} GiB "
                         f"({count} decoded examples of {list(shape)}); choose another directory or none")


class DecodedCache:
    """Decoded examples kept after their first decode, looked up by example number.

    ``memory``: a zero-filled array whose pages the OS commits only when an example is written,
    so memory grows with what this worker has seen. A directory: the same array as a memory-mapped
    file ``DIR/distrain-<key>-<host>/``; later runs and requeues on the node reuse it. The host is
    in the name because mmap writes are only coherent between processes of one machine. An
    example's pixels are written before its "filled" flag, so a reader never sees a half example.

    Cached pixels are the decoder's own output, so a cached epoch is bit-identical to a streamed one.
    """

    def __init__(self, where: str, count: int, shape: tuple[int, ...], key: str) -> None:
        self.shape = tuple(shape)
        if where == "memory":
            self.images = np.zeros((count, *shape), np.uint8)
            self.filled = np.zeros(count, np.uint8)
            self.path = None
            return
        self.path = Path(where).expanduser() / f"distrain-{key}-{socket.gethostname()}"
        self.path.mkdir(parents=True, exist_ok=True)
        self.images = self._mapped(self.path / "images.u8", (count, *shape))
        self.filled = self._mapped(self.path / "filled.u8", (count,))
        log.info("data.cache: %s (%d of %d examples already decoded)", self.path, int(self.filled.sum()), count)

    @staticmethod
    def _mapped(path: Path, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != nbytes:  # a new file (sparse until written); all workers agree on the size
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        return np.memmap(path, np.uint8, "r+", shape=shape)

    def lookup(self, tf, index, decode_fn):
        """The image of example ``index``: from the cache, else ``decode_fn()`` (then cached)."""
        def is_filled(i):
            return np.bool_(self.filled[i])

        def read(i):
            return np.asarray(self.images[i])

        def store(i, image):
            self.images[i] = image
            self.filled[i] = 1
            return image

        hit = tf.numpy_function(is_filled, [index], tf.bool, stateful=True)
        hit.set_shape([])
        image = tf.cond(hit, lambda: tf.numpy_function(read, [index], tf.uint8, stateful=True),
                        lambda: tf.numpy_function(store, [index, decode_fn()], tf.uint8, stateful=True))
        image.set_shape(self.shape)
        return image
