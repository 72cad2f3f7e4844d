"""Pred-Sim (Noekland & Eidnes 2019, "Training neural networks with local error signals").

Every block below the last learns from its own loss on its output h_k = m(alpha_k), its
input detached (the same blocks as BLL):

    l_k = (1 - beta) * CE( p_k(h_k), y ) + beta * || S(s_k(h_k)) - S(onehot(y)) ||^2 / B^2

* p_k, the prediction head: the chain's predictive head of block k when it has one
  (for ResNets ``GridPooledHead``: ReLU, average pool to at most 2048 features, linear,
  as in the authors' code), otherwise ReLU, global average pool, linear (a linear map
  for vectors);
* s_k, the learned similarity transform: a 3x3 convolution (C_k -> C_k, after the ReLU)
  for feature maps, a linear map for vectors;
* S(u) ``[B, B]``, the similarity matrix as in the authors' code: each example's features
  (for a map with more than 3 channels and more than one location, the per-channel
  standard deviation over space, their default) are centred and normalised, and S holds
  their cosine similarities (Pearson correlations), clamped to [-1, 1]; the mean squared
  difference is taken over all B^2 entries;
* beta = ``--sim-weight`` (their 0.99).

The last block and the output head learn from the output cross-entropy, like BLL's last
block. The heads belong to the method; they are attached to the chain as the submodule
``predsim_heads`` so that the optimiser and the checkpoints see them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_bll.config import ConfigError, Section, option, unit_interval
from pyro_bll.core.chain import BLLChain
from pyro_bll.core.likelihoods import PooledHead, masked_cross_entropy
from pyro_bll.methods.base import Method

if TYPE_CHECKING:
    from pyro_bll.run.options import RunConfig


@dataclass(frozen=True)
class PredSimOptions(Section):
    """The options of ``--method predsim``."""

    name = "predsim"
    title = "--method predsim"

    sim_weight: float = option(
        0.99,
        "share beta of the similarity-matching loss, (1 - beta) * prediction CE + beta * "
        "similarity loss (Noekland & Eidnes: 0.99)",
        check=unit_interval,
    )


def similarity_matrix(u: Tensor) -> Tensor:
    """S(u) ``[B, B]`` for ``u`` of shape ``[B, F]`` or an NCHW map ``[B, C, H, W]``.

    Computed in float32 even under bf16 autocast (cosines of nearby codes need the digits).
    """
    with torch.autocast(u.device.type, enabled=False):
        return _similarity(u.float())


def _similarity(u: Tensor) -> Tensor:
    if u.dim() == 4 and u.shape[1] > 3 and u.shape[2] * u.shape[3] > 1:
        u = u.flatten(2).std(dim=2)  # [B, C]: per-channel spread over space
    u = u.flatten(1)
    uc = u - u.mean(dim=1, keepdim=True)
    un = uc / (1e-8 + uc.norm(dim=1, keepdim=True))
    return (un @ un.transpose(0, 1)).clamp(-1, 1)


def similarity_loss(u: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Mean squared difference between S(u) and S(one-hot labels) (a scalar)."""
    target = similarity_matrix(F.one_hot(y, num_classes).to(u.dtype))
    return F.mse_loss(similarity_matrix(u), target)


class _MapSimilarity(nn.Module):
    """s_k for maps: ``[B, H, W, C]`` -> ReLU -> 3x3 conv -> ``[B, C, H, W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(torch.relu(h).permute(0, 3, 1, 2))


class PredSim(Method):
    """Noekland & Eidnes' local prediction + similarity-matching loss on the chain's blocks."""

    name = "predsim"
    SECTION = PredSimOptions
    local = True

    def __init__(self, chain: BLLChain, cfg: RunConfig) -> None:
        if chain.label_event_dim != 0:
            raise ConfigError(
                f"--method predsim needs one label per example; --task {cfg.task} has one "
                "per position; use --method bll, bp or fa"
            )
        spatial = chain.event_dim - 1
        if spatial not in (0, 2):
            raise ConfigError(f"--method predsim supports vectors and 2-d maps, not {spatial}-d")
        chain.detach = True
        self.beta = cfg.predsim.sim_weight
        self.num_classes = chain.feedback.num_classes
        ref = next(chain.parameters())
        heads = []
        for k in range(chain.num_blocks - 1):
            # a ResNet block knows its channels; the feedback's width is C only when the
            # latent is per channel (not under --message grid)
            c = getattr(chain.blocks[k], "channels", None) or (
                chain.feedback.class_outputs(k).shape[-1] // chain.families[k].n_feedback
            )
            if chain.pred_heads is not None:  # the chain's own predictive heads (BLL's)
                pred = chain.pred_heads[k]
            elif spatial:
                pred = PooledHead(c, self.num_classes)
            else:
                pred = nn.Linear(c, self.num_classes)
            sim = _MapSimilarity(c) if spatial else nn.Linear(c, c)
            heads.append(nn.ModuleDict({"pred": pred, "sim": sim}))
        # same device, dtype and memory format (channels_last or not) as the network
        convs = [p for p in chain.blocks.parameters() if p.dim() == 4]
        channels_last = bool(convs) and all(
            p.is_contiguous(memory_format=torch.channels_last) for p in convs
        )
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        chain.predsim_heads = nn.ModuleList(heads).to(ref.device, ref.dtype, memory_format=fmt)

    def block_losses(
        self, chain: BLLChain, x: Tensor, y: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """l_k of every block ``[N]`` (per example, with graph) and detached logs."""
        losses, logs = zip(*self._blocks(chain, x, y, mask), strict=True)
        per_block = torch.stack(losses)
        return per_block, {k: sum(log[k] for log in logs) for k in logs[0]}

    def _blocks(
        self, chain: BLLChain, x: Tensor, y: Tensor, mask: Tensor | None
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """l_k of one block at a time (with graph) and its logs ``[N]`` (zeros elsewhere);
        the next block's input is block k's detached mean."""
        n, batch = chain.num_blocks, y.shape[0]
        inp = x
        for k in range(n):
            h = chain.families[k].mean(chain.forward_message(k, inp))  # input detached, k > 0
            if k < n - 1:
                heads = chain.predsim_heads[k]
                ce = masked_cross_entropy(heads["pred"](h), y, mask).sum() / batch
                sim = similarity_loss(heads["sim"](h), y, self.num_classes)
                loss = (1 - self.beta) * ce + self.beta * sim
            else:
                ce = masked_cross_entropy(chain.head(h), y, mask).sum() / batch
                sim = torch.zeros_like(ce)
                loss = ce
            onehot = torch.zeros(n, device=ce.device, dtype=ce.dtype)
            onehot[k] = 1.0
            yield loss, {"loss": onehot * loss.detach(), "pred": onehot * ce.detach(),
                         "sim": onehot * sim.detach()}  # fmt: skip
            inp = h.detach()

    def local_losses(
        self,
        chain: BLLChain,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None,
        *,
        noise: object = None,
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """l_k and logs of one block at a time (``--backward per-block``)."""
        return self._blocks(chain, x, y, mask)

    def loss(
        self, chain: BLLChain, x: Tensor, y: Tensor, mask: Tensor | None, *, noise: object = None
    ):
        """Sum of the block losses l_k (Pred-Sim draws no noise); logs ``loss``, ``pred``,
        ``sim`` ``[N]``."""
        per_block, logs = self.block_losses(chain, x, y, mask)
        return per_block.sum(), logs
