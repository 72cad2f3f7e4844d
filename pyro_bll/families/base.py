"""The interface every latent family implements.

A family describes the distribution F(alpha) over one block's latent z, channel-wise over
the last dimension: a block output of shape ``[..., n_raw * C]`` becomes parameters of C
independent scalar distributions, each of shape ``[..., C]``.

Conventions (docs/math.md §1). Every family is an exponential family

    F(z; eta) = h(z) exp(<eta, T(z)> - A(eta)),

with natural parameters ``eta = (eta_1, ..., eta_m)`` (a tuple of ``[..., C]`` tensors),
sufficient statistics ``T(z) = (T_1(z), ..., T_m(z))`` and log-normaliser ``A``. The
natural-parameter convention is this library's own, documented per family; it is never
torch's private ``_natural_params``.

The feedback message beta_k is a *conjugate potential* exp(<beta, T(z)>) with no base
measure, so the variational posterior

    rho(z) proportional to alpha(z) * exp(<beta, T(z)>)   =   F(z; eta(alpha) + beta)

stays in the family exactly (``posterior``). A potential of all zeros carries no
information: rho = alpha. ``feedback_potential`` maps a zero raw output to the zero
potential (up to ``zero_potential_tol``), so an untrained feedback network leaves rho at
alpha instead of pulling every block towards a label-independent target; the paper's
fixed-variance Gaussian is the documented exception (``zero_raw_is_uninformative``).

The prototype likelihood reads the potential beta_c of class c as the class-conditional
law F(eta_ref + beta_c) (``class_natural``); eta_ref is zero for every family except those
whose zero natural parameter is not a distribution (the Gamma uses Exp(1)). Its
sampling-free bound (``pyro_bll.core.likelihoods.PrototypeBound``, docs/likelihood_bound.md)
needs only the log-normaliser and the expected statistics E_eta[T(z)] = grad A(eta)
(``expected_stats``).

KL(p || q) between two members is torch's closed form where one is registered for the
family's distribution class, else the Bregman divergence of the log-normaliser
(``Family.bregman_kl``); ``register_bregman_kl`` hands the latter to torch's
``kl_divergence`` (and so to ``BlockLocalELBO``'s analytic KL) for a distribution class
torch has none for.

Writing a new family (docs/families.md, "Adding a family"): set the class variables
documented on ``Family``, implement the abstract methods, make ``feedback_potential`` keep
eta(alpha) + beta_y + beta_c valid for any two potentials (the bound evaluates A there),
and add one line to ``FAMILIES`` (or advertise the class under the ``pyro_bll.families``
entry-point group from another package). The generic tests in tests/families/test_families.py then
run on it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, kl_divergence, register_kl

Params = tuple[Tensor, ...]
Natural = tuple[Tensor, ...]
# points z and, for a continuous domain, (u, dz/du) for the trapezoid rule in u
Quadrature = tuple[Tensor, tuple[Tensor, Tensor] | None]

DOMAINS = ("real", "positive", "unit_interval", "circle", "binary", "finite", "counts", "simplex")


def bounded_below(raw: Tensor, floor: float) -> Tensor:
    """A smooth map of R onto (-floor, inf) with f(0) = 0 and f'(0) = 1.

        f(r) = (floor / log 2) * (softplus(2 log 2 * r / floor) - log 2)

    Potentials that may not lower a parameter by more than ``floor`` (Gamma and Beta
    shapes) use it, so that a zero raw feedback output is the zero potential.
    """
    scale = floor / math.log(2.0)
    return scale * (torch.nn.functional.softplus(2.0 * raw / scale) - math.log(2.0))


def mask_potential(beta: Natural, mask: Tensor | None, lead: int = 0) -> Natural:
    """beta with every masked label's potential set to zero (no information): the mask
    ``[B, *L]`` meets beta ``[*lead, B, *L, ...]`` (``lead`` leading axes, as the n blocks of
    a group, ``pyro_bll.core.stacked``)."""
    if mask is None:
        return beta
    m = mask.to(beta[0].dtype)
    return tuple(b * m.reshape(m.shape + (1,) * (b.dim() - lead - m.dim())) for b in beta)


def inverse_softplus(y: Tensor, offset: float = 0.0) -> Tensor:
    """r with softplus(r) + offset = y: the unconstrained coordinate of a positive parameter
    that a block wrote as softplus(raw) + offset.

        r = log(expm1(x)) = x + log(-expm1(-x)),   x = y - offset,

    the second form stable for large x. x is clamped at eps(dtype) * max(offset, 1), the
    resolution of y - offset in floating point: r is exact wherever softplus(r) is resolved
    next to the offset, and about log(eps * offset) (-17 for float32, offset 0.5) below.
    """
    x = (y - offset).clamp_min(torch.finfo(y.dtype).eps * max(offset, 1.0))
    return x + torch.log(-torch.expm1(-x))


def register_bregman_kl(
    dist_cls: type[Distribution], family: Family, params_of: Callable[[Distribution], Params]
) -> None:
    """Register ``family.bregman_kl`` as torch's KL between two ``dist_cls`` distributions.

    For a family whose distribution class has no KL in torch: ``kl_divergence`` (and with
    it ``BlockLocalELBO``'s analytic KL, which would otherwise fall back to a single-sample
    estimate) then returns the Bregman divergence of the family's log-normaliser.
    ``params_of`` reads a distribution's family parameters back (e.g. ``lambda d:
    (d.loc, d.concentration)``). Register it for a subclass of your own, as
    ``pyro_bll.families.vonmises`` does, not for a torch class other code shares.
    """

    def _kl(p: Distribution, q: Distribution) -> Tensor:
        return family.bregman_kl(params_of(p), params_of(q))

    _kl.__doc__ = (
        f"KL({dist_cls.__name__} || {dist_cls.__name__}): {type(family).__name__}'s Bregman KL"
    )
    register_kl(dist_cls, dist_cls)(_kl)


class FamilyError(ValueError):
    """A block output or parameter that does not fit a family."""


def check_group_size(name: str, group_size: int) -> None:
    """FamilyError unless ``group_size`` is an integer >= 2 (grouped families)."""
    if not (isinstance(group_size, int) and group_size >= 2):
        raise FamilyError(f"{name}: group_size must be an integer >= 2, got {group_size!r}")


def group_channels(name: str, raw: Tensor, group_size: int, what: str) -> Tensor:
    """``[..., C]`` -> ``[..., C / K, K]`` with K = ``group_size`` (categorical, Dirichlet)."""
    c = raw.shape[-1]
    if c % group_size:
        raise FamilyError(
            f"{name}: group_size {group_size} does not divide the {c} channels "
            f"of the {what}; choose a group_size that divides the channel count"
        )
    return raw.unflatten(-1, (c // group_size, group_size))


class Family(ABC):
    """One exponential family of channel-wise latent distributions.

    Subclasses set ``name``, ``n_raw`` (raw block outputs per channel) and ``n_feedback``
    (raw feedback outputs per channel) and implement the abstract methods.
    """

    name: ClassVar[str]
    n_raw: ClassVar[int]
    n_feedback: ClassVar[int]
    # trailing axes of each natural parameter beyond the latent's own shape (1 for a
    # categorical group's K logits, 0 for scalar-per-channel families)
    stat_dims: ClassVar[int] = 0
    # axes of one draw of a latent variable (0: a scalar per channel or group; 1: a vector,
    # e.g. a Dirichlet group's K values on the simplex); tests read shapes from it
    event_dims: ClassVar[int] = 0
    discrete: ClassVar[bool] = False
    # initial scale of the feedback weights: a potential of this size moves rho well away
    # from alpha for the paper's Gaussian (which uses 1.0), but makes KL(rho || alpha)
    # swamp the other terms for families with bounded means, which start better with a
    # weak potential
    feedback_init_std: ClassVar[float] = 0.1
    # False only where a zero raw feedback output is, by design, an informative potential
    # (the paper's fixed-variance Gaussian: the potential of N(0, sigma^2))
    zero_raw_is_uninformative: ClassVar[bool] = True
    # how close to zero the potential of a zero raw output is (0: exactly zero)
    zero_potential_tol: ClassVar[float] = 0.0
    # the default of --likelihood for this family, chosen from measurements (docs/families.md)
    default_likelihood: ClassVar[str] = "bound"
    # what the next block consumes by default on tasks that let the family choose (the
    # transformer): "mean" (m(alpha), which every family has) or "params" (alpha's
    # unconstrained coordinates, which keep a deep stack of bounded or positive means from
    # squashing the residual stream at every block, docs/results.md). "params" needs
    # ``unconstrained``: a class that declares it without one is refused when defined
    default_propagate: ClassVar[str] = "mean"
    # where a latent variable lives, for the generic checks that integrate over it
    # (``quadrature``): "real", "positive", "unit_interval", "circle" ([-pi, pi)),
    # "binary", "finite" (an integer_interval support), "counts" (0, 1, 2, ...), or
    # "simplex" (no grid: the checks use Monte Carlo)
    domain: ClassVar[str] = "real"
    # True where ``unconstrained(params(raw)) == raw`` (the coordinates the block wrote);
    # the transformer then starts its input projection as [I, 0], continuing the stream
    unconstrained_is_raw: ClassVar[bool] = True
    # the version of ``params``' reading of raw block outputs. Raise it when that reading
    # changes: checkpoints record it, and a checkpoint written under another version is
    # refused, since its weights would mean another distribution (checkpoints.check_links)
    link_version: ClassVar[int] = 1
    # options that fit the family to a latent of 6 channels: the generic tests build every
    # family with them (e.g. a categorical's group size must divide the channel count)
    example_options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def check_class(cls) -> None:
        """Raise ``FamilyError`` (one line naming the fix) where the class variables do not
        fit together; ``make_family`` and the plugin loader call it."""
        where = (
            f"family {getattr(cls, 'name', cls.__name__)!r} ({cls.__module__}.{cls.__qualname__})"
        )
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise FamilyError(f"{where} does not implement {', '.join(missing)}")
        for var in ("name", "n_raw", "n_feedback"):
            if not hasattr(cls, var):
                raise FamilyError(f"{where} does not set the class variable {var}")
        if cls.default_propagate not in ("mean", "params", "sample"):
            raise FamilyError(
                f"{where}: default_propagate must be mean, params or sample, "
                f"got {cls.default_propagate!r}"
            )
        if cls.default_propagate == "params" and cls.unconstrained is Family.unconstrained:
            raise FamilyError(
                f"{where}: default_propagate 'params' needs an unconstrained() method; "
                "implement it or set default_propagate = 'mean'"
            )
        if cls.domain not in DOMAINS and cls.quadrature is Family.quadrature:
            raise FamilyError(
                f"{where}: unknown domain {cls.domain!r}; use one of {', '.join(DOMAINS)} "
                "or override quadrature()"
            )

    # ---- parameter layout -------------------------------------------------------------
    def split_raw(self, raw: Tensor, n: int, what: str) -> tuple[Tensor, ...]:
        """Split ``[..., n * C]`` into n tensors of ``[..., C]`` (channel blocks)."""
        if raw.shape[-1] % n != 0:
            raise FamilyError(
                f"{self.name}: {what} has {raw.shape[-1]} features on its last axis, not a "
                f"multiple of {n} (the family needs {n} values per latent channel); "
                f"make the block output {n} * channels features"
            )
        return tuple(raw.chunk(n, dim=-1))

    def raw_size(self, channels: int) -> int:
        """Width a block must output to parametrise ``channels`` latent channels."""
        return self.n_raw * channels

    def feedback_size(self, channels: int) -> int:
        """Width a feedback network must output for ``channels`` latent channels."""
        return self.n_feedback * channels

    # ---- the exponential family -------------------------------------------------------
    @abstractmethod
    def params(self, raw: Tensor) -> Params:
        """Map a block's raw output ``[..., n_raw * C]`` to valid parameters alpha."""

    @abstractmethod
    def check_params(self, params: Params) -> None:
        """Raise ``FamilyError`` if ``params`` lie outside the parameter space."""

    @abstractmethod
    def natural(self, params: Params) -> Natural:
        """eta(alpha): natural parameters of the distribution with ``params``."""

    @abstractmethod
    def from_natural(self, eta: Natural) -> Params:
        """Inverse of ``natural``."""

    @abstractmethod
    def sufficient_stats(self, z: Tensor) -> tuple[Tensor, ...]:
        """T(z), one ``[..., C]`` tensor per natural parameter."""

    @abstractmethod
    def log_normalizer(self, eta: Natural) -> Tensor:
        """A(eta), ``[..., C]``."""

    @abstractmethod
    def log_base_measure(self, z: Tensor) -> Tensor:
        """log h(z), ``[..., C]``."""

    @abstractmethod
    def distribution(self, params: Params) -> Distribution:
        """A torch distribution with batch shape ``[..., C]``."""

    @abstractmethod
    def mean(self, params: Params) -> Tensor:
        """m(alpha) = E_alpha[z], ``[..., C]``: what the next block consumes by default."""

    @abstractmethod
    def feedback_potential(self, raw: Tensor) -> Natural:
        """Map a feedback network's raw output ``[..., n_feedback * C]`` to a potential."""

    @abstractmethod
    def expected_stats(self, eta: Natural) -> tuple[Tensor, ...]:
        """E_eta[T(z)] = grad A(eta), one tensor per statistic, shaped like ``eta``."""

    def log_normalizer_shift(self, eta: Natural, beta: Natural) -> Tensor:
        """A(eta + beta) - A(eta), ``[..., C]``: the log of E_eta exp<beta, T(z)>.

        Families whose A cancels badly for concentrated laws (the Gaussians: A grows like
        the precision) override it with an algebraically equal, stable form.
        """
        shifted = tuple(e + b for e, b in zip(eta, beta, strict=True))
        return self.log_normalizer(shifted) - self.log_normalizer(eta)

    def class_log_mgf(self, eta: Natural, beta: Natural) -> Tensor:
        """sum_C [A(eta + beta_c) - A(eta)] for every class c, ``[..., V]``.

        ``eta`` ``[..., C(, K)]`` per natural parameter, ``beta`` ``[V, C(, K)]``: the log
        moment generating function of the prototype bound (``pyro_bll.core.likelihoods``). This
        general form broadcasts to ``[..., V, C]``; families whose shift is linear or
        quadratic in beta override it with matrix products that never build that tensor.
        """
        cls = -(2 + self.stat_dims)  # the class axis goes in front of channel (statistic)
        eta_c = tuple(e.unsqueeze(cls) for e in eta)  # [..., 1, C(, K)]
        if beta[0].dim() > -cls:  # n blocks' prototypes [n, V, C(, K)]: against [n, M, ...]
            beta = tuple(b.unsqueeze(cls - 1) for b in beta)  # [n, 1, V, C(, K)]
        shift = self.log_normalizer_shift(eta_c, beta)  # [..., V, C]
        return shift.sum(-1)

    def class_natural(self, beta: Natural) -> Natural:
        """eta_ref + beta: the class-conditional law the prototype likelihood reads beta as."""
        return beta

    def unconstrained(self, params: Params) -> Tensor:
        """alpha in the coordinates the block wrote it in, ``[..., n_raw * C]``
        (``--propagate params``): the inverse of ``params``, so that
        ``unconstrained(params(raw)) == raw`` (means and logits as they are, positive
        parameters through ``inverse_softplus``). On the transformer the next block reads
        these, and its stream continues the previous block's stream unchanged
        (docs/families.md, "What the next block reads")."""
        raise FamilyError(f"{self.name}: no unconstrained parametrisation; use --propagate mean")

    def features(self, z: Tensor) -> Tensor:
        """A draw z as the ``[..., C]`` input of the next block (``propagate="sample"``)."""
        return z

    def spatial_mean(self, params: Params, axes: tuple[int, ...]) -> Params:
        """Parameters of the law of the average of independent draws over ``axes``.

        Needed by ``--message mean`` (``pyro_bll.guides.spatial.MeanMessage``), which puts
        the latent on the spatial mean of a feature map. Only families closed under
        averaging independent draws can offer it; the rest raise ``FamilyError``.
        """
        raise FamilyError(
            f"{self.name}: the average of independent draws leaves the family, so the "
            "latent cannot sit on the spatial mean; use --message pool or a Gaussian family"
        )

    def channel_law(self, params: Params, axes: tuple[int, ...]) -> Params:
        """One latent per channel for a feature map (``--message channel``, the paper's reading).

        ``[B, H, W, C] -> [B, C]`` for ``axes = (1, 2)``: the family member whose mean is the
        channel's spatial mean of m(alpha) and whose dispersion is the family's own (for the
        fixed-variance Gaussian N(mean_hw mu, sigma^2)), so that rho = (alpha + beta) / 2
        there. Not the law of an average (that is ``spatial_mean``): a summary of the map
        on which the feedback acts with the weight the paper gives it.
        """
        raise FamilyError(f"{self.name}: no channel-wise summary of a feature map is defined")

    # ---- derived operations (shared by all families) ----------------------------------
    def inner(self, eta: Natural, stats: tuple[Tensor, ...]) -> Tensor:
        """<eta, T(z)> per latent variable (the latent's shape, e.g. ``[..., C]``)."""
        total = sum(e * t.to(e.dtype) for e, t in zip(eta, stats, strict=True))
        return total.sum(tuple(range(-self.stat_dims, 0))) if self.stat_dims else total

    def posterior(self, alpha: Params, beta: Natural) -> Params:
        """rho = F(eta(alpha) + beta): the exact product alpha(z) * exp(<beta, T(z)>)."""
        eta = self.natural(alpha)
        return self.from_natural(tuple(a + b for a, b in zip(eta, beta, strict=True)))

    def kl(self, p: Params, q: Params) -> Tensor:
        """KL(F(p) || F(q)) per latent variable (``[..., C]``), differentiable in both
        arguments: torch's ``kl_divergence`` where one is registered for the family's
        distribution class (a closed form, or the Bregman KL that ``register_bregman_kl``
        registered), else ``bregman_kl``."""
        try:
            return kl_divergence(self.distribution(p), self.distribution(q))
        except NotImplementedError:
            return self.bregman_kl(p, q)

    def bregman_kl(self, p: Params, q: Params) -> Tensor:
        """KL(F(p) || F(q)) from the log-normaliser alone: the Bregman divergence of A,

            KL = A(eta_q) - A(eta_p) - <eta_q - eta_p, grad A(eta_p)>,

        with grad A(eta_p) = E_p[T(z)] (``expected_stats``). Exact for every exponential
        family, differentiable in both arguments (through ``log_normalizer`` and
        ``expected_stats``); per latent variable, ``[..., C]``.
        """
        eta_p, eta_q = self.natural(p), self.natural(q)
        diff = tuple(b - a for a, b in zip(eta_p, eta_q, strict=True))
        mu_p = self.expected_stats(eta_p)
        return self.log_normalizer(eta_q) - self.log_normalizer(eta_p) - self.inner(diff, mu_p)

    def log_prob(self, params: Params, z: Tensor) -> Tensor:
        """log F(z; params) via the exponential-family form, ``[..., C]``."""
        eta = self.natural(params)
        return (
            self.log_base_measure(z)
            + self.inner(eta, self.sufficient_stats(z))
            - (self.log_normalizer(eta))
        )

    def potential_logits(self, z: Tensor, prototypes: Natural) -> Tensor:
        """Logits of the local likelihood tied to the feedback weights.

        q(y = c | z) = softmax_c( sum_C <beta_c, T(z)> - A(eta_ref + beta_c) ), where ``prototypes``
        holds the feedback potential beta_c of every class c as ``[num_classes, C]``
        tensors and z is ``[..., C]``. Returns ``[..., num_classes]``. The class-independent
        base measure h(z) cancels in the softmax and is left out.
        """
        d = self.stat_dims + 1  # flatten each statistic's latent and statistic axes
        t = [s.flatten(-d) for s in self.sufficient_stats(z)]  # [..., C']
        e = [p.flatten(-d) for p in prototypes]  # [V, C']
        logits = sum(s.to(p.dtype) @ p.transpose(-1, -2) for s, p in zip(t, e, strict=True))
        return logits - self.per_row(self.class_log_normalizer(prototypes))

    @staticmethod
    def per_row(per_class: Tensor) -> Tensor:
        """``[V]`` as it is, ``[n, V]`` (n blocks) as ``[n, 1, V]``: to meet ``[(n,) M, V]``."""
        return per_class if per_class.dim() == 1 else per_class.unsqueeze(-2)

    def class_log_normalizer(self, prototypes: Natural) -> Tensor:
        """sum over channels of A(eta_ref + beta_c), ``[num_classes]`` (``[n, num_classes]``
        for the prototypes of n blocks at once, ``[n, V, C]``)."""
        lead = prototypes[0].dim() - 2 - self.stat_dims  # 1 for n blocks, else 0
        return self.log_normalizer(self.class_natural(prototypes)).flatten(lead + 1).sum(-1)

    def quadrature(self, *laws: Params, points: int = 40001) -> Quadrature | None:
        """Points covering the support of the laws ``laws`` (all of one batch shape), for
        checks by numerical integration (tests/families/test_families.py,
        tests/core/test_estimators.py).

        Returns ``(z, None)`` for a discrete domain, whose points ``z [G, *batch]`` are
        summed over (counts up to a far tail), ``(z, (u, dz_du))`` for a continuous one,
        integrated with the trapezoid rule in the coordinate ``u [G, *batch]`` (z = u,
        exp(u) or sigmoid(u); the circle's grid is [-pi, pi] itself, where the trapezoid
        rule is the periodic one), and None where no grid covers the domain ("simplex").
        Read from ``domain``; a family on another domain overrides this.
        """
        ds = [self.distribution(p) for p in laws]
        shape = ds[0].batch_shape
        ones = [1] * len(shape)
        if self.domain in ("binary", "finite", "counts"):
            if self.domain == "binary":
                grid = torch.tensor([0, 1])
            elif self.domain == "finite":
                support = ds[0].support
                grid = torch.arange(support.lower_bound, support.upper_bound + 1)
            else:
                hi = int(max(d.mean.max() for d in ds) * 5 + 60)
                grid = torch.arange(hi + 1)
            z = grid.to(torch.float64).reshape(-1, *ones).expand(-1, *shape)
            return z, None
        if self.domain == "simplex":
            return None
        t = torch.linspace(0, 1, points, dtype=torch.float64).reshape(-1, *ones)
        if self.domain == "circle":
            u = (-math.pi + 2 * math.pi * t).expand(-1, *shape)
            return u, (u, torch.ones_like(u))
        if self.domain == "unit_interval":
            # sigmoid(36) < 1 in float64; on the left z stays positive much further, and a
            # shape near its floor leaves a tail of about exp(shape * u) beyond the grid
            u = -80 + 116 * t.expand(-1, *shape)
            z = torch.sigmoid(u)
            return z, (u, z * (1 - z))
        if self.domain == "positive":
            hi = torch.stack([(d.mean + 40 * d.stddev).log() for d in ds]).amax(0)
            u = -40 + (hi + 40) * t
            return u.exp(), (u, u.exp())
        lo = torch.stack([d.mean - 15 * d.stddev for d in ds]).amin(0)
        hi = torch.stack([d.mean + 15 * d.stddev for d in ds]).amax(0)
        u = lo + (hi - lo) * t
        return u, (u, torch.ones_like(u))

    def zero_potential(self, params: Params) -> Natural:
        """The uninformative potential (rho = alpha) for parameters ``params``."""
        return tuple(torch.zeros_like(e) for e in self.natural(params))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
