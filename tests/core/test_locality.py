"""docs/math.md §2: every block learns from its own loss only."""

import torch

from pyro_bll import BlockLocalELBO, seed_everything

from utils import assert_block_local, mlp_chain, toy_batch


def test_total_gradient_equals_local_gradient_and_nothing_leaks(family):
    chain = mlp_chain(family).double()
    x, y = toy_batch()
    x = x.double()
    seed_everything(1)
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    assert_block_local(chain, losses.per_block)


def test_without_detaching_gradients_do_cross_blocks(family):
    """The check above can fail: end to end, a later block's loss reaches block 0."""
    chain = mlp_chain(family, detach=False).double()
    x, y = toy_batch()
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x.double(), y)
    g = torch.autograd.grad(losses.per_block[-1], chain.block_parameters(0), allow_unused=True)
    assert any(t is not None and t.abs().max() > 0 for t in g)


def test_forward_blocks_run_once_per_step(family):
    """Guide and model share the cached forward messages."""
    chain = mlp_chain(family)
    calls = [0] * chain.num_blocks
    for k, block in enumerate(chain.blocks):
        block.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    x, y = toy_batch()
    BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    assert calls == [1] * chain.num_blocks
