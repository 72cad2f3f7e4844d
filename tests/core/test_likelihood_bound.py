"""The sampling-free local likelihood (docs/likelihood_bound.md), over every family.

Every check compares against a computation that does not go through the library's own
statistics or log-normalisers: log-normalisers by summation or quadrature over the
support with statistics written in the test (``utils.reference_grid``), torch's (or, for
the von Mises, scipy's) log-densities of the class-conditional laws for the prototype
logits, Monte Carlo draws for expectations, finite differences for gradients.
"""

import pytest
import torch

from pyro_bll.core.likelihoods import prototype_bound
from pyro_bll.families import make_family

from utils import (
    assert_close,
    independent_log_prob,
    reference_inner,
    reference_log_normalizer,
    reference_name,
    reference_stats,
)

C, V = 6, 4  # latent channels, classes


def _raw(n, *batch, scale=1.0):
    return scale * torch.randn(*batch, n, dtype=torch.float64)


def _setup(family, *batch):
    alpha = family.params(_raw(family.raw_size(C), *batch))
    protos = family.feedback_potential(_raw(family.feedback_size(C), V))  # [V, C(, K)]
    beta_y_raw = _raw(family.feedback_size(C), *batch)
    rho = family.posterior(alpha, family.feedback_potential(beta_y_raw))
    return rho, protos


def _class_log_prob(family, protos, z):
    """log pi_c(z) of the class-conditional laws pi_c = F(eta_ref + beta_c) (eta_ref: see
    ``test_class_laws_use_the_documented_reference``), from torch's or scipy's densities:
    ``z [..., C(, K)]`` -> ``[..., V, C]``."""
    params = family.from_natural(family.class_natural(protos))  # [V, C(, K)]
    return independent_log_prob(family, params, z.unsqueeze(-2 - family.event_dims))


def _log_q_by_torch(family, protos, z, y):
    """log q(y | z) from independent log-densities: softmax_c sum_C log pi_c(z). ``z [S, B, C]``."""
    lp = _class_log_prob(family, protos, z)  # [S, B, V, C]
    logits = lp.sum(-1)  # [S, B, V]
    return torch.log_softmax(logits, -1).gather(-1, y.expand(z.shape[0], -1).unsqueeze(-1))[..., 0]


def test_prototype_logits_equal_the_class_laws_log_densities(family):
    """potential_logits = sum_C log pi_c(z) up to a class-independent term (the base measure)."""
    rho, protos = _setup(family, 5)
    z = family.distribution(rho).sample()  # [5, C]
    logits = family.potential_logits(z, protos)  # [5, V]
    direct = _class_log_prob(family, protos, z).sum(-1)  # [5, V]
    diff = direct - logits
    assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-9, rtol=0)


def _stats(family, z):
    """T(z) as the test writes it (``utils.reference_stats``)."""
    return reference_stats(reference_name(family), z, getattr(family, "group_size", None))


def test_expected_stats_match_monte_carlo(family):
    rho, _ = _setup(family, 3)
    eta = family.natural(rho)
    z = family.distribution(rho).sample((200_000,))
    for got, stat in zip(family.expected_stats(eta), _stats(family, z), strict=True):
        mc = stat.mean(0)
        se = stat.std(0) / 200_000**0.5
        assert ((got - mc).abs() <= 5 * se + 1e-9).all(), (got, mc)


def test_moment_generating_identity_matches_monte_carlo(family):
    """E_rho exp<beta, T(z)> = exp(A(eta_rho + beta) - A(eta_rho)), the step the bound rests on."""
    rho, _ = _setup(family, 3)
    beta = family.feedback_potential(_raw(family.feedback_size(C), 3, scale=0.3))
    eta = family.natural(rho)
    z = family.distribution(rho).sample((200_000,))
    log_w = reference_inner(family.name, beta, _stats(family, z))  # [S, 3, C']
    w = log_w.exp()
    exact = family.log_normalizer_shift(eta, beta).exp()
    se = w.std(0) / 200_000**0.5
    assert ((w.mean(0) - exact).abs() <= 6 * se + 1e-9).all()


def test_bound_lies_below_the_monte_carlo_expectation(family):
    rho, protos = _setup(family, 8)
    y = torch.randint(V, (8,))
    bound = prototype_bound(family, rho, protos, y)  # [8]
    z = family.distribution(rho).sample((20_000,))  # [S, 8, C]
    log_q = _log_q_by_torch(family, protos, z, y)  # [S, 8]
    mc, se = log_q.mean(0), log_q.std(0) / 20_000**0.5
    assert (bound <= mc + 4 * se).all(), (bound, mc)
    assert (bound > mc - 20).all()  # a bound, but not a vacuous one


