"""Tiny data sets in the real on-disk formats, for the loader and vision-task tests."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """One idx file (uint8 payload): magic (0, 0, 0x08, ndim), big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def class_images(labels: np.ndarray, size: int, channels: int, rng) -> np.ndarray:
    """``[N, size, size, channels]`` uint8 noise with a bright class-specific band."""
    images = rng.integers(0, 60, (len(labels), size, size, channels)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c : 2 * c + 3, :, :] = 250
    return images


def tiny_fashion_mnist(directory: Path, n_train: int = 16, n_test: int = 8, seed: int = 0) -> Path:
    """The four Fashion-MNIST idx files (training files gzipped, test files plain)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, gz in [("train", n_train, True), ("t10k", n_test, False)]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = class_images(labels, 28, 1, rng)[..., 0]
        write_idx(directory / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels, gz)
    return directory


def cifar_batch(images_nhwc: np.ndarray, labels: np.ndarray) -> dict:
    """A batch dict as in cifar-10-batches-py: b"data" [N, 3072] (R, G, B planes)."""
    data = images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)
    return {
        b"batch_label": b"tiny",
        b"labels": [int(v) for v in labels],
        b"data": np.ascontiguousarray(data, dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
    }


def tiny_cifar10(root: Path, per_batch: int = 2, n_test: int = 8, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/`` with five training batches and a test batch."""
    rng = np.random.default_rng(seed)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    names = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]
    for name, n in names:
        labels = rng.integers(0, 10, n)
        batch = cifar_batch(class_images(labels, 32, 3, rng), labels)
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root
