"""Critic backward messages: block k+1 sends back a small learned model of its read-out.

Block j >= 1 learns a critic c_j: a linear map from (a spatial summary of) its own input
message to the log-probabilities its read-out assigns to every label,

    c_j(pool(h_j)) ~ log softmax( r_j( m(alpha_j) ) )           [B(, T), V]

trained by least squares on block j's own batch (input and target detached, so only the
critic's parameters learn from it; r_j is block j's predictive head, or the output head
for the last block). Block k = j - 1 reads the critic as its local likelihood:

    q_k(y | z_k) = softmax_y( c_{k+1}( pool(features(z_k)) ) )

through a frozen copy refreshed every T steps. ``pool`` averages a feature map over its
spatial axes (the channel summary that ``--message channel`` puts the latent on) and is
the identity elsewhere.

* **What it approximates:** p(y | z_k) through block k+1 and its read-out, distilled into
  a linear model of block k+1's input.
* **Which premise it relaxes:** neither backward locking (block k never waits) nor weight
  transport of a block: only the critic's parameters cross, V x C numbers per block and
  refresh (``bytes_per_refresh``), up to T - 1 steps stale.
* **rho_k:** beta_k stays the label potential; the critic's likelihood is evaluated at the
  guide's draw (pathwise for reparameterised families).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pyro.distributions import Categorical
from torch import Tensor, nn
from torch.distributions import Distribution

from pyro_bll.core.frozen import FrozenCopies, RefreshSchedule, module_bytes

if TYPE_CHECKING:
    from pyro_bll.core.chain import BLLChain
    from pyro_bll.core.step_cache import StepCache


class Critic(nn.Module):
    """One linear critic per block j = 1..N-1 (``maps[j - 1]``), owned by block j.

    Args:
        widths: the latent channels of blocks 0..N-2 (what block j's input summarises to).
        num_classes: V.
        refresh: T, how often the blocks below copy the critics.
    """

    def __init__(self, widths: list[int], num_classes: int, refresh: int = 1) -> None:
        super().__init__()
        self.schedule = RefreshSchedule(refresh, "critic")
        self.copies = FrozenCopies()  # what the blocks below read
        self.maps = nn.ModuleList(nn.Linear(c, num_classes) for c in widths)
        for m in self.maps:  # an untrained critic sends no information: uniform q_k
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- what block j owns: the critic and its regression ------------------------------
    def module_of(self, j: int) -> nn.Module | None:
        """Block j's critic (``None`` for block 0, which has no block below it)."""
        return self.maps[j - 1] if j >= 1 else None

    def regression(self, chain: BLLChain, j: int, h: Tensor, alpha_j: Any, y: Tensor,
                   mask: Tensor | None) -> Tensor:  # fmt: skip
        """Block j's least-squares loss ``[B]``: the critic on its detached input ``h`` against
        its read-out's detached log-probabilities."""
        with torch.no_grad():
            mean = chain.families[j].mean(alpha_j)
            if j == chain.num_blocks - 1:
                target = chain.head.distribution(mean).logits
            else:
                target = chain.pred_heads[j](mean)  # type: ignore[index]
            target = target.log_softmax(-1)  # [B(, T), V]
        pred = self.maps[j - 1](pool(chain, h.detach()))
        err = (pred - target).pow(2).sum(-1)  # [B] or [B, T]
        if mask is not None:
            err = err * mask.to(err.dtype)
        return err.reshape(err.shape[0], -1).sum(-1)

    # ---- what block k reads: a frozen copy -----------------------------------------------
    @property
    def frozen(self) -> list[nn.Module]:
        """The copies the blocks below read, ``frozen[k]`` block k + 1's critic."""
        return self.copies.clones

    def maybe_refresh(self, step: int | None) -> int:
        """Copy the critics when training step ``step`` starts a refresh period (``None``:
        every call); the bytes copied (0 when the copies are kept)."""
        if not self.schedule.due(step):
            return 0
        self.copies.refresh(list(self.maps))
        return self.bytes_per_refresh()

    def bytes_per_refresh(self) -> int:
        return sum(module_bytes(m) for m in self.maps)

    def likelihoods(self, chain: BLLChain) -> list[CriticLikelihood]:
        if chain.propagate == "params":
            raise ValueError(
                "the critic reads the mean message of the block below; use propagate='mean' "
                "or 'sample' with --beta critic"
            )
        return [CriticLikelihood(self, k) for k in range(chain.num_blocks - 1)]


class CriticLikelihood:
    """q_k(y | z_k) = softmax(c_{k+1}(pool(features(z_k)))) through the frozen copy."""

    def __init__(self, critic: Critic, k: int) -> None:
        self.critic, self.k = critic, k

    def __call__(
        self, chain: BLLChain, k: int, z: Tensor, cache: StepCache | None = None
    ) -> Distribution:
        if not self.critic.frozen:
            self.critic.maybe_refresh(None)
        feats = chain.families[k].features(z)
        return Categorical(logits=self.critic.frozen[k](pool(chain, feats)))


def pool(chain: BLLChain, h: Tensor) -> Tensor:
    """A feature map's mean over its spatial axes ``[B, H, W, C] -> [B, C]``; other
    messages unchanged."""
    if chain.spatial_message is None or h.dim() <= 2:
        return h
    return h.mean(tuple(range(1, h.dim() - 1)))


def critic_widths(chain: BLLChain) -> list[int]:
    """The latent channels of blocks 0..N-2, read off the class potentials ``[V, C]``."""
    widths = []
    for k in range(chain.num_blocks - 1):
        beta = chain.class_potentials(k)[0]
        if beta.dim() != 2:
            raise ValueError(
                f"--beta critic needs channel latents ([V, C] class potentials); block {k} "
                f"has {tuple(beta.shape)}"
            )
        widths.append(beta.shape[-1])
    return widths


__all__ = ["Critic", "CriticLikelihood", "critic_widths", "pool"]
