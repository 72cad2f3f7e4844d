"""The block-local ELBO: Pyro's per-site ELBO terms, grouped into one loss per block.

For block k (docs/math.md §2; the paper's Eq. 3-4):

    l_k = KL(rho_k || alpha_k) - E_{rho_k}[log q_k(y | z_k)] + lambda * CE_k

Each term is read off a Pyro site whose block is k (``pyro_bll.core.tags``: the model's
``infer={"block": k}`` or ``pyro_bll.block(k)``; an untagged program is one block):

* latent site ``z`` (guide rho, model alpha): the analytic KL through
  ``torch.distributions.kl_divergence`` where one is registered and model and guide site
  agree on scale and mask (``analytic_kl``; scaled and masked as TraceMeanField_ELBO
  does), else the single-sample estimate log rho(z) - log alpha(z) as in Trace_ELBO;
* observed sites: minus the closed-form expectation or bound when the site names its
  latent (``infer={"latent": "z"}``) and its distribution offers
  ``expected_log_prob(value, rho)`` (``analytic_likelihood``), else -log p(y | ...) at the
  guide's draws;
* factor sites (``pyro.factor``, the chain's ``pred_k``): minus the factor;
  ``pyro.deterministic`` sites cost nothing.

Gradients. Reparameterised sites are differentiated pathwise. Every non-reparameterised
guide site r of block k gets a score-function term

    (log rho_r(z_r) - stop_grad(.)) * stop_grad(C_r - b_r)

where C_r is the part of block k's cost downstream of z_r, Rao-Blackwellised over the
plates r sits in (as Pyro's Trace_ELBO / TraceGraph_ELBO do), and b_r an optional
leave-one-out baseline over those plates. ``dependencies="graph"`` finds the downstream
costs by provenance tracking (TraceGraph_ELBO's method); ``dependencies="block"`` puts
the whole block's cost on every site (Trace_ELBO's). Only block k's own costs enter, so
block k's gradient is an unbiased estimate of the gradient of l_k with the block's inputs
held fixed; on a single-block program that is the ELBO's gradient. An observed site that
names its latent (``infer={"latent": ...}``) and is evaluated at a draw declares that a
label at position t depends on z at position t only: it carries its own per-position
score function (``_per_label``) and leaves r's generic term.

Vectorised blocks. A site inside ``pyro_bll.blocks_plate`` holds several blocks along a
batch axis (``tags.BlockAxis``): its terms are split along that axis, slice i going to block
``first + i``. Its score-function term, if it has one, reads only the costs of the same
axis, and no baseline is averaged across blocks.

The losses are summed over the batch, as Pyro's ELBOs are, and averaged over
``num_particles``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.infer.util import MultiFrameTensor, is_validation_enabled
from pyro.ops.provenance import detach_provenance, get_provenance
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape
from torch import Tensor
from torch.distributions import Independent, kl_divergence

from pyro_bll.core.step_cache import StepCache, active_cache, step_cache
from pyro_bll.core.tags import MODEL_BLOCK, BlockAxis, RecordModelTags

KINDS = ("kl", "likelihood", "pred")
Dependencies = Literal["graph", "block"]


@dataclass
class BlockLosses:
    """Per-block local losses ``[N]``, their sum, and a named breakdown per block."""

    per_block: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)  # name -> [N]

    @property
    def total(self) -> Tensor:
        return self.per_block.sum()


@dataclass
class _Cost:
    """One site's cost in a block: ``value`` has the site's batch shape (scaled, masked)."""

    block: int | BlockAxis
    kind: str
    value: Tensor
    frames: Any  # the site's cond_indep_stack (plates)
    handled: str | None = None  # a latent whose score function this term already carries


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


def _same(a: Any, b: Any) -> bool:
    """Equal scales or masks (numbers, tensors or None)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
            return False
        return bool(torch.equal(a, b))
    return a == b


def _span(block: int | BlockAxis) -> range:
    """The blocks a site's terms go to: its one block, or its axis's blocks."""
    return block.blocks if isinstance(block, BlockAxis) else range(block, block + 1)


def _overlap(a: int | BlockAxis, b: int | BlockAxis) -> bool:
    """Whether two sites' blocks share a block."""
    ra, rb = _span(a), _span(b)
    return ra.start < rb.stop and rb.start < ra.stop


