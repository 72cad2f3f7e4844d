"""docs/families.md: the algebra of every registered family."""

import math

import pytest
import torch
from torch.distributions import kl_divergence

from pyro_bll import FAMILIES, FamilyError, make_family

from utils import assert_close

C = 6  # latent channels (a multiple of the test categorical's group size)


def _params(family, *batch, shift=0.0):
    raw = shift + torch.randn(*batch, family.raw_size(C), dtype=torch.float64)
    return family.params(raw)


def _potential(family, *batch):
    raw = torch.randn(*batch, family.feedback_size(C), dtype=torch.float64)
    return family.feedback_potential(raw)


def _support_points(family, alpha, rho):
    """Points z ``[G, *latent]`` covering the support of alpha and rho, with a rule: the
    family's own grid (``Family.quadrature``, read from its ``domain``).

    Finite supports are enumerated and counts summed up to a far tail (``rule`` None).
    Continuous supports are integrated with the trapezoid rule in a coordinate u
    (z = u, exp(u) or sigmoid(u); the circle's [-pi, pi]); ``rule = (u, dz/du)``.
    """
    grid = family.quadrature(alpha, rho)
    assert grid is not None, f"{family.name}: no quadrature grid on {family.domain!r}"
    return grid


def test_params_have_the_documented_shapes_and_lie_in_support(family):
    params = _params(family, 5, 7)
    family.check_params(params)
    d = family.distribution(params)
    z = d.sample()
    assert z.shape == d.batch_shape + d.event_shape and d.batch_shape[:2] == (5, 7)
    assert len(d.event_shape) == family.event_dims
    assert d.support.check(z).all()
    assert family.mean(params).shape == (5, 7, C)  # what the next block consumes
    assert family.features(z).shape == (5, 7, C)  # a draw fed on (propagate="sample")
    for eta, stat in zip(family.natural(params), family.sufficient_stats(z), strict=True):
        assert eta.shape == stat.shape


def _check_posterior_of_a_vector_family(family, alpha, beta, rho):
    """No grid covers a simplex: log rho(z) - log alpha(z) - <beta, T(z)> must be one
    constant over random z (torch's log-densities), and that constant is minus the log of
    E_alpha exp<beta, T(z)> (Monte Carlo over 200,000 draws)."""
    d_alpha, d_rho = family.distribution(alpha), family.distribution(rho)
    z = d_alpha.sample((200_000,))
    log_w = family.inner(beta, family.sufficient_stats(z))  # [S, 4, G]
    offset = d_rho.log_prob(z) - d_alpha.log_prob(z) - log_w
    assert_close(offset, offset[:1].expand_as(offset), atol=1e-8, rtol=1e-8)
    w = log_w.exp()
    se = w.std(0) / 200_000**0.5
    assert ((w.mean(0) - (-offset[0]).exp()).abs() <= 6 * se).all()


def test_natural_round_trip(family):
    params = _params(family, 50)
    back = family.from_natural(family.natural(params))
    for a, b in zip(params, back, strict=True):
        assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_exponential_family_log_prob_matches_torch(family):
    params = _params(family, 40)
    z = family.distribution(params).sample()
    assert_close(family.log_prob(params, z), family.distribution(params).log_prob(z), atol=1e-9)


