"""Critic backward messages (pyro_bll.core.critic): block j's linear model of its read-out,
read by block j - 1 through a frozen copy; checked against hand computations."""

from __future__ import annotations

import math

import torch

from pyro_bll import BlockLocalELBO, make_family
from pyro_bll.core.critic import Critic, critic_widths

from utils import assert_block_local, assert_close, mlp_chain, toy_batch


def _chain():
    chain = mlp_chain(make_family("gaussian"), register_params=False).double()
    chain.use_critic(Critic(critic_widths(chain), 4).double())
    return chain


def test_an_untrained_critic_sends_no_information():
    chain = _chain()
    z = torch.randn(5, 6, dtype=torch.float64)
    chain.critic.maybe_refresh(0)
    logp = chain.local_likelihoods[0](chain, 0, z).logits
    assert_close(logp, torch.full((5, 4), -math.log(4), dtype=torch.float64), atol=1e-12)


def test_the_likelihood_is_the_frozen_critic_of_the_block_above():
    chain = _chain()
    with torch.no_grad():
        for p in chain.critic.parameters():
            p.normal_()
    assert chain.critic.maybe_refresh(0) == sum(p.numel() * 8 for p in chain.critic.parameters())
    z = torch.randn(5, 6, dtype=torch.float64)
    w, b = chain.critic.maps[0].weight, chain.critic.maps[0].bias  # block 1's critic
    want = (z @ w.T + b).log_softmax(-1)
    first = chain.local_likelihoods[0](chain, 0, z).logits
    assert_close(first, want, atol=1e-12)
    with torch.no_grad():
        w.add_(1.0)  # the live critic moves; the copy stays until the next refresh
    assert chain.critic.maybe_refresh(0) == 0
    assert_close(chain.local_likelihoods[0](chain, 0, z).logits, first, atol=0)


def test_critics_are_owned_by_the_block_above_and_learning_stays_local():
    chain = _chain()
    with torch.no_grad():
        for p in chain.critic.parameters():
            p.normal_()
    chain.critic.maybe_refresh(0)
    x, y = toy_batch()
    losses = BlockLocalELBO(3).block_losses(chain.model, chain.guide, x.double(), y)
    assert_block_local(chain, losses.per_block)
    assert any(p is chain.critic.maps[1].weight for p in chain.block_parameters(2))
    h = torch.randn(16, 6, dtype=torch.float64)
    alpha = chain.families[1].params(chain.blocks[1](h))
    fit = chain.critic.regression(chain, 1, h, alpha, y, None).sum()
    grads = torch.autograd.grad(fit, list(chain.parameters()), allow_unused=True)
    owners = {id(p) for p in chain.critic.maps[0].parameters()}
    for p, g in zip(chain.parameters(), grads, strict=True):
        assert (g is not None and g.abs().sum() > 0) == (id(p) in owners)


def test_the_regression_learns_the_read_out():
    """A few hundred steps of the least-squares fit on a fixed input: the critic matches
    block 1's predictive head's log-probabilities."""
    chain = _chain()
    h = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    alpha = chain.families[1].params(chain.blocks[1](h))
    opt = torch.optim.Adam(chain.critic.maps[0].parameters(), lr=0.05)
    first = None
    for _ in range(300):
        opt.zero_grad()
        fit = chain.critic.regression(chain, 1, h, alpha, y, None).mean()
        first = fit.item() if first is None else first
        fit.backward()
        opt.step()
    assert fit.item() < 0.1 * first
