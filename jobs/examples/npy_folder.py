"""Your own data: a loader for a folder of NumPy files, with the contract of ``tf.keras.datasets``.

The folder holds ``x_train.npy``, ``y_train.npy``, ``x_test.npy`` and ``y_test.npy``: images
N x H x W or N x H x W x C (uint8 0..255, or floats already scaled) and integer labels 0..classes-1.
distrain cuts the validation split from the training arrays, shards, shuffles and resumes exactly
as for its own sources. The folder is ``$NPY_DATA_DIR`` (default: ``npy-data`` next to this file);
on a cluster it must be on storage every node sees.

    python jobs/examples/npy_folder.py write jobs/examples/npy-data      digits as .npy files, to try it
    distrain train jobs/examples/npy_folder.yaml                          one machine
    NPY_DATA_DIR=/shared/my-data sbatch npy.sh                            (sbatch passes the variable on)
"""
import os
import sys
from pathlib import Path

import numpy as np

FILES = ("x_train", "y_train", "x_test", "y_test")


def load_data(folder=None):
    """Returns ``(x_train, y_train), (x_test, y_test)`` from FOLDER's four .npy files."""
    folder = Path(folder or os.environ.get("NPY_DATA_DIR") or Path(__file__).with_name("npy-data"))
    missing = [f"{name}.npy" for name in FILES if not (folder / f"{name}.npy").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (write them with: python {__file__} write {folder})")
    x_train, y_train, x_test, y_test = (np.load(folder / f"{name}.npy") for name in FILES)
    return (x_train, y_train), (x_test, y_test)


def write_digits(folder) -> None:
    """Writes scikit-learn's digits (8x8, scaled to 0..255 uint8) as the four files: a small example."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images * (255 / 16)).round().astype(np.uint8)
    y = digits.target.astype(np.int64)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cut = len(x) * 4 // 5
    for name, array in zip(FILES, (x[:cut], y[:cut], x[cut:], y[cut:])):
        np.save(folder / f"{name}.npy", array)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "write":
        sys.exit(f"usage: python {sys.argv[0]} write FOLDER")
    write_digits(sys.argv[2])
    print(f"wrote {', '.join(f'{n}.npy' for n in FILES)} to {sys.argv[2]}")
