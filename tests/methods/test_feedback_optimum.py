"""Why a learned feedback goes silent: the best label-only potential for an example the
block already classifies correctly is close to zero (docs/math.md, "What the feedback
learns"). An independent numpy quadrature on one Gaussian latent; no library code.

alpha = N(mu, 1); two classes with the prototype likelihood
q(y | z) = softmax_c log N(z; m_c, 1), m = (-1, +1), i.e. q(1 | z) = sigmoid(2 z); the
feedback for label y = 1 is the tied potential N(z; m_1, 1)^w, so rho_w has precision
1 + w and mean (mu + w) / (1 + w) (w = 1: the paper's potential of precision 1). The local
objective E_rho[log q(y | z)] - KL(rho || alpha) is maximised, among all rho, by the
posterior alpha(z) q(y | z) / p(y); within the tilted family by some w*.
"""

from __future__ import annotations

import numpy as np
import pytest

Z = np.linspace(-30.0, 30.0, 60001)  # quadrature grid


def _normal(z, mean, var):
    return np.exp(-0.5 * (z - mean) ** 2 / var) / np.sqrt(2 * np.pi * var)


def _objective(mu: float, w: float) -> float:
    """E_rho[log q(1 | z)] - KL(rho || alpha) by quadrature, rho = alpha N(z; 1, 1)^w."""
    log_alpha = -0.5 * (Z - mu) ** 2
    log_rho = log_alpha - 0.5 * w * (Z - 1.0) ** 2
    log_rho -= np.log(np.trapezoid(np.exp(log_rho - log_rho.max()), Z)) + log_rho.max()
    log_alpha -= 0.5 * np.log(2 * np.pi)
    rho = np.exp(log_rho)
    log_q = -np.logaddexp(0.0, -2.0 * Z)  # log sigmoid(2 z)
    return float(np.trapezoid(rho * (log_q - log_rho + log_alpha), Z))


def _best_w(mu: float) -> float:
    ws = np.linspace(0.0, 3.0, 601)
    return float(ws[np.argmax([_objective(mu, w) for w in ws])])


def test_quadrature_reproduces_a_closed_form():
    """Sanity check of the quadrature: with w = 0 the objective is E_alpha[log q]."""
    want = np.trapezoid(_normal(Z, 0.5, 1.0) * -np.logaddexp(0.0, -2.0 * Z), Z)
    assert _objective(0.5, 0.0) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("mu", [2.0, 3.0, 4.0])
def test_the_best_feedback_for_a_confident_correct_block_is_nearly_silent(mu):
    """Deep inside its class the posterior is alpha: w* is small, far from the paper's
    fixed potential (w = 1), and it shrinks as the block grows more confident."""
    assert _best_w(mu) < 0.12
    assert _best_w(mu + 1.0) <= _best_w(mu)


def test_a_wrong_block_wants_a_strong_feedback():
    """On the wrong side of the boundary the best potential moves rho a long way."""
    assert _best_w(-1.0) > 0.5
    assert _objective(-1.0, _best_w(-1.0)) > _objective(-1.0, 0.0) + 0.1


def test_the_papers_fixed_potential_costs_a_correct_block():
    """For a correctly classified example the fixed w = 1 is worse than silence."""
    assert _objective(3.0, 1.0) < _objective(3.0, 0.0) - 0.2
