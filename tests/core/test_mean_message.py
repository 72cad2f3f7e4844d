"""``--message mean``: the latent of a feature-map block is the spatial mean of the map.

The claims of ``guides/spatial.py``: ``Family.spatial_mean`` is the law of the average of
the map's independent draws; with a potential on T(zbar) the exact posterior over the whole
map has the same KL to alpha as the two laws of zbar (so the chain's KL term is exact); the
prototype likelihood is the classifier on zbar; and the chain stays block-local.
"""

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from pyro_bll import BlockLocalELBO
from pyro_bll.analysis.diagnostics import collect, to_inference_data
from pyro_bll.config import ConfigError
from pyro_bll.families import FAMILIES, Family, FamilyError, make_family
from pyro_bll.guides import MeanMessage
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks.vision import build_resnet_chain

from utils import assert_block_local, assert_close

# the families closed under averaging independent draws (the Gaussians) implement it
GAUSSIANS = sorted(n for n, c in FAMILIES.items() if c.spatial_mean is not Family.spatial_mean)


def mean_chain(family="gaussian", **cfg):
    cfg = RunConfig(**{"task": "cifar10", "pred_weight": 1.0, "width": 1 / 16, "message": "mean",
                       "blocks": 3, **cfg})  # fmt: skip
    return build_resnet_chain("resnet18", 1, 10, make_family(family), cfg)


@pytest.mark.parametrize("name", GAUSSIANS)
def test_spatial_mean_is_the_law_of_the_average(name):
    fam = make_family(name)
    alpha = fam.params(torch.randn(2, 3, 4, fam.raw_size(5), dtype=torch.float64))
    loc, scale = fam.spatial_mean(alpha, (1, 2))  # [2, 5]
    assert loc.shape == scale.shape == (2, 5)
    torch.manual_seed(0)  # by simulation of the average of independent draws (loose)
    zbar = fam.distribution(alpha).sample((20000,)).mean((2, 3))  # [D, 2, 5]
    assert_close(zbar.mean(0), loc, atol=4 * scale.max().item() / 141, rtol=0)
    assert_close(zbar.std(0), scale, atol=0, rtol=0.05)


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(GAUSSIANS)))
def test_families_not_closed_under_averaging_refuse(name):
    fam = make_family(name)
    alpha = fam.params(torch.zeros(1, 2, 2, fam.raw_size(12)))
    with pytest.raises(FamilyError, match="use --message pool"):
        fam.spatial_mean(alpha, (1, 2))
    with pytest.raises(ConfigError, match="--message mean: .*use --message pool"):
        mean_chain(name)


@pytest.mark.parametrize("name", GAUSSIANS)
def test_kl_of_the_map_posterior_equals_the_kl_of_the_means(name):
    """Per channel, alpha over the n locations is N(a, diag(s^2)); the potential
    exp(b1 zbar + b2 zbar^2) with zbar = u.z, u = 1/n, gives the exact map posterior
    N(P^-1 h, P^-1) with P = diag(1/s^2) - 2 b2 u u^T, h = a/s^2 + b1 u. Its KL to alpha
    equals KL(rho(zbar) || alpha(zbar)) from the family's algebra (float64, tight)."""
    fam = make_family(name)
    h_, w_, c = 3, 2, 4
    n = h_ * w_
    alpha = fam.params(torch.randn(1, h_, w_, fam.raw_size(c), dtype=torch.float64))
    beta = fam.feedback_potential(torch.randn(1, fam.feedback_size(c), dtype=torch.float64))
    message = MeanMessage()
    law = message.latent_params(fam, alpha)  # [1, C]
    rho_bar = fam.posterior(law, message.place(beta, law))
    kl_bar = fam.kl(rho_bar, law)[0]  # [C]
    a = alpha[0][0].reshape(n, c)
    s2 = alpha[1][0].reshape(n, c).pow(2)
    u = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for ch in range(c):
        prior = MultivariateNormal(a[:, ch], torch.diag(s2[:, ch]))
        b1, b2 = beta[0][0, ch], beta[1][0, ch]
        prec = torch.diag(1 / s2[:, ch]) - 2 * b2 * torch.outer(u, u)
        cov = torch.linalg.inv(prec)
        post = MultivariateNormal(cov @ (a[:, ch] / s2[:, ch] + b1 * u), cov)
        kl_map = torch.distributions.kl_divergence(post, prior)
        assert_close(kl_map, kl_bar[ch], atol=1e-10, rtol=1e-10)


def test_prototype_likelihood_is_the_classifier_on_the_mean():
    chain = mean_chain()
    fam = chain.families[0]
    x = torch.randn(4, 1, 8, 8)
    alpha = chain.forward_message(0, x)
    zbar = fam.distribution(chain.latent_params(0, alpha)).sample()  # [4, C]
    assert zbar.shape == (4, alpha[0].shape[-1])
    b = chain.feedback.class_outputs(0)  # [V, C], fixed-variance prototypes (sigma 1)
    hand = zbar @ b.T - 0.5 * b.pow(2).sum(-1)
    q = chain.local_likelihoods[0](chain, 0, zbar)
    assert_close(q.logits, torch.log_softmax(hand, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", GAUSSIANS)
def test_the_mean_chain_trains_locally(name):
    chain = mean_chain(name).double()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    assert torch.isfinite(losses.per_block).all()
    assert (losses.terms["kl"][:-1] > 0).all() and losses.terms["kl"][-1] == 0  # no z_N
    assert_block_local(chain, losses.per_block)


def test_mean_needs_propagate_mean():
    with pytest.raises(ConfigError, match="--message mean .*use --propagate mean"):
        mean_chain(propagate="sample")


def test_diagnostics_of_a_mean_chain_have_one_site_per_block():
    chain = mean_chain().eval()
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 3, 1])
    runs = [collect(chain, x, y, None, draws=6, examples=2, positions=5, channels=3, seed=0)]
    idata = to_inference_data(runs, y, None)
    assert idata.posterior["z"].shape == (1, 6, 3, 2, 1, 3)  # one site: the mean
    kl = idata.agreement["kl"].values
    # blocks 1-2 hold a latent (KL > 0); the last has none (the head reads its mean): NaN
    assert kl.shape == (1, 6, 3) and (kl[..., :2] > 0).all() and np.isnan(kl[..., 2]).all()
