"""How a per-example feedback message meets a feature map (``--message channel|mean|...``).

The feedback network (``--feedback linear``: the paper's one linear layer per block from
the one-hot label to the block's channel count) gives every example one potential
beta_k ``[B, C]`` per natural parameter. A vision block's latent is a feature map
z_k ``[B, H, W, C]`` (channels last, as the families expect), so the message must be
spread over the H * W locations. The choices, all conjugate potentials:

* ``broadcast``: the potential exp(<beta, T(z_hw)>) at every location,

      rho(z) proportional to alpha(z) * prod_hw exp(<beta, T(z_hw)>),
      eta(rho_hw) = eta(alpha_hw) + beta                      (beta as ``[B, 1, 1, C]``);

* ``mean``: the latent is the spatial mean itself (the map's other directions, which the
  label says nothing about, are marginalised). With z_hw ~ F(alpha_hw) independent,
  zbar = mean_hw z_hw ``[B, C]`` has law alpha(zbar) (for Gaussians N(mean_hw mu,
  mean_hw s^2 / (H W)): ``Family.spatial_mean``), and the potential exp(<beta, T(zbar)>)
  acts on it:

      rho(zbar) proportional to alpha(zbar) * exp(<beta, T(zbar)>).

  As the potential depends on z only through zbar, KL(rho || alpha) over the whole map
  equals the KL of the two laws of zbar: only the spatial mean of the map is pulled
  towards the label's prototype, not every location (``pool`` pulls every location,
  with weight 1 / (H W), because T(z) = (z, z^2) holds per-location squares). Needs a
  family closed under averaging (the Gaussians) and ``--propagate mean``.

* ``channel`` (the paper's reading): one latent per channel, summarising the map by the
  family member whose mean is the channel's spatial mean of m(alpha) and whose
  dispersion is the family's own (``Family.channel_law``; for the fixed-variance Gaussian
  N(mean_hw mu, sigma^2)). The potential acts on it with full weight, so for the paper's
  Gaussian rho_kj = (alpha_kj + beta_kj) / 2 whatever the map's size. Unlike ``mean``,
  this is a modelling choice rather than the law of an average: the map's H * W
  locations are not counted as independent evidence against the label. Under ``mean``
  the latent's variance is sigma^2 / (H W), so a potential of precision 1 / sigma^2 moves
  rho's mean by only 1 / (H W + 1) of the way to the prototype (0.0013 for 28x28 maps):
  the feedback barely acts.

* ``grid``: ``channel`` on every cell of an s x s grid that tiles the map (the largest
  divisor s of the side with C s^2 <= 2048, ``grid_side``: the predictive heads' tiling,
  where they do not pool adaptively to a finer grid).
  The latent is one variable per (cell, channel), ``[B, s * s * C]`` flattened in (row,
  column, channel) order, with the cell's mean of m(alpha) and the family's own
  dispersion; the feedback sends one potential per (cell, channel), a class template of
  the map, and acts with full weight (rho = (alpha + beta) / 2 per cell for the paper's
  Gaussian). Where ``channel`` pulls only the C spatial means towards the label, ``grid``
  also says where on the map a class puts its activity.

* ``pool``: one potential on the spatially averaged sufficient statistics,

      rho(z) proportional to alpha(z) * exp(<beta, mean_hw T(z_hw)>),
      eta(rho_hw) = eta(alpha_hw) + beta / (H W),

  i.e. exactly ``broadcast`` with beta / (H W). The label is a statement about the whole
  image, and pooling makes it one statement rather than H * W independent ones.

The prototype local likelihood q_k(y | z) tied to the feedback weights meets the map the
same way (``reduce_logits``), so that q_k and rho_k use one potential. With per-location
logits l_c(z_hw) = <beta_c, T(z_hw)> - A(beta_c):

* ``broadcast``: logit_c = sum_hw l_c(z_hw) (every location is an independent draw from
  the class's distribution F(beta_c));
* ``pool``: logit_c = mean_hw l_c(z_hw) = <beta_c, mean_hw T(z_hw)> - A(beta_c), the
  prototype classifier applied to the spatially averaged statistics (l_c is affine in
  T, so the mean of the logits is the logit of the mean);
* ``mean``: logit_c = <beta_c, T(zbar)> - A(beta_c) on the latent zbar itself. For the
  fixed-variance Gaussian this equals ``pool``'s logits at the same map up to a
  class-independent term (both are linear in the spatial mean).

Spatial axes are the ``spatial_dims`` axes right after the batch axis (``[B, H, W, ...]``);
labels are one per example ``[B]``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from torch import Tensor

from pyro_bll.families import Family, Natural, Params


class SpatialMessage(ABC):
    """Places per-example potentials on a map and reduces per-location logits."""

    name = "spatial"

    def __init__(self, spatial_dims: int = 2) -> None:
        if spatial_dims < 1:
            raise ValueError(f"spatial_dims must be >= 1, got {spatial_dims}")
        self.spatial_dims = spatial_dims

    def _axes(self) -> tuple[int, ...]:
        return tuple(range(1, 1 + self.spatial_dims))

    def num_locations(self, alpha: Params) -> int:
        """H * W of the latent map that ``alpha`` parametrises (``[B, H, W, ...]``)."""
        return math.prod(alpha[0].shape[1 : 1 + self.spatial_dims])

    def latent_params(self, family: Family, alpha: Params) -> Params:
        """Parameters of the latent site given the map's forward message (the map itself)."""
        return alpha

    def latent_event_dim(self, event_dim: int) -> int:
        """Event axes of the latent site for a map with ``event_dim`` event axes."""
        return event_dim

    def latent_width(self, channels: int, side: int) -> int:
        """Channels of the latent of a ``side x side`` map of ``channels`` channels: the
        width the feedback network writes one potential for."""
        return channels

    def feedback_scale(self, channels: int, side: int) -> float:
        """Factor on the family's initial feedback scale for such a map (1: as it is)."""
        return 1.0

    @abstractmethod
    def weight(self, num_locations: int) -> float:
        """The factor multiplying beta at every location."""

    def place(self, beta: Natural, alpha: Params) -> Natural:
        """beta ``[B, *rest]`` -> ``[B, 1, 1, *rest]`` times ``weight(H W)``, beside alpha."""
        w = self.weight(self.num_locations(alpha))
        ones = (1,) * self.spatial_dims
        return tuple(b.reshape(b.shape[:1] + ones + b.shape[1:]) * w for b in beta)

    @abstractmethod
    def reduce_logits(self, logits: Tensor) -> Tensor:
        """Per-location logits ``[B, H, W, V]`` -> per-example logits ``[B, V]``."""

    def bound_spatial_dims(self) -> int:
        """Map axes the latent keeps and one label covers (the prototype bound sums them)."""
        return self.spatial_dims

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spatial_dims={self.spatial_dims})"


