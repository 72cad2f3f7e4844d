"""Continuous families on bounded or positive supports: Gamma and Beta latents.

Both are reparameterisable (pathwise gradients). Natural-parameter conventions:

* Gamma(a, b) (shape a, rate b) on z > 0:  T(z) = (log z, z),  eta = (a - 1, -b),
  A = lgamma(a) - a log b,  h = 1.  Block output (r1, r2): a = softplus(r2) + min_param,
  b = a / softplus(r1) + min_param (r1 the mean, r2 the concentration; ``Gamma.params``).
* Beta(a, b) on 0 < z < 1:  T(z) = (log z, log(1 - z)),  eta = (a - 1, b - 1),
  A = lgamma(a) + lgamma(b) - lgamma(a + b),  h = 1.  Block output (r1, r2):
  a = softplus(r1) + min_param, b = softplus(r2) + min_param.

(torch's private Beta convention is unshifted, (a, b); ours is shifted so that h = 1.)
Feedback potentials are zero for a zero raw output and may lower a shape by at most
``min_param / 3`` (``bounded_below``): alpha's shapes are at least ``min_param``, so
eta(alpha) + beta_y + beta_c, where the prototype bound evaluates A, is again a Gamma or
Beta with shapes of at least ``min_param / 3``.
"""

from __future__ import annotations

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


@dataclass(repr=True)
class _TwoPositive(Family):
    """Two positive parameters per channel, each at least ``min_param``; each family
    links raw ``[..., 2C]`` to them its own way (``params``)."""

    min_param: float = 0.5
    n_raw = 2
    n_feedback = 2
    default_propagate = "params"

    def __post_init__(self) -> None:
        if not self.min_param > 0:
            raise FamilyError(f"{self.name}: min_param must be > 0, got {self.min_param}")

    def _shift(self, raw: Tensor) -> Tensor:
        """A potential component that lowers a shape by less than ``min_param / 3``."""
        return bounded_below(raw, self.min_param / 3)

    def check_params(self, params: Params) -> None:
        for p in params:
            if not (torch.isfinite(p).all() and (p > 0).all()):
                raise FamilyError(f"{self.name}: both parameters must be finite and > 0")

    def log_base_measure(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z)


@dataclass(repr=True)
class Gamma(_TwoPositive):
    """raw ``[..., 2C]`` -> (a, b), see ``params``; m(alpha) = a / b.

    Feedback raw (r1, r2) ``[..., 2C]`` -> beta = (f(r1), -f(r2)) with f = ``bounded_below``
    (zero at zero); the prototype likelihood reads beta_c as Gamma(1 + beta_1, 1 - beta_2),
    i.e. against the reference Exp(1) (eta_ref = (0, -1)), since the zero natural
    parameter, Gamma(1, 0), is not a distribution.
    """

    name = "gamma"
    domain = "positive"
    link_version = 2  # 1: (shape, rate) = softplus + min_param, up to commit 3b35e2d

    def params(self, raw: Tensor) -> Params:
        """raw (r1, r2) ``[..., 2C]`` -> shape a = softplus(r2) + min_param and rate
        b = a / softplus(r1) + min_param: r1 sets the mean (a / b, about softplus(r1)), r2
        the concentration (a coefficient of variation 1 / sqrt(a)).

        On the transformer r1 is the block's residual stream (``ParamReadout``). Written
        as the shape, the stream had to grow for the latent to concentrate (shapes up to
        about 1500 in the top blocks of a 20-block stack); here the readout r2 carries the
        concentration and the stream only the mean. The rate's floor keeps it at least
        ``min_param``, as the shape.
        """
        r1, r2 = self.split_raw(raw, 2, "block output")
        a = F.softplus(r2) + self.min_param
        mean = F.softplus(r1).clamp_min(torch.finfo(r1.dtype).eps)  # no rate of inf
        return (a, a / mean + self.min_param)

    def unconstrained(self, params: Params) -> Tensor:
        """The raw output ``[..., 2C]``:
        (softplus^-1(a / (b - min_param)), softplus^-1(a - min_param))."""
        a, b = params
        rest = (b - self.min_param).clamp_min(torch.finfo(b.dtype).eps * b)
        return torch.cat([inverse_softplus(a / rest), inverse_softplus(a, self.min_param)], -1)

    def natural(self, params: Params) -> Natural:
        a, b = params
        return (a - 1, -b)

    def from_natural(self, eta: Natural) -> Params:
        return (eta[0] + 1, -eta[1])

    def sufficient_stats(self, z: Tensor) -> tuple[Tensor, ...]:
        return (z.log(), z)

    def log_normalizer(self, eta: Natural) -> Tensor:
        a, b = eta[0] + 1, -eta[1]
        return torch.lgamma(a) - a * b.log()

    def distribution(self, params: Params) -> dist.Gamma:
        return dist.Gamma(*params, validate_args=False)

    def expected_stats(self, eta: Natural) -> tuple[Tensor, ...]:
        """E[log z] = digamma(a) - log b, E[z] = a / b."""
        a, b = eta[0] + 1, -eta[1]
        return (torch.digamma(a) - b.log(), a / b)

    def mean(self, params: Params) -> Tensor:
        return params[0] / params[1]

    def channel_law(self, params: Params, axes: tuple[int, ...]) -> Params:
        """Shape mean_hw a, rate chosen so that the mean is mean_hw (a / b)."""
        a = params[0].mean(axes)
        return a, a / (params[0] / params[1]).mean(axes)

    def feedback_potential(self, raw: Tensor) -> Natural:
        r1, r2 = self.split_raw(raw, 2, "feedback output")
        return (self._shift(r1), -self._shift(r2))

    def class_natural(self, beta: Natural) -> Natural:
        return (beta[0], beta[1] - 1)  # reference Exp(1)