def _leave_one_out(cost: Tensor, dims: list[int]) -> Tensor:
    """The mean of the other elements' cost over ``dims``: a baseline independent of each
    element's own draw (elements of a plate are conditionally independent)."""
    n = math.prod(cost.shape[d] for d in dims)
    if n < 2:
        return torch.zeros_like(cost)
    return (cost.sum(dims, keepdim=True) - cost) / (n - 1)


class BlockLocalELBO(ELBO):
    """A Pyro ELBO whose loss is the sum of block-local losses.

    A drop-in ELBO: works with ``pyro.infer.SVI`` (``loss``, ``loss_and_grads``) and with a
    plain torch optimiser (``differentiable_loss`` or ``block_losses``), on any model and
    guide written in Pyro, whose sites are tagged with their block (``pyro_bll.block``).

    Args:
        num_blocks: number of blocks N; default: one more than the largest tag.
        num_particles: Monte Carlo particles averaged per step.
        vectorize_particles: draw the particles in one vectorised pass (a plate at dim
            ``-max_plate_nesting - 1``); sound where the program broadcasts over it.
        max_plate_nesting: as in Pyro's ELBOs (guessed from a trace where needed).
        analytic_kl: use the registered KL(rho || alpha) where model and guide site
            agree on scale and mask.
        analytic_likelihood: use a site's ``expected_log_prob`` when it names its latent.
        dependencies: "graph" (provenance-tracked downstream costs) or "block" (the whole
            block's cost) for the score-function terms of non-reparameterised sites.
        baseline: subtract a leave-one-out mean over the plates of a site whose
            downstream costs all lie in those plates.
    """

    def __init__(
        self,
        num_blocks: int | None = None,
        *,
        num_particles: int = 1,
        vectorize_particles: bool = False,
        max_plate_nesting: float = float("inf"),
        analytic_kl: bool = True,
        analytic_likelihood: bool = True,
        dependencies: Dependencies = "graph",
        baseline: bool = True,
    ) -> None:
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if dependencies not in ("graph", "block"):
            raise ValueError(f"dependencies must be 'graph' or 'block', got {dependencies!r}")
        self.num_blocks = num_blocks
        self.analytic_kl = analytic_kl
        self.analytic_likelihood = analytic_likelihood
        self.dependencies = dependencies
        self.baseline = baseline

    # ---- traces ------------------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        """Guide, then model replayed on the guide's draws, sharing the active step cache.

        Unlike ``get_importance_trace`` no log-density is computed up front: the analytic
        KL needs none, and ``_log_prob`` computes the few that are needed on demand.
        """
        with TrackNonReparam() if self.dependencies == "graph" else nullcontext():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            replayed = poutine.replay(RecordModelTags()(model), trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample" and not site_is_subsample(site):
                        _log_prob(site)  # the shape check reads it
                        check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace

    def _particle_traces(self, model, guide, args, kwargs) -> Iterator[tuple[Any, Any]]:
        """One (model, guide) trace pair per particle (one for vectorised particles), each
        under its own step cache (the caller's, if one is active, for particle 0)."""
        outer = active_cache()
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            with step_cache(outer):
                yield self._get_vectorized_trace(model, guide, args, kwargs)
            return
        for i in range(self.num_particles):
            cache = StepCache() if outer is None else outer.for_particle(i)
            with step_cache(cache):
                yield self._get_trace(model, guide, args, kwargs)

    # ---- the losses --------------------------------------------------------------------
    def block_losses(self, model, guide, *args, **kwargs) -> BlockLosses:
        """Run guide and model (once per particle); the per-block losses and their terms."""
        parts = [
            self._particle_losses(m, g)
            for m, g in self._particle_traces(model, guide, args, kwargs)
        ]
        n = len(parts[0][0])
        if any(len(p[0]) != n for p in parts):
            raise ValueError("the particles of one step have different numbers of blocks")
        terms = {kind: sum(p[1][kind] for p in parts) / self.num_particles for kind in KINDS}
        per_block = sum(p[0] for p in parts) / self.num_particles
        return BlockLosses(per_block=per_block, terms=terms)

    def _particle_losses(self, model_trace, guide_trace) -> tuple[Tensor, dict[str, Tensor]]:
        model_trace = prune_subsample_sites(model_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        blocks = self._site_blocks(model_trace, guide_trace)
        n = self.num_blocks
        if n is None:
            n = max((_span(b)[-1] for b in blocks.values()), default=0) + 1
        costs = self._costs(model_trace, guide_trace, blocks)
        scores = self._score_terms(guide_trace, blocks, costs)
        ref = costs[0].value if costs else torch.zeros(())  # dtype and device of the losses
        totals: dict[str, list[Tensor | float]] = {kind: [0.0] * n for kind in KINDS}
        for block, kind, value in [(c.block, c.kind, c.value) for c in costs] + [
            (k, "kl", term)
            for k, term in scores  # value zero: gradients only
        ]:
            if isinstance(block, BlockAxis):  # one slice per block
                for k, part in zip(block.blocks, block.split(value).unbind(0), strict=True):
                    totals[kind][k] = totals[kind][k] + part
            else:
                totals[kind][block] = totals[kind][block] + value.sum()
        stacked = {
            kind: detach_provenance(
                torch.stack([torch.as_tensor(v, dtype=ref.dtype, device=ref.device) for v in vs])
            )
            for kind, vs in totals.items()
        }
        return stacked["kl"] + stacked["likelihood"] + stacked["pred"], stacked

    def _site_blocks(self, model_trace, guide_trace) -> dict[str, int | BlockAxis]:
        """The block of every sample site: the model's tag, which a guide tag must match;
        an untagged program is one block."""
        tags: dict[str, int | None] = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["infer"].get("_deterministic"):
                continue
            own = site.get(MODEL_BLOCK, site["infer"].get("block"))
            g = guide_trace.nodes.get(name)
            theirs = None if g is None else g["infer"].get("block")
            if own is not None and theirs is not None and own != theirs:
                raise ValueError(
                    f"site {name!r} is in block {own} in the model but in block {theirs} in "
                    "the guide; tag it once, in the model, or make the tags agree"
                )
            tags[name] = own if own is not None else theirs
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and name not in model_trace.nodes:
                tags[name] = site["infer"].get("block")  # an auxiliary guide site
        tagged = {t for t in tags.values() if t is not None}
        untagged = [name for name, t in tags.items() if t is None]
        if untagged and (tagged - {0} or (self.num_blocks or 1) > 1):
            raise ValueError(
                f"site {untagged[0]!r} has no block: tag it with infer={{'block': k}} or "
                "wrap it in `with pyro_bll.block(k):`"
            )
        blocks = {name: 0 if t is None else t for name, t in tags.items()}
        for name, k in blocks.items():
            if isinstance(k, BlockAxis):
                pass
            elif isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"site {name!r} has block {k!r}; a block is an integer >= 0")
            if self.num_blocks is not None and _span(k)[-1] >= self.num_blocks:
                raise ValueError(
                    f"site {name!r} has block {_span(k)[-1]}, but the ELBO has "
                    f"{self.num_blocks} blocks (0 to {self.num_blocks - 1}); fix the tag or "
                    "BlockLocalELBO(num_blocks)"
                )
        return blocks

    def _costs(self, model_trace, guide_trace, blocks: dict[str, int | BlockAxis]) -> list[_Cost]:
        costs = []
        for name, site in model_trace.nodes.items():
            if name not in blocks:
                continue
            k, frames = blocks[name], site["cond_indep_stack"]
            if not site["is_observed"]:
                g = guide_trace.nodes.get(name)
                if g is None:
                    raise ValueError(f"latent site {name!r} is missing from the guide")
                costs.append(_Cost(k, "kl", self._kl(site, g), frames))
            elif site["infer"].get("is_auxiliary"):  # pyro.factor, the predictive loss
                costs.append(_Cost(k, "pred", -_log_prob(site), frames))
            else:
                value, handled = self._expected_log_lik(site, guide_trace)
                if handled is not None and isinstance(k, BlockAxis):
                    raise ValueError(
                        f"site {name!r} of blocks {k} is read at a draw of a latent without a "
                        "reparameterised sampler; give it an expected_log_prob, or use one "
                        "site per block"
                    )
                costs.append(_Cost(k, "likelihood", -value, frames, handled))
        for name, g in guide_trace.nodes.items():  # auxiliary guide sites: -entropy
            if g["type"] == "sample" and name not in model_trace.nodes:
                costs.append(_Cost(blocks[name], "kl", _log_prob(g), g["cond_indep_stack"]))
        return costs

    def _kl(self, model_site: dict, guide_site: dict) -> Tensor:
        """KL(rho || alpha) per batch element: analytic where registered and valid."""
        same = _same(model_site["scale"], guide_site["scale"]) and _same(
            model_site["mask"], guide_site["mask"]
        )
        if self.analytic_kl and same:
            try:
                kl = kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:  # torch has no analytic KL for this pair:
                pass  # fall back to the estimate below, as TraceMeanField_ELBO does
            else:
                return scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
        # single-sample estimate at the guide's draw: log rho(z) - log alpha(z)
        return _log_prob(guide_site) - _log_prob(model_site)

    def _expected_log_lik(self, site: dict, guide_trace) -> tuple[Tensor, str | None]:
        """E_rho[log q(y | z)] per batch element: closed form, or at the guide's draw.

        Returns the value and, for the per-position score function of a discrete latent
        named by ``infer["latent"]``, that latent's name (its term is then in the value).
        """
        latent = site["infer"].get("latent")
        rho_site = guide_trace.nodes.get(latent) if latent is not None else None
        base, mask, event = _unwrap(site["fn"])
        if self.analytic_likelihood and rho_site is not None and hasattr(base, "expected_log_prob"):
            value = base.expected_log_prob(site["value"], rho_site["fn"])  # [B, *L]
            if mask is not None:
                value = value * mask.to(value.dtype)
            return _sum_event(value, event) * site["scale"], None
        if rho_site is None or rho_site["fn"].has_rsample or site["mask"] is not None:
            return _log_prob(site), None  # scaled and masked
        log_q, log_rho, mask = _per_label(site, rho_site)
        value = _with_score_function(log_q, log_rho, mask)  # [B, *L]
        return _sum_event(value, event), latent

    def _score_terms(
        self, guide_trace, blocks: dict[str, int | BlockAxis], costs: list[_Cost]
    ) -> list[tuple[int | BlockAxis, Tensor]]:
        """(block, surrogate term) for every non-reparameterised guide site."""
        terms = []
        for name, g in guide_trace.nodes.items():
            if g["type"] != "sample" or g["fn"].has_rsample or name not in blocks:
                continue
            if g["is_observed"] or site_is_subsample(g):
                continue
            k = blocks[name]
            downstream = [
                c
                for c in costs
                if _overlap(c.block, k)
                and c.handled != name
                and (self.dependencies == "block" or name in get_provenance(c.value))
            ]
            if not downstream:
                continue
            if any(c.block != k for c in downstream):  # only an axis's own sites mix slices
                raise ValueError(
                    f"site {name!r} of blocks {k} has costs downstream of it outside its block "
                    "axis; put them in the same pyro_bll.blocks_plate, or use one site per block"
                )
            frames = g["cond_indep_stack"]
            multi = MultiFrameTensor(*((c.frames, detach_provenance(c.value)) for c in downstream))
            cost = multi.sum_to(frames)
            if not isinstance(cost, Tensor):
                continue
            cost = cost.detach()
            if self.baseline:
                across = k.dim if isinstance(k, BlockAxis) else None  # never across blocks
                shared = [
                    f.dim
                    for f in frames
                    if f.vectorized and all(f in c.frames for c in downstream)
                    and cost.dim() >= -f.dim and cost.shape[f.dim] > 1 and f.dim != across
                ]  # fmt: skip
                if shared:
                    cost = cost - _leave_one_out(cost, shared)
            log_rho = detach_provenance(
                g["fn"].log_prob(g["value"], *g["args"], **g["kwargs"])
            )  # the score function: neither scaled nor masked, as in Pyro
            term = (log_rho - log_rho.detach()) * cost
            terms.append((k, term if isinstance(k, BlockAxis) else term.sum()))
        return terms

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
