"""Why a learned feedback goes silent: the best label-only potential for an example the
block already classifies correctly is close to zero (docs/math.md, "What the feedback
learns").

alpha = N(mu, 1); two classes with the prototype likelihood
q(y | z) = softmax_c log N(z; m_c, 1), m = (-1, +1), i.e. q(1 | z) = sigmoid(2 z); the
feedback for label y = 1 is the tied potential N(z; m_1, 1)^w, so rho_w has precision
1 + w and mean (mu + w) / (1 + w) (w = 1: the paper's potential of precision 1). The local
objective L(w) = E_rho[log q(y | z)] - KL(rho || alpha) is at most log p(y) =
log E_alpha q(y | z), reached by the posterior alpha(z) q(y | z) / p(y) alone; within the
tilted family it is maximised by some w*.

The objective is a numpy quadrature written here (checked against closed forms and
scipy's adaptive quadrature), w* is found by scipy's bounded scalar minimiser (not a grid
that starts at the expected answer), and the library's own computation of L(w) (its
posterior, KL and prototype logits) must agree with it, so that its optimum is the same.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import torch

from pyro_bll import make_family

Z = np.linspace(-30.0, 30.0, 60001)  # quadrature grid
W_RANGE = (-0.3, 3.0)  # the gated Gaussian's potentials reach precisions above -1/3


def _log_q(z):
    return -np.logaddexp(0.0, -2.0 * z)  # log sigmoid(2 z)


def _objective(mu: float, w: float) -> float:
    """E_rho[log q(1 | z)] - KL(rho || alpha) by quadrature, rho = alpha N(z; 1, 1)^w."""
    log_alpha = -0.5 * (Z - mu) ** 2
    log_rho = log_alpha - 0.5 * w * (Z - 1.0) ** 2
    log_rho -= np.log(np.trapezoid(np.exp(log_rho - log_rho.max()), Z)) + log_rho.max()
    log_alpha -= 0.5 * np.log(2 * np.pi)
    rho = np.exp(log_rho)
    return float(np.trapezoid(rho * (_log_q(Z) - log_rho + log_alpha), Z))


def _log_evidence(mu: float) -> float:
    """log p(y = 1) = log E_alpha q(1 | z): the objective's maximum over every rho."""
    alpha = np.exp(-0.5 * (Z - mu) ** 2) / np.sqrt(2 * np.pi)
    return float(np.log(np.trapezoid(alpha * np.exp(_log_q(Z)), Z)))


def _best_w(objective, mu: float) -> float:
    """argmax_w objective(mu, w) over ``W_RANGE`` by Brent's bounded method."""
    res = scipy.optimize.minimize_scalar(
        lambda w: -objective(mu, w), bounds=W_RANGE, method="bounded", options={"xatol": 1e-7}
    )
    assert res.success
    return float(res.x)


def _library_objective(mu: float, w: float, family: str = "gaussian_gated") -> float:
    """L(w) from the library: rho = ``posterior`` of alpha = N(mu, 1) and the potential
    w (z - z^2 / 2) (natural (w, -w / 2); the gated family's r1 = g = w), ``kl``, and
    E_rho log q by quadrature of ``potential_logits`` with the prototypes N(-1, 1) and
    N(1, 1). For ``family="gaussian"`` the potential is the paper's, ``feedback_potential(1)``
    (w = 1)."""
    fam = make_family(family)
    f64 = dict(dtype=torch.float64)
    alpha = fam.params(torch.tensor([[mu]], **f64))
    if family == "gaussian":
        assert w == 1.0
        beta = fam.feedback_potential(torch.ones(1, 1, **f64))
    else:
        beta = (torch.tensor([[w]], **f64), torch.tensor([[-w / 2]], **f64))
    rho = fam.posterior(alpha, beta)
    protos = (torch.tensor([[-1.0], [1.0]], **f64), torch.full((2, 1), -0.5, **f64))
    z = torch.linspace(-20.0, 20.0, 20001, **f64)[:, None]  # [G, 1]
    log_q = torch.log_softmax(fam.potential_logits(z, protos), -1)[:, 1]  # [G]
    density = fam.distribution(rho).log_prob(z)[:, 0].exp()
    expected = torch.trapezoid(density * log_q, z[:, 0])
    return float(expected - fam.kl(rho, alpha)[0, 0])


