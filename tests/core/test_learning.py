"""A short learning check per family: a small BLL MLP learns a held-out classification."""

import torch

from pyro_bll import BlockLocalELBO

from utils import mlp_chain


def _clusters(n, generator):
    """Four classes: noisy points around the corners of a square in 6 dimensions."""
    y = torch.randint(0, 4, (n,), generator=generator)
    centres = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    x = torch.randn(n, 6, generator=generator) * 0.5
    x[:, :2] += 1.5 * centres[y]
    return x, y


def test_every_family_learns_above_chance(family):
    g = torch.Generator().manual_seed(0)
    x_train, y_train = _clusters(512, g)
    x_test, y_test = _clusters(512, g)
    chain = mlp_chain(family, register_params=False)
    elbo = BlockLocalELBO(chain.num_blocks)
    opt = torch.optim.Adam(chain.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = elbo.block_losses(chain.model, chain.guide, x_train[idx], y_train[idx]).total / 64
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-30:]) < 0.7 * sum(losses[:30])
    with torch.no_grad():
        acc = (chain.predict_logits(x_test).argmax(-1) == y_test).float().mean().item()
    assert acc > 0.75, acc  # chance is 0.25
