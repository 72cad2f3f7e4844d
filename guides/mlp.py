"""A deeper feedback network: a small MLP from the label for every block.

beta_k = W2_k GELU(E_k[y]) with E_k ``[V, H]`` (the one-hot label times the first layer)
and W2_k ``[H, size_k]``. Each block owns its own MLP, so the feedback of block k is
trained only by l_k and learning stays local (a trunk shared by all blocks would receive
gradients from every block's loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyro_bll.guides.linear import block_stds


class MLPFeedback(nn.Module):
    """Per-block two-layer MLPs from the one-hot label; ``[...]`` labels -> ``[..., size_k]``."""

    def __init__(
        self,
        num_classes: int,
        sizes: Sequence[int],
        init_std: float | Sequence[float] = 1.0,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Embedding(num_classes, hidden), nn.GELU(), nn.Linear(hidden, s))
            for s in sizes
        )
        # output scale about init_std (per block), as for the linear feedback
        for net, std in zip(self.nets, block_stds(init_std, sizes), strict=True):
            nn.init.normal_(net[2].weight, std=std / hidden**0.5)
            nn.init.zeros_(net[2].bias)

    def forward(self, y: Tensor, k: int) -> Tensor:
        return self.nets[k](y)

    def class_outputs(self, k: int) -> Tensor:
        labels = torch.arange(self.num_classes, device=self.nets[k][0].weight.device)
        return self.nets[k](labels)  # [V, size_k]

    def block_module(self, k: int) -> nn.Module:
        return self.nets[k]
