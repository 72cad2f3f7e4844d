"""The block-local ELBO: Pyro's per-site ELBO terms, grouped into one loss per block.

For block k (docs/math.md §2; the paper's Eq. 3-4):

    l_k = KL(rho_k || alpha_k) - E_{rho_k}[log q_k(y | z_k)] + lambda * CE_k

Each term is read off a Pyro site tagged ``infer["block"] = k``:

* latent site ``z_k`` (guide rho_k, model alpha_k): the analytic KL through
  ``torch.distributions.kl_divergence`` where one is registered (``analytic_kl``), else the
  single-sample estimate log rho_k(z) - log alpha_k(z) as in ``Trace_ELBO``;
* observed sites (``y_k``, ``y``): minus the closed-form expectation or bound when the
  site's distribution offers ``expected_log_prob(value, rho)`` (the prototype likelihood's
  sampling-free bound, the affine-Gaussian head) and ``analytic_likelihood`` is on; else
  -log q_k(y | z_k) at the guide's draw: pathwise for reparameterisable rho, and for
  discrete rho with one score-function term per labelled position (``_per_label``);
* factor sites (``pred_k``): minus the factor.

With block inputs detached in the chain, d(sum_j l_j)/d(theta_k, phi_k) = d l_k / d(...),
so minimising the sum trains every block on its own loss. The losses are summed over the
batch, as Pyro's ELBOs are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape
from torch import Tensor
from torch.distributions import Independent, kl_divergence

from pyro_bll.core.step_cache import StepCache


@dataclass
class BlockLosses:
    """Per-block local losses ``[N]``, their sum, and a named breakdown per block."""

    per_block: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)  # name -> [N]

    @property
    def total(self) -> Tensor:
        return self.per_block.sum()


def _log_prob(site: dict) -> Tensor:
    """The site's scaled and masked log-density per batch element, computed once."""
    if "log_prob" not in site:
        lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        site["log_prob"] = scale_and_mask(lp, site["scale"], site["mask"])
    return site["log_prob"]


def _with_score_function(cost: Tensor, log_rho: Tensor, valid: Tensor | None = None) -> Tensor:
    """cost ``[B, *L]`` plus the DiCE score-function term (value zero, gradient unbiased).

    Adds (cost - b) * (log rho - stop_grad(log rho)) element by element, with b the
    leave-one-out mean of the detached cost over the batch axis at the same position,
    taken over the ``valid`` (observed) entries only; invalid entries get no term.
    """
    c = cost.detach()
    v = torch.ones_like(c) if valid is None else valid.to(c.dtype).expand_as(c)
    others = v.sum(0, keepdim=True) - v  # [B, *L] valid entries besides this one
    total = (c * v).sum(0, keepdim=True)
    baseline = torch.where(others > 0, (total - c * v) / others.clamp(min=1), torch.zeros_like(c))
    return cost + v * (c - baseline) * (log_rho - log_rho.detach())


def _unwrap(fn) -> tuple[Any, Tensor | None, int]:
    """(base distribution, mask or None, reinterpreted event axes) of a site's ``fn``.

    Undoes the ``.mask(mask).to_event(n)`` that ``BLLChain`` wraps observed and latent
    sites in, so that per-position terms ``[B, *L]`` can be formed before the event sum.
    """
    event, mask = 0, None
    while True:
        if isinstance(fn, Independent):
            event += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, MaskedDistribution):
            mask = fn._mask if mask is None else mask & fn._mask
            fn = fn.base_dist
        else:
            return fn, mask, event


def _sum_event(value: Tensor, event: int) -> Tensor:
    """``[B, *E]`` -> ``[B]``: sum the trailing ``event`` axes."""
    return value.sum(tuple(range(-event, 0))) if event else value


