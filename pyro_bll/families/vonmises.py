"""Von Mises latents on the circle: one angle per pair of channels.

The C channels are grouped in C / 2 pairs, and each pair is one angle z in [-pi, pi)
(as the categorical's groups, with ``group_size`` fixed at 2): raw ``[..., C]`` ->
natural parameters ``[..., C / 2, 2]``, z ``[..., C / 2]``. The pair is the natural
parameter itself: every point of R^2 is a von Mises law (0 is the uniform one), so the
block writes eta directly, the posterior eta(alpha) + beta needs no constraint, and a zero
raw feedback output is the zero potential.

Natural-parameter convention (per angle, one tensor ``[..., C / 2, 2]``):

    T(z) = (cos z, sin z),   eta = (kappa cos mu, kappa sin mu),   h = 1,
    A(eta) = log(2 pi I0(|eta|)) = log(2 pi) + log i0e(|eta|) + |eta|,
    E[T(z)] = grad A(eta) = (I1 / I0)(|eta|) eta / |eta|   (I1 / I0 = i1e / i0e),

with location mu and concentration kappa = |eta|. m(alpha) = E[(cos z, sin z)], the mean
of the angle as a point of the plane (inside the unit disc), flattened back to
``[..., C]``; a draw is fed on as (cos z, sin z). Draws are not reparameterisable
(torch's rejection sampler): ``--likelihood sample`` uses the score function, and the
default ``--likelihood bound`` needs no draws. torch has no von Mises KL: the family
registers the Bregman KL of its log-normaliser (``register_bregman_kl``). No channel
summary of a feature map (``--message channel``) or law of a spatial mean is offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

from pyro_bll.families.base import (
    Family,
    FamilyError,
    Natural,
    Params,
    group_channels,
    register_bregman_kl,
)


def _norm(eta: Tensor) -> Tensor:
    """|eta| over the last axis, with a zero gradient (not NaN) at eta = 0."""
    return (eta * eta).sum(-1).clamp_min(torch.finfo(eta.dtype).tiny).sqrt()


def log_bessel_i0(kappa: Tensor) -> Tensor:
    """log I0(kappa) for kappa >= 0, through the scaled i0e (no overflow)."""
    return torch.log(torch.special.i0e(kappa)) + kappa


def bessel_ratio_over_kappa(kappa: Tensor) -> Tensor:
    """(I1 / I0)(kappa) / kappa = i1e / (i0e kappa), 1/2 - kappa^2 / 16 near 0."""
    small = kappa < 1e-3
    safe = torch.where(small, torch.ones_like(kappa), kappa)
    ratio = torch.special.i1e(safe) / (torch.special.i0e(safe) * safe)
    return torch.where(small, 0.5 - kappa * kappa / 16, ratio)


class CircularVonMises(dist.VonMises):
    """torch's von Mises, built from the natural parameters ``eta [..., 2]``.

    ``log_prob`` is the exponential-family form <eta, T(z)> - A(eta) with the exact
    i0e normaliser (torch's uses a polynomial approximation, good to about 1e-7), smooth
    in eta everywhere, the uniform law eta = 0 included; the sampler's concentration is
    kept above zero (torch's rejection sampler does not stop at exactly 0).
    """

    arg_constraints = {"eta": constraints.real_vector}
    support = constraints.interval(-math.pi, math.pi)

    def __init__(self, eta: Tensor, validate_args: bool | None = None) -> None:
        self.eta = eta
        super().__init__(
            torch.atan2(eta[..., 1], eta[..., 0]), _norm(eta), validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return type(self)(self.eta.expand(batch_shape + (2,)), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        eta = self.eta
        inner = eta[..., 0] * torch.cos(value) + eta[..., 1] * torch.sin(value)
        return inner - math.log(2 * math.pi) - log_bessel_i0(_norm(eta))


@dataclass(repr=True)
class VonMises(Family):
    """Angles z in [-pi, pi), one per pair of channels. raw ``[..., C]`` -> eta
    ``[..., C / 2, 2]`` (the pair is the natural parameter); m(alpha) = E[(cos z, sin z)].

    Feedback raw ``[..., C]`` is the potential's natural parameter, pair by pair: rho =
    VonMises(eta + beta), zero potential at zero; the prototype likelihood reads beta_c as
    the law VonMises(beta_c) (eta_ref = 0, the uniform law).
    """

    name = "vonmises"
    n_raw = 1
    n_feedback = 1
    stat_dims = 1
    group_size: ClassVar[int] = 2  # channels per angle (not an option)
    domain = "circle"
    # the next block reads the natural parameters the block wrote: its residual stream
    # continues unchanged (m(alpha) lies in the unit disc and would squash it)
    default_propagate = "params"

    def _pairs(self, raw: Tensor, what: str) -> Tensor:
        return group_channels(self.name, raw, self.group_size, what)

    def params(self, raw: Tensor) -> Params:
        return (self._pairs(raw, "block output"),)

    def check_params(self, params: Params) -> None:
        if not torch.isfinite(params[0]).all():
            raise FamilyError("vonmises: non-finite natural parameters")

    def natural(self, params: Params) -> Natural:
        return (params[0],)

    def from_natural(self, eta: Natural) -> Params:
        return (eta[0],)

    def sufficient_stats(self, z: Tensor) -> tuple[Tensor, ...]:
        return (torch.stack([torch.cos(z), torch.sin(z)], dim=-1),)

    def log_normalizer(self, eta: Natural) -> Tensor:
        return math.log(2 * math.pi) + log_bessel_i0(_norm(eta[0]))

    def log_base_measure(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z)

    def distribution(self, params: Params) -> CircularVonMises:
        return CircularVonMises(params[0], validate_args=False)

    def expected_stats(self, eta: Natural) -> tuple[Tensor, ...]:
        e = eta[0]
        return (bessel_ratio_over_kappa(_norm(e)).unsqueeze(-1) * e,)

    def mean(self, params: Params) -> Tensor:
        return self.expected_stats(params)[0].flatten(-2)

    def features(self, z: Tensor) -> Tensor:
        return self.sufficient_stats(z)[0].flatten(-2)

    def unconstrained(self, params: Params) -> Tensor:
        return params[0].flatten(-2)  # the raw output [..., C]

    def feedback_potential(self, raw: Tensor) -> Natural:
        return (self._pairs(raw, "feedback output"),)


register_bregman_kl(CircularVonMises, VonMises(), lambda d: (d.eta,))