def test_bound_is_exact_for_a_point_mass_limit():
    """For a Gaussian rho with a vanishing variance Jensen is tight: the bound is log q(y|mu),
    q's class laws written out from the family's docstring: raw (r1, r2) is the class law
    N(r1 / (1 + P), 1 / (1 + P)), P = softplus(r2 - 5)."""
    fam = make_family("gaussian_learned", min_scale=0.0)
    mu = torch.randn(4, C, dtype=torch.float64)
    rho = (mu, torch.full_like(mu, 1e-6))
    raw = _raw(2 * C, V)
    protos = fam.feedback_potential(raw)
    r1, r2 = raw[:, :C], raw[:, C:]
    prec = 1 + torch.nn.functional.softplus(r2 - 5)
    laws = torch.distributions.Normal(r1 / prec, prec.rsqrt())  # [V, C]
    y = torch.randint(V, (4,))
    exact = torch.log_softmax(laws.log_prob(mu.unsqueeze(-2)).sum(-1), -1)
    assert_close(prototype_bound(fam, rho, protos, y), exact.gather(-1, y[:, None])[:, 0],
                 atol=1e-6, rtol=0)  # fmt: skip


def test_log_normalizer_and_its_shift_match_numerical_normalisation(family):
    """A(eta) = log of the sum or integral of h(z) exp(<eta, T(z)>) over the support, with
    T, h and the grid written in the test (``utils.reference_grid``), and the shift
    A(eta + beta) - A(eta) (the stable forms some families use) as the difference of two
    such integrals (float64, moderate parameters)."""
    name = reference_name(family)
    rho, _ = _setup(family, 4)
    eta = family.natural(rho)
    beta = family.feedback_potential(_raw(family.feedback_size(C), 4))
    shifted = tuple(e + b for e, b in zip(eta, beta, strict=True))
    a_eta, a_shifted = reference_log_normalizer(name, eta), reference_log_normalizer(name, shifted)
    assert_close(family.log_normalizer(eta), a_eta, atol=1e-8, rtol=1e-8)
    assert_close(family.log_normalizer(shifted), a_shifted, atol=1e-8, rtol=1e-8)
    assert_close(family.log_normalizer_shift(eta, beta), a_shifted - a_eta, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_class_log_mgf_matches_numerical_normalisation(family, weight):
    """class_log_mgf(eta, w beta) = sum_C [A(eta + w beta_c) - A(eta)] for every class c
    (the fixed Gaussian's matrix-product form included), A by quadrature or summation."""
    name = reference_name(family)
    rho, protos = _setup(family, 5, 3)
    eta = family.natural(rho)  # [5, 3, C(, K)]
    beta = tuple(weight * p for p in protos)  # [V, C(, K)]
    got = family.class_log_mgf(eta, beta)
    assert got.shape == (5, 3, V)
    cls = -2 - family.stat_dims  # a class axis in front of the channels
    eta_c = tuple(e.unsqueeze(cls) for e in eta)  # [5, 3, 1, C(, K)]
    shifted = tuple(e + b for e, b in zip(eta_c, beta, strict=True))
    want = reference_log_normalizer(name, shifted) - reference_log_normalizer(name, eta_c)
    assert_close(got, want.sum(-1), atol=1e-8, rtol=1e-8)


def test_the_fixed_gaussian_class_log_mgf_by_quadrature():
    """The paper Gaussian's matrix-product form at sigma = 0.7 with a message weight:
    sum_C log of the integral of N(z; mu, s^2) exp(w (b_c z / sigma^2 - z^2 / (2 sigma^2)))
    over z, by quadrature."""
    fam = make_family("gaussian", sigma=0.7)
    alpha = fam.params(torch.randn(5, 3, 6, dtype=torch.float64))
    rho = fam.posterior(alpha, fam.feedback_potential(torch.randn(5, 3, 6, dtype=torch.float64)))
    mu, s = rho  # [5, 3, 6]
    b = torch.randn(4, 6, dtype=torch.float64)
    w = 0.25
    got = fam.class_log_mgf(fam.natural(rho), tuple(w * t for t in fam.feedback_potential(b)))
    loc, scale = mu[..., None, :, None], s[..., None, :, None]  # [5, 3, 1, C, 1]
    z = loc + scale * torch.linspace(-15, 15, 3001, dtype=torch.float64)  # [5, 3, 1, C, G]
    tilt = w * (b[:, :, None] * z - z * z / 2) / 0.7**2  # [5, 3, V, C, G]
    log_f = torch.distributions.Normal(loc, scale).log_prob(z) + tilt
    peak = log_f.amax(-1, keepdim=True)
    want = (torch.trapezoid((log_f - peak).exp(), z, dim=-1).log() + peak[..., 0]).sum(-1)
    assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_bound_on_a_pooled_map_lies_below_the_monte_carlo_expectation(family):
    """``pool``: logits are the mean over the map's locations of the per-location logits."""
    rho, protos = _setup(family, 3, 2, 2)  # [B, H, W, C]
    y = torch.randint(V, (3,))
    bound = prototype_bound(family, rho, protos, y, weight=1 / 4, spatial_dims=2)
    z = family.distribution(rho).sample((20_000,))  # [S, 3, 2, 2, C(, K)]
    per_loc = _class_log_prob(family, protos, z).sum(-1)  # [S, 3, 2, 2, V]
    log_q = torch.log_softmax(per_loc.mean((2, 3)), -1)
    log_q = log_q.gather(-1, y.expand(20_000, -1).unsqueeze(-1))[..., 0]
    mc, se = log_q.mean(0), log_q.std(0) / 20_000**0.5
    assert (bound <= mc + 4 * se).all(), (bound, mc)


def test_bound_gradient_matches_finite_differences(family):
    """Autograd through alpha's raw outputs and the feedback's equals central differences."""
    a_raw = _raw(family.raw_size(C), 2).requires_grad_()
    b_raw = _raw(family.feedback_size(C), V).requires_grad_()
    y = torch.tensor([1, 3])

    def f(a, b):
        protos = family.feedback_potential(b)
        rho = family.posterior(family.params(a), tuple(p[y] for p in protos))
        return prototype_bound(family, rho, protos, y).sum()

    f(a_raw, b_raw).backward()
    for x, grad in ((a_raw, a_raw.grad), (b_raw, b_raw.grad)):
        eps = 1e-6
        for i in range(0, x.numel(), 3):
            d = torch.zeros_like(x).flatten()
            d[i] = eps
            d = d.view_as(x)
            with torch.no_grad():
                args = (a_raw + d, b_raw) if x is a_raw else (a_raw, b_raw + d)
                args_m = (a_raw - d, b_raw) if x is a_raw else (a_raw, b_raw - d)
                fd = (f(*args) - f(*args_m)) / (2 * eps)
            assert_close(grad.flatten()[i], fd, atol=1e-6, rtol=1e-5)


def test_a_zero_raw_feedback_output_sends_no_information(family):
    """Contract: an untrained feedback network leaves rho at alpha (documented exception:
    the paper's fixed-variance Gaussian, whose zero output is the potential of N(0, sigma^2):
    exp<beta, T(z)> / N(z; 0, sigma^2) is the same for every z, torch's density)."""
    beta = family.feedback_potential(torch.zeros(3, family.feedback_size(C), dtype=torch.float64))
    if family.zero_raw_is_uninformative:
        for b in beta:
            assert b.abs().max() <= family.zero_potential_tol
    else:
        assert family.name == "gaussian"
        z = torch.linspace(-4, 4, 9, dtype=torch.float64)[:, None, None].expand(-1, 3, C)
        prior = torch.distributions.Normal(0.0, family.sigma).log_prob(z)
        offset = reference_inner(family.name, beta, reference_stats(family.name, z)) - prior
        assert_close(offset, offset[:1].expand_as(offset), atol=1e-12, rtol=0)


# eta_ref of the class-conditional laws, as the families' docstrings give it (zero unless
# listed): the prototype likelihood reads beta_c as F(eta_ref + beta_c)
CLASS_REFERENCE = {
    "gaussian_learned": lambda fam: (0.0, -0.5),  # N(0, 1)
    "gaussian_gated": lambda fam: (0.0, -0.5 / fam.sigma**2),  # N(0, sigma^2)
    "gamma": lambda fam: (0.0, -1.0),  # Exp(1)
}


def test_class_laws_use_the_documented_reference(family):
    """class_natural(beta) = eta_ref + beta, with eta_ref from the docstrings; the class
    law of a zero raw feedback output is a distribution (its numerical normaliser is
    finite) and the family's A there is that normaliser."""
    name = reference_name(family)
    protos = family.feedback_potential(_raw(family.feedback_size(C), V))
    ref = CLASS_REFERENCE.get(name, lambda fam: (0.0,) * len(protos))(family)
    for got, p, r in zip(family.class_natural(protos), protos, ref, strict=True):
        assert_close(got, p + r, atol=1e-12, rtol=0)
    zero = family.feedback_potential(torch.zeros(1, family.feedback_size(C), dtype=torch.float64))
    a_ref = reference_log_normalizer(name, family.class_natural(zero))
    assert torch.isfinite(a_ref).all()
    assert_close(family.log_normalizer(family.class_natural(zero)), a_ref, atol=1e-8, rtol=1e-8)


def test_two_extreme_potentials_keep_the_bound_finite(family):
    """eta(alpha) + beta_y + beta_c stays a valid parameter for any raw feedback outputs."""
    alpha = family.params(_raw(family.raw_size(C), 5, scale=30.0))
    for sign in (-1.0, 1.0):
        raw = sign * 60.0 * torch.ones(V, family.feedback_size(C), dtype=torch.float64)
        protos = family.feedback_potential(raw)
        rho = family.posterior(alpha, tuple(p[torch.zeros(5, dtype=torch.long)] for p in protos))
        family.check_params(rho)
        assert torch.isfinite(prototype_bound(family, rho, protos, torch.arange(5) % V)).all()


def test_channel_law_has_the_maps_mean(family):
    """``--message channel``: the summary's mean is the spatial mean of the map's means.
    ``channel_law`` is optional (docs/families.md): a family without one is skipped."""
    from pyro_bll.families import Family

    if type(family).channel_law is Family.channel_law:
        pytest.skip(f"{family.name} offers no channel_law (optional)")
    alpha = family.params(_raw(family.raw_size(C), 2, 3, 3))  # [B, H, W, C(, K)]
    law = family.channel_law(alpha, (1, 2))
    family.check_params(law)
    got = family.distribution(law).mean
    want = family.distribution(alpha).mean.mean((1, 2))
    if family.discrete and family.stat_dims:  # a categorical's mean: its probabilities
        got = family.distribution(law).probs
        want = family.distribution(alpha).probs.mean((1, 2))
    assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_unconstrained_parameters_have_the_raw_width(family):
    alpha = family.params(_raw(family.raw_size(C), 2, 5))
    u = family.unconstrained(alpha)
    assert u.shape == (2, 5, family.raw_size(C)) and torch.isfinite(u).all()


def test_unconstrained_coordinates_are_the_raw_output(family):
    """``--propagate params`` hands on what the block wrote: unconstrained(params(raw))
    is raw itself (compared with the input, not with a second computation), over raw
    values from -8 to 8, where every positive parameter is resolved beside its offset.
    The Beta declares otherwise (``unconstrained_is_raw``) and hands on log-shapes."""
    raw = _raw(family.raw_size(C), 4, 5, scale=3.0).clamp(-8.0, 8.0)
    u = family.unconstrained(family.params(raw))
    if family.unconstrained_is_raw:
        assert_close(u, raw, atol=1e-9, rtol=1e-9)
    else:
        assert family.name == "beta"
        want = torch.log(torch.nn.functional.softplus(raw) + family.min_param)
        assert_close(u, want, atol=1e-12, rtol=1e-12)


def test_unconstrained_coordinates_stay_finite_where_softplus_underflows():
    """A raw output far below zero puts Gamma's mean at its floor (eps) or its shape at
    its offset in float32: the coordinate is then clamped (finite, about log(eps) or
    log(eps * offset)), not -inf; raw values that float32 resolves come back as they were."""
    fam = make_family("gamma")
    raw = torch.tensor([[-200.0, -20.0, 0.0, 30.0]], dtype=torch.float32).repeat(1, 2)
    u = fam.unconstrained(fam.params(raw))
    assert torch.isfinite(u).all()
    assert (u[:, [0, 1, 4, 5]] < -15).all() and (u[:, [0, 1, 4, 5]] > -19).all()
    assert_close(u[:, [2, 3, 6, 7]], raw[:, [2, 3, 6, 7]], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("estimator", ["bound", "sample"])
def test_chain_uses_the_bound_only_when_asked(estimator):
    """The ELBO's likelihood term is the bound (deterministic) or a draw (varies)."""
    from pyro_bll import BLLChain, BlockLocalELBO, make_family
    from pyro_bll.core.likelihoods import CategoricalHead
    from pyro_bll.guides import LinearFeedback

    fam = make_family("bernoulli")
    blocks = [torch.nn.Linear(3, C), torch.nn.Linear(C, C)]
    chain = BLLChain(blocks, fam, LinearFeedback(V, [C, C]), CategoricalHead(C, V),
                     likelihood=estimator, register_params=False)  # fmt: skip
    x, y = torch.randn(16, 3), torch.randint(V, (16,))
    elbo = BlockLocalELBO(2)
    values = {elbo.block_losses(chain.model, chain.guide, x, y).terms["likelihood"][0].item()
              for _ in range(3)}  # fmt: skip
    assert (len(values) == 1) == (estimator == "bound")
