"""Shared test helpers."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_bll import BLLChain, CategoricalHead
from pyro_bll.families import Family
from pyro_bll.guides import LinearFeedback
from pyro_bll.models import mlp_blocks


def assert_close(
    actual, expected, *, atol: float, rtol: float = 0.0, msg: str = "", equal_nan: bool = False
) -> None:
    """One closeness check for the whole suite; each test states its own tolerance
    (``equal_nan``: NaN, an undefined value, must sit where the expected value has it)."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, msg=msg or None, equal_nan=equal_nan
    )


def mlp_chain(family: Family, *, in_dim=6, widths=(6, 6, 6), classes=4, **kw) -> BLLChain:
    """A small MLP chain with the paper's linear feedback and prototype likelihoods."""
    blocks = mlp_blocks(in_dim, widths, family)
    feedback = LinearFeedback(classes, [family.feedback_size(w) for w in widths])
    kw.setdefault("pred_heads", [nn.Linear(w, classes) for w in widths[:-1]])
    return BLLChain(blocks, family, feedback, CategoricalHead(widths[-1], classes), **kw)


def toy_batch(n=16, in_dim=6, classes=4):
    x = torch.randn(n, in_dim)
    y = torch.randint(0, classes, (n,))
    return x, y


def assert_block_local(chain: BLLChain, per_block: torch.Tensor) -> None:
    """docs/math.md §2 (locality), on block losses ``per_block [N]`` of ``chain``: the
    total loss's gradient for block k's parameters equals that of l_k alone, l_k gives no
    other parameter a gradient, and every parameter belongs to exactly one block."""
    params = list(chain.parameters())
    total_grads = torch.autograd.grad(per_block.sum(), params, retain_graph=True, allow_unused=True)
    total = {id(p): g for p, g in zip(params, total_grads, strict=True)}
    owned = set()
    for k in range(chain.num_blocks):
        mine = chain.block_parameters(k)
        owned |= {id(p) for p in mine}
        others = [p for p in params if all(p is not q for q in mine)]
        # unused: the last block's feedback when the head reads m(alpha_N) (no site z_N)
        local = torch.autograd.grad(per_block[k], mine, retain_graph=True, allow_unused=True)
        for p, g in zip(mine, local, strict=True):
            if g is None:
                assert total[id(p)] is None or total[id(p)].abs().max() == 0
            else:
                assert_close(g, total[id(p)], atol=1e-12, rtol=1e-10)
        leak = torch.autograd.grad(per_block[k], others, retain_graph=True, allow_unused=True)
        assert all(g is None or g.abs().max() == 0 for g in leak)
    assert owned == {id(p) for p in params}, "every parameter belongs to exactly one block"


# ---- independent references for the exponential families ---------------------------------
# Written from the natural-parameter conventions in each family's docstring
# (pyro_bll/families/*.py): sufficient statistics T(z), base measure h(z) and where the
# latent lives, with integration grids built here, so that a test can compute
# A(eta) = log sum/integral h(z) exp(<eta, T(z)>) without the family's own formulas (its
# ``sufficient_stats``, ``log_base_measure``, ``log_normalizer`` or ``quadrature``).

# name -> (domain, trailing statistic axes of each natural parameter)
REFERENCE_FAMILIES = {
    "gaussian": ("real", 0),  # T = (z, z^2), h = 1 / sqrt(2 pi)
    "gaussian_learned": ("real", 0),
    "gaussian_gated": ("real", 0),
    "bernoulli": ("binary", 0),  # T = z, h = 1
    "categorical": ("finite", 1),  # T = one-hot [K], h = 1
    "poisson": ("counts", 0),  # T = z, h = 1 / z!
    "gamma": ("positive", 0),  # T = (log z, z), h = 1
    "beta": ("unit_interval", 0),  # T = (log z, log(1 - z)), h = 1
    "dirichlet": ("simplex", 1),  # T = log z [K], h = 1
    "vonmises": ("circle", 1),  # T = (cos z, sin z), h = 1
}


