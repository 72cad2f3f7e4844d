"""docs/families.md: the algebra of every registered family.

References are independent of the families' own formulas: sufficient statistics, base
measures, log-normalisers and integration grids written in the test (``utils``:
``reference_grid``, ``reference_stats``, ``reference_log_normalizer``), torch's
log-densities and closed-form KLs (scipy's Bessel function for the von Mises, whose
torch-class ``log_prob`` the library overrides), Monte Carlo.
"""

import math

import pytest
import torch
from torch.distributions import kl_divergence

from pyro_bll import FAMILIES, FamilyError, make_family

from utils import (
    REFERENCE_FAMILIES,
    assert_close,
    independent_log_prob,
    reference_grid,
    reference_inner,
    reference_log_h,
    reference_log_normalizer,
    reference_name,
    reference_stats,
)

C = 6  # latent channels (a multiple of the test categorical's group size)


def _params(family, *batch, shift=0.0):
    raw = shift + torch.randn(*batch, family.raw_size(C), dtype=torch.float64)
    return family.params(raw)


def _potential(family, *batch):
    raw = torch.randn(*batch, family.feedback_size(C), dtype=torch.float64)
    return family.feedback_potential(raw)


def _stats(family, z):
    """T(z) at draws z, as the test writes it."""
    return reference_stats(family.name, z, getattr(family, "group_size", None))


def test_every_built_in_family_has_an_independent_reference():
    """The references in tests/utils.py cover every family this package ships, on the
    domain and with the statistic axes the family declares."""
    for name, cls in FAMILIES.items():
        if not cls.__module__.startswith("pyro_bll."):
            continue  # a plugin: its own package tests it
        assert name in REFERENCE_FAMILIES, f"add {name!r} to utils.REFERENCE_FAMILIES"
        assert REFERENCE_FAMILIES[name] == (cls.domain, cls.stat_dims), name


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


def test_natural_round_trip(family):
    params = _params(family, 50)
    back = family.from_natural(family.natural(params))
    for a, b in zip(params, back, strict=True):
        assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_exponential_family_log_prob_matches_an_independent_density(family):
    """``Family.log_prob`` (h, T, A of the family) against torch's log-density (scipy's
    for the von Mises)."""
    params = _params(family, 40)
    z = family.distribution(params).sample()
    assert_close(family.log_prob(params, z), independent_log_prob(family, params, z), atol=1e-9)


def test_natural_parameters_give_the_independent_density(family):
    """eta(alpha) in the docstring's convention: log h(z) + <eta, T(z)> - A(eta), with h, T
    written in the test and A by summation or quadrature, is torch's (scipy's)
    log-density at draws of alpha."""
    name = reference_name(family)
    params = _params(family, 5)
    eta = family.natural(params)
    z = family.distribution(params).sample((7,))  # [7, 5, *latent]
    want = independent_log_prob(family, params, z)
    got = (reference_log_h(name, z) + reference_inner(name, eta, _stats(family, z))
           - reference_log_normalizer(name, eta))  # fmt: skip
    assert_close(got, want, atol=1e-8, rtol=1e-8)


def _integrate(grid, log_f):
    """log of the sum or integral of exp(log_f) ``[G, *latent]`` on ``grid``."""
    return torch.logsumexp(grid.log_w + log_f, 0)


def test_posterior_matches_numerical_normalisation(family):
    """rho = F(eta(alpha) + beta) vs alpha(z) exp(<beta, T(z)>) normalised numerically on
    the test's own grid (``utils.reference_grid``, T written in the test): the normaliser
    is exp(A(eta_rho) - A(eta_alpha)), the normalised density is rho's (torch's or scipy's,
    at draws of rho), and its expected statistics are E_rho T = grad A(eta_rho) (the
    bound and the Bregman KL use them)."""
    name = reference_name(family)
    alpha = _params(family, 4)
    beta = _potential(family, 4)
    rho = family.posterior(alpha, beta)
    family.check_params(rho)
    eta_a, eta_r = family.natural(alpha), family.natural(rho)
    grid = reference_grid(name, eta_a, eta_r)
    log_alpha = (grid.log_h + reference_inner(name, eta_a, grid.stats)
                 - reference_log_normalizer(name, eta_a))  # fmt: skip
    log_unnorm = log_alpha + reference_inner(name, beta, grid.stats)
    log_norm = _integrate(grid, log_unnorm)
    exact = family.log_normalizer(eta_r) - family.log_normalizer(eta_a)
    assert_close(log_norm, exact, atol=1e-8, rtol=1e-8)
    z = family.distribution(rho).sample((20,))
    want = (independent_log_prob(family, alpha, z)
            + reference_inner(name, beta, _stats(family, z)) - log_norm)  # fmt: skip
    assert_close(independent_log_prob(family, rho, z), want, atol=1e-8, rtol=1e-8)
    density = (grid.log_w + log_unnorm - log_norm).exp()  # quadrature weight included
    extra = (1,) * family.stat_dims  # statistic axes beyond the latent's
    for got, t in zip(family.expected_stats(eta_r), grid.stats, strict=True):
        want = (density.reshape(density.shape + extra) * t).sum(0)
        assert_close(got, want, atol=1e-8, rtol=1e-8)


