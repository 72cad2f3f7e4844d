"""A vector-valued family: Dirichlet latents on the probability simplex, in groups.

Channels are grouped into simplices of ``group_size`` values each (as the categorical's
groups): raw ``[..., C]`` -> concentrations a ``[..., C / K, K]`` = softplus + ``min_param``,
z ``[..., C / K, K]`` with every group summing to one. The latent is a vector per group:
its distribution's batch shape is ``[..., C / K]`` and its event is the K values.

Natural-parameter convention (per group, all ``[..., G, K]``):

    T(z) = log z,   eta = a - 1,   A(eta) = sum_K lgamma(a) - lgamma(sum_K a),   h = 1,
    E[T(z)] = digamma(a) - digamma(sum_K a).

The feedback potential is f(raw) with f = ``bounded_below`` (zero at zero, never lowering a
concentration by ``min_param / 3`` or more), so rho = Dirichlet(a + beta) stays valid
for alpha plus any two potentials. m(alpha) = a / sum_K a, flattened back to ``[..., C]``.
Implicitly reparameterised (pathwise gradients), like the Beta, its K = 2 special case.
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
    check_group_size,
    group_channels,
    inverse_softplus,
)


@dataclass(repr=True)
class Dirichlet(Family):
    """Groups of ``group_size`` channels, each a Dirichlet vector on the simplex."""

    group_size: int = 4
    min_param: float = 0.5
    name = "dirichlet"
    n_raw = 1
    n_feedback = 1
    stat_dims = 1
    event_dims = 1
    example_options = {"group_size": 3}
    domain = "simplex"  # no quadrature grid: the generic checks use Monte Carlo
    default_propagate = "params"

    def __post_init__(self) -> None:
        check_group_size(self.name, self.group_size)
        if not self.min_param > 0:
            raise FamilyError(f"dirichlet: min_param must be > 0, got {self.min_param}")

    def _groups(self, raw: Tensor, what: str) -> Tensor:
        return group_channels(self.name, raw, self.group_size, what)

    def params(self, raw: Tensor) -> Params:
        return (F.softplus(self._groups(raw, "block output")) + self.min_param,)

    def check_params(self, params: Params) -> None:
        a = params[0]
        if not (torch.isfinite(a).all() and (a > 0).all()):
            raise FamilyError("dirichlet: concentrations must be finite and > 0")

    def natural(self, params: Params) -> Natural:
        return (params[0] - 1,)

    def from_natural(self, eta: Natural) -> Params:
        return (eta[0] + 1,)

    def sufficient_stats(self, z: Tensor) -> tuple[Tensor, ...]:
        return (z.clamp_min(torch.finfo(z.dtype).tiny).log(),)

    def log_normalizer(self, eta: Natural) -> Tensor:
        a = eta[0] + 1
        return torch.lgamma(a).sum(-1) - torch.lgamma(a.sum(-1))

    def expected_stats(self, eta: Natural) -> tuple[Tensor, ...]:
        a = eta[0] + 1
        return (torch.digamma(a) - torch.digamma(a.sum(-1, keepdim=True)),)

    def log_base_measure(self, z: Tensor) -> Tensor:
        return torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)

    def distribution(self, params: Params) -> dist.Dirichlet:
        return dist.Dirichlet(params[0], validate_args=False)

    def mean(self, params: Params) -> Tensor:
        a = params[0]
        return (a / a.sum(-1, keepdim=True)).flatten(-2)

    def features(self, z: Tensor) -> Tensor:
        return z.flatten(-2)

    def channel_law(self, params: Params, axes: tuple[int, ...]) -> Params:
        """Concentration mean_hw sum_K a, mean vector mean_hw (a / sum_K a)."""
        a = params[0]
        total = a.sum(-1, keepdim=True)
        return ((a / total).mean(axes) * total.mean(axes),)

    def unconstrained(self, params: Params) -> Tensor:
        return inverse_softplus(params[0], self.min_param).flatten(-2)  # raw [..., C]

    def feedback_potential(self, raw: Tensor) -> Natural:
        return (bounded_below(self._groups(raw, "feedback output"), self.min_param / 3),)
