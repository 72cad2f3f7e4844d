"""The per-block terms of several blocks computed together: the chain's vectorised sites.

With ``chain.stack`` on (the training default), blocks below the last whose latent sites
agree (one family, one shape of parameters) form a *group* ``a .. b-1``. Their forward
messages do not depend on the draws (``propagate`` "mean" or "params"), so the guide and
the model first run every forward block, then treat each group as one batch over blocks
(docs/math.md §2, "Computing the blocks' terms together"):

    alpha  [n, B, *L, C]    torch.stack of alpha_a .. alpha_{b-1}   (n = b - a)
    beta   [n, B, *L, C]    the feedback potentials of every block of the group
    rho    = F(eta(alpha) + beta)                     one posterior for the whole group
    z_{a:b} ~ rho           one site in a ``blocks_plate`` at batch dim -2
    y_{a:b} ~ q(y | z)      one prototype-likelihood site over the group's blocks

so the family's algebra (posterior, KL, the likelihood's bound or its value at the draw)
runs once per group instead of once per block. ``BlockLocalELBO`` splits every term of a
group's sites along the blocks axis, and ``torch.stack`` passes each slice's gradient to
its own block only, so each l_k still has gradients only in block k's parameters. Block
k's draw still comes from block k's own noise stream (``BlockwiseDraws``). Predictive
heads of one structure (Linear and LayerNorm layers) run as one head with stacked
parameters (``pyro_bll.core.stacked_heads``), site ``pred_a:b``; other heads, and local
likelihoods other than the label's prototypes, stay one site per block. The Pyro sites
of a group are written by ``pyro_bll.core.stacked_program``.
The per-site program (``chain.stack`` off, as ``Predictive`` and the diagnostics run it)
gives the same losses and gradients (tests/core/test_stacked.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import Distribution, kl_divergence, register_kl

from pyro_bll.core.likelihoods import PrototypeCategorical, prototype_bound
from pyro_bll.core.noise import NoiseKey, block_noise
from pyro_bll.core.step_cache import StepCache
from pyro_bll.families import Family, Natural, Params
from pyro_bll.families.base import mask_potential

if TYPE_CHECKING:
    from pyro_bll.core.chain import BLLChain

BLOCKS_DIM = -2  # the blocks axis of a group's sites: [n, B] batch shape, data plate at -1


def site_name(prefix: str, group: Sequence[int]) -> str:
    """``z_2:5`` for blocks 2, 3, 4 (slice notation)."""
    return f"{prefix}_{group[0]}:{group[-1] + 1}"


def stack_params(params: Sequence[Params]) -> Params:
    """Per-block parameter tuples -> one tuple of ``[n, ...]`` tensors."""
    return tuple(torch.stack(ps) for ps in zip(*params, strict=True))


def block_slice(params: Params, i: int) -> Params:
    return tuple(p[i] for p in params)


def groups(chain: BLLChain, blocks: range, cache: StepCache) -> list[list[int]]:
    """Runs of consecutive blocks below the last whose latent sites can be stacked: one
    family object, parameters of one shape and dtype, and the prototype likelihood in all
    or none. A block that fits with none of its neighbours is a run of one. Found once per
    step (the guide's call), and read from the step's cache by the model."""
    key = (blocks.start, blocks.stop)
    if key not in cache.groups:
        cache.groups[key] = _find_groups(chain, blocks, cache)
    return cache.groups[key]


def _find_groups(chain: BLLChain, blocks: range, cache: StepCache) -> list[list[int]]:
    last = chain.num_blocks - 1
    runs: list[list[int]] = []
    key_of_run = None
    for k in blocks:
        if k >= last:
            break
        site = chain.latent_params(k, cache.alpha[k], cache)
        key = (id(chain.families[k]), tuple((p.shape, p.dtype) for p in site))
        key += (chain.uses_prototypes(k),)
        if runs and key == key_of_run and runs[-1][-1] == k - 1 and _draw_is_free(chain, k, site):
            runs[-1].append(k)
        else:
            runs.append([k])
            key_of_run = key
    return runs


def shares_prototypes(chain: BLLChain, k: int) -> bool:
    """Whether block k's group has one likelihood site: the label's prototypes on
    latents without a spatial message (``prototype_likelihood``)."""
    return chain.uses_prototypes(k) and chain.spatial_message is None


def _draw_is_free(chain: BLLChain, k: int, site: Params) -> bool:
    """Whether the blocks' draws may share a site: pathwise draws, or no cost that reads a
    draw (the prototypes' bound, or no local likelihood), so no score function of one
    block's draw would meet another block's cost."""
    if chain.local_likelihoods is None:
        return True
    if shares_prototypes(chain, k) and chain.likelihood == "bound":
        return True
    return bool(chain.families[k].distribution(site).has_rsample)


class BlockwiseDraws(dist.TorchDistribution):
    """A group's stacked law ``base`` (batch ``[n, ...]``) whose draw takes each block's slice
    from that block's own noise stream (``pyro_bll.core.noise``), as the per-site program
    does; densities, moments and the KL are the stacked law's."""

    arg_constraints: dict = {}

    def __init__(self, base: Distribution, draw: Callable[[], Tensor]) -> None:
        self.base, self._draw = base, draw
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return self.base.has_rsample

    @property
    def support(self):  # type: ignore[override]
        return self.base.support

    @property
    def mean(self) -> Tensor:
        return self.base.mean

    @property
    def variance(self) -> Tensor:
        return self.base.variance

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        if tuple(sample_shape):
            raise ValueError("a group's blockwise draw is one draw per block; no sample_shape")
        return self._draw()

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        return self.base.log_prob(value)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != self.batch_shape:
            raise ValueError(f"a group's draws cannot be expanded to {tuple(batch_shape)}")
        return self


@register_kl(BlockwiseDraws, Distribution)
def _kl_blockwise(p: BlockwiseDraws, q: Distribution) -> Tensor:
    return kl_divergence(p.base, q)


def blockwise_draws(
    family: Family, rho: Params, group: Sequence[int], noise: NoiseKey | None
) -> BlockwiseDraws:
    """rho's stacked law, drawn block by block under each block's noise stream."""
    base = family.distribution(rho)

    def draw() -> Tensor:
        if noise is None:  # one stream for all: the stacked law draws at once
            return base.rsample() if base.has_rsample else base.sample()
        zs = []
        for i, k in enumerate(group):
            with block_noise(noise, k, rho[0].device):
                d = family.distribution(block_slice(rho, i))
                zs.append(d.rsample() if d.has_rsample else d.sample())
        return torch.stack(zs)

    return BlockwiseDraws(base, draw)


def feedback(
    chain: BLLChain, group: Sequence[int], y: Tensor, mask: Tensor | None, site: Params
) -> Natural:
    """beta of every block of the group, ``[n, B, *L, C]`` per natural parameter (zero where
    masked). A feedback network with ``stacked(y, blocks)`` computes the raw potentials of
    all blocks in one call; otherwise they are stacked block by block."""
    stacked = getattr(chain.feedback, "stacked", None)
    if stacked is not None and chain.spatial_message is None:
        raw = stacked(y, group)  # [n, B, *L, size]
        return mask_potential(chain.families[group[0]].feedback_potential(raw), mask, lead=1)
    per_block = [
        chain.feedback_message(k, y, mask, block_slice(site, i)) for i, k in enumerate(group)
    ]
    return stack_params(per_block)


def class_potentials(chain: BLLChain, group: Sequence[int]) -> Natural:
    """beta_c of every class for every block of the group, ``[n, V, C]`` each."""
    outputs = torch.stack([chain.feedback.class_outputs(k) for k in group])  # [n, V, size]
    return chain.families[group[0]].feedback_potential(outputs)


def prototype_likelihood(
    chain: BLLChain, group: Sequence[int], z: Tensor, rho: Params | None, y: Tensor
) -> Distribution:
    """The group's prototype likelihoods q_k(y | z_k) as one distribution of batch
    ``[n, B, *L]``: at the draw (``rho=None``) or carrying the bound under rho.

    The family's prototype algebra takes latents ``[n, M, C]`` against prototypes
    ``[n, V, C]`` (M = B * prod(L): every label position), so the group's latents are
    flattened to that and the results put back on ``[n, B, *L]``."""
    fam = chain.families[group[0]]
    protos = class_potentials(chain, group)
    n, num_classes = len(group), protos[0].shape[-2 - fam.stat_dims]
    labels = 2 + chain.label_event_dim  # the axes n, B, *L
    label_shape = z.shape[:labels]

    def flat(t: Tensor) -> Tensor:  # [n, B, *L, ...] -> [n, M, ...]
        return t.reshape(n, -1, *t.shape[labels:])

    def logits() -> Tensor:
        out = fam.potential_logits(flat(z), protos)  # [n, M, V]
        return out.reshape(*label_shape, num_classes)

    if rho is None:
        return dist.Categorical(logits=logits())
    rho_flat = tuple(flat(p) for p in rho)

    def bound(value: Tensor) -> Tensor:
        labels = value.expand(label_shape).reshape(n, -1)  # [n, M]
        return prototype_bound(fam, rho_flat, protos, labels).reshape(label_shape)

    return PrototypeCategorical(logits, bound, label_shape, num_classes)
