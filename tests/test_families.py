"""DESIGN.md section 2, item 1: the algebra of every registered family."""

import pytest
import torch
from torch.distributions import kl_divergence

from pyro_bll import FamilyError

from utils import assert_close

C = 3


def _params(family, *batch, scale=1.0):
    raw = scale * torch.randn(*batch, family.raw_size(C), dtype=torch.float64)
    return family.params(raw)


def _potential(family, *batch):
    raw = torch.randn(*batch, family.feedback_size(C), dtype=torch.float64)
    return family.feedback_potential(raw)


def test_params_have_channel_shape_and_lie_in_support(family):
    params = _params(family, 5, 7)
    for p in params:
        assert p.shape == (5, 7, C)
    family.check_params(params)
    d = family.distribution(params)
    assert d.batch_shape == (5, 7, C)
    assert family.mean(params).shape == (5, 7, C)
    assert d.support.check(d.sample()).all()


def test_natural_round_trip(family):
    params = _params(family, 50)
    back = family.from_natural(family.natural(params))
    for a, b in zip(params, back, strict=True):
        assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_exponential_family_log_prob_matches_torch(family):
    params = _params(family, 40)
    z = family.distribution(params).sample()
    assert_close(family.log_prob(params, z), family.distribution(params).log_prob(z), atol=1e-10)


def test_posterior_matches_numerical_normalisation(family):
    """rho from natural parameters vs alpha(z) exp(<beta, T(z)>) normalised on a grid."""
    alpha = _params(family, 4)
    beta = _potential(family, 4)
    rho = family.posterior(alpha, beta)
    d_alpha, d_rho = family.distribution(alpha), family.distribution(rho)
    lo = torch.minimum(d_alpha.mean - 15 * d_alpha.stddev, d_rho.mean - 15 * d_rho.stddev)
    hi = torch.maximum(d_alpha.mean + 15 * d_alpha.stddev, d_rho.mean + 15 * d_rho.stddev)
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None, None]
    z = lo + (hi - lo) * t  # [G, 4, C]
    stats = family.sufficient_stats(z)
    log_unnorm = d_alpha.log_prob(z) + sum(b * s for b, s in zip(beta, stats, strict=True))
    dens = log_unnorm.exp()
    norm = torch.trapezoid(dens, z, dim=0)
    numeric = dens / norm
    assert_close(numeric, d_rho.log_prob(z).exp(), atol=1e-6, rtol=1e-5)
    mean = torch.trapezoid(numeric * z, z, dim=0)
    assert_close(mean, d_rho.mean, atol=1e-6, rtol=1e-6)


def test_zero_potential_leaves_alpha_unchanged(family):
    alpha = _params(family, 6)
    rho = family.posterior(alpha, family.zero_potential(family.mean(alpha)))
    for a, r in zip(alpha, rho, strict=True):
        assert_close(r, a, atol=1e-12, rtol=1e-12)


def test_kl_matches_monte_carlo_and_reaches_both_arguments(family):
    raw_p = torch.randn(2, family.raw_size(C), dtype=torch.float64, requires_grad=True)
    raw_q = torch.randn(2, family.raw_size(C), dtype=torch.float64, requires_grad=True)
    p, q = family.params(raw_p), family.params(raw_q)
    kl = family.kl(p, q)
    assert kl.shape == (2, C)
    dp, dq = family.distribution(p), family.distribution(q)
    z = dp.sample((200_000,))
    mc = (dp.log_prob(z) - dq.log_prob(z)).mean(0)
    se = (dp.log_prob(z) - dq.log_prob(z)).std(0) / 200_000**0.5
    assert ((kl - mc).abs() < 5 * se + 1e-9).all()
    assert_close(kl, kl_divergence(dp, dq), atol=1e-12)
    kl.sum().backward()
    assert raw_p.grad is not None and raw_p.grad.abs().sum() > 0
    assert raw_q.grad is not None and raw_q.grad.abs().sum() > 0


def test_potential_logits_match_direct_formula(family):
    classes = 5
    protos = _potential(family, classes)  # each [V, C]
    z = family.distribution(_params(family, 7)).sample()
    logits = family.potential_logits(z, protos)
    assert logits.shape == (7, classes)
    stats = family.sufficient_stats(z)
    for c in range(classes):
        eta_c = tuple(e[c] for e in protos)
        direct = sum(e * s for e, s in zip(eta_c, stats, strict=True)).sum(-1)
        direct = direct - family.log_normalizer(eta_c).sum(-1)
        assert_close(logits[:, c], direct, atol=1e-10)


def test_wrong_block_width_is_a_clear_error(family):
    if family.n_raw == 1:
        pytest.skip("every width fits a family with one value per channel")
    with pytest.raises(FamilyError, match="multiple of"):
        family.params(torch.randn(4, family.n_raw * C + 1))


def test_fixed_variance_gaussian_posterior_is_the_papers():
    """Paper: alpha, beta with variance s^2 give rho = N((alpha + beta) / 2, s^2 / 2)."""
    from pyro_bll.families import FixedVarianceGaussian

    fam = FixedVarianceGaussian(sigma=0.7)
    a, b = torch.randn(10, C, dtype=torch.float64), torch.randn(10, C, dtype=torch.float64)
    loc, scale = fam.posterior(fam.params(a), fam.feedback_potential(b))
    assert_close(loc, (a + b) / 2, atol=1e-12)
    assert_close(scale, torch.full_like(a, 0.7 / 2**0.5), atol=1e-12)


def test_unknown_family_lists_valid_names():
    from pyro_bll import make_family

    with pytest.raises(FamilyError, match="valid families: gaussian"):
        make_family("gausian")
    with pytest.raises(FamilyError, match="no option"):
        make_family("gaussian", sgima=1.0)
