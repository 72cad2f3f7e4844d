"""Shared test helpers."""

from __future__ import annotations

import torch
from torch import nn

from pyro_bll import BLLChain, CategoricalHead
from pyro_bll.families import Family
from pyro_bll.guides import LinearFeedback
from pyro_bll.models import mlp_blocks


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, msg: str = "") -> None:
    """One closeness check for the whole suite; each test states its own tolerance."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)


def mlp_chain(family: Family, *, in_dim=6, widths=(6, 6, 6), classes=4, **kw) -> BLLChain:
    """A small MLP chain with the paper's linear feedback and prototype likelihoods."""
    blocks = mlp_blocks(in_dim, widths, family)
    feedback = LinearFeedback(classes, [family.feedback_size(w) for w in widths])
    kw.setdefault("pred_heads", [nn.Linear(w, classes) for w in widths[:-1]])
    return BLLChain(blocks, family, feedback, CategoricalHead(widths[-1], classes), **kw)


def toy_batch(n=16, in_dim=6, classes=4):
    x = torch.randn(n, in_dim)
    y = torch.randint(0, classes, (n,))
    return x, y
