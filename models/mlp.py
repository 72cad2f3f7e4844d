"""A multilayer perceptron cut into blocks: the smallest real network for tests and demos.

Block k: ``[B, D_{k-1}] -> [B, n_raw * C_k]``,  raw = W_k act(m(alpha_{k-1})) + b_k, with no
activation on the input x of the first block. The latent z_k is the pre-activation.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pyro_bll.families import Family


def mlp_blocks(in_dim: int, widths: Sequence[int], family: Family) -> list[nn.Module]:
    """One block per entry of ``widths`` (the latent channels C_k of that block)."""
    blocks: list[nn.Module] = []
    prev = in_dim
    for k, width in enumerate(widths):
        if width <= 0:
            raise ValueError(f"MLP width must be positive, got {width}")
        layers: list[nn.Module] = [] if k == 0 else [nn.GELU()]
        layers.append(nn.Linear(prev, family.raw_size(width)))
        blocks.append(nn.Sequential(*layers))
        prev = width
    return blocks
