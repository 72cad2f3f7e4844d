"""docs/math.md §2: exactness on a linear-Gaussian chain (float64).

The exact quantities come from the joint Gaussian of (z_1, ..., z_N, y) given x, built
with numpy in the test and conditioned with the Schur complement (``_joint``,
``_exact``), not from the closed forms of ``pyro_bll.models.linear_gaussian`` (which
``test_the_specs_closed_forms_are_the_joint_gaussians`` checks against it).
"""

import numpy as np
import pytest
import scipy.stats
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


def _joint(x):
    """Mean ``[B, N + 1]`` and covariance ``[N + 1, N + 1]`` of u = (z_1, ..., z_N, y) given
    x: u = T u + d + e with T[k, k - 1] = a_k (w for y), d = (a_1 x + c_1, c_2, ..., c_N,
    c_y), e ~ N(0, diag(v_1, ..., v_N, v_y)); so u = L (d + e), L = (I - T)^-1."""
    n = len(SPEC.a)
    t = np.zeros((n + 1, n + 1))
    for k in range(1, n):
        t[k, k - 1] = SPEC.a[k]
    t[n, n - 1] = SPEC.w
    lower = np.linalg.inv(np.eye(n + 1) - t)
    x = x.numpy()[:, 0]
    d = np.tile(np.array([*SPEC.c, SPEC.c_y]), (len(x), 1))
    d[:, 0] += SPEC.a[0] * x
    return d @ lower.T, lower @ np.diag([*SPEC.v, SPEC.v_y]) @ lower.T


def _exact(x, y):
    """Per block k: the forward marginal p(z_k | x) and the posterior p(z_k | x, y) as
    (mean [B], variance) pairs, and log p(y | x) [B], from the joint Gaussian."""
    mean, cov = _joint(x)
    y = y.numpy()
    n = len(SPEC.a)
    forward, posterior = [], []
    for k in range(n):
        forward.append((mean[:, k], cov[k, k]))
        gain = cov[k, n] / cov[n, n]  # conditioning on y: the Schur complement
        posterior.append((mean[:, k] + gain * (y - mean[:, n]), cov[k, k] - gain * cov[k, n]))
    evidence = scipy.stats.norm.logpdf(y, mean[:, n], np.sqrt(cov[n, n]))
    return forward, posterior, torch.from_numpy(evidence)


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
    log_evidence = _exact(x, y)[2].sum()
    for k in range(chain.num_blocks):
        assert_close(-losses.per_block[k], log_evidence, atol=1e-10, rtol=1e-12)


def test_rho_is_the_exact_posterior(data):
    """rho_k = p(z_k | x, y) and alpha_k = p(z_k | x), both from the joint Gaussian."""
    x, y = data
    chain = build_linear_gaussian_chain(SPEC).double()
    fam = chain.families[0]
    forward, posterior, _ = _exact(x, y)
    inp = x
    for k in range(chain.num_blocks):
        alpha = chain.forward_message(k, inp)
        loc, scale = fam.posterior(alpha, chain.feedback_message(k, y, None))
        mean, var = posterior[k]
        assert_close(loc[:, 0], torch.from_numpy(mean), atol=1e-12, rtol=1e-10)
        assert_close(scale[:, 0] ** 2, torch.full_like(loc[:, 0], var), atol=1e-12, rtol=1e-10)
        # alpha_k is the forward marginal p(z_k | x)
        m, s = forward[k]
        assert_close(alpha[0][:, 0], torch.from_numpy(m), atol=1e-12, rtol=1e-10)
        assert_close(alpha[1][:, 0] ** 2, torch.full_like(loc[:, 0], s), atol=1e-12, rtol=1e-10)
        inp = alpha


def test_the_specs_closed_forms_are_the_joint_gaussians(data):
    """``LinearGaussianSpec``'s recursions (forward marginals, backward messages,
    evidence, posterior) against the joint Gaussian conditioned in numpy."""
    x, y = data
    forward, posterior, evidence = _exact(x, y)
    assert_close(SPEC.log_evidence(x[:, 0], y), evidence, atol=1e-12, rtol=1e-10)
    for k, (m, s) in enumerate(SPEC.forward_marginals(x[:, 0])):
        assert_close(m, torch.from_numpy(forward[k][0]), atol=1e-12, rtol=1e-10)
        assert_close(s, torch.full_like(m, forward[k][1]), atol=1e-12, rtol=1e-10)
        mean, var = SPEC.posterior(x[:, 0], y, k)
        assert_close(mean, torch.from_numpy(posterior[k][0]), atol=1e-12, rtol=1e-10)
        assert_close(var, torch.full_like(mean, posterior[k][1]), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("shift", [-0.5, 0.05, 1.0])
def test_any_other_feedback_gives_a_strictly_smaller_bound(data, shift):
    x, y = data
    exact = _losses(build_linear_gaussian_chain(SPEC).double(), x, y).per_block
    wrong_chain = build_linear_gaussian_chain(SPEC, shift=shift, name="shifted").double()
    wrong = _losses(wrong_chain, x, y).per_block
    log_evidence = _exact(x, y)[2].sum()
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
    exact = _exact(x, y)[2].exp()
    assert ((est - exact).abs() < 4 * se).all(), (est, exact, se)
