"""The real idx loader and the Fashion-MNIST task, on tiny files written by the test."""

import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from pyro_bll.data import DataError, load_fashion_mnist, read_idx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import run  # noqa: E402


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def tiny_fashion_mnist(directory: Path, n_train=60, n_test=20, seed=0) -> None:
    """Files in the original Fashion-MNIST layout, with learnable class patterns."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, gz in [("train", n_train, True), ("t10k", n_test, False)]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 3, :] = 250  # a class-specific bright band
        _write_idx(directory / f"{split}-images-idx3-ubyte", images, gz)
        _write_idx(directory / f"{split}-labels-idx1-ubyte", labels, gz)


def test_loader_reads_plain_and_gzip_files(tmp_path):
    tiny_fashion_mnist(tmp_path)
    x, y = load_fashion_mnist(tmp_path, "train")
    assert x.shape == (60, 28, 28) and y.shape == (60,)
    assert int(x[0].max()) == 250
    xt, yt = load_fashion_mnist(tmp_path, "test")
    assert xt.shape == (20, 28, 28)
    assert (read_idx(tmp_path / "t10k-labels-idx1-ubyte") == yt.numpy()).all()


def test_missing_or_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "train")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match="header promises"):
        read_idx(short)


def test_fashion_mnist_task_one_epoch(tmp_path, capsys):
    data = tmp_path / "data"
    tiny_fashion_mnist(data)
    out = tmp_path / "run"
    argv = [
        "--task",
        "fashion_mnist_mlp",
        "--data-dir",
        str(data),
        "--layers",
        "2",
        "--d-model",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "20",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert run.cli(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and "test_sequence_accuracy" not in metrics
    missing = [*argv[:3], str(tmp_path / "nowhere"), *argv[4:-1], str(tmp_path / "run2")]
    assert run.cli(missing) == 2
    assert "missing train-images-idx3-ubyte" in capsys.readouterr().err
