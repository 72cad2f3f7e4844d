"""Diagonal Gaussian families: the paper's fixed-variance one and a learned-variance one.

Natural-parameter convention for N(mu, s^2), per channel (all ``[..., C]``):

    T(z) = (z, z^2),   eta = (mu / s^2, -1 / (2 s^2)),
    A(eta) = -eta_1^2 / (4 eta_2) - log(-2 eta_2) / 2,   log h(z) = -log(2 pi) / 2.

With the paper's fixed variance s^2 and a feedback potential of the same variance centred
at beta, rho = N((alpha + beta) / 2, s^2 / 2) (Kappel et al., Sec. 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_bll.families.base import (
    Family,
    FamilyError,
    Natural,
    Params,
    bounded_below,
    inverse_softplus,
)


class _DiagonalGaussian(Family):
    """Shared algebra; subclasses choose how raw outputs become (loc, scale)."""

    default_propagate = "mean"  # the paper's

    def check_params(self, params: Params) -> None:
        loc, scale = params
        if not torch.isfinite(loc).all():
            raise FamilyError(f"{self.name}: non-finite Gaussian mean")
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise FamilyError(f"{self.name}: Gaussian scale must be finite and > 0")

    def natural(self, params: Params) -> Natural:
        loc, scale = params
        prec = scale.pow(-2)
        return (loc * prec, -0.5 * prec)

    def from_natural(self, eta: Natural) -> Params:
        eta1, eta2 = eta
        var = -0.5 / eta2  # requires eta2 < 0
        return (eta1 * var, var.sqrt())

    def sufficient_stats(self, z: Tensor) -> tuple[Tensor, ...]:
        return (z, z * z)

    def log_normalizer(self, eta: Natural) -> Tensor:
        eta1, eta2 = eta
        return -eta1.pow(2) / (4 * eta2) - 0.5 * torch.log(-2 * eta2)

    def log_base_measure(self, z: Tensor) -> Tensor:
        return torch.full_like(z, -0.5 * math.log(2 * math.pi))

    def distribution(self, params: Params) -> dist.Normal:
        loc, scale = params
        return dist.Normal(loc, scale, validate_args=False)

    def expected_stats(self, eta: Natural) -> tuple[Tensor, ...]:
        """E[z] = mu, E[z^2] = mu^2 + s^2 with s^2 = -1 / (2 eta_2), mu = eta_1 s^2."""
        var = -0.5 / eta[1]
        mu = eta[0] * var
        return (mu, mu * mu + var)

    def log_normalizer_shift(self, eta: Natural, beta: Natural) -> Tensor:
        """A(eta + beta) - A(eta) without the cancellation of two O(precision) terms.

        With eta = (mu P, -P / 2) and P' = P - 2 beta_2 (the shifted precision),

            A(eta + beta) - A(eta) = (2 beta_2 mu^2 P + 2 beta_1 mu P + beta_1^2) / (2 P')
                                     - log(P' / P) / 2,

        which tends to <beta, T(mu)> as P grows (a point mass), instead of a difference of
        two numbers of size mu^2 P.
        """
        prec = -2 * eta[1]
        mu = eta[0] / prec
        b1, b2 = beta
        shifted = prec - 2 * b2
        quad = (2 * b2 * mu * mu * prec + 2 * b1 * mu * prec + b1 * b1) / (2 * shifted)
        return quad - 0.5 * torch.log1p(-2 * b2 / prec)

    def mean(self, params: Params) -> Tensor:
        return params[0]

    def spatial_mean(self, params: Params, axes: tuple[int, ...]) -> Params:
        """The mean of n independent N(mu_i, s_i^2) over ``axes``: N(mean mu, mean s^2 / n).

        ``[B, H, W, C] -> [B, C]`` for ``axes = (1, 2)`` (n = H W).
        """
        loc, scale = params
        n = math.prod(loc.shape[a] for a in axes)
        return loc.mean(axes), (scale.pow(2).mean(axes) / n).sqrt()


@dataclass(repr=True)
class FixedVarianceGaussian(_DiagonalGaussian):
    """The paper's family: block output = mean, variance fixed to ``sigma**2``.

    raw ``[..., C]`` -> alpha = (raw, sigma); feedback raw b ``[..., C]`` -> the potential
    of N(b, sigma^2): beta = (b / sigma^2, -1 / (2 sigma^2)).
    """

    sigma: float = 1.0
    name = "gaussian"
    n_raw = 1
    n_feedback = 1
    # pathwise draws beat the bound on the harder sequence task and tie on the MLP
    # (docs/results.md, estimator choice)
    default_likelihood = "sample"
    feedback_init_std = 1.0  # prototypes b of about the block outputs' size
    # the paper fixes the potential's precision to 1 / sigma^2: a zero raw output is the
    # potential of N(0, sigma^2), which shrinks rho's mean to alpha / 2
    zero_raw_is_uninformative = False

    def __post_init__(self) -> None:
        if not self.sigma > 0:
            raise FamilyError(f"gaussian: sigma must be > 0, got {self.sigma}")

    def params(self, raw: Tensor) -> Params:
        (loc,) = self.split_raw(raw, 1, "block output")
        return (loc, torch.full_like(loc, self.sigma))

    def spatial_mean(self, params: Params, axes: tuple[int, ...]) -> Params:
        """N(mean mu, sigma^2 / n): as the general case, without touching the constant scale."""
        loc = params[0]
        n = math.prod(loc.shape[a] for a in axes)
        mean = loc.mean(axes)
        return mean, torch.full_like(mean, self.sigma / math.sqrt(n))

    def channel_law(self, params: Params, axes: tuple[int, ...]) -> Params:
        """N(mean_hw mu, sigma^2): with the feedback's N(b, sigma^2), rho = N((a + b) / 2, .)."""
        mean = params[0].mean(axes)
        return mean, torch.full_like(mean, self.sigma)

    def unconstrained(self, params: Params) -> Tensor:
        return params[0]  # the scale is a constant

    def feedback_potential(self, raw: Tensor) -> Natural:
        (b,) = self.split_raw(raw, 1, "feedback output")
        prec = 1.0 / self.sigma**2
        return (b * prec, torch.full_like(b, -0.5 * prec))

    def class_log_mgf(self, eta: Natural, beta: Natural) -> Tensor:
        """``log_normalizer_shift`` summed over channels, as matrix products ``[..., V]``.

        Every class potential has the same precision part b2 (-1 / (2 sigma^2), times the
        message weight), so with
        P the precision of eta, mu its mean and P' = P - 2 b2 (both free of c),

            sum_C shift_c = sum_C (b2 mu^2 P / P' - log(1 - 2 b2 / P) / 2)
                            + (mu P / P') . b1_c + (1 / (2 P')) . b1_c^2,

        two products ``[..., C] @ [C, V]`` instead of a ``[..., V, C]`` tensor (the memory
        of one block's step on the transformer).
        """
        prec = -2 * eta[1]  # [..., C]
        mu = eta[0] / prec
        b1 = beta[0]  # [V, C], or [n, V, C] for n blocks against eta [n, M, C]
        # [C], or [n, 1, C]: one for every class (a message weight w scales all alike)
        b2 = beta[1][0] if b1.dim() == 2 else beta[1][..., :1, :]
        shifted = prec - 2 * b2
        common = (b2 * mu * mu * prec / shifted - 0.5 * torch.log1p(-2 * b2 / prec)).sum(-1)
        linear = (mu * prec / shifted) @ b1.transpose(-1, -2)
        square = (0.5 / shifted) @ (b1 * b1).transpose(-1, -2)
        return common.unsqueeze(-1) + linear + square


@dataclass(repr=True)
class LearnedVarianceGaussian(_DiagonalGaussian):
    """Mean and per-channel scale both produced by the block.

    raw ``[..., 2C]`` = (mu, r) -> alpha = (mu, softplus(r) + min_scale). The feedback
    network outputs (r1, r2) ``[..., 2C]`` and sends the potential

        beta = (r1, -softplus(r2 - 5) / 2)   (precision softplus(r2 - 5) >= 0),

    nearly zero (precision 0.0067) for a zero raw output: an untrained feedback network
    leaves rho at alpha. The prototype likelihood reads beta_c against a standard-normal
    reference, the class law N(r1 / (1 + P), 1 / (1 + P)) with P the potential's precision.
    """

    min_scale: float = 1e-3
    name = "gaussian_learned"
    n_raw = 2
    n_feedback = 2
    # the bound: ahead of pathwise draws on the harder sequence task (docs/results.md)
    default_likelihood = "bound"
    zero_potential_tol = 0.004  # softplus(-5) / 2
    # feedback_init_std stays at the base's 0.1: small prototypes r1 at the start (its
    # precision starts near zero at any scale). At 1.0, the paper Gaussian's scale, a
    # 20-block transformer trained slowly (seed 1: 84.45 % against 100.00 %, docs/results.md)

    def __post_init__(self) -> None:
        if not self.min_scale >= 0:
            raise FamilyError(f"gaussian_learned: min_scale must be >= 0, got {self.min_scale}")

    def params(self, raw: Tensor) -> Params:
        loc, r = self.split_raw(raw, 2, "block output")
        return (loc, F.softplus(r) + self.min_scale)

    def feedback_potential(self, raw: Tensor) -> Natural:
        r1, r2 = self.split_raw(raw, 2, "feedback output")
        return (r1, -0.5 * F.softplus(r2 - 5.0))

    def class_natural(self, beta: Natural) -> Natural:
        return (beta[0], beta[1] - 0.5)  # reference N(0, 1)

    def unconstrained(self, params: Params) -> Tensor:
        return torch.cat([params[0], inverse_softplus(params[1], self.min_scale)], dim=-1)

    def channel_law(self, params: Params, axes: tuple[int, ...]) -> Params:
        """N(mean_hw mu, mean_hw s^2): the map's mean with the map's own average variance."""
        loc, scale = params
        return loc.mean(axes), scale.pow(2).mean(axes).sqrt()


@dataclass(repr=True)
class GatedGaussian(FixedVarianceGaussian):
    """The paper's forward message N(raw, sigma^2), with a feedback potential whose
    precision the feedback network sets per channel (and may set to zero).

    Feedback raw (r1, r2) ``[..., 2C]`` -> the potential

        beta = (r1 / sigma^2, -g / (2 sigma^2)),   g = bounded_below(r2, 1/3) > -1/3,

    so rho = N((mu + r1) / (1 + g), sigma^2 / (1 + g)) per channel. g = 1 with r1 = b is the
    paper's potential N(b, sigma^2); a zero raw output is the zero potential (rho = alpha).
    The paper's potential has precision 1 / sigma^2 on every channel, so its KL pulls every
    channel of z_k towards a function of the label; here a channel the feedback leaves
    silent keeps rho = alpha there, and the block is free to carry other information in it
    (docs/families.md). With g > -1/3 for each potential, eta(alpha) + beta_y + beta_c has
    precision (1 + g_y + g_c) / sigma^2 > 1 / (3 sigma^2): the bound stays defined. The
    prototype likelihood reads beta_c against the reference N(0, sigma^2).
    """

    name = "gaussian_gated"
    n_feedback = 2
    default_likelihood = "bound"  # ahead of pathwise draws on its MLP (docs/results.md)
    zero_raw_is_uninformative = True
    feedback_init_std = 0.1  # start near the zero potential: rho close to alpha

    def feedback_potential(self, raw: Tensor) -> Natural:
        r1, r2 = self.split_raw(raw, 2, "feedback output")
        prec = 1.0 / self.sigma**2
        return (r1 * prec, -0.5 * prec * bounded_below(r2, 1.0 / 3.0))

    def class_natural(self, beta: Natural) -> Natural:
        return (beta[0], beta[1] - 0.5 / self.sigma**2)  # reference N(0, sigma^2)

    # the class potentials' precisions differ, so the paper Gaussian's two matrix
    # products do not apply: the general [..., V, C] form
    class_log_mgf = Family.class_log_mgf
