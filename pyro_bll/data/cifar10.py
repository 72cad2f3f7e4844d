"""Reader for CIFAR-10 in its python format, with torchvision's download as a fallback.

The python version of CIFAR-10 (``cifar-10-python.tar.gz``) unpacks to a directory
``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` (training, 50,000 images)
and ``test_batch`` (10,000 images). Each is a pickled dict with

    b"data"    uint8 ``[N, 3072]``: 1024 red, then 1024 green, then 1024 blue values of a
               32x32 image in row-major order
    b"labels"  N ints in 0..9

``--data-dir`` may name the directory that holds ``cifar-10-batches-py/`` (torchvision's
``root``) or ``cifar-10-batches-py/`` itself. The default is ``~/.cache/pyro_bll/cifar10``.
A directory that does not exist is refused (nothing is created, nothing downloaded). When
the directory exists but holds no files, torchvision's ``CIFAR10(root, download=True)`` is
tried there; where no network exists that fails with a ``DataError`` that says where to put
the files.

The pickles are read with an unpickler that admits only the NumPy array constructors, so
a data file can never run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pyro_bll.data.idx import DataError

DEFAULT_CIFAR10 = "~/.cache/pyro_bll/cifar10"
BATCHES_DIR = "cifar-10-batches-py"
SPLIT_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
NUM_CLASSES = 10
_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _fix(directory: Path) -> str:
    return (
        f"download {_URL} and unpack it into {directory} (it creates {BATCHES_DIR}/), "
        f"or point --data-dir at a directory holding {BATCHES_DIR}"
    )


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images ``[N, 32, 32, 3]`` uint8 (channels last), labels ``[N]``."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path} is not a CIFAR-10 python batch ({e}); replace it from {_URL}"
        ) from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path} lacks the b'data' array or b'labels'; replace it from {_URL}")
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: data is {data.dtype} {tuple(data.shape)}, expected uint8 [N, 3072]"
        )
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: {labels.shape} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels outside 0..{NUM_CLASSES - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _batches_dir(directory: Path) -> Path | None:
    for candidate in (directory / BATCHES_DIR, directory):
        if (candidate / SPLIT_FILES["test"][0]).is_file():
            return candidate
    return None


def _download(directory: Path) -> None:
    """torchvision's download into ``directory`` (fetches and unpacks the archive)."""
    from torchvision.datasets import CIFAR10

    CIFAR10(str(directory), train=True, download=True)


def load_cifar10(directory: str | Path, split: str, download: bool = True) -> tuple[Tensor, Tensor]:
    """Images ``[N, 32, 32, 3]`` uint8 (channels last) and labels ``[N]`` int64 of a split."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():  # nothing is created and nothing downloaded for a typo
        raise DataError(
            f"the CIFAR-10 directory {directory} does not exist; pass --data-dir with the "
            f"folder that holds {BATCHES_DIR}/, or create {directory} to let torchvision "
            "download the data set into it"
        )
    found = _batches_dir(directory)
    if found is None and download:
        try:
            _download(directory)
        except Exception as e:  # no network, a proxy, a full disk: one line, then stop
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"CIFAR-10 is not in {directory} and the download failed ({reason}); "
                f"{_fix(directory)}"
            ) from None
        found = _batches_dir(directory)
    if found is None:
        raise DataError(f"CIFAR-10 is not in {directory}; {_fix(directory)}")
    parts = []
    for name in SPLIT_FILES[split]:
        if not (found / name).is_file():
            raise DataError(f"missing {name} in {found}; {_fix(directory)}")
        parts.append(read_batch(found / name))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)