def _per_label(site: dict, rho_site: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    """log q(y | z) ``[B, *L]`` (masked), log rho(z) restricted to the latents behind each
    label ``[B, *L]``, and the label mask.

    A label at position t of a sequence depends on z at position t only, so its score
    function is grad log rho(z_t), not grad log rho(z) of the whole sequence: the other
    positions' log-densities would add variance and no signal. For one label per example
    (images) the whole latent is behind it.
    """
    fn, mask, _ = _unwrap(site["fn"])
    log_q = fn.log_prob(site["value"])  # [B, *L]
    if mask is not None:
        log_q = log_q * mask.to(log_q.dtype)
    rho, _, _ = _unwrap(rho_site["fn"])
    log_rho = rho.log_prob(rho_site["value"])  # [B, *L, *rest]
    extra = log_rho.dim() - log_q.dim()
    log_rho = log_rho.sum(tuple(range(-extra, 0))) if extra > 0 else log_rho
    return log_q * site["scale"], log_rho, mask


def _scaled_sum(value: Tensor, site: dict) -> Tensor:
    """Sum a per-example term, applying the site's plate scale (subsampling)."""
    return (value * site["scale"]).sum()


class BlockLocalELBO(ELBO):
    """A Pyro ELBO whose loss is the sum of block-local losses.

    Works with ``pyro.infer.SVI`` (``loss``, ``loss_and_grads``) and with a plain torch
    optimiser (``differentiable_loss`` or ``block_losses``). The model and guide must accept
    a ``cache`` keyword (``BLLChain.model`` / ``.guide`` do): one ``StepCache`` is passed to both
    so the forward messages are computed once per step.
    """

    def __init__(
        self,
        num_blocks: int,
        *,
        analytic_kl: bool = True,
        analytic_likelihood: bool = True,
        max_plate_nesting: int = 1,
    ) -> None:
        super().__init__(num_particles=1, max_plate_nesting=max_plate_nesting)
        self.num_blocks = num_blocks
        self.analytic_kl = analytic_kl
        self.analytic_likelihood = analytic_likelihood

    def _get_trace(self, model, guide, args, kwargs):
        """Guide, then model replayed on the guide's draws, sharing one message cache.

        Unlike ``get_importance_trace`` no log-density is computed up front: the analytic
        KL needs none, and ``_log_prob`` computes the few that are needed on demand.
        """
        cache = kwargs.get("cache")
        kwargs = {**kwargs, "cache": StepCache() if cache is None else cache}
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample" and not site_is_subsample(site):
                        _log_prob(site)  # the shape check reads it
                        check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace

    def block_losses(self, model, guide, *args, **kwargs) -> BlockLosses:
        """Run guide and model once; return the per-block losses and their terms."""
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        model_trace = prune_subsample_sites(model_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        kinds = ("kl", "likelihood", "pred")
        terms: dict[str, list[Tensor | float]] = {kind: [0.0] * self.num_blocks for kind in kinds}

        def add(kind: str, k: int, value: Tensor) -> None:
            terms[kind][k] = terms[kind][k] + value

        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            k = site["infer"].get("block")
            if k is None:
                raise ValueError(f"model site {name!r} has no infer['block'] tag")
            if site["is_observed"]:
                kind = "pred" if site["infer"].get("is_auxiliary") else "likelihood"
                add(kind, k, -self._expected_log_lik(site, guide_trace))
                continue
            g = guide_trace.nodes.get(name)
            if g is None:
                raise ValueError(f"latent site {name!r} is missing from the guide")
            add("kl", k, self._kl(site, g))
        ref = next(v for vs in terms.values() for v in vs if isinstance(v, Tensor))
        stacked = {
            kind: torch.stack([torch.as_tensor(v, dtype=ref.dtype, device=ref.device) for v in vs])
            for kind, vs in terms.items()
        }
        per_block = stacked["kl"] + stacked["likelihood"] + stacked["pred"]
        return BlockLosses(per_block=per_block, terms=stacked)

    def _kl(self, model_site: dict, guide_site: dict) -> Tensor:
        if self.analytic_kl:
            try:
                kl = kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:  # torch has no analytic KL for this pair:
                pass  # fall back to the estimate below, as TraceMeanField_ELBO does
            else:
                return _scaled_sum(kl, guide_site)
        # single-sample estimate at the guide's draw: log rho(z) - log alpha(z)
        diff = _log_prob(guide_site) - _log_prob(model_site)  # [B]
        if not guide_site["fn"].has_rsample:
            diff = _with_score_function(diff, _log_prob(guide_site))
        return diff.sum()

    def _expected_log_lik(self, site: dict, guide_trace) -> Tensor:
        """E_rho[log q(y | z)]: closed form, pathwise, or score function (discrete z).

        For a non-reparameterisable rho the surrogate (DiCE form) keeps the value of the
        single-sample estimate log q(y | z) and adds the score-function gradient

            (log q(y | z) - b) * grad log rho(z),

        with b the leave-one-out batch mean of log q: only the block's own likelihood
        enters, so the estimator stays local.
        """
        latent = site["infer"].get("latent")
        rho_site = guide_trace.nodes[latent] if latent is not None else None
        base, mask, event = _unwrap(site["fn"])
        if self.analytic_likelihood and rho_site is not None and hasattr(base, "expected_log_prob"):
            value = base.expected_log_prob(site["value"], rho_site["fn"])  # [B, *L]
            if mask is not None:
                value = value * mask.to(value.dtype)
            return _scaled_sum(_sum_event(value, event), site)
        if rho_site is None or rho_site["fn"].has_rsample:
            return _log_prob(site).sum()  # [B], scaled and masked
        log_q, log_rho, mask = _per_label(site, rho_site)
        return _with_score_function(log_q, log_rho, mask).sum()

    # ---- the pyro.infer.ELBO interface -------------------------------------------------
    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        return self.block_losses(model, guide, *args, **kwargs).total

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.item()