def test_the_familys_quadrature_grid_covers_its_laws(family):
    """``Family.quadrature``, read from the class's ``domain`` (the grid
    tests/core/test_estimators.py integrates on), holds the laws' mass: torch's (scipy's)
    density sums or integrates to one on it. No grid covers a simplex."""
    alpha = _params(family, 4)
    rho = family.posterior(alpha, _potential(family, 4))
    grid = family.quadrature(alpha, rho)
    if grid is None:
        assert family.domain == "simplex"
        pytest.skip("no quadrature grid on a simplex (the generic checks use Monte Carlo)")
    z, rule = grid
    for law in (alpha, rho):
        p = independent_log_prob(family, law, z).exp()
        total = p.sum(0) if rule is None else torch.trapezoid(p * rule[1], rule[0], dim=0)
        assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


def test_a_zero_raw_feedback_output_leaves_alpha(family):
    """An untrained feedback network (raw output 0) sends a potential beta_0 within
    ``zero_potential_tol`` of zero, and rho's density (torch's or scipy's, at draws of
    alpha) is alpha(z) exp(<beta_0, T(z)>) normalised numerically: alpha itself for an
    exact zero. The paper's fixed-variance Gaussian is the documented exception
    (docs/families.md): its zero output is the potential of N(0, sigma^2), so rho is
    alpha(z) N(z; 0, sigma^2) normalised numerically, N(mu / 2, sigma^2 / 2)."""
    name = reference_name(family)
    alpha = _params(family, 6)
    beta0 = family.feedback_potential(torch.zeros(6, family.feedback_size(C), dtype=torch.float64))
    rho = family.posterior(alpha, beta0)
    family.check_params(rho)
    eta_a = family.natural(alpha)
    grid = reference_grid(name, eta_a, family.natural(rho))
    if family.zero_raw_is_uninformative:
        assert max(b.abs().max() for b in beta0) <= family.zero_potential_tol

        def tilt(z, stats):
            return reference_inner(name, beta0, stats)
    else:
        assert name == "gaussian"
        prior = torch.distributions.Normal(0.0, family.sigma)

        def tilt(z, stats):
            return prior.log_prob(z)

    log_alpha = (grid.log_h + reference_inner(name, eta_a, grid.stats)
                 - reference_log_normalizer(name, eta_a))  # fmt: skip
    log_norm = _integrate(grid, log_alpha + tilt(grid.z, grid.stats))
    z = family.distribution(alpha).sample((30,))
    log_alpha_z = independent_log_prob(family, alpha, z)
    want = log_alpha_z + tilt(z, _stats(family, z)) - log_norm
    got = independent_log_prob(family, rho, z)
    assert_close(got, want, atol=1e-9, rtol=1e-9)
    if family.zero_potential_tol == 0 and family.zero_raw_is_uninformative:
        assert_close(got, log_alpha_z, atol=1e-12, rtol=1e-12)  # rho = alpha exactly
    if not family.zero_raw_is_uninformative:  # the paper's rho = N(mu / 2, sigma^2 / 2)
        paper = torch.distributions.Normal(alpha[0] / 2, family.sigma / 2**0.5)
        assert_close(got, paper.log_prob(z), atol=1e-12, rtol=1e-12)


def test_kl_matches_monte_carlo_and_reaches_both_arguments(family):
    raw_p = torch.randn(2, family.raw_size(C), dtype=torch.float64, requires_grad=True)
    raw_q = torch.randn(2, family.raw_size(C), dtype=torch.float64, requires_grad=True)
    p, q = family.params(raw_p), family.params(raw_q)
    kl = family.kl(p, q)
    dp = family.distribution(p)
    assert kl.shape == dp.batch_shape
    n = 200_000
    z = dp.sample((n,))
    with torch.no_grad():
        diff = independent_log_prob(family, p, z) - independent_log_prob(family, q, z)
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


def _von_mises_kl_by_quadrature(p, q):
    """KL(p || q) = integral of p (log p - log q) over the circle, the periodic trapezoid
    rule, log p(z) = <eta_p, (cos z, sin z)> - A(eta_p) with A by the same rule: no Bessel
    function, differentiable in both pairs (the pair is the natural parameter)."""
    grid = reference_grid("vonmises", p)
    log_p = reference_inner("vonmises", p, grid.stats) - reference_log_normalizer("vonmises", p)
    log_q = reference_inner("vonmises", q, grid.stats) - reference_log_normalizer("vonmises", q)
    return ((grid.log_w + log_p).exp() * (log_p - log_q)).sum(0)


def test_kl_and_bregman_kl_match_an_independent_kl(family):
    """``Family.kl`` and the generic ``bregman_kl`` (A(eta_q) - A(eta_p) - <eta_q - eta_p,
    grad A(eta_p)>) against torch's closed form for the family's torch class, or, for the
    von Mises (which torch has none for), the KL by quadrature: values and the
    gradients for both arguments."""
    raw_p, raw_q, p, q = _two_laws(family)
    if family.name in TORCH_LAWS:
        law = TORCH_LAWS[family.name]
        want = kl_divergence(law(p), law(q))
    else:
        assert family.name == "vonmises", f"add an independent KL for {family.name!r}"
        want = _von_mises_kl_by_quadrature(p, q)
    assert (want > 0).all()
    for got in (family.kl(p, q), family.bregman_kl(p, q)):
        assert got.shape == want.shape == family.distribution(p).batch_shape
        assert_close(got, want, atol=1e-9, rtol=1e-9)
        for a, b in zip(_grads(got, raw_p, raw_q), _grads(want, raw_p, raw_q), strict=True):
            assert b.abs().sum() > 0
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
