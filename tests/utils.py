"""Shared test helpers."""

from __future__ import annotations

import torch
from torch import nn

from pyro_bll import BLLChain, CategoricalHead
from pyro_bll.families import Family
from pyro_bll.guides import LinearFeedback
from pyro_bll.models import mlp_blocks


def assert_close(
    actual, expected, *, atol: float, rtol: float = 0.0, msg: str = "", equal_nan: bool = False
) -> None:
    """One closeness check for the whole suite; each test states its own tolerance
    (``equal_nan``: NaN, an undefined value, must sit where the expected value has it)."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, msg=msg or None, equal_nan=equal_nan
    )


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


def assert_block_local(chain: BLLChain, per_block: torch.Tensor) -> None:
    """docs/math.md §2 (locality), on block losses ``per_block [N]`` of ``chain``: the
    total loss's gradient for block k's parameters equals that of l_k alone, l_k gives no
    other parameter a gradient, and every parameter belongs to exactly one block."""
    params = list(chain.parameters())
    total_grads = torch.autograd.grad(per_block.sum(), params, retain_graph=True, allow_unused=True)
    total = {id(p): g for p, g in zip(params, total_grads, strict=True)}
    owned = set()
    for k in range(chain.num_blocks):
        mine = chain.block_parameters(k)
        owned |= {id(p) for p in mine}
        others = [p for p in params if all(p is not q for q in mine)]
        # unused: the last block's feedback when the head reads m(alpha_N) (no site z_N)
        local = torch.autograd.grad(per_block[k], mine, retain_graph=True, allow_unused=True)
        for p, g in zip(mine, local, strict=True):
            if g is None:
                assert total[id(p)] is None or total[id(p)].abs().max() == 0
            else:
                assert_close(g, total[id(p)], atol=1e-12, rtol=1e-10)
        leak = torch.autograd.grad(per_block[k], others, retain_graph=True, allow_unused=True)
        assert all(g is None or g.abs().max() == 0 for g in leak)
    assert owned == {id(p) for p in params}, "every parameter belongs to exactly one block"
