"""A whole image data set as one uint8 tensor on the run's device, batched there.

Loading never waits on a host-side pipeline: the training split sits on the device as
``[N, H, W, C]`` uint8 (60,000 Fashion-MNIST images take 47 MB, 50,000 CIFAR-10 images
154 MB), each epoch draws a permutation there, and crop, flip and normalisation run on
the batch in place of a DataLoader. All randomness of an epoch comes from one generator
seeded by ``(seed, epoch)``, so the batches and their augmentation are the same on a
rerun or after ``--resume``.

Normalisation uses the per-channel mean and standard deviation of the training images
in use (after ``--train-size``), computed exactly from a 256-bin histogram.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_bll.data.augment import normalise, random_crop, random_flip


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 ``[N, H, W, C]`` images, on the ``[0, 1]`` scale."""
    c = images.shape[-1]
    values = torch.arange(256, dtype=torch.float64, device=images.device) / 255
    mean, std = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    for i in range(c):
        counts = torch.bincount(images[..., i].reshape(-1).long(), minlength=256).double()
        p = counts / counts.sum()
        m = (p * values).sum()
        mean[i], std[i] = m.cpu(), ((p * (values - m) ** 2).sum().sqrt()).cpu()
    return mean.float(), std.clamp_min(1e-3).float()


@dataclass
class Augmentation:
    """What ``DeviceImageData.batches`` does to training batches."""

    crop_padding: int = 0  # pixels of zero padding for the random crop (0: no crop)
    flip: bool = False  # random horizontal flips


class DeviceImageData:
    """Training and test images on ``device``; yields normalised float batches.

    Args:
        train, test: ``(images [N, H, W, C] uint8, labels [N] int64)`` on the CPU.
        device: where everything lives from here on.
        augmentation: crop padding and flips of training batches (test batches: none).
        memory_format: layout of the float batches (``torch.channels_last`` on GPU runs).
    """

    def __init__(
        self,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        device: torch.device,
        augmentation: Augmentation,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.device = torch.device(device)
        self.x_train, self.y_train = (t.to(self.device) for t in train)
        self.x_test, self.y_test = (t.to(self.device) for t in test)
        self.augmentation = augmentation
        self.memory_format = memory_format
        mean, std = channel_stats(self.x_train)
        self.mean, self.std = mean.to(self.device), std.to(self.device)

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[-1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[1]  # square images [N, H, W, C]

    def epoch_generator(self, seed: int, epoch: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed * 100_003 + epoch)

    def augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 ``[B, H, W, C]`` -> augmented uint8 ``[B, H, W, C]``."""
        images = random_crop(images, self.augmentation.crop_padding, generator)
        return random_flip(images, generator) if self.augmentation.flip else images

    def prepare(self, images: Tensor) -> Tensor:
        return normalise(images, self.mean, self.std, self.memory_format)

    def batches(
        self, batch_size: int, seed: int, epoch: int, augment: bool = True
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled training batches ``([B, C, H, W] float, [B] int64)``."""
        g = self.epoch_generator(seed, epoch)
        order = torch.randperm(len(self.y_train), generator=g, device=self.device)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            images = self.x_train[idx]
            if augment:
                images = self.augment(images, g)
            yield self.prepare(images), self.y_train[idx]

    def test_batches(self, batch_size: int = 1000) -> Iterator[tuple[Tensor, Tensor]]:
        """The test split in order, normalised with the training statistics, no augmentation."""
        for i in range(0, len(self.y_test), batch_size):
            yield self.prepare(self.x_test[i : i + batch_size]), self.y_test[i : i + batch_size]
