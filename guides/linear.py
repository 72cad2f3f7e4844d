"""The paper's feedback network: one linear map per block from the one-hot label.

beta_k = W_k e_y: block k's raw feedback is column y of W_k ``[n_feedback * C_k, V]``,
i.e. an embedding lookup. Labels ``[B]`` or ``[B, T]`` give ``[B, size_k]`` or
``[B, T, size_k]``. The same table evaluated at every class gives the prototypes of the
local likelihood (``class_outputs``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def block_stds(init_std: float | Sequence[float], sizes: Sequence[int]) -> list[float]:
    """One initial output scale per block: ``init_std`` for all, or one each."""
    if isinstance(init_std, (int, float)):
        return [float(init_std)] * len(sizes)
    if len(init_std) != len(sizes):
        raise ValueError(f"{len(init_std)} initial scales for {len(sizes)} feedback blocks")
    return [float(s) for s in init_std]


class LinearFeedback(nn.Module):
    """One bias-free linear layer per block from the one-hot label to the block's potential.

    Args:
        num_classes: V, the number of label values.
        sizes: raw feedback width per block (``family.feedback_size(C_k)``).
        init_std: standard deviation of the initial weights (one for all blocks, or one
            per block).
    """

    def __init__(
        self, num_classes: int, sizes: Sequence[int], init_std: float | Sequence[float] = 1.0
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.ModuleList(nn.Embedding(num_classes, s) for s in sizes)
        for layer, std in zip(self.layers, block_stds(init_std, sizes), strict=True):
            nn.init.normal_(layer.weight, std=std)

    def forward(self, y: Tensor, k: int) -> Tensor:
        return self.layers[k](y)  # [..., size_k]

    def class_outputs(self, k: int) -> Tensor:
        return self.layers[k].weight  # [V, size_k]

    def stacked(self, y: Tensor, blocks: Sequence[int]) -> Tensor:
        """The outputs of blocks of one width in one gather: ``[n, *y.shape, size]``."""
        return torch.stack([self.layers[k].weight for k in blocks])[:, y]

    def block_module(self, k: int) -> nn.Module:
        return self.layers[k]

    @torch.no_grad()
    def set_block_weights(self, k: int, weight: Tensor) -> None:
        """Overwrite block k's table ``[V, size_k]`` (used by closed-form feedback updates)."""
        self.layers[k].weight.copy_(weight)
