"""How much the backward message of a block varies between examples of one class.

Block k's local-likelihood term E_rho[log q_k(y | z_k)] is what sends information about
the label back into z_k. Its *effective message* is the term's linearisation at the
forward mean,

    g_k(x, y) = d/dz log q_k(y | z) |_{z = m(alpha_k)}          [B, *S, C(, K)]

(summed over the example's valid labels, so that with several labels per example, as for
the transformer, the gradient at site s collects every label whose likelihood reads z_s).
It is the natural parameter that a conjugate Gaussian potential would carry: to first
order, log q_k(y | z) = const + <g_k, z - m(alpha_k)>. ``m(alpha_k)`` is the mean of the
law of z_k (``BLLChain.latent_params``: alpha_k, or its channel summary on feature maps)
in the shape of a draw (the torch distribution's ``mean``); q_k is the chain's local
likelihood as a function of z: the prototype likelihood for ``--beta label``, the frozen
copies for ``--beta lookahead`` fed z (whatever ``--lookahead-input`` says; with ``mean``
the training term is log q_k(y | m(alpha_k)) and g_k is exactly its gradient there), the
critic's softmax for ``--beta critic``, and the output head for the last block when the
head reads a draw (``head_input="sample"``). It is computed with ``torch.autograd.grad``
with respect to a detached copy of m(alpha_k): no parameter's ``.grad`` is touched.

For the label kind g_k is not label-only. The prototype likelihood's logits are
l_c(z) = <beta_c, T(z)> - A_ref(beta_c), so

    g_k = sum_c ( [c = y] - q_k(c | m(alpha_k)) ) grad_z <beta_c, T(z)> |_{m(alpha_k)},

which for the paper's Gaussian (T(z) = z / sigma^2 up to a class-independent term) is
(b_y - sum_c q_k(c | m) b_c) / sigma^2: it varies within a class through the prototype
classifier's own class probabilities at the example's forward mean, inside the span of
the prototypes. What the blocks send is separate: the *feedback potential* beta_k(y)
``[B, *S, C']`` (the natural parameters concatenated over the channel axis,
``BLLChain.feedback_message``), which every kind keeps label-only (look-ahead and critic
change q_k, not beta_k), so its within-class variation is exactly 0.

**The statistic.** Units are the valid labelled sites u (label axes ``[B, *L]``
flattened: one per example for an MLP or an image, one per position for the transformer),
each with its label c(u) and the vector v_u of everything the message holds below its
label axes, ``[U, D]``. With unit weights w_u (1, or an example's bootstrap count),
W_c = sum_{u in c} w_u, class means vbar_c = sum_{u in c} w_u v_u / W_c and the grand mean
vbar = sum_u w_u v_u / sum_u w_u:

    share = sum_c sum_{u in c} w_u ||v_u - vbar_c||^2 / sum_u w_u ||v_u - vbar||^2  in [0, 1]

the within-class sum of squares over the total (one-way ANOVA); NaN when the total is 0.
It is also 1 - R^2 of the best label-only approximation of v (its class means), i.e. the
fraction of the message's variance that no message computed from the label alone can
carry. ``message_within`` is that share for g_k, ``feedback_within`` for beta_k.

A block without a latent (the last when the head reads m(alpha_N)) has neither: NaN. A
categorical latent is an index with no gradient (its mean is not a value of z), and the
look-ahead under ``propagate="params"`` reads alpha's parameters rather than z: there
``message_within`` is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_bll.core.agreement import local_logits
from pyro_bll.core.chain import BLLChain
from pyro_bll.families import Params

VARIATION = ("message_within", "feedback_within")


def within_class_share(
    values: Tensor, labels: Tensor, num_classes: int, weights: Tensor | None = None
) -> Tensor:
    """The within-class share of the module docstring for ``values [U, ...]`` (flattened to
    ``[U, D]``), ``labels [U]`` and unit weights ``[R, U]`` (``None``: every unit once);
    returns ``[R]``, float64.

    The sums of squares are taken about the unweighted class and grand means first (exact
    two-pass deviations), then corrected for the weights:
    sum w ||d - dbar_w||^2 = sum w ||d||^2 - ||sum w d||^2 / sum w, per class.
    """
    if values.shape[0] != labels.shape[0]:
        raise ValueError(f"{values.shape[0]} message vectors for {labels.shape[0]} labels")
    v = values.reshape(values.shape[0], -1).to(torch.float64)
    w = v.new_ones(1, v.shape[0]) if weights is None else weights.to(v)
    onehot = F.one_hot(labels, num_classes).to(v)  # [U, V]
    class_mean = (onehot.T @ v) / onehot.sum(0).clamp(min=1).unsqueeze(-1)  # [V, D]
    dev_c, dev_g = v - class_mean[labels], v - v.mean(0)  # [U, D]
    within = w @ dev_c.pow(2).sum(-1)  # [R]
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(-1)
        w_c = w[:, idx]  # [R, U_c]
        s_c = w_c @ dev_c[idx]  # [R, D]
        within = within - s_c.pow(2).sum(-1) / w_c.sum(-1).clamp(min=1e-300)
    total = w @ dev_g.pow(2).sum(-1) - (w @ dev_g).pow(2).sum(-1) / w.sum(-1)
    share = within.clamp(min=0) / total
    return torch.where(total > 0, share, torch.full_like(share, math.nan))


def _units(t: Tensor, y: Tensor) -> Tensor:
    """A message ``[B, *L, ...]`` as one vector per labelled site ``[B * prod(L), D]``."""
    if tuple(t.shape[: y.dim()]) != tuple(y.shape):
        raise ValueError(f"labels {tuple(y.shape)} do not index the message {tuple(t.shape)}")
    return t.reshape(y.numel(), -1)


def effective_message(
    chain: BLLChain, k: int, alpha: Params, y: Tensor, mask: Tensor | None
) -> Tensor | None:
    """g_k ``[B, *S, C(, K)]`` (the shape of a draw of z_k) for block k's forward message
    ``alpha`` and labels ``y [B, *L]``; None where it is not defined (module docstring)."""
    if not chain.has_latent(k):
        return None
    alpha = tuple(a.detach() for a in alpha)
    z0 = chain.families[k].distribution(chain.latent_params(k, alpha)).mean.detach()
    if not z0.is_floating_point() or not torch.isfinite(z0).all():
        return None  # a categorical latent: an index, no mean value of z
    look = chain.lookahead if k < chain.num_blocks - 1 else None
    if look is not None and chain.propagate == "params":
        return None  # the copies read alpha's parameters, not z
    valid = torch.ones_like(y, dtype=torch.bool) if mask is None else mask.bool()
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    with torch.enable_grad():
        z = z0.clone().requires_grad_(True)
        if look is not None:
            logits = look.logits(chain, k, z, alpha, read="sample")
        else:
            logits = local_logits(chain, k, alpha, z)
        logq = logits.log_softmax(-1).gather(-1, y_safe.unsqueeze(-1)).squeeze(-1)
        (grad,) = torch.autograd.grad((logq * valid).sum(), z, allow_unused=True)
    return torch.zeros_like(z0) if grad is None else grad


def feedback_potential(
    chain: BLLChain, k: int, alpha: Params, y: Tensor, mask: Tensor | None
) -> Tensor:
    """beta_k with its natural parameters concatenated: ``[B, *L, D']``."""
    site = chain.latent_params(k, tuple(a.detach() for a in alpha))
    beta = chain.feedback_message(k, y, mask, site)
    return torch.cat([_units(b.detach(), y) for b in beta], -1).reshape(*y.shape, -1)


@dataclass
class BlockVariation:
    """Block k's messages at its valid labelled sites (units), ready for any weights."""

    example: Tensor  # [U] the example each unit belongs to
    labels: Tensor  # [U]
    num_classes: int
    message: Tensor | None  # [U, D] g_k; None where undefined
    feedback: Tensor | None  # [U, D'] beta_k; None for a block without a latent

    def shares(self, weights: Tensor | None = None) -> dict[str, Tensor]:
        """``message_within`` and ``feedback_within`` under example weights ``[R, B]``
        (``None``: every example once); ``[R]`` each, NaN where undefined."""
        w = None if weights is None else weights[:, self.example]
        r = 1 if weights is None else weights.shape[0]
        out = {}
        for name, v in zip(VARIATION, (self.message, self.feedback), strict=True):
            if v is None:
                out[name] = torch.full((r,), math.nan, dtype=torch.float64)
            else:
                out[name] = within_class_share(v, self.labels, self.num_classes, w)
        return out


def block_variation(
    chain: BLLChain, k: int, alpha: Params, y: Tensor, mask: Tensor | None
) -> BlockVariation:
    """The messages of block k (forward message ``alpha``) on a labelled batch."""
    valid = (torch.ones_like(y, dtype=torch.bool) if mask is None else mask.bool()).flatten()
    example = torch.arange(y.shape[0], device=y.device).repeat_interleave(y[0].numel())
    message = feedback = None
    if chain.has_latent(k):
        g = effective_message(chain, k, alpha, y, mask)
        message = None if g is None else _units(g, y)[valid]
        feedback = _units(feedback_potential(chain, k, alpha, y, mask), y)[valid]
    num_classes = int(chain.class_potentials(k)[0].shape[0])
    return BlockVariation(example[valid], y.flatten()[valid], num_classes, message, feedback)


__all__ = [
    "VARIATION",
    "BlockVariation",
    "block_variation",
    "effective_message",
    "feedback_potential",
    "within_class_share",
]
