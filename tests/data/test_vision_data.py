"""The real idx and CIFAR-10 readers on tiny files, and the device-side augmentation."""

import gzip
import os
import pickle
import re
import struct
import urllib.error

import numpy as np
import pytest
import torch
from vision_files import cifar_batch, tiny_cifar10, tiny_fashion_mnist, write_idx

from pyro_bll.data import (
    DataError,
    DeviceImageData,
    channel_stats,
    load_cifar10,
    load_fashion_mnist,
    normalise,
    random_crop,
    random_flip,
    read_idx,
)
from pyro_bll.data import cifar10 as cifar_module
from pyro_bll.data.device_data import Augmentation

from utils import assert_close

# ---- idx ---------------------------------------------------------------------------------


def _header(ndim_sizes):
    return bytes([0, 0, 8, len(ndim_sizes)]) + struct.pack(f">{len(ndim_sizes)}I", *ndim_sizes)


@pytest.mark.parametrize(
    "name, payload, needle",
    [
        ("magic", b"\x01\x02\x03\x04" + b"\x00" * 8, "bad magic number"),
        ("empty", b"", "bad magic number"),
        ("dtype", bytes([0, 0, 0x42, 1]) + b"\x00" * 8, "bad magic number"),
        ("header", bytes([0, 0, 8, 3]) + b"\x00\x00\x00\x02", "too short for its 3-dimension"),
        ("body", _header([4, 2]) + b"\x00" * 5, "promises 20 (truncated)"),
        ("extra", _header([2]) + b"\x00" * 3, "holds 11 bytes, its header promises 10 (corrupt)"),
        ("zero_dims", bytes([0, 0, 8, 0]), "0 dimensions"),
        ("gz_truncated", gzip.compress(_header([50]) + bytes(50))[:-12], "corrupt or truncated"),
        ("gz_garbage", b"\x1f\x8b\x08\x00" + b"garbage" * 4, "corrupt or truncated"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else "",
)
def test_corrupt_or_truncated_idx_is_a_one_line_data_error(tmp_path, name, payload, needle):
    path = tmp_path / (f"{name}.gz" if name.startswith("gz") else name)
    path.write_bytes(payload)
    with pytest.raises(DataError, match=re.escape(needle)) as info:
        read_idx(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_idx_labels_out_of_range_and_wrong_dtype(tmp_path):
    tiny_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3] * 7 + [10]))
    with pytest.raises(DataError, match="label 10 outside 0..9"):
        load_fashion_mnist(tmp_path, "test")
    good_images, good_labels = load_fashion_mnist(tmp_path, "train")
    assert good_images.shape == (16, 28, 28) and good_labels.dtype == torch.int64


def test_missing_idx_names_the_debian_package(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*--data-dir"):
        load_fashion_mnist(tmp_path, "test")


# ---- CIFAR-10 ----------------------------------------------------------------------------


def test_cifar_reader_layout_and_both_directory_conventions(tmp_path):
    tiny_cifar10(tmp_path, per_batch=2, n_test=3)
    x, y = load_cifar10(tmp_path, "train", download=False)
    assert x.shape == (10, 32, 32, 3) and x.dtype == torch.uint8 and y.shape == (10,)
    xt, yt = load_cifar10(tmp_path / "cifar-10-batches-py", "test", download=False)
    assert xt.shape == (3, 32, 32, 3)
    # the row-major R, G, B planes of b"data" land at [row, col, channel]
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    data = raw[b"data"]
    for c, r, col in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert xt[1, r, col, c] == data[1, c * 1024 + r * 32 + col]
    assert yt.tolist() == raw[b"labels"]


def test_cifar_missing_files_and_failed_download(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cifar_module, "_download", calls.append)
    with pytest.raises(DataError, match="none does not exist; pass --data-dir"):
        load_cifar10(tmp_path / "none", "train")
    assert calls == [] and not (tmp_path / "none").exists()  # nothing tried, nothing made
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="is not in .* download .*cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "none", "train", download=False)

    def offline(directory):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(cifar_module, "_download", offline)
    with pytest.raises(DataError, match=r"download failed \(<urlopen error Name or serv") as e:
        load_cifar10(tmp_path / "none", "test")
    assert "\n" not in str(e.value) and "cifar-10-batches-py" in str(e.value)
    tiny_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_cifar10(tmp_path, "train")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"not a pickle", "not a CIFAR-10 python batch"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:-20], "not a CIFAR-10"),
        (pickle.dumps(_Exploit()), "refusing to load posix.system"),
        (pickle.dumps([1, 2]), "holds a list"),
        (pickle.dumps({b"labels": [1]}), "lacks the b'data' array"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "[N, 3072]"),
        (pickle.dumps(cifar_batch(np.zeros((2, 32, 32, 3), np.uint8), [0, 12])), "outside 0..9"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "labels for 2"),
    ],
    ids=["garbage", "cut", "exploit", "list", "no_data", "shape", "label", "count"],
)
def test_corrupt_cifar_batch_is_a_data_error(tmp_path, content, needle):
    tiny_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match=re.escape(needle)):
        load_cifar10(tmp_path, "test", download=False)