def test_posterior_matches_numerical_normalisation(family):
    """rho = F(eta(alpha) + beta) vs alpha(z) exp(<beta, T(z)>) normalised numerically,
    over the family's own integration domain (``Family.quadrature``)."""
    alpha = _params(family, 4)
    beta = _potential(family, 4)
    rho = family.posterior(alpha, beta)
    family.check_params(rho)
    if family.quadrature(alpha, rho) is None:  # e.g. a simplex: Monte Carlo
        return _check_posterior_of_a_vector_family(family, alpha, beta, rho)
    z, rule = _support_points(family, alpha, rho)
    d_alpha, d_rho = family.distribution(alpha), family.distribution(rho)
    log_unnorm = d_alpha.log_prob(z) + family.inner(beta, family.sufficient_stats(z))
    stats = family.sufficient_stats(z)
    extra = [1] * family.stat_dims  # statistic axes beyond the latent's

    def integrate(f):  # f [G, *latent, *stat]
        if rule is None:
            return f.sum(0)
        u, jac = rule
        w = jac.reshape(jac.shape + (1,) * (f.dim() - jac.dim()))
        return torch.trapezoid(
            f * w, u.reshape(u.shape + (1,) * (f.dim() - u.dim())).expand_as(f), dim=0
        )

    log_norm = integrate(log_unnorm.exp()).log()
    # the normaliser is exp(A(eta + beta) - A(eta)) and the normalised density is rho
    exact = family.log_normalizer(family.natural(rho)) - family.log_normalizer(
        family.natural(alpha)
    )
    assert_close(log_norm, exact, atol=1e-5, rtol=1e-6)
    assert_close(log_unnorm - log_norm, d_rho.log_prob(z), atol=1e-4, rtol=1e-5)
    # and its expected statistics are grad A(eta(rho)) (the bound and the Bregman KL use them)
    density = (log_unnorm - log_norm).exp()
    for got, t in zip(family.expected_stats(family.natural(rho)), stats, strict=True):
        want = integrate(density.reshape(density.shape + tuple(extra)) * t.to(density.dtype))
        assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_zero_potential_leaves_alpha_unchanged(family):
    alpha = _params(family, 6)
    rho = family.posterior(alpha, family.zero_potential(alpha))
    for a, r in zip(alpha, rho, strict=True):
        assert_close(r, a, atol=1e-12, rtol=1e-12)


def test_kl_matches_monte_carlo_and_reaches_both_arguments(family):
    raw_p = torch.randn(2, family.raw_size(C), dtype=torch.float64, requires_grad=True)
    raw_q = torch.randn(2, family.raw_size(C), dtype=torch.float64, requires_grad=True)
    p, q = family.params(raw_p), family.params(raw_q)
    kl = family.kl(p, q)
    dp, dq = family.distribution(p), family.distribution(q)
    assert kl.shape == dp.batch_shape
    n = 200_000
    z = dp.sample((n,))
    diff = dp.log_prob(z) - dq.log_prob(z)
    se = diff.std(0) / math.sqrt(n)
    assert ((kl - diff.mean(0)).abs() < 5 * se + 1e-9).all()
    kl.sum().backward()
    assert raw_p.grad is not None and raw_p.grad.abs().sum() > 0
    assert raw_q.grad is not None and raw_q.grad.abs().sum() > 0


def _two_laws(family):
    raw_p = torch.randn(2, family.raw_size(C), dtype=torch.float64, requires_grad=True)
    raw_q = torch.randn(2, family.raw_size(C), dtype=torch.float64, requires_grad=True)
    return raw_p, raw_q, family.params(raw_p), family.params(raw_q)


def _grads(value, *inputs):
    return torch.autograd.grad(value.sum(), inputs, retain_graph=True)


def test_bregman_kl_equals_the_familys_kl_in_value_and_gradient(family):
    """The generic KL from the log-normaliser, A(eta_q) - A(eta_p) - <eta_q - eta_p,
    grad A(eta_p)>, is the closed form every family with one uses (torch's, or the
    Bernoulli's from the logits), with the same gradients for both arguments."""
    raw_p, raw_q, p, q = _two_laws(family)
    bregman, kl = family.bregman_kl(p, q), family.kl(p, q)
    assert bregman.shape == kl.shape == family.distribution(p).batch_shape
    assert (bregman > 0).all()
    assert_close(bregman, kl, atol=1e-9, rtol=1e-9)
    for gb, gk in zip(_grads(bregman, raw_p, raw_q), _grads(kl, raw_p, raw_q), strict=True):
        assert gb.abs().sum() > 0
        assert_close(gb, gk, atol=1e-9, rtol=1e-9)


