"""The transformer's block boundary under ``--propagate params``."""

from __future__ import annotations

import pytest
import torch

from pyro_bll.families import make_family
from pyro_bll.models.transformer import TransformerBlock

from utils import assert_close

D = 8


@pytest.mark.parametrize("name", ["gamma", "gaussian_learned"])
def test_an_untrained_params_boundary_continues_the_stream(name):
    """For a family with two parameters per channel, block k writes raw = (h, extra(h))
    and block k + 1 reads alpha through a projection of width 2D -> D. Untrained, that
    projection hands on h itself, so a deep stack starts as one residual stream."""
    torch.manual_seed(0)
    fam = make_family(name)
    block = TransformerBlock(D, 1, fam, params_input=True).double()
    h = torch.randn(2, 5, D, dtype=torch.float64)  # the previous block's stream
    raw = torch.cat([h, torch.randn(2, 5, D, dtype=torch.float64)], dim=-1)  # [B, T, 2D]
    alpha = fam.params(raw)
    assert_close(block.inproj(fam.unconstrained(alpha)), h, atol=1e-9, rtol=1e-9)
    assert_close(block(alpha), block.readout(block.layers(h)), atol=1e-9, rtol=1e-9)


def test_the_projection_learns_from_the_extra_parameters():
    """The zero half of the initial projection still receives a gradient: the block can
    learn to read the second parameter (e.g. Gamma's rate)."""
    fam = make_family("gamma")
    block = TransformerBlock(D, 1, fam, params_input=True)
    alpha = fam.params(torch.randn(2, 5, 2 * D))
    block(alpha).pow(2).sum().backward()
    assert block.inproj.weight.grad[:, D:].abs().sum() > 0


def test_the_beta_boundary_keeps_a_fresh_projection():
    """The Beta hands on log-shapes (``unconstrained_is_raw`` False): its projection keeps
    the default random initialisation, as measured (docs/results.md)."""
    torch.manual_seed(0)
    block = TransformerBlock(D, 1, make_family("beta"), params_input=True)
    assert block.inproj.weight[:, D:].abs().sum() > 0
    assert not torch.allclose(block.inproj.weight[:, :D], torch.eye(D))
