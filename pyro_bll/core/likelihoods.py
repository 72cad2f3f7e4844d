"""Likelihoods: the output head f_out and the block-local likelihoods q_k(y | z_k).

Shapes: z is ``[B, C]`` (vector latents) or ``[B, T, C]`` (sequence latents); labels are
``[B]`` or ``[B, T]`` to match. Every likelihood returns a Pyro distribution whose batch
shape is the label shape; the chain masks it and moves the position axis to the event.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution

from pyro_bll.families import Family, Natural, Params


def masked_cross_entropy(logits: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    """Cross-entropy summed over positions: logits ``[B, V]`` or ``[B, T, V]`` -> ``[B]``."""
    ce = F.cross_entropy(logits.movedim(-1, 1), y, reduction="none")  # [B] or [B, T]
    if mask is not None:
        ce = ce * mask.to(ce.dtype)
    return ce.reshape(ce.shape[0], -1).sum(-1)


class CategoricalHead(nn.Module):
    """f_out: logits = W LayerNorm(h) + b, read as Categorical(logits). ``[..., C] -> [..., V]``."""

    def __init__(self, channels: int, num_classes: int, norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels) if norm else nn.Identity()
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.norm(h))

    def distribution(self, h: Tensor) -> Distribution:
        return dist.Categorical(logits=self(h))


class PooledHead(CategoricalHead):
    """Vision head: ReLU, global average pool over space, linear. ``[B, H, W, C] -> [B, V]``.

    The standard ResNet classifier (the ReLU ends the last residual unit, whose
    pre-activation is the latent's mean). Also the per-block predictive head of BLL and
    Pred-Sim (Noekland & Eidnes 2019 use a pooled linear head).
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(channels, num_classes, norm=False)

    def forward(self, h: Tensor) -> Tensor:
        h = torch.relu(h)
        if h.dim() > 2:
            h = h.mean(tuple(range(1, h.dim() - 1)))
        return self.linear(h)


class GridPooledHead(nn.Module):
    """Predictive head of a feature-map block: ReLU, average pool to ``s x s``, linear.

    ``[B, H, W, C] -> [B, V]``. Noekland & Eidnes (2019) average-pool a block's output
    down to at most 2048 features (``max_features``) before the linear layer of their
    prediction loss. The largest grid with ``C * s^2 <= max_features`` is ``s_max``; the
    head uses the largest divisor ``s`` of the map side that keeps at least half of the
    features of ``s_max`` (tiles of ``H / s`` pixels: a plain strided average, or nothing
    when ``s = H``, several times cheaper on a CPU than adaptive pooling), and adaptive
    pooling to ``s_max`` otherwise (e.g. a 14x14 map with 16 channels: 11x11 rather than
    7x7). A global pool (``s = 1``) throws away where things are, and for the narrow early
    blocks of a reduced-width ResNet (8 channels) leaves the local classifier almost
    nothing to work with.
    """

    def __init__(
        self, channels: int, num_classes: int, spatial: int, max_features: int = 2048
    ) -> None:
        super().__init__()
        s_max = max(1, min(spatial, math.isqrt(max(max_features // channels, 1))))
        tiling = max(s for s in range(1, s_max + 1) if spatial % s == 0)
        self.side = tiling if 2 * tiling * tiling >= s_max * s_max else s_max
        self.window = spatial // self.side if spatial % self.side == 0 else 0  # 0: adaptive
        self.linear = nn.Linear(channels * self.side * self.side, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        h = torch.relu(h).permute(0, 3, 1, 2)  # [B, C, H, W]
        if h.shape[-1] == self.side:
            pass  # nothing to pool
        elif self.window and h.shape[-1] == self.side * self.window:
            h = F.avg_pool2d(h, self.window)  # [B, C, s, s]
        else:
            h = F.adaptive_avg_pool2d(h, self.side)
        return self.linear(h.flatten(1))

    def distribution(self, h: Tensor) -> Distribution:
        return dist.Categorical(logits=self(h))


class ConvPooledHead(nn.Module):
    """Predictive head with one conv layer before the pooled linear read-out (``--pred-head conv``).

    ``[B, H, W, C] -> [B, V]``: ReLU, 3x3 convolution C -> 2C (stride 2 on maps of side 8
    or more, else 1), batch norm, then ``GridPooledHead`` on the result. A linear head
    asks every block to make the classes linearly separable at once; auxiliary networks
    with a little depth of their own (Belilovsky et al. 2020, "Decoupled greedy learning
    of CNNs"; Wang et al. 2021, "Revisiting locally supervised learning") let the early
    blocks of a greedily trained network keep more of what later blocks need. The
    stride keeps its arithmetic small (for block 1 of a ResNet, half of one of the
    block's conv layers); on one CPU thread its time is mostly per-operation overhead.
    """

    def __init__(self, channels: int, num_classes: int, spatial: int) -> None:
        super().__init__()
        hidden, stride = 2 * channels, (2 if spatial >= 8 else 1)
        self.conv = nn.Conv2d(channels, hidden, 3, stride=stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(hidden)
        self.read = GridPooledHead(hidden, num_classes, (spatial - 1) // stride + 1)

    def forward(self, h: Tensor) -> Tensor:
        h = self.norm(self.conv(torch.relu(h).permute(0, 3, 1, 2)))  # [B, 2C, H', W']
        return self.read(h.permute(0, 2, 3, 1))  # GridPooledHead applies the ReLU

    def distribution(self, h: Tensor) -> Distribution:
        return dist.Categorical(logits=self(h))


PRED_HEADS: dict[str, type[nn.Module]] = {"linear": GridPooledHead, "conv": ConvPooledHead}


def prototype_bound(
    family: Family,
    rho: Params,
    prototypes: Natural,
    labels: Tensor,
    *,
    weight: float = 1.0,
    spatial_dims: int = 0,
) -> Tensor:
    """A sampling-free lower bound on E_rho[log q(y | z)] for the prototype likelihood.

    With l_c(z) = w * sum_{s, C} <beta_c, T(z_s)> - w n A_ref(beta_c) the logits of
    q(y = c | z) over the n locations s of a map (w = 1 / n for ``pool``, 1 for
    ``broadcast``; n = 1 without a map) and A_ref(beta) = A(eta_ref + beta)
    (``Family.class_natural``), Jensen's inequality on the log-sum-exp and

        E_rho exp<w beta_c, T(z)> = exp( A(eta_rho + w beta_c) - A(eta_rho) )

    give (docs/likelihood_bound.md)

        E_rho[log q(y | z)] >= E_rho[l_y(z)] - log sum_c exp( sum_{s, C} [A(eta_rho + w beta_c)
                                                  - A(eta_rho)] - w n A_ref(beta_c) ),
        E_rho[l_y(z)] = w * sum_{s, C} <beta_y, E_rho T(z_s)> - w n A_ref(beta_y).

    Shapes: rho's parameters ``[B, *L, *S, C(, K)]`` with L the label axes (``[B, T]``
    labels for sequences) and S the ``spatial_dims`` map axes that one label covers;
    prototypes ``[V, C(, K)]``; labels ``[B, *L]``. Returns ``[B, *L]``. Exact gradients
    (no sampling) for every exponential family. The prototypes of n blocks at once,
    ``[n, V, C(, K)]``, go with rho ``[n, M, C(, K)]`` and labels ``[n, M]``
    (``pyro_bll.core.stacked``).
    """
    eta = family.natural(rho)
    k = family.stat_dims
    beta_c = tuple(weight * p for p in prototypes)  # [V, C(, K)]
    # log E_rho exp<w beta_c, T(z)> summed over channels: [B, *L, *S, V]
    log_mgf = family.class_log_mgf(eta, beta_c)
    flat = k + 1
    stats = [t.flatten(-flat) for t in family.expected_stats(eta)]  # [B, *L, *S, C']
    expected = sum(
        t @ p.flatten(-flat).transpose(-1, -2) for t, p in zip(stats, prototypes, strict=True)
    )  # [B, *L, *S, V]
    n = 1
    if spatial_dims:
        axes = tuple(range(-1 - spatial_dims, -1))
        n = math.prod(log_mgf.shape[a] for a in axes)
        log_mgf, expected = log_mgf.sum(axes), expected.sum(axes)  # [B, *L, V]
    a_ref = weight * n * family.per_row(family.class_log_normalizer(prototypes))  # [V]
    log_norm = torch.logsumexp(log_mgf - a_ref, dim=-1)  # [B, *L]
    mean_logit = (weight * expected - a_ref).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return mean_logit - log_norm


class PrototypeCategorical(dist.TorchDistribution):
    """q(y | z) as a Categorical over the prototype logits that also offers the
    sampling-free ``expected_log_prob`` (``prototype_bound`` under the rho it was built
    with), which ``BlockLocalELBO`` uses in place of a draw.

    The logits at the draw z are computed only when something reads them (``log_prob``,
    ``sample``, ``logits``): a step that evaluates the bound never builds them.
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        logits: Callable[[], Tensor],
        bound: Callable[[Tensor], Tensor],
        batch_shape: torch.Size,
        num_classes: int,
    ) -> None:
        self._logits_fn, self._bound, self._num_classes = logits, bound, num_classes
        self._categorical: dist.Categorical | None = None
        super().__init__(torch.Size(batch_shape), torch.Size(), validate_args=False)

    def _at_draw(self) -> dist.Categorical:
        if self._categorical is None:
            self._categorical = dist.Categorical(logits=self._logits_fn()).expand(self.batch_shape)
        return self._categorical

    @property
    def logits(self) -> Tensor:
        return self._at_draw().logits

    @property
    def support(self):
        return dist.constraints.integer_interval(0, self._num_classes - 1)

    def log_prob(self, value: Tensor) -> Tensor:
        return self._at_draw().log_prob(value)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        return self._at_draw().sample(torch.Size(sample_shape))

    def expand(self, batch_shape, _instance=None):
        return PrototypeCategorical(
            self._logits_fn, self._bound, torch.Size(batch_shape), self._num_classes
        )

    def expected_log_prob(self, value: Tensor, rho: Distribution | None = None) -> Tensor:
        """The bound on E_rho[log q(value | z)], label-shaped; rho is the one it was built with."""
        return self._bound(value)


class PrototypeLikelihood:
    """The default local likelihood, tied to the feedback weights (docs/math.md).

    With the feedback potential beta_c = g_k(e_c) of every class c,

        q_k(y = c | z) = softmax_c( <beta_c, T(z)> - A(eta_ref + beta_c) ).

    For the fixed-variance Gaussian this is a nearest-prototype classifier whose
    prototypes are the feedback outputs: logit_c = -||z - b_c||^2 / (2 sigma^2) + const.
    On a feature map the per-location logits are reduced by the chain's spatial
    ``message`` (summed for broadcast, averaged for pool; ``pyro_bll.guides.spatial``).
    Given rho's parameters the distribution carries the sampling-free bound
    (``prototype_bound``) on its expectation under rho (``PrototypeCategorical``); without
    them it is a plain Categorical, read at a draw of z.
    """

    def distribution(
        self,
        family: Family,
        z: Tensor,
        class_potentials: tuple,
        message=None,
        rho: Params | None = None,
        label_shape: torch.Size | None = None,
    ) -> Distribution:
        # z: [..., C]; class_potentials: tuple of [num_classes, C]; logits: [..., num_classes]
        def logits() -> Tensor:
            out = family.potential_logits(z, class_potentials)
            if message is not None:
                out = message.reduce_logits(out)  # [B, H, W, V] -> [B, V]
            return out

        if rho is None:
            return dist.Categorical(logits=logits())
        if label_shape is None:
            raise ValueError("the bound's distribution needs the labels' batch shape")
        weight, spatial = 1.0, 0
        if message is not None:
            spatial = message.bound_spatial_dims()
            weight = message.weight(message.num_locations(rho)) if spatial else 1.0
        return PrototypeCategorical(
            logits,
            lambda y: prototype_bound(
                family, rho, class_potentials, y, weight=weight, spatial_dims=spatial
            ),
            label_shape,
            class_potentials[0].shape[0],
        )


class AffineGaussian(dist.Normal):
    """y ~ N(w . z + c, v) for real y, with the expectation under a Gaussian rho in closed form.

    z ``[B, C]``, w ``[C]``: loc = sum_C w z + c, shape ``[B]``.
    """

    def __init__(self, z: Tensor, weight: Tensor, bias: Tensor, variance: Tensor) -> None:
        self.weight, self.bias, self.noise_var = weight, bias, variance
        super().__init__((z * weight).sum(-1) + bias, variance.sqrt().expand(z.shape[:-1]))

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance or type(self).__new__(type(self)))
        new.weight, new.bias, new.noise_var = self.weight, self.bias, self.noise_var
        return new

    def expected_log_prob(self, value: Tensor, rho: Distribution) -> Tensor:
        """E_{z ~ rho}[log N(value; w.z + c, v)] for a diagonal Gaussian rho over z ``[B, C]``.

        = log N(value; w.mu + c, v) - sum_C w^2 s^2 / (2 v)
        """
        base = rho.base_dist if isinstance(rho, torch.distributions.Independent) else rho
        mu, var = base.mean, base.variance
        loc = (mu * self.weight).sum(-1) + self.bias
        spread = (self.weight.pow(2) * var).sum(-1)
        return (
            -0.5 * math.log(2 * math.pi)
            - 0.5 * self.noise_var.log()
            - ((value - loc).pow(2) + spread) / (2 * self.noise_var)
        )


class LinearGaussianHead(nn.Module):
    """A regression head y ~ N(w . h + c, v) (used by the exact linear-Gaussian chain)."""

    def __init__(self, weight: Tensor, bias: Tensor, variance: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.variance = nn.Parameter(variance)

    def forward(self, h: Tensor) -> Tensor:
        return (h * self.weight).sum(-1) + self.bias

    def distribution(self, h: Tensor) -> Distribution:
        return AffineGaussian(h, self.weight, self.bias, self.variance)
