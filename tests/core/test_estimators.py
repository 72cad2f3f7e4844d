"""The gradient estimator of E_rho[log q_k(y | z_k)] is unbiased for every family.

A one-variable latent (C = 1, or one categorical group) makes the expectation computable
exactly: by enumeration of the support (discrete families) or by quadrature (continuous
ones), differentiated by autograd. The estimator under test is the one BlockLocalELBO uses
(pathwise, or the local score function with a leave-one-out baseline), averaged over the
batch (independent draws) and over repeats, compared within 5 standard errors.
"""

import torch
from torch import nn

from pyro_bll import BLLChain, BlockLocalELBO, CategoricalHead
from pyro_bll.guides import LinearFeedback

from utils import reference_grid, reference_name

V = 3  # label classes


class Const(nn.Module):
    """A block whose output is a free parameter, the same for every example."""

    def __init__(self, raw):
        super().__init__()
        self.raw = nn.Parameter(raw)

    def forward(self, x):
        return self.raw.expand(x.shape[0], -1)


def _exact_expected_log_lik(family, raw, beta, protos, label):
    """E_rho[log q(label | z)] by enumeration or quadrature on the test's own grid
    (``utils.reference_grid``), differentiable in ``raw`` through rho's density."""
    alpha = family.params(raw[None])
    rho = family.posterior(alpha, beta)
    grid = reference_grid(reference_name(family), family.natural(alpha), family.natural(rho))
    z = grid.z.to(raw.dtype)  # [G, 1, latent...]
    log_w = grid.log_w.flatten(1).sum(-1)  # one latent element: its weight

    def terms(z):
        log_rho = family.distribution(rho).log_prob(z).flatten(1).sum(-1)  # [G]
        log_q = torch.log_softmax(family.potential_logits(z[:, 0], protos), -1)[:, label]
        return log_rho, log_q

    with torch.no_grad():  # grid points that round onto the support's edge carry no mass
        keep = torch.stack([t.isfinite() for t in terms(z)]).all(0)
    log_rho, log_q = terms(z[keep])
    return ((log_w[keep] + log_rho).exp() * log_q).sum()


def _score_function_gradient(family, raw, beta, protos, label, n=400_000):
    """grad_raw E_rho[log q(label | z)] by the score function with many draws: for vector
    latents (a simplex has no quadrature grid here), an independent unbiased reference."""
    rho = family.posterior(family.params(raw[None]), beta)
    d = family.distribution(rho)
    z = d.sample((n,))  # [S, 1, G(, K)]
    log_q = torch.log_softmax(family.potential_logits(z[:, 0], protos), -1)[:, label]  # [S]
    log_rho = d.log_prob(z).flatten(1).sum(-1)  # [S]
    f = log_q.detach()
    surrogate = ((f - f.mean()) * log_rho).mean()  # mean-centred: same expectation
    return torch.autograd.grad(surrogate, raw)[0]


def test_local_estimator_is_unbiased(family):
    torch.set_default_dtype(torch.float64)
    try:
        c = family.group_size if hasattr(family, "group_size") else 1
        raw0 = 0.5 * torch.randn(family.raw_size(c))
        feedback = LinearFeedback(V, [family.feedback_size(c)] * 2, init_std=0.7)
        feedback.requires_grad_(False)
        chain = BLLChain(
            [Const(raw0.clone()), Const(torch.zeros(family.raw_size(c)))],
            family,
            feedback,
            CategoricalHead(c, V),
            pred_heads=None,
            likelihood="sample",  # the bound is deterministic: tests/core/test_likelihood_bound.py
            register_params=False,
        )
        label = 1
        beta = family.feedback_potential(feedback(torch.tensor([label]), 0))
        protos = chain.class_potentials(0)
        raw = raw0.clone().requires_grad_(True)
        if family.event_dims:
            exact = _score_function_gradient(family, raw, beta, protos, label)
        else:
            exact = torch.autograd.grad(
                _exact_expected_log_lik(family, raw, beta, protos, label), raw
            )[0]

        n, repeats = 4000, 25
        x, y = torch.zeros(n, 1), torch.full((n,), label)
        elbo = BlockLocalELBO(2)
        estimates = []
        for _ in range(repeats):
            nll = elbo.block_losses(chain.model, chain.guide, x, y).terms["likelihood"][0]
            g = torch.autograd.grad(-nll / n, chain.blocks[0].raw)[0]
            estimates.append(g)
        est = torch.stack(estimates)
        mean, se = est.mean(0), est.std(0) / repeats**0.5
        assert ((mean - exact).abs() <= 5 * se + 1e-3 * exact.abs() + 1e-6).all(), (mean, exact, se)
        assert (se < 0.05 * exact.abs().max() + 1e-3).all(), "estimator too noisy to test"
    finally:
        torch.set_default_dtype(torch.float32)


def test_single_sample_kl_gradient_is_unbiased(family):
    """With ``analytic_kl=False`` the KL term's gradient still matches the analytic one."""
    torch.set_default_dtype(torch.float64)
    try:
        c = family.group_size if hasattr(family, "group_size") else 1
        feedback = LinearFeedback(V, [family.feedback_size(c)] * 2, init_std=0.7)
        feedback.requires_grad_(False)
        chain = BLLChain(
            [Const(0.5 * torch.randn(family.raw_size(c))), Const(torch.zeros(family.raw_size(c)))],
            family,
            feedback,
            CategoricalHead(c, V),
            pred_heads=None,
            register_params=False,
        )
        n, repeats = 4000, 25
        x, y = torch.zeros(n, 1), torch.full((n,), 1)
        raw = chain.blocks[0].raw
        exact_kl = BlockLocalELBO(2).block_losses(chain.model, chain.guide, x[:1], y[:1])
        exact = torch.autograd.grad(exact_kl.terms["kl"][0], raw)[0]
        mc = BlockLocalELBO(2, analytic_kl=False)
        est = torch.stack(
            [
                torch.autograd.grad(
                    mc.block_losses(chain.model, chain.guide, x, y).terms["kl"][0] / n, raw
                )[0]
                for _ in range(repeats)
            ]
        )
        mean, se = est.mean(0), est.std(0) / repeats**0.5
        assert ((mean - exact).abs() <= 5 * se + 1e-3 * exact.abs() + 1e-6).all(), (mean, exact, se)
    finally:
        torch.set_default_dtype(torch.float32)
