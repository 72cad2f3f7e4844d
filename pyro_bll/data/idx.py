"""Reader for the idx format of (Fashion-)MNIST, plain or gzip-compressed.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``, which installs the
original files under ``/usr/share/datasets/fashion-mnist/``; any directory holding the
four files works (``--data-dir``).

An idx file is a 4-byte magic number ``(0, 0, dtype code, ndim)``, ``ndim`` big-endian
uint32 sizes, then ``prod(sizes)`` values. Anything else (bad magic, a header cut short, a
body shorter or longer than the header promises, a damaged gzip stream, labels outside
0..9) is a ``DataError`` with one line that names the file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FIX = "re-install dataset-fashion-mnist or point --data-dir at intact idx files"


class DataError(ValueError):
    """A missing or malformed data file."""


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is a corrupt or truncated gzip file ({e}); {_FIX}") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e}); {_FIX}") from None


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file: magic (0, 0, dtype, ndim), ndim big-endian sizes, then the data."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number); {_FIX}")
    ndim = raw[3]
    if ndim == 0:
        raise DataError(f"{path}: idx header declares 0 dimensions; {_FIX}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(
            f"{path} is truncated: {len(raw)} bytes, too short for its {ndim}-dimension "
            f"header; {_FIX}"
        )
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "corrupt"
        raise DataError(
            f"{path} holds {len(raw)} bytes, its header promises {expected} ({what}); {_FIX}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"missing {stem}[.gz] in {directory}; install the Debian package "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist, files in "
        f"{DEFAULT_FASHION_MNIST}) or point --data-dir at the idx files"
    )


def load_fashion_mnist(directory: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64 of the ``train`` or ``test`` split."""
    directory = Path(directory)
    image_path = _find(directory, _FILES[split][0])
    label_path = _find(directory, _FILES[split][1])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match"
        )
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise DataError(f"{directory}: {split} images and labels must be unsigned bytes; {_FIX}")
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{label_path}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}; {_FIX}"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
