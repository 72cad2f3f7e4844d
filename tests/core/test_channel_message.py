"""``--message channel`` (the paper's channel-wise latent) against ``mean``, and ``grid``
(the channel law per cell), on a ResNet.

The feedback's weight in rho's mean is computed by hand from the Gaussian product rule
(precision-weighted means), not from the library's posterior: 1/2 under ``channel``,
1 / (H W + 1) under ``mean``. The agreement statistic ``feedback_weight`` must report it.
"""

import numpy as np
import pytest
import torch
from test_resnet import tiny_chain

from pyro_bll import BlockLocalELBO, make_family
from pyro_bll.analysis.diagnostics import forward_messages
from pyro_bll.config import ConfigError
from pyro_bll.core.agreement import block_sums, summarise
from pyro_bll.guides import GridMessage, grid_side
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks.vision import build_resnet_chain

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


@pytest.mark.parametrize(
    ("message", "family", "side"),
    # under grid, 28x28 images give maps of 28, 14 and 7 with cells of 2, 2 and 1 pixels
    [("channel", "gamma", 12), *(("grid", f, 28) for f in ("gaussian", "categorical", "gamma"))],
)
def test_the_summary_chains_train_locally(message, family, side):
    cfg = RunConfig(task="cifar10", pred_weight=1.0, width=0.125, message=message)
    chain = build_resnet_chain("resnet18", 1, 10, make_family(family), cfg, image_size=side)
    chain = chain.double()
    x, y = torch.randn(4, 1, side, side, dtype=torch.float64), torch.randint(0, 10, (4,))
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    assert torch.isfinite(losses.per_block).all()
    assert_block_local(chain, losses.per_block)


@pytest.mark.parametrize("message", ["channel", "grid"])
def test_summary_messages_need_propagate_mean(message):
    with pytest.raises(ConfigError, match=f"--message {message} .*use --propagate mean"):
        tiny_chain("resnet18", "gaussian", message=message, propagate="sample")


# ---- --message grid: the channel law on every cell of the predictive heads' grid ----------


@pytest.mark.parametrize(
    ("channels", "side", "expected"),
    # by hand: the largest divisor s of the side with C s^2 <= 2048
    [(8, 28, 14), (16, 14, 7), (32, 7, 7), (64, 4, 4), (48, 8, 4), (4096, 6, 1)],
)
def test_grid_side(channels, side, expected):
    assert grid_side(channels, side) == expected


def test_grid_latent_is_the_cell_means_and_rho_halves_the_way_by_hand():
    """A 28x28 map of 8 channels: 14x14 cells of 2x2 pixels, flattened (row, col, channel);
    with the paper's potential N(b, sigma^2) on each, rho's mean is (cell mean + b) / 2."""
    family, message = make_family("gaussian"), GridMessage()
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(2, 28, 28, 8, generator=g, dtype=torch.float64)
    alpha = (loc, torch.full_like(loc, SIGMA))
    site = message.latent_params(family, alpha)
    a = loc.numpy()
    cells = np.array(
        [[a[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((1, 2)) for j in range(14)]
         for i in range(14)]
    ).transpose(2, 0, 1, 3)  # [row, col, B, C] -> [B, row, col, C]  # fmt: skip
    assert site[0].shape == (2, 14 * 14 * 8)
    assert_close(site[0], cells.reshape(2, -1), atol=1e-12)
    assert_close(site[1], np.full((2, 14 * 14 * 8), SIGMA), atol=0)
    b = torch.randn(2, 14 * 14 * 8, generator=g, dtype=torch.float64)
    beta = message.place(family.feedback_potential(b), alpha)
    rho = family.posterior(site, beta)
    assert_close(rho[0], (cells.reshape(2, -1) + b.numpy()) / 2, atol=1e-12)
    assert_close(rho[1], np.full((2, 14 * 14 * 8), SIGMA / 2**0.5), atol=1e-12)


def test_grid_feedback_writes_one_template_per_class_at_a_channel_prototypes_size():
    """Width-0.125 ResNet-18 on 28x28 images: latents of 8 x 14^2, 16 x 7^2 and 32 x 7^2
    channels; each block's initial template has about a channel prototype's norm."""
    cfg = RunConfig(task="cifar10", pred_weight=1.0, width=0.125, message="grid")
    torch.manual_seed(0)
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg, image_size=28)
    widths = [layer.weight.shape[1] for layer in chain.feedback.layers]
    assert widths[:3] == [8 * 14**2, 16 * 7**2, 32 * 7**2]
    for layer, s in zip(chain.feedback.layers, [14, 7, 7], strict=False):
        # entries ~ N(0, (1 / s)^2): the sample std of 10 * C * s^2 >= 15,680 draws, within 5 %
        assert_close(layer.weight.std(), 1.0 / s, atol=0.05 / s)
    x, y = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    alphas = forward_messages(chain, x)
    for k in range(chain.num_blocks - 1):
        site = chain.latent_params(k, alphas[k])
        assert site[0].shape == (3, widths[k])
        weight = summarise(block_sums(chain, k, alphas[k], y, None))["feedback_weight"]
        assert_close(weight, [0.5], atol=1e-5)
