"""Training methods on the same chain: block-local learning and end-to-end backprop.

A method turns a batch into a scalar loss (per example) plus per-block losses for logging;
the training step (``training.py``) owns ``backward()`` and the optimiser.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chain import BLLChain
from .elbo import BlockLocalELBO
from .likelihoods import masked_cross_entropy


class BLL:
    """Sum of block-local losses l_k (inputs detached at every block boundary)."""

    def __init__(self, chain: BLLChain) -> None:
        chain.detach = True
        self.elbo = BlockLocalELBO(chain.num_blocks)

    def loss(self, chain: BLLChain, x: Tensor, y: Tensor, mask: Tensor | None):
        losses = self.elbo.block_losses(chain.model, chain.guide, x, y, mask)
        per_block = losses.per_block / y.shape[0]
        return per_block.sum(), per_block.detach()


class Backprop:
    """End-to-end cross-entropy of f_out(m(alpha_N)) through every block."""

    def __init__(self, chain: BLLChain) -> None:
        chain.detach = False

    def loss(self, chain: BLLChain, x: Tensor, y: Tensor, mask: Tensor | None):
        loss = masked_cross_entropy(chain.predict_logits(x), y, mask).sum() / y.shape[0]
        return loss, torch.stack([loss.detach()])


METHODS = {"bll": BLL, "bp": Backprop}