# torch's closed forms next to each family's distribution (torch, not pyro, classes)
TORCH_LAWS = {
    "gaussian": lambda p: torch.distributions.Normal(*p),
    "gaussian_learned": lambda p: torch.distributions.Normal(*p),
    "gaussian_gated": lambda p: torch.distributions.Normal(*p),
    "bernoulli": lambda p: torch.distributions.Bernoulli(logits=p[0]),
    "categorical": lambda p: torch.distributions.Categorical(logits=p[0]),
    "poisson": lambda p: torch.distributions.Poisson(p[0]),
    "gamma": lambda p: torch.distributions.Gamma(*p),
    "beta": lambda p: torch.distributions.Beta(*p),
    "dirichlet": lambda p: torch.distributions.Dirichlet(p[0]),
}


@pytest.mark.parametrize("name", sorted(TORCH_LAWS))
def test_bregman_kl_matches_torchs_closed_form(name):
    family = make_family(name, **FAMILIES[name].example_options)
    raw_p, raw_q, p, q = _two_laws(family)
    law = TORCH_LAWS[name]
    bregman, torch_kl = family.bregman_kl(p, q), kl_divergence(law(p), law(q))
    assert_close(bregman, torch_kl, atol=1e-9, rtol=1e-9)
    gb, gt = _grads(bregman, raw_p, raw_q), _grads(torch_kl, raw_p, raw_q)
    for a, b in zip(gb, gt, strict=True):
        assert a.abs().sum() > 0
        assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_the_von_mises_kl_is_the_bregman_one_registered_with_torch():
    """torch has no von Mises KL: the family registers the Bregman KL, so torch's
    ``kl_divergence`` (and the ELBO's analytic KL) returns it; concentrated laws too."""
    family = make_family("vonmises")
    raw_p, raw_q, p, q = _two_laws(family)
    got = kl_divergence(family.distribution(p), family.distribution(q))
    assert_close(got, family.bregman_kl(p, q), atol=0, rtol=0)
    # point masses far apart: KL ~ kappa (1 - cos(mu_p - mu_q)), finite and positive
    eta = torch.tensor([[50.0, 0.0]], dtype=torch.float64)
    kl = family.bregman_kl((eta,), (-eta,))
    assert torch.isfinite(kl).all() and kl.item() == pytest.approx(100.0, rel=0.02)


def test_wrong_block_width_is_a_clear_error(family):
    if family.n_raw == 1 and family.stat_dims == 0:
        pytest.skip("every width fits a family with one value per channel")
    width = family.raw_size(C) + 1
    with pytest.raises(FamilyError, match="multiple of|does not divide"):
        family.params(torch.randn(4, width))


def test_fixed_variance_gaussian_posterior_is_the_papers():
    """Paper: alpha, beta with variance s^2 give rho = N((alpha + beta) / 2, s^2 / 2)."""
    fam = make_family("gaussian", sigma=0.7)
    a, b = torch.randn(10, C, dtype=torch.float64), torch.randn(10, C, dtype=torch.float64)
    loc, scale = fam.posterior(fam.params(a), fam.feedback_potential(b))
    assert_close(loc, (a + b) / 2, atol=1e-12)
    assert_close(scale, torch.full_like(a, 0.7 / 2**0.5), atol=1e-12)


def test_bad_family_input_is_a_clear_error():
    with pytest.raises(FamilyError, match="valid families: gaussian"):
        make_family("gausian")
    with pytest.raises(FamilyError, match="no option"):
        make_family("gaussian", sgima=1.0)
    with pytest.raises(FamilyError, match="group_size 4 does not divide the 6 channels"):
        make_family("categorical", group_size=4).params(torch.randn(2, 6))
    with pytest.raises(FamilyError, match="rate must be finite and > 0"):
        make_family("poisson").check_params((torch.tensor([-1.0]),))
    with pytest.raises(FamilyError, match="must be finite and > 0"):
        make_family("gamma").check_params((torch.tensor([1.0]), torch.tensor([-2.0])))
