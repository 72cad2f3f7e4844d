"""Reader for the idx format of (Fashion-)MNIST, plain or gzip-compressed.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``, which installs the
original files under ``/usr/share/datasets/fashion-mnist/``; any directory holding the
four files works (``--data-dir``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(ValueError):
    """A missing or malformed data file."""


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file: magic (0, 0, dtype, ndim), ndim big-endian sizes, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes, its header promises {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise DataError(
        f"missing {stem}[.gz] in {directory}; install the Debian package "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data-dir"
    )


def load_fashion_mnist(directory: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64 of the ``train`` or ``test`` split."""
    directory = Path(directory)
    images = read_idx(_find(directory, _FILES[split][0]))
    labels = read_idx(_find(directory, _FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
