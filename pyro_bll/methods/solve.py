"""Feedback by convex solve (docs/math.md; the paper notes the closed form).

For the fixed-variance Gaussian and the linear feedback beta_k = W_k e_y, the agreement
term of block k is KL(rho_k || alpha_k) = sum ||m_i - W_k e_{y_i}||^2 / (8 sigma^2) + const,
where m_i = E_alpha[z] at example (or position) i. With a ridge term the mini-batch optimum

    W_k = argmin_W  sum_i ||m_i - W e_{y_i}||^2 + ridge * ||W||^2

is, column by column, the shrunk class mean  W_k[c] = sum_{i: y_i = c} m_i / (n_c + ridge).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyro_bll.core.chain import BLLChain
from pyro_bll.core.step_cache import StepCache
from pyro_bll.families import FixedVarianceGaussian

# how --method bll updates the feedback weights: gradient steps, or this closed form
FEEDBACK_UPDATES = ("grad", "solve")


def class_mean_prototypes(
    m: Tensor,
    y: Tensor,
    mask: Tensor | None,
    num_classes: int,
    ridge: float,
    previous: Tensor | None = None,
) -> Tensor:
    """Ridge least-squares prototypes ``[V, C]`` from messages ``[..., C]`` and labels ``[...]``.

    A class that is absent from the batch keeps its ``previous`` prototype when
    ``ridge = 0`` (its optimum is then undetermined); with ``ridge > 0`` it shrinks to 0.
    """
    c = m.shape[-1]
    m = m.reshape(-1, c)
    y = y.reshape(-1)
    w = torch.ones_like(y, dtype=m.dtype) if mask is None else mask.reshape(-1).to(m.dtype)
    sums = torch.zeros(num_classes, c, dtype=m.dtype, device=m.device)
    sums.index_add_(0, y, m * w[:, None])
    counts = torch.zeros(num_classes, dtype=m.dtype, device=m.device).index_add_(0, y, w)
    denom = (counts + ridge)[:, None]
    protos = sums / denom.clamp_min(torch.finfo(m.dtype).tiny)
    if previous is not None:
        protos = torch.where(denom > 0, protos, previous)
    return protos


def check_solvable(chain: BLLChain) -> None:
    """Raise ValueError unless every block has a fixed-variance Gaussian and linear feedback."""
    if not all(type(f) is FixedVarianceGaussian for f in chain.families):
        raise ValueError("--feedback-update solve needs --family gaussian (fixed variance)")
    if not hasattr(chain.feedback, "set_block_weights"):
        raise ValueError("--feedback-update solve needs --feedback linear")
    if chain.propagate != "mean":
        raise ValueError("--feedback-update solve needs --propagate mean")
    if chain.spatial_message is not None:
        raise ValueError(
            "--feedback-update solve covers vector and sequence latents, not feature maps; "
            "use --feedback-update grad"
        )


@torch.no_grad()
def solve_feedback(
    chain: BLLChain,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None,
    ridge: float,
    cache: StepCache,
    blocks: range | None = None,
) -> None:
    """Set every block's feedback weights to the closed-form optimum on this batch.

    Fills ``cache`` with the forward messages, so the loss computed next reuses them.
    ``blocks`` (default all) restricts the solve to a segment a..b-1, with ``x`` block a's
    input message (the block-parallel runtime).
    """
    inp = x
    for k in blocks if blocks is not None else range(chain.num_blocks):
        with torch.enable_grad():
            alpha = chain.forward_message(k, inp, cache)
        mean = chain.families[k].mean(alpha).detach()
        protos = class_mean_prototypes(
            mean, y, mask, chain.feedback.num_classes, ridge, chain.feedback.class_outputs(k)
        )
        chain.feedback.set_block_weights(k, protos)
        inp = mean