class BroadcastMessage(SpatialMessage):
    """beta at every location; prototype logits summed over locations."""

    name = "broadcast"

    def weight(self, num_locations: int) -> float:
        return 1.0

    def reduce_logits(self, logits: Tensor) -> Tensor:
        return logits.sum(self._axes())


class PoolMessage(SpatialMessage):
    """A potential on the spatial mean of T(z): beta / (H W) at every location."""

    name = "pool"

    def weight(self, num_locations: int) -> float:
        return 1.0 / num_locations

    def reduce_logits(self, logits: Tensor) -> Tensor:
        return logits.mean(self._axes())


class MeanMessage(SpatialMessage):
    """The latent is the spatial mean zbar ``[B, C]`` of the map; beta acts on it as is."""

    name = "mean"

    def latent_params(self, family: Family, alpha: Params) -> Params:
        return family.spatial_mean(alpha, self._axes())  # [B, H, W, C] -> [B, C]

    def latent_event_dim(self, event_dim: int) -> int:
        return event_dim - self.spatial_dims

    def weight(self, num_locations: int) -> float:
        return 1.0

    def place(self, beta: Natural, alpha: Params) -> Natural:
        return beta  # alpha is already the law of zbar, [B, C] like beta

    def reduce_logits(self, logits: Tensor) -> Tensor:
        return logits  # computed on zbar: already [B, V]

    def bound_spatial_dims(self) -> int:
        return 0  # the latent is already one vector per example


class ChannelMessage(MeanMessage):
    """One latent per channel ``[B, C]`` with the family's own dispersion (the paper's)."""

    name = "channel"

    def latent_params(self, family: Family, alpha: Params) -> Params:
        return family.channel_law(alpha, self._axes())  # [B, H, W, C] -> [B, C]


def grid_side(channels: int, side: int, max_features: int = 2048) -> int:
    """The largest divisor s of ``side`` with ``channels * s * s <= max_features`` (>= 1):
    ``GridPooledHead``'s tiling (which pools adaptively instead where this s keeps under
    half the features of its largest grid)."""
    fits = [s for s in range(1, side + 1) if side % s == 0 and channels * s * s <= max_features]
    return max(fits, default=1)


class GridMessage(ChannelMessage):
    """``channel`` per cell of an s x s grid: the latent ``[B, s * s * C]`` (``grid_side``)."""

    name = "grid"

    def latent_width(self, channels: int, side: int) -> int:
        return channels * grid_side(channels, side) ** 2

    def feedback_scale(self, channels: int, side: int) -> float:
        """1 / s: a class template of s * s * C entries starts with the norm of a channel
        prototype of C entries, so the first KLs and prototype logits are ``channel``'s."""
        return 1.0 / grid_side(channels, side)

    def latent_params(self, family: Family, alpha: Params) -> Params:
        """``[B, H, W, *rest]`` per parameter -> the cells' channel laws, flattened to
        ``[B, s * s * rest[0], *rest[1:]]`` in (row, column, channel) order."""
        if self.spatial_dims != 2:
            raise ValueError(f"--message grid needs 2 spatial axes, got {self.spatial_dims}")
        b, h, w = alpha[0].shape[:3]
        if h != w:
            raise ValueError(f"--message grid needs square maps, got {h}x{w}")
        s = grid_side(math.prod(alpha[0].shape[3:]), h)
        cells = tuple(p.reshape(b, s, h // s, s, w // s, *p.shape[3:]) for p in alpha)
        law = family.channel_law(cells, (2, 4))  # [B, s, s, *rest]
        return tuple(p.reshape(b, -1, *p.shape[4:]) for p in law)


MESSAGES: dict[str, type[SpatialMessage]] = {
    "channel": ChannelMessage,
    "grid": GridMessage,
    "pool": PoolMessage,
    "broadcast": BroadcastMessage,
    "mean": MeanMessage,
}
