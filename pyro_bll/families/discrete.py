"""Discrete families: Bernoulli, grouped Categorical and Poisson latents.

Their draws are not reparameterisable: ``BlockLocalELBO`` estimates the gradient of
E_rho[log q_k(y | z_k)] with the score function and a leave-one-out baseline, using only
block k's own likelihood (learning stays local); the KL terms are analytic.

Natural-parameter conventions (per latent variable):

* Bernoulli:  T(z) = z,          eta = logit p,     A = softplus(eta),  h = 1.
* Categorical over K values, one-hot T(z) ``[..., G, K]``, eta = logits ``[..., G, K]``
  (over-complete; any shift is the same distribution), A = logsumexp_K(eta), h = 1.
* Poisson:    T(z) = z,          eta = log rate,    A = exp(eta),       h = 1 / z!.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import register_kl

from pyro_bll.families.base import (
    Family,
    FamilyError,
    Natural,
    Params,
    check_group_size,
    group_channels,
    inverse_softplus,
)


class StableBernoulli(dist.Bernoulli):
    """Bernoulli whose KL is computed from logits only (see ``_kl_stable_bernoulli``)."""


@register_kl(StableBernoulli, StableBernoulli)
def _kl_stable_bernoulli(p: StableBernoulli, q: StableBernoulli) -> Tensor:
    """KL(p || q) = sigmoid(a) (a - b) - softplus(a) + softplus(b) for logits a, b.

    The exponential-family form (eta_p - eta_q) E_p[T] - A(eta_p) + A(eta_q). torch's
    Bernoulli KL goes through probabilities and returns inf once a logit exceeds ~17 in
    float32 (the probability rounds to 1); this form stays finite and differentiable.
    """
    a, b = p.logits, q.logits
    return torch.sigmoid(a) * (a - b) - F.softplus(a) + F.softplus(b)


def _check_finite(name: str, what: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise FamilyError(f"{name}: non-finite {what}")


class _Logits(Family):
    """Families whose parameters are their natural parameters: logits, any real value."""

    default_propagate = "params"

    def check_params(self, params: Params) -> None:
        _check_finite(self.name, "logits", params[0])

    def natural(self, params: Params) -> Natural:
        return (params[0],)

    def from_natural(self, eta: Natural) -> Params:
        return (eta[0],)

    def unconstrained(self, params: Params) -> Tensor:
        return params[0].flatten(-1 - self.stat_dims)  # logits ``[..., C]``


@dataclass(repr=True)
class Bernoulli(_Logits):
    """Binary latents. raw ``[..., C]`` = logits; m(alpha) = sigmoid(logits) (probabilities).

    Feedback raw ``[..., C]`` is used as the potential's natural parameter directly.
    """

    name = "bernoulli"
    n_raw = 1
    n_feedback = 1
    discrete = True
    domain = "binary"

    def params(self, raw: Tensor) -> Params:
        return self.split_raw(raw, 1, "block output")

    def sufficient_stats(self, z: Tensor) -> tuple[Tensor, ...]:
        return (z,)

    def log_normalizer(self, eta: Natural) -> Tensor:
        return F.softplus(eta[0])

    def log_base_measure(self, z: Tensor) -> Tensor:
        return torch.zeros_like(z)

    def distribution(self, params: Params) -> dist.Bernoulli:
        return StableBernoulli(logits=params[0], validate_args=False)

    def expected_stats(self, eta: Natural) -> tuple[Tensor, ...]:
        return (torch.sigmoid(eta[0]),)

    def mean(self, params: Params) -> Tensor:
        return torch.sigmoid(params[0])

    def channel_law(self, params: Params, axes: tuple[int, ...]) -> Params:
        """Logits of the spatially averaged probability: logsigmoid minus log(1 - p)."""
        p = torch.sigmoid(params[0]).mean(axes)
        return (p.log() - torch.log1p(-p),)

    def feedback_potential(self, raw: Tensor) -> Natural:
        return self.split_raw(raw, 1, "feedback output")


@dataclass(repr=True)
class GroupedCategorical(_Logits):
    """Channels grouped into categorical variables of ``group_size`` values each.

    raw ``[..., C]`` -> logits ``[..., C / K, K]``; the latent z ``[..., C / K]`` holds one
    index per group; m(alpha) = the probabilities flattened back to ``[..., C]``, and a draw
    is fed on as its one-hot code ``[..., C]``. Feedback raw ``[..., C]`` are potential logits.
    """

    group_size: int = 4
    name = "categorical"
    example_options = {"group_size": 3}
    n_raw = 1
    n_feedback = 1
    stat_dims = 1
    discrete = True
    domain = "finite"

    def __post_init__(self) -> None:
        check_group_size(self.name, self.group_size)

    def _groups(self, raw: Tensor, what: str) -> Tensor:
        return group_channels(self.name, raw, self.group_size, what)

    def params(self, raw: Tensor) -> Params:
        return (self._groups(raw, "block output"),)

    def sufficient_stats(self, z: Tensor) -> tuple[Tensor, ...]:
        return (F.one_hot(z.long(), self.group_size).to(torch.get_default_dtype()),)

    def log_normalizer(self, eta: Natural) -> Tensor:
        return torch.logsumexp(eta[0], dim=-1)

    def log_base_measure(self, z: Tensor) -> Tensor:
        return torch.zeros(z.shape, dtype=torch.get_default_dtype(), device=z.device)

    def distribution(self, params: Params) -> dist.Categorical:
        return dist.Categorical(logits=params[0], validate_args=False)

    def expected_stats(self, eta: Natural) -> tuple[Tensor, ...]:
        return (torch.softmax(eta[0], dim=-1),)

    def mean(self, params: Params) -> Tensor:
        return torch.softmax(params[0], dim=-1).flatten(-2)

    def channel_law(self, params: Params, axes: tuple[int, ...]) -> Params:
        """Logits of the spatially averaged probabilities of every group ``[B, C / K, K]``."""
        return (torch.softmax(params[0], dim=-1).mean(axes).log(),)

    def features(self, z: Tensor) -> Tensor:
        return F.one_hot(z.long(), self.group_size).flatten(-2).to(torch.get_default_dtype())

    def feedback_potential(self, raw: Tensor) -> Natural:
        return (self._groups(raw, "feedback output"),)


@dataclass(repr=True)
class Poisson(Family):
    """Count latents. raw ``[..., C]`` -> rate = softplus(raw) + min_rate; m(alpha) = rate.

    Feedback raw ``[..., C]`` is the potential's natural parameter (a log-rate offset).
    """

    min_rate: float = 1e-3
    name = "poisson"
    n_raw = 1
    n_feedback = 1
    discrete = True
    domain = "counts"
    default_propagate = "params"

    def __post_init__(self) -> None:
        if not self.min_rate >= 0:
            raise FamilyError(f"poisson: min_rate must be >= 0, got {self.min_rate}")

    def params(self, raw: Tensor) -> Params:
        (r,) = self.split_raw(raw, 1, "block output")
        return (F.softplus(r) + self.min_rate,)

    def check_params(self, params: Params) -> None:
        rate = params[0]
        if not (torch.isfinite(rate).all() and (rate > 0).all()):
            raise FamilyError("poisson: the rate must be finite and > 0")

    def natural(self, params: Params) -> Natural:
        return (params[0].log(),)

    def unconstrained(self, params: Params) -> Tensor:
        return inverse_softplus(params[0], self.min_rate)  # the raw output [..., C]

    def from_natural(self, eta: Natural) -> Params:
        return (eta[0].exp(),)

    def sufficient_stats(self, z: Tensor) -> tuple[Tensor, ...]:
        return (z,)

    def log_normalizer(self, eta: Natural) -> Tensor:
        return eta[0].exp()

    def log_base_measure(self, z: Tensor) -> Tensor:
        return -torch.lgamma(z + 1)

    def distribution(self, params: Params) -> dist.Poisson:
        return dist.Poisson(params[0], validate_args=False)

    def expected_stats(self, eta: Natural) -> tuple[Tensor, ...]:
        return (eta[0].exp(),)

    def mean(self, params: Params) -> Tensor:
        return params[0]

    def channel_law(self, params: Params, axes: tuple[int, ...]) -> Params:
        return (params[0].mean(axes),)

    def feedback_potential(self, raw: Tensor) -> Natural:
        return self.split_raw(raw, 1, "feedback output")
