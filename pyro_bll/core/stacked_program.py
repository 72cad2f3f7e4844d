"""The chain's guide and model with groups of agreeing blocks as one site each.

``BLLChain.guide`` and ``BLLChain.model`` hand over to these functions when the chain
computes groups of blocks together (``chain.stack``; docs/math.md §2). The guide first runs
every forward block of the segment (no forward message depends on a draw), then writes,
per group ``a .. b-1`` (``pyro_bll.core.stacked.groups``), inside one ``blocks_plate``:

    guide:  z_a:b ~ rho           rho = F(eta(alpha) + beta), [n, B, *L, C]
    model:  z_a:b ~ alpha
            y_a:b ~ q(y | z)      the prototype likelihoods of the group (one site)
            pred_a:b              the predictive heads run as one (stacked parameters)

A block in no group, the head's block, local likelihoods other than the label's
prototypes and heads of different structure keep the per-site program's sites (``z_k``,
``y_k``, ``pred_k``), reading the group's draw where they need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import torch
from torch import Tensor

from pyro_bll.core import stacked
from pyro_bll.core.stacked_heads import stackable_heads, stacked_cross_entropy, stacked_heads
from pyro_bll.core.step_cache import StepCache
from pyro_bll.core.tags import block_factor, blocks_plate

if TYPE_CHECKING:
    from pyro_bll.core.chain import BLLChain


def _plate(group: list[int]):
    a, n = group[0], len(group)
    return blocks_plate(f"blocks_{a}:{a + n}", a, n, stacked.BLOCKS_DIM)


def guide(chain: BLLChain, x, y: Tensor, mask: Tensor | None, blocks: range, cache) -> None:
    """The guide's sites of ``blocks``: one ``z_a:b`` per group, ``z_k`` otherwise."""
    chain.forward_messages(x, blocks, cache)
    with pyro.plate("data", y.shape[0], dim=-1):
        for group in stacked.groups(chain, blocks, cache):
            if len(group) == 1:
                k = group[0]
                chain._guide_site(k, cache.alpha[k], y, mask, cache, cache.noise)
                continue
            fam, a = chain.families[group[0]], group[0]
            site = stacked.stack_params(
                [chain.latent_params(k, cache.alpha[k], cache) for k in group]
            )  # [n, B, ...] per parameter
            rho = fam.posterior(site, stacked.feedback(chain, group, y, mask, site))
            cache.stacked[a] = (site, rho)
            for i, k in enumerate(group):
                cache.rho[k] = stacked.block_slice(rho, i)
            draws = stacked.blockwise_draws(fam, rho, group, cache.noise)
            with _plate(group):
                pyro.sample(stacked.site_name("z", group), draws.to_event(chain.latent_event_dim))
        last = chain.num_blocks - 1
        if blocks.stop > last:  # the head's block: in no group
            chain._guide_site(last, cache.alpha[last], y, mask, cache, cache.noise)


def model(chain: BLLChain, y: Tensor, mask: Tensor | None, blocks: range, cache) -> Tensor | None:
    """The model's sites of ``blocks`` (inside the data plate; the guide cached their
    messages); returns the draw of the last block of ``blocks``."""
    z = None
    for group in stacked.groups(chain, blocks, cache):
        if len(group) == 1:
            k = group[0]
            z = chain._model_site(k, cache.alpha[k], cache)
            if k < chain.num_blocks - 1:
                chain._local_sites(k, z, cache.alpha[k], y, mask, cache)
            continue
        z = _group_sites(chain, group, y, mask, cache)[-1]
    last = chain.num_blocks - 1
    if blocks.stop > last:  # the head's block: in no group
        z = chain._model_site(last, cache.alpha[last], cache)
    return z


def _group_sites(chain: BLLChain, group: list[int], y, mask, cache: StepCache) -> Tensor:
    """A group's latent, likelihood and predictive sites; returns its draw ``[n, ...]``."""
    a, name = group[0], stacked.site_name("z", group)
    site, rho = cache.stacked[a]
    shared = stacked.shares_prototypes(chain, a)
    heads = None if chain.pred_heads is None else [chain.pred_heads[k] for k in group]
    pred = heads is not None and chain.pred_weight > 0 and stackable_heads(heads)
    with _plate(group):
        z = pyro.sample(name, chain._latent(a, site))
        if shared:  # one likelihood site for the group
            bound = rho if chain.likelihood == "bound" else None
            q = stacked.prototype_likelihood(chain, group, z, bound, y)
            fn = chain._observed(q, mask)
            pyro.sample(stacked.site_name("y", group), fn, obs=y, infer={"latent": name})
        if pred:  # one predictive head for the group, with stacked parameters
            means = torch.stack([chain.families[k].mean(cache.alpha[k]) for k in group])
            ce = stacked_cross_entropy(stacked_heads(heads, means), y, mask)  # [n, B]
            block_factor(stacked.site_name("pred", group), -chain.pred_weight * ce, None)
    for i, k in enumerate(group):  # per-block sites reading the group's draw
        if chain.local_likelihoods is not None and not shared:
            q = chain.local_likelihoods[k](chain, k, z[i], cache)
            fn = chain._observed(q, mask)
            pyro.sample(f"y_{k}", fn, obs=y, infer={"block": k, "latent": name})
        if not pred:
            chain._pred_site(k, cache.alpha[k], y, mask)
    return z