@dataclass(repr=True)
class Beta(_TwoPositive):
    """raw ``[..., 2C]`` -> (a, b) = softplus + min_param; m(alpha) = a / (a + b).

    Feedback raw (r1, r2) ``[..., 2C]`` -> beta = (f(r1), f(r2)) with f = ``bounded_below``
    (zero at zero); the prototype likelihood reads beta_c as Beta(1 + beta_1, 1 + beta_2).
    """

    name = "beta"
    domain = "unit_interval"

    # the shapes, not a location, are the block's stream, so the next block reads their
    # logs through a fresh projection: handed on unchanged, the stream grew without bound
    # on a 20-block stack, and a mean/concentration link measured worse there
    # (docs/families.md, "What the next block reads")
    unconstrained_is_raw = False

    def params(self, raw: Tensor) -> Params:
        r1, r2 = self.split_raw(raw, 2, "block output")
        return (F.softplus(r1) + self.min_param, F.softplus(r2) + self.min_param)

    def unconstrained(self, params: Params) -> Tensor:
        """log a, log b ``[..., 2C]``."""
        return torch.cat([params[0].log(), params[1].log()], dim=-1)

    def natural(self, params: Params) -> Natural:
        a, b = params
        return (a - 1, b - 1)

    def from_natural(self, eta: Natural) -> Params:
        return (eta[0] + 1, eta[1] + 1)

    def sufficient_stats(self, z: Tensor) -> tuple[Tensor, ...]:
        return (z.log(), torch.log1p(-z))

    def log_normalizer(self, eta: Natural) -> Tensor:
        a, b = eta[0] + 1, eta[1] + 1
        return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)

    def distribution(self, params: Params) -> dist.Beta:
        return dist.Beta(*params, validate_args=False)

    def expected_stats(self, eta: Natural) -> tuple[Tensor, ...]:
        """E[log z] = digamma(a) - digamma(a + b), E[log(1 - z)] = digamma(b) - digamma(a + b)."""
        a, b = eta[0] + 1, eta[1] + 1
        total = torch.digamma(a + b)
        return (torch.digamma(a) - total, torch.digamma(b) - total)

    def mean(self, params: Params) -> Tensor:
        return params[0] / (params[0] + params[1])

    def channel_law(self, params: Params, axes: tuple[int, ...]) -> Params:
        """Concentration mean_hw (a + b), mean mean_hw (a / (a + b))."""
        a, b = params
        kappa, m = (a + b).mean(axes), (a / (a + b)).mean(axes)
        return m * kappa, (1 - m) * kappa

    def feedback_potential(self, raw: Tensor) -> Natural:
        r1, r2 = self.split_raw(raw, 2, "feedback output")
        return (self._shift(r1), self._shift(r2))
