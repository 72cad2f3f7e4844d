"""``--message channel`` (the paper's channel-wise latent) against ``mean``, on a ResNet.

The feedback's weight in rho's mean is computed by hand from the Gaussian product rule
(precision-weighted means), not from the library's posterior: 1/2 under ``channel``,
1 / (H W + 1) under ``mean``. The agreement statistic ``feedback_weight`` must report it.
"""

import pytest
import torch
from test_resnet import tiny_chain

from pyro_bll import BlockLocalELBO
from pyro_bll.agreement import block_sums, summarise
from pyro_bll.config import ConfigError
from pyro_bll.diagnostics import forward_messages

from utils import assert_block_local, assert_close

SIGMA = 1.0


def _by_hand(alpha_loc, b, n_avg):
    """rho's mean for a latent N(mean_hw mu, sigma^2 / n_avg) and a potential N(b, sigma^2)."""
    p_a, p_b = n_avg / SIGMA**2, 1 / SIGMA**2
    return (p_a * alpha_loc.mean((1, 2)) + p_b * b) / (p_a + p_b)


@pytest.mark.parametrize("message", ["channel", "mean"])
def test_rho_mean_and_the_reported_feedback_weight(message):
    chain = tiny_chain("resnet18", "gaussian", message=message).double()
    with torch.no_grad():
        for layer in chain.feedback.layers:
            layer.weight.normal_(0, 2.0)
    x, y = torch.randn(5, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (5,))
    alphas = forward_messages(chain, x)
    for k in range(chain.num_blocks - 1):
        alpha = alphas[k]  # ([B, H, W, C], [B, H, W, C])
        hw = alpha[0].shape[1] * alpha[0].shape[2]
        site = chain.latent_params(k, alpha)
        rho = chain.families[k].posterior(site, chain.feedback_message(k, y, None, site))
        b = chain.feedback(y, k)  # the raw prototype means b_y, [B, C]
        n_avg = 1 if message == "channel" else hw
        assert_close(rho[0], _by_hand(alpha[0], b, n_avg), atol=1e-10, rtol=1e-10)
        weight = summarise(block_sums(chain, k, alpha, y, None))["feedback_weight"]
        assert_close(weight, torch.tensor([1 / (n_avg + 1)], dtype=torch.float64), atol=1e-9)


def test_the_channel_chain_trains_locally():
    chain = tiny_chain("resnet18", "gamma", message="channel").double()
    x, y = torch.randn(4, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (4,))
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    assert torch.isfinite(losses.per_block).all()
    assert_block_local(chain, losses.per_block)


def test_channel_needs_propagate_mean():
    with pytest.raises(ConfigError, match="--message channel .*use --propagate mean"):
        tiny_chain("resnet18", "gaussian", message="channel", propagate="sample")
