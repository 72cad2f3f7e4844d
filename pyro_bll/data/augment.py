"""Batch augmentation on the data's own device: random crop with padding, horizontal flip.

Images stay uint8 and channels-last, ``[B, H, W, C]``, until ``normalise`` turns them
into the network's float input ``[B, C, H, W]``. Every random draw comes from the
``generator`` passed in, so a batch's augmentation is a function of that generator's
state (the training loop seeds one per (seed, epoch)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(images: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Zero-pad each side by ``pad`` and cut a random ``H x W`` window per image.

    ``[B, H, W, C] -> [B, H, W, C]``; the window's top-left corner is uniform on
    ``{0..2 pad}^2``, independently per image (Krizhevsky-style crop augmentation).
    """
    if pad <= 0:
        return images
    b, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))  # [B, H + 2p, W + 2p, C]
    dev = images.device
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator, device=dev)
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(w, device=dev)  # [B, W]
    batch = torch.arange(b, device=dev)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2; ``[B, H, W, C]``."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(2), images)


def normalise(
    images: Tensor, mean: Tensor, std: Tensor, memory_format=torch.contiguous_format
) -> Tensor:
    """uint8 ``[B, H, W, C]`` -> float ``[B, C, H, W]``, ``(x / 255 - mean_c) / std_c``."""
    x = (images.float() / 255 - mean) / std  # mean, std: [C]
    return x.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
