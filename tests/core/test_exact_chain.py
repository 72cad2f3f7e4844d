"""docs/math.md §2: exactness on a linear-Gaussian chain (float64)."""

import pytest
import torch

from pyro_bll import BlockLocalELBO
from pyro_bll.models import LinearGaussianSpec, build_linear_gaussian_chain

from utils import assert_close

SPEC = LinearGaussianSpec(
    a=[0.8, -1.3, 0.5, 1.1],
    c=[0.1, 0.4, -0.2, 0.0],
    v=[0.5, 0.3, 0.7, 0.2],
    w=1.5,
    c_y=0.3,
    v_y=0.4,
)


@pytest.fixture
def data():
    x = torch.randn(9, 1, dtype=torch.float64)
    y = torch.randn(9, dtype=torch.float64) * 2
    return x, y


def _losses(chain, x, y):
    return BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)


@pytest.mark.parametrize("detach", [True, False])
def test_every_local_loss_equals_the_log_evidence(data, detach):
    x, y = data
    chain = build_linear_gaussian_chain(SPEC, detach=detach).double()
    losses = _losses(chain, x, y)
    log_evidence = SPEC.log_evidence(x[:, 0], y).sum()
    for k in range(chain.num_blocks):
        assert_close(-losses.per_block[k], log_evidence, atol=1e-10, rtol=1e-12)


def test_rho_is_the_exact_posterior(data):
    x, y = data
    chain = build_linear_gaussian_chain(SPEC).double()
    fam = chain.families[0]
    inp = x
    for k in range(chain.num_blocks):
        alpha = chain.forward_message(k, inp)
        loc, scale = fam.posterior(alpha, chain.feedback_message(k, y, None))
        mean, var = SPEC.posterior(x[:, 0], y, k)
        assert_close(loc[:, 0], mean, atol=1e-12, rtol=1e-10)
        assert_close(scale[:, 0] ** 2, var, atol=1e-12, rtol=1e-10)
        # alpha_k is the forward marginal p(z_k | x)
        m, s = SPEC.forward_marginals(x[:, 0])[k]
        assert_close(alpha[0][:, 0], m, atol=1e-12, rtol=1e-10)
        inp = alpha


@pytest.mark.parametrize("shift", [-0.5, 0.05, 1.0])
def test_any_other_feedback_gives_a_strictly_smaller_bound(data, shift):
    x, y = data
    exact = _losses(build_linear_gaussian_chain(SPEC).double(), x, y).per_block
    wrong_chain = build_linear_gaussian_chain(SPEC, shift=shift, name="shifted").double()
    wrong = _losses(wrong_chain, x, y).per_block
    log_evidence = SPEC.log_evidence(x[:, 0], y).sum()
    # the last block's bound uses the true head; all bounds must drop below log p(y|x)
    assert (-wrong < log_evidence - 1e-9).all(), (wrong, exact)
    assert (wrong > exact + 1e-9).all()


def test_monte_carlo_evidence_agrees_within_standard_error(data):
    """Sample z_N ~ p(z_N | x) through the chain, average p(y | z_N)."""
    x, y = data
    chain = build_linear_gaussian_chain(SPEC).double()
    n = 200_000
    inp = x
    for k in range(chain.num_blocks):
        alpha = chain.forward_message(k, inp)
        inp = alpha
    z = chain.families[-1].distribution(alpha).sample((n,))  # [n, B, 1]
    lik = chain.head.distribution(z).log_prob(y).exp()  # [n, B]
    est = lik.mean(0)
    se = lik.std(0) / n**0.5
    exact = SPEC.log_evidence(x[:, 0], y).exp()
    assert ((est - exact).abs() < 4 * se).all(), (est, exact, se)
