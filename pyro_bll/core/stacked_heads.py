"""Predictive heads of several blocks run as one, with their parameters stacked.

A group of blocks computed together (``pyro_bll.core.stacked``) whose predictive heads
share one structure of Linear and LayerNorm layers (and parameter-free activations) runs
them as one head: each layer's parameters are stacked to ``[n, ...]`` and applied to the
stacked inputs ``[n, B, *L, C]`` by batched products, so head i's output depends only on
head i's parameters and input slice i. The cross-entropy against the shared labels is then
one call over all n blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = (nn.Identity, nn.ReLU, nn.GELU, nn.Tanh)  # parameter-free layers


def _same_structure(mods: Sequence[nn.Module]) -> bool:
    first = mods[0]
    if any(type(m) is not type(first) for m in mods):
        return False
    if isinstance(first, nn.Sequential):
        return all(len(m) == len(first) for m in mods) and all(
            _same_structure([m[i] for m in mods]) for i in range(len(first))
        )
    if isinstance(first, nn.Linear):
        return all(
            m.weight.shape == first.weight.shape and (m.bias is None) == (first.bias is None)
            for m in mods
        )
    if isinstance(first, nn.LayerNorm):
        return all(
            m.normalized_shape == first.normalized_shape and m.eps == first.eps
            and m.elementwise_affine and (m.bias is not None) for m in mods
        )  # fmt: skip
    return isinstance(first, _ACTIVATIONS) and all(repr(m) == repr(first) for m in mods)


def stackable_heads(mods: Sequence[nn.Module]) -> bool:
    """Whether n heads can run as one: the same structure of Linear, LayerNorm (affine)
    and parameter-free activations, in Sequential containers."""
    return len(mods) > 1 and _same_structure(mods)


def stacked_heads(mods: Sequence[nn.Module], h: Tensor) -> Tensor:
    """n heads of one structure (``stackable_heads``) on inputs ``[n, B, *L, C]`` at once,
    with their parameters stacked: ``[n, B, *L, V]``. Block i's output depends only on
    head i's parameters and input slice i."""
    first = mods[0]
    if isinstance(first, nn.Sequential):
        for i in range(len(first)):
            h = stacked_heads([m[i] for m in mods], h)
        return h
    if isinstance(first, nn.Linear):
        w = torch.stack([m.weight for m in mods]).transpose(1, 2)  # [n, C, V]
        flat = h.reshape(h.shape[0], -1, h.shape[-1])  # [n, M, C]
        out = flat @ w
        if first.bias is not None:
            out = out + torch.stack([m.bias for m in mods]).unsqueeze(1)  # [n, 1, V]
        return out.reshape(*h.shape[:-1], w.shape[-1])
    if isinstance(first, nn.LayerNorm):
        view = (len(mods),) + (1,) * (h.dim() - 1 - len(first.normalized_shape))
        w = torch.stack([m.weight for m in mods]).reshape(*view, *first.normalized_shape)
        b = torch.stack([m.bias for m in mods]).reshape(*view, *first.normalized_shape)
        return F.layer_norm(h, first.normalized_shape, eps=first.eps) * w + b
    return first(h)  # a parameter-free activation


def stacked_cross_entropy(logits: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    """``masked_cross_entropy`` of n blocks' logits ``[n, B, *L, V]`` against the labels
    ``[B, *L]``: ``[n, B]``."""
    n, v = logits.shape[0], logits.shape[-1]
    labels = y.expand(n, *y.shape).reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, v), labels, reduction="none").reshape(n, *y.shape)
    if mask is not None:
        ce = ce * mask.to(ce.dtype)
    return ce.reshape(n, y.shape[0], -1).sum(-1)