class Grid(NamedTuple):
    """Points covering a family's support, for sums (discrete) or quadrature (continuous).

    ``z [G, *latent]`` (a simplex: ``[G, *latent, K]``); ``stats`` T(z), each shaped
    ``[G, *eta.shape]``; ``log_h`` log h(z) and ``log_w`` the log quadrature weight
    (trapezoid rule times dz/du in the grid's coordinate u; 0 for a sum), ``[G, *latent]``.
    """

    z: Tensor
    stats: tuple[Tensor, ...]
    log_h: Tensor
    log_w: Tensor


def reference_name(family: Family) -> str:
    """The family's name if this module has a reference for it, else skip the test."""
    if family.name not in REFERENCE_FAMILIES:
        pytest.skip(f"no independent reference for the plugin family {family.name!r}")
    return family.name


def _trapezoid_log_weights(lo: Tensor, hi: Tensor, points: int) -> tuple[Tensor, Tensor]:
    """u ``[points, *shape]`` evenly from lo to hi (each ``[*shape]``) and log weights."""
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64).reshape(-1, *[1] * lo.dim())
    u = lo + (hi - lo) * t
    w = torch.ones_like(t)
    w[0] = w[-1] = 0.5
    return u, torch.log(w * (hi - lo) / (points - 1))


def _sinh_log_weights(lo: Tensor, hi: Tensor, centre: Tensor, points: int):
    """u = centre + sinh(t) from lo to hi, t evenly spaced, and log(trapezoid weight * du/dt):
    a grid dense near the centre whose tails grow exponentially, so that integrands that
    decay only like exp(-a |u|) (a shape a near zero) are covered with few points."""
    t, log_w = _trapezoid_log_weights(torch.asinh(lo - centre), torch.asinh(hi - centre), points)
    return centre + torch.sinh(t), log_w + torch.log(torch.cosh(t))


