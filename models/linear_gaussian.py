"""An exactly solvable chain: linear blocks, scalar Gaussian latents, Gaussian y.

    z_1 = a_1 x + c_1 + e_1,   z_k = a_k z_{k-1} + c_k + e_k,   e_k ~ N(0, v_k)
    y   = w z_N + c_y + n,     n ~ N(0, v_y)

Every exact quantity is Gaussian (all ``[B]`` for a batch of scalar x, y):

* forward marginal  p(z_k | x) = N(m_k, S_k):  m_k = a_k m_{k-1} + c_k,
  S_k = a_k^2 S_{k-1} + v_k (m_0 = x, S_0 = 0);
* backward message  p(y | z_k) = N(y; G_k z_k + H_k, R_k):  G_N = w, H_N = c_y, R_N = v_y,
  G_k = G_{k+1} a_{k+1}, H_k = G_{k+1} c_{k+1} + H_{k+1}, R_k = G_{k+1}^2 v_{k+1} + R_{k+1};
* evidence          log p(y | x) = log N(y; G_k m_k + H_k, G_k^2 S_k + R_k)  (any k);
* posterior         p(z_k | x, y) = alpha_k(z) p(y | z) / p(y | x).

Blocks propagate full parameters (mean and scale), as the exact block must (docs/math.md §2),
and the chain uses the learned-variance Gaussian family with ``min_scale = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from pyro_bll.core.likelihoods import AffineGaussian, LinearGaussianHead
from pyro_bll.families import LearnedVarianceGaussian


def _softplus_inv(s: Tensor) -> Tensor:
    return s + torch.log(-torch.expm1(-s))


class LinearGaussianBlock(nn.Module):
    """(m, s) ``[B, 1]`` each -> raw (a m + c, softplus^-1(sqrt(a^2 s^2 + v))) ``[B, 2]``."""

    def __init__(self, a: float, c: float, v: float, first: bool) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))
        self.log_v = nn.Parameter(torch.tensor(math.log(v), dtype=torch.float64))
        self.first = first

    def forward(self, inp) -> Tensor:
        if self.first:
            m, var = inp, torch.zeros_like(inp)
        else:
            m, s = inp
            var = s * s
        mean = self.a * m + self.c
        scale = (self.a**2 * var + self.log_v.exp()).sqrt()
        return torch.cat([mean, _softplus_inv(scale)], dim=-1)


@dataclass
class LinearGaussianSpec:
    """Coefficients of the chain; ``a, c, v`` have one entry per block."""

    a: list[float]
    c: list[float]
    v: list[float]
    w: float
    c_y: float
    v_y: float

    def forward_marginals(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(m_k, S_k) for every block, each ``[B]``."""
        m, s = x, torch.zeros_like(x)
        out = []
        for a, c, v in zip(self.a, self.c, self.v, strict=True):
            m, s = a * m + c, a * a * s + v
            out.append((m, s))
        return out

    def backward_messages(self) -> list[tuple[float, float, float]]:
        """(G_k, H_k, R_k) for every block."""
        g, h, r = self.w, self.c_y, self.v_y
        out = [(g, h, r)]
        for a, c, v in zip(self.a[:0:-1], self.c[:0:-1], self.v[:0:-1], strict=True):
            g, h, r = g * a, g * c + h, g * g * v + r
            out.append((g, h, r))
        return out[::-1]

    def log_evidence(self, x: Tensor, y: Tensor) -> Tensor:
        """log p(y | x), ``[B]``."""
        m, s = self.forward_marginals(x)[0]
        g, h, r = self.backward_messages()[0]
        var = g * g * s + r
        return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (y - g * m - h) ** 2 / var)

    def posterior(self, x: Tensor, y: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Mean and variance of p(z_k | x, y), each ``[B]``."""
        m, s = self.forward_marginals(x)[k]
        g, h, r = self.backward_messages()[k]
        prec = 1 / s + g * g / r
        return (m / s + g * (y - h) / r) / prec, 1 / prec


class ExactFeedback(nn.Module):
    """Feedback that sends the exact backward message p(y | z_k) as a Gaussian potential.

    As a function of z_k, N(y; G z + H, R) is proportional to N(z; (y - H)/G, R/G^2), a
    potential of precision P = G^2 / R and natural parameters (P (y - H) / G, -P / 2); the
    learned-variance family's raw feedback (r1, r2) sends (r1, -softplus(r2 - 5) / 2), so
    r1 = P (y - H) / G and r2 = softplus^-1(P) + 5.
    ``shift`` moves every message's centre, to test that wrong feedback lowers the ELBO.
    """

    def __init__(self, spec: LinearGaussianSpec, shift: float = 0.0) -> None:
        super().__init__()
        self.messages = spec.backward_messages()
        self.shift = nn.Parameter(torch.tensor(float(shift), dtype=torch.float64))

    def forward(self, y: Tensor, k: int) -> Tensor:
        g, h, r = self.messages[k]
        mean = (y - h) / g + self.shift
        precision = torch.full_like(y, g * g / r)
        return torch.stack([mean * precision, _softplus_inv(precision) + 5.0], dim=-1)  # [B, 2]


class ExactLocalLikelihood:
    """q_k(y | z_k) = p(y | z_k) = N(y; G_k z_k + H_k, R_k)."""

    def __init__(self, spec: LinearGaussianSpec) -> None:
        self.messages = spec.backward_messages()

    def __call__(self, chain, k: int, z: Tensor, cache=None) -> Distribution:
        g, h, r = (torch.tensor(v, dtype=z.dtype) for v in self.messages[k])
        return AffineGaussian(z, g.reshape(1), h, r)


def build_linear_gaussian_chain(
    spec: LinearGaussianSpec, *, shift: float = 0.0, detach: bool = True, **options: Any
):
    """The exact chain as a ``BLLChain`` in float64 (``options``: more ``BLLChain``
    arguments, e.g. ``name``)."""
    from pyro_bll.core.chain import BLLChain

    n = len(spec.a)
    blocks = [
        LinearGaussianBlock(a, c, v, first=(i == 0))
        for i, (a, c, v) in enumerate(zip(spec.a, spec.c, spec.v, strict=True))
    ]
    f64 = dict(dtype=torch.float64)
    head = LinearGaussianHead(
        torch.tensor([spec.w], **f64), torch.tensor(spec.c_y, **f64), torch.tensor(spec.v_y, **f64)
    )
    return BLLChain(
        blocks,
        LearnedVarianceGaussian(min_scale=0.0),
        ExactFeedback(spec, shift=shift),
        head,
        event_dim=1,
        local_likelihoods=[ExactLocalLikelihood(spec)] * (n - 1),
        propagate="params",
        head_input="sample",
        detach=detach,
        **options,
    )


__all__ = [
    "ExactFeedback",
    "ExactLocalLikelihood",
    "LinearGaussianBlock",
    "LinearGaussianSpec",
    "build_linear_gaussian_chain",
]
