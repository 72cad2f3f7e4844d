"""The block-local loss written directly in torch, without Pyro.

The same sum of l_k that ``BlockLocalELBO`` reads off Pyro traces, for chains with the
prototype local likelihood, optional predictive heads and ``head_input="mean"``. It draws
z_k in the guide's order, so with the same seed it reproduces the Pyro value exactly; it
serves as the baseline of ``experiments/bench_step.py`` and as a cross-check in tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyro_bll.core.chain import BLLChain
from pyro_bll.core.likelihoods import masked_cross_entropy, prototype_bound


def plain_block_losses(chain: BLLChain, x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    """Per-block losses ``[N]`` summed over the batch (as Pyro's ELBOs are)."""
    if chain.head_input != "mean" or chain.local_likelihoods is None:
        raise ValueError("the reference loss covers head_input='mean' with local likelihoods")
    sum_event = tuple(range(1, chain.event_dim + 1))  # [B, ...] -> [B]
    last = chain.num_blocks - 1
    inp: Any = x
    alphas, zs, losses = [], [], []
    # guide pass: draw every z_k from rho_k in order (as the Pyro guide does)
    for k in range(chain.num_blocks):
        alpha = chain.forward_message(k, inp)
        rho, z = None, None
        if chain.has_latent(k):  # the last block has none when the head reads m(alpha_N)
            rho = chain.families[k].posterior(alpha, chain.feedback_message(k, y, mask))
            d = chain.families[k].distribution(rho)
            z = d.rsample() if d.has_rsample else d.sample()
        alphas.append((alpha, rho))
        zs.append(z)
        if k < last:
            inp = chain.next_input(k, alpha, z)
    for k, ((alpha, rho), z) in enumerate(zip(alphas, zs, strict=True)):
        fam = chain.families[k]
        loss = fam.kl(rho, alpha).sum(sum_event).sum() if rho is not None else 0.0
        if k < last:
            protos = chain.class_potentials(k)
            if chain.likelihood == "bound":
                lik = prototype_bound(fam, rho, protos, y)
                lik = lik if mask is None else lik * mask.to(lik.dtype)
                loss = loss - lik.sum()
            else:
                logits = fam.potential_logits(z, protos)
                loss = loss + masked_cross_entropy(logits, y, mask).sum()
            if chain.pred_heads is not None and chain.pred_weight > 0:
                logits = chain.pred_heads[k](fam.mean(alpha))
                loss = loss + chain.pred_weight * masked_cross_entropy(logits, y, mask).sum()
        else:
            loss = loss + masked_cross_entropy(chain.head(fam.mean(alpha)), y, mask).sum()
        losses.append(loss)
    return torch.stack(losses)