def reference_grid(name: str, *etas: tuple[Tensor, ...], points: int = 2001) -> Grid:
    """A grid covering the laws with natural parameters ``etas`` (one batch shape), each
    element with its own range (the laws' parameters are read back per the docstring
    conventions only to place the grid). Continuous grids integrate to about 1e-12."""
    domain, stat_dims = REFERENCE_FAMILIES[name]
    etas = tuple(tuple(t.detach().to(torch.float64) for t in e) for e in etas)
    first = etas[0][0]
    latent = first.shape[: first.dim() - stat_dims]
    ones = [1] * len(latent)

    def over_laws(f):  # elementwise min and max of f over the laws
        vals = torch.stack([f(e) for e in etas])
        return vals.amin(0), vals.amax(0)

    if domain == "binary":
        z = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(-1, *ones).expand(-1, *latent)
        return Grid(z, (z,), torch.zeros_like(z), torch.zeros_like(z))
    if domain == "finite":
        k = first.shape[-1]
        idx = torch.arange(k).reshape(-1, *ones).expand(-1, *latent)
        one_hot = torch.eye(k, dtype=torch.float64)[idx]  # [K, *latent, K]
        zero = torch.zeros(idx.shape, dtype=torch.float64)
        return Grid(idx, (one_hot,), zero, zero)
    if domain == "counts":
        rate = max(float(e[0].exp().max()) for e in etas)
        top = int(rate + 12 * rate**0.5 + 40)
        z = torch.arange(top + 1, dtype=torch.float64)
        log_fact = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(z[1:]).cumsum(0)])
        z, log_fact = (t.reshape(-1, *ones).expand(-1, *latent) for t in (z, log_fact))
        return Grid(z, (z,), -log_fact, torch.zeros_like(z))
    if domain == "circle":  # the periodic trapezoid rule: equal weights 2 pi / G
        g = 256
        z = -math.pi + 2 * math.pi * torch.arange(g, dtype=torch.float64) / g
        z = z.reshape(-1, *ones).expand(-1, *latent)
        w = torch.full_like(z, math.log(2 * math.pi / g))
        return Grid(z, (torch.stack([z.cos(), z.sin()], -1),), torch.zeros_like(z), w)
    if domain == "real":  # eta = (mu / s^2, -1 / (2 s^2))
        lo, _ = over_laws(lambda e: e[0] * (-0.5 / e[1]) - 15 * (-0.5 / e[1]).sqrt())
        _, hi = over_laws(lambda e: e[0] * (-0.5 / e[1]) + 15 * (-0.5 / e[1]).sqrt())
        z, log_w = _trapezoid_log_weights(lo, hi, points)
        log_h = torch.full_like(z, -0.5 * math.log(2 * math.pi))
        return Grid(z, (z, z * z), log_h, log_w)
    if domain == "positive":  # Gamma(a, b): eta = (a - 1, -b); u = log z

        def ends(e):
            a, b = e[0] + 1, -e[1]
            mode = torch.log(a / b)
            return mode - 45 / a - 10 / a.sqrt(), mode + torch.log1p(45 / a + 10 / a.sqrt())

        lo, _ = over_laws(lambda e: ends(e)[0])
        _, hi = over_laws(lambda e: ends(e)[1])
        centre = torch.stack([torch.log((e[0] + 1) / -e[1]) for e in etas]).mean(0)
        u, log_w = _sinh_log_weights(lo, hi, centre, points)
        return Grid(u.exp(), (u, u.exp()), torch.zeros_like(u), log_w + u)
    if domain == "unit_interval":  # Beta(a, b): eta = (a - 1, b - 1); u = logit z

        def ends(e):
            a, b = e[0] + 1, e[1] + 1
            mode, spread = torch.log(a / b), 10 * (1 / a + 1 / b).sqrt() + 5
            return mode - 45 / a - spread, mode + 45 / b + spread

        lo, _ = over_laws(lambda e: ends(e)[0])
        _, hi = over_laws(lambda e: ends(e)[1])
        centre = torch.stack([torch.log((e[0] + 1) / (e[1] + 1)) for e in etas]).mean(0)
        u, log_w = _sinh_log_weights(lo, hi, centre, points)
        log_z, log_1mz = F.logsigmoid(u), F.logsigmoid(-u)  # exact where z rounds to 1
        return Grid(torch.sigmoid(u), (log_z, log_1mz), torch.zeros_like(u),
                    log_w + log_z + log_1mz)  # fmt: skip
    if domain == "simplex":
        return _simplex_grid(etas, latent, points)
    raise ValueError(f"no grid for domain {domain!r}")


def _simplex_grid(etas, latent, points: int) -> Grid:
    """Dirichlet(a), eta = a - 1 ``[*latent, K]``: stick breaking in logit coordinates,
    z_j = v_j prod_{i<j} (1 - v_i), z_K = prod_{i<K} (1 - v_i), v_j = sigmoid(u_j), with
    dz/du = prod_j v_j (1 - v_j) prod_{i<j} (1 - v_i); a product grid of n = min(points,
    120) points per axis in u_j = mode + sinh(t) (n^(K-1) points in all)."""
    k = etas[0][0].shape[-1]
    n = min(points, 120)
    us, log_ws = [], []
    for j in range(k - 1):

        def ends(e, j=j):
            a = e[0] + 1
            left, right = a[..., j], a[..., j + 1 :].sum(-1)  # v_j ~ Beta(a_j, sum_{i>j} a_i)
            mode, spread = torch.log(left / right), 10 * (1 / left + 1 / right).sqrt() + 5
            return mode - 36 / left - spread, mode + 36 / right + spread

        lo = torch.stack([ends(e)[0] for e in etas]).amin(0)
        hi = torch.stack([ends(e)[1] for e in etas]).amax(0)
        centre = torch.stack([torch.log((e[0][..., j] + 1) / (e[0][..., j + 1 :] + 1).sum(-1))
                              for e in etas]).mean(0)  # the laws' modes in u_j  # fmt: skip
        u, log_w = _sinh_log_weights(lo, hi, centre, n)  # [n, *latent]
        shape = [1] * (k - 1)
        shape[j] = n
        us.append(u.reshape(*shape, *latent))
        log_ws.append(log_w.reshape(*shape, *latent))
    full = [n] * (k - 1) + list(latent)
    us = [u.expand(full).reshape(-1, *latent) for u in us]  # [G, *latent] per axis
    log_w = sum(w.expand(full).reshape(-1, *latent) for w in log_ws)
    log_z, log_rest = [], torch.zeros_like(us[0])  # log prod_{i<j} (1 - v_i)
    for u in us:
        log_z.append(log_rest + F.logsigmoid(u))
        log_w = log_w + log_rest + F.logsigmoid(u) + F.logsigmoid(-u)
        log_rest = log_rest + F.logsigmoid(-u)
    log_z = torch.stack(log_z + [log_rest], -1)  # [G, *latent, K]
    return Grid(log_z.exp(), (log_z,), torch.zeros_like(us[0]), log_w)