@pytest.mark.parametrize(("mu", "w"), [(0.5, 0.0), (3.0, 1.0), (-1.0, 0.9), (2.0, -0.2)])
def test_the_quadrature_against_closed_forms(mu, w):
    """L(w) = E_rho[log q] - KL(rho || alpha), rho = N((mu + w) / (1 + w), 1 / (1 + w)):
    the KL of two Gaussians in closed form, E_rho[log sigmoid(2 z)] by scipy's adaptive
    quadrature."""
    m, v = (mu + w) / (1 + w), 1 / (1 + w)
    kl = 0.5 * (v + (m - mu) ** 2 - 1 - np.log(v))
    expected, err = scipy.integrate.quad(
        lambda z: np.exp(-0.5 * (z - m) ** 2 / v) / np.sqrt(2 * np.pi * v) * _log_q(z),
        m - 30 * np.sqrt(v),
        m + 30 * np.sqrt(v),
        epsabs=1e-12,
        limit=200,
    )
    assert err < 1e-9
    assert _objective(mu, w) == pytest.approx(expected - kl, abs=1e-8)


@pytest.mark.parametrize("mu", [-1.0, 0.0, 2.0, 4.0])
def test_the_library_computes_the_same_objective(mu):
    """The library's posterior, KL and prototype logits give the quadrature's L(w) at
    every w, so its optimum w* is the quadrature's."""
    for w in (-0.25, 0.0, 0.3, 1.0, 2.5):
        assert _library_objective(mu, w) == pytest.approx(_objective(mu, w), abs=1e-8)
    assert _best_w(_library_objective, mu) == pytest.approx(_best_w(_objective, mu), abs=1e-4)


@pytest.mark.parametrize("mu", [-1.0, 2.0, 3.0, 4.0])
def test_no_potential_beats_the_exact_posterior(mu):
    """L(w) <= log p(y) for every w (the evidence bound), with a gap at w* that shrinks
    as the block grows confident (the posterior is nearly alpha itself)."""
    evidence = _log_evidence(mu)
    for w in np.linspace(*W_RANGE, 12):
        assert _objective(mu, w) < evidence
    gap = evidence - _objective(mu, _best_w(_objective, mu))
    assert gap > 0 and (gap < 0.02 if mu >= 2 else gap < 0.1)


@pytest.mark.parametrize("mu", [2.0, 3.0, 4.0])
def test_the_best_feedback_for_a_confident_correct_block_is_nearly_silent(mu):
    """Deep inside its class w* is close to zero (slightly negative: the exact
    posterior is a little wider than alpha's tilt towards the prototype), far from the
    paper's fixed potential (w = 1), shrinks as the block grows more confident, and
    silence (w = 0) is within 1e-3 nats of the optimum."""
    best = _best_w(_objective, mu)
    assert -0.05 < best < 0.0
    assert abs(_best_w(_objective, mu + 1.0)) < abs(best)
    assert 0 <= _objective(mu, best) - _objective(mu, 0.0) < 1e-3


def test_a_wrong_block_wants_a_strong_feedback():
    """On the wrong side of the boundary the best potential moves rho a long way."""
    best = _best_w(_objective, -1.0)
    assert 0.5 < best < W_RANGE[1] - 0.1  # an interior optimum
    assert _objective(-1.0, best) > _objective(-1.0, 0.0) + 0.1


def test_the_papers_fixed_potential_costs_a_correct_block():
    """For a correctly classified example the paper's fixed w = 1 (the fixed-variance
    Gaussian's own feedback_potential) is worse than silence."""
    paper = _library_objective(3.0, 1.0, family="gaussian")
    assert paper == pytest.approx(_objective(3.0, 1.0), abs=1e-8)
    assert paper < _objective(3.0, 0.0) - 0.2