# ---- augmentation and device-resident batches --------------------------------------------


def _images(n=32, size=8, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, channels), generator=g, dtype=torch.uint8)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = _images()
    pad = 2
    out = random_crop(x, pad, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (0, 0, pad, pad, pad, pad))
    shifts = set()
    for i in range(len(x)):
        hits = [
            (r, c)
            for r in range(2 * pad + 1)
            for c in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, r : r + 8, c : c + 8])
        ]
        assert len(hits) == 1  # random pixels: exactly one window matches
        shifts.add(hits[0])
    assert len(shifts) > 5  # offsets really vary from image to image
    assert not torch.equal(out, x)
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_random_flip_mirrors_about_half_the_images():
    x = _images(n=64)
    out = random_flip(x, torch.Generator().manual_seed(3))
    flipped = [torch.equal(out[i], x[i].flip(1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48


def test_normalise_layout_and_channel_stats():
    x = _images(n=50)
    mean, std = channel_stats(x)
    ref = x.double().div(255)
    assert_close(mean, ref.mean((0, 1, 2)).float(), atol=1e-6)
    assert_close(std, ref.std((0, 1, 2), unbiased=False).float(), atol=1e-6)
    out = normalise(x, mean, std)
    assert out.shape == (50, 3, 8, 8) and out.is_contiguous()
    assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert_close(out.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    cl = normalise(x, mean, std, torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, out)


def _data(flip=True, pad=2):
    x, y = _images(n=40), torch.arange(40) % 10
    return DeviceImageData((x, y), (x[:8], y[:8]), torch.device("cpu"), Augmentation(pad, flip))


def test_epoch_batches_are_deterministic_given_seed_and_epoch():
    data = _data()

    def epoch(seed, e):
        return [(bx.clone(), by.clone()) for bx, by in data.batches(16, seed, e)]

    a, b, c, d = epoch(0, 1), epoch(0, 1), epoch(0, 2), epoch(1, 1)
    assert [t[0].shape[0] for t in a] == [16, 16, 8]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][1], c[0][1]) and not torch.equal(a[0][1], d[0][1])
    # every example once per epoch; augmentation changes the pixels, not the labels
    assert sorted(torch.cat([t[1] for t in a]).tolist()) == sorted(data.y_train.tolist())
    plain = list(data.batches(16, 0, 1, augment=False))
    assert torch.equal(plain[0][1], a[0][1]) and not torch.equal(plain[0][0], a[0][0])


def test_test_batches_are_unaugmented_and_in_order():
    data = _data()
    (xt, yt), = list(data.test_batches(1000))  # fmt: skip
    assert torch.equal(yt, data.y_test)
    assert torch.equal(xt, normalise(data.x_test, data.mean, data.std))