def reference_stats(name: str, z: Tensor, group_size: int | None = None) -> tuple[Tensor, ...]:
    """T(z) at given points z (draws), per the docstring conventions."""
    z = z.to(torch.float64)
    if name.startswith("gaussian"):
        return (z, z * z)
    if name in ("bernoulli", "poisson"):
        return (z,)
    if name == "categorical":
        return (torch.eye(group_size, dtype=torch.float64)[z.long()],)
    if name == "gamma":
        return (z.log(), z)
    if name == "beta":
        return (z.log(), torch.log1p(-z))
    if name == "dirichlet":
        return (z.log(),)
    if name == "vonmises":
        return (torch.stack([z.cos(), z.sin()], -1),)
    raise ValueError(name)


def reference_log_h(name: str, z: Tensor) -> Tensor:
    """log h(z) at given points z, latent-shaped."""
    z = z.to(torch.float64)
    if name.startswith("gaussian"):
        return torch.full_like(z, -0.5 * math.log(2 * math.pi))
    if name == "poisson":
        return -torch.from_numpy(scipy.special.gammaln(z.numpy() + 1))
    return torch.zeros(z.shape[:-1] if name == "dirichlet" else z.shape, dtype=torch.float64)


def reference_inner(name: str, eta: tuple[Tensor, ...], stats: tuple[Tensor, ...]) -> Tensor:
    """<eta, T>, summed over a statistic axis where the family has one."""
    total = sum(e * t for e, t in zip(eta, stats, strict=True))
    return total.sum(-1) if REFERENCE_FAMILIES[name][1] else total


def reference_log_normalizer(name: str, eta: tuple[Tensor, ...], **grid_kw) -> Tensor:
    """A(eta) = log sum/integral h(z) exp(<eta, T(z)>) on ``reference_grid``, latent-shaped
    (differentiable in eta)."""
    g = reference_grid(name, eta, **grid_kw)
    return torch.logsumexp(g.log_w + g.log_h + reference_inner(name, eta, g.stats), 0)


def independent_log_prob(family: Family, params: tuple[Tensor, ...], z: Tensor) -> Tensor:
    """log F(z; params) from an implementation that is not the library's: torch's
    ``log_prob`` where ``family.distribution`` is a torch class, scipy's Bessel function
    for the von Mises (whose torch-class ``log_prob`` the library overrides)."""
    d = family.distribution(params)
    if not type(d).log_prob.__module__.startswith("pyro_bll"):
        return d.log_prob(z)
    if family.name != "vonmises":
        raise ValueError(f"{family.name}: no independent log-density")
    eta = params[0].detach().to(torch.float64).numpy()  # the pair is (kappa cos mu, kappa sin mu)
    kappa, loc = np.hypot(eta[..., 0], eta[..., 1]), np.arctan2(eta[..., 1], eta[..., 0])
    zz = z.detach().to(torch.float64).numpy()
    lp = kappa * np.cos(zz - loc) - math.log(2 * math.pi) - np.log(scipy.special.i0e(kappa)) - kappa
    return torch.from_numpy(np.asarray(lp))
