"""The block-local loss written directly in torch, without Pyro.

The same sum of l_k that ``BlockLocalELBO`` reads off Pyro traces, for chains with the
prototype or look-ahead local likelihood, optional predictive heads and
``head_input="mean"``, on vectors, sequences and feature maps, block by block or (with
``chain.stack``) with groups of agreeing blocks together. It draws z_k in the guide's
order, so with the same seed it reproduces the Pyro value exactly; it serves as the
baseline of ``experiments/bench_step.py`` and as a cross-check in tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyro_bll.core import stacked
from pyro_bll.core.chain import BLLChain
from pyro_bll.core.likelihoods import masked_cross_entropy, prototype_bound
from pyro_bll.core.lookahead_sweep import LookaheadSweep
from pyro_bll.core.stacked_heads import stackable_heads, stacked_cross_entropy, stacked_heads
from pyro_bll.core.step_cache import StepCache


def plain_block_losses(chain: BLLChain, x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    """Per-block losses ``[N]`` summed over the batch (as Pyro's ELBOs are).

    Covers ``head_input="mean"`` with local likelihoods: the prototype likelihood (its
    bound or its value at the draw), on vectors, sequences and feature maps (the latent
    where the chain's spatial message puts it), and the look-ahead (through its copies,
    or its sweep where that applies, ``pyro_bll.core.lookahead_sweep``)."""
    if chain.head_input != "mean" or chain.local_likelihoods is None:
        raise ValueError("the reference loss covers head_input='mean' with local likelihoods")
    if chain.critic is not None:
        raise ValueError("the reference loss does not cover the critic's message")
    cache = StepCache()
    if chain.lookahead is not None and chain.lookahead.sweeps(chain):
        cache.sweep = LookaheadSweep(chain, y, mask)
    if chain.stacks(cache):
        return _stacked_block_losses(chain, x, y, mask, cache)
    last = chain.num_blocks - 1
    inp: Any = x
    sites, zs = [], []
    # guide pass: draw every z_k from rho_k in order (as the Pyro guide does)
    for k in range(chain.num_blocks):
        alpha = chain.forward_message(k, inp, cache)
        site, rho, z = None, None, None
        if chain.has_latent(k):  # the last block has none when the head reads m(alpha_N)
            site = chain.latent_params(k, alpha, cache)  # alpha_k, or its channel summary
            beta = chain.feedback_message(k, y, mask, site)
            rho = chain.families[k].posterior(site, beta)
            cache.rho[k] = rho
            d = chain.families[k].distribution(rho)
            z = d.rsample() if d.has_rsample else d.sample()
        sites.append((site, rho))
        zs.append(z)
        if k < last:
            inp = chain.next_input(k, alpha, z)
    losses = []
    for k, ((site, rho), z) in enumerate(zip(sites, zs, strict=True)):
        fam, alpha = chain.families[k], cache.alpha[k]
        loss = fam.kl(rho, site).sum() if rho is not None else 0.0
        if k < last:
            loss = loss - _local_log_likelihood(chain, k, z, cache, y, mask).sum()
            loss = loss + _pred_loss(chain, k, y, mask, cache)
        else:
            loss = loss + masked_cross_entropy(chain.head(fam.mean(alpha)), y, mask).sum()
        losses.append(loss)
    return torch.stack(losses)


def _stacked_block_losses(chain: BLLChain, x, y, mask, cache: StepCache) -> Tensor:
    """The same losses with the chain's groups of agreeing blocks computed together
    (``pyro_bll.core.stacked``), drawing in the Pyro guide's order: every forward block
    first, then each group (a block in no group on its own)."""
    n, last = chain.num_blocks, chain.num_blocks - 1
    chain.forward_messages(x, range(n), cache)
    losses: list[Tensor] = [torch.zeros(())] * n
    for group in stacked.groups(chain, range(n), cache):
        fam = chain.families[group[0]]
        site = stacked.stack_params([chain.latent_params(k, cache.alpha[k], cache) for k in group])
        rho = fam.posterior(site, stacked.feedback(chain, group, y, mask, site))
        for i, k in enumerate(group):
            cache.rho[k] = stacked.block_slice(rho, i)
        z = stacked.blockwise_draws(fam, rho, group, None).rsample()  # [n, B, ...]
        kl = _per_block(fam.kl(rho, site))  # [n]
        if stacked.shares_prototypes(chain, group[0]):
            bound = chain.likelihood == "bound"
            q = stacked.prototype_likelihood(chain, group, z, rho if bound else None, y)
            lik = q.expected_log_prob(y) if bound else q.log_prob(y)  # [n, B, *L]
            lik = _per_block(lik if mask is None else lik * mask.to(lik.dtype))
        else:
            lik = torch.stack(
                [
                    _local_log_likelihood(chain, k, z[i], cache, y, mask).sum()
                    for i, k in enumerate(group)
                ]
            )
        heads = None if chain.pred_heads is None else [chain.pred_heads[k] for k in group]
        if heads is not None and chain.pred_weight > 0 and stackable_heads(heads):
            means = torch.stack([fam.mean(cache.alpha[k]) for k in group])  # [n, B, ..., C]
            ce = stacked_cross_entropy(stacked_heads(heads, means), y, mask)
            pred: list = list(chain.pred_weight * ce.sum(-1))
        else:
            pred = [_pred_loss(chain, k, y, mask, cache) for k in group]
        for i, k in enumerate(group):
            losses[k] = kl[i] - lik[i] + pred[i]
    alpha = cache.alpha[last]  # head_input "mean": the head's block has no latent
    losses[last] = masked_cross_entropy(chain.head(chain.families[last].mean(alpha)), y, mask).sum()
    return torch.stack(losses)


def _per_block(value: Tensor) -> Tensor:
    """``[n, ...]`` -> ``[n]``: each block's sum."""
    return value.reshape(value.shape[0], -1).sum(-1)


def _pred_loss(chain: BLLChain, k: int, y, mask, cache: StepCache) -> Tensor | float:
    if chain.pred_heads is None or chain.pred_weight <= 0:
        return 0.0
    logits = chain.pred_heads[k](chain.families[k].mean(cache.alpha[k]))
    return chain.pred_weight * masked_cross_entropy(logits, y, mask).sum()


def _local_log_likelihood(chain: BLLChain, k: int, z, cache: StepCache, y, mask) -> Tensor:
    """Block k's local likelihood term per label ``[B, *L]`` (masked labels: 0)."""
    fam = chain.families[k]
    if chain.spatial_message is None and chain.lookahead is None and chain.likelihood == "bound":
        lik = prototype_bound(fam, cache.rho[k], chain.class_potentials(k), y)
    elif chain.spatial_message is None and chain.lookahead is None:  # at the draw
        return -masked_cross_entropy(fam.potential_logits(z, chain.class_potentials(k)), y, mask)
    else:
        q = chain.local_likelihoods[k](chain, k, z, cache)
        bound = chain.likelihood == "bound" and hasattr(q, "expected_log_prob")
        lik = q.expected_log_prob(y) if bound else q.log_prob(y)
    return lik if mask is None else lik * mask.to(lik.dtype)
