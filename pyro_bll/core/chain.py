"""The latent chain as a Pyro program: forward blocks as model, feedback network as guide.

Model (the forward network N_A, conditional on x; docs/math.md §1):

    alpha_k = F_k.params( f_k( m(alpha_{k-1}) ) )       alpha_0 = x
    z_k ~ F_k(alpha_k)                                  site "z_k", infer["block"] = k
    y   ~ q_k(y | z_k)          for k < N               site "y_k"   (local likelihood)
    pred_k = -lambda * CE(h_k(m(alpha_k)), y)           site "pred_k" (predictive loss)
    y   ~ f_out(m(alpha_N))  or  f_out(z_N)             site "y", block N

Guide (the feedback network N_B; structured, it reuses alpha_k):

    beta_k = F_k.feedback_potential( g_k(y) ) * mask    natural parameters
    z_k ~ rho_k = F_k.from_natural( eta(alpha_k) + beta_k )

``m`` is chosen by ``propagate``: "mean" (the paper: E_alpha[z]), "params" (the full
parameter tuple, e.g. mean and scale) or "sample" (the site's draw of z_k). With
``detach=True`` every block input is detached, so each block's parameters get gradients
only from its own sites. Forward messages are computed once per step and shared by guide
and model through the ``StepCache`` that ``BlockLocalELBO`` makes active while it runs
both (``pyro_bll.core.step_cache``; model and guide take no argument for it); the training
step may put a ``NoiseKey`` in ``cache.noise`` so that every block draws z_k from its
own stream (``pyro_bll.core.noise``). ``segment=(a, b)`` runs blocks a..b-1 only, with ``x``
then block a's input; the guide leaves the outgoing value m(alpha_{b-1}) in
``cache.outgoing`` (the block-parallel runtime, ``pyro_bll.distributed``).

Without a label, ``model(x)`` is the forward network's generative program: z_k ~ alpha_k
and y ~ f_out, so ``pyro.infer.Predictive(chain.model, num_samples=S)(x)`` draws
predictions ``[S, B(, T)]``; with ``guide=chain.guide`` and labels it draws z_k ~ rho_k.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import pyro
from pyro.ops.provenance import detach_provenance
from pyro.params.param_store import param_with_module_name
from torch import Tensor, nn
from torch.distributions import Distribution

from pyro_bll.core import stacked_program
from pyro_bll.core.likelihoods import PrototypeLikelihood, masked_cross_entropy
from pyro_bll.core.noise import block_noise
from pyro_bll.core.step_cache import StepCache, active_cache
from pyro_bll.core.tags import block_factor
from pyro_bll.families import Family, Natural, Params
from pyro_bll.families.base import mask_potential

if TYPE_CHECKING:
    from pyro_bll.core.critic import Critic
    from pyro_bll.core.lookahead import Lookahead
    from pyro_bll.guides.spatial import SpatialMessage

Propagate = Literal["mean", "params", "sample"]
LikelihoodEstimator = Literal["bound", "sample"]
LIKELIHOOD_ESTIMATORS: tuple[str, ...] = ("bound", "sample")
# parameters some chain registered with the param store (weakly held): a loaded store's
# values are not among them, another chain's are
_REGISTERED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def _registered_elsewhere(tensor: Tensor) -> bool:
    return _REGISTERED.get(id(tensor)) is tensor


class LocalLikelihood(Protocol):
    """q_k(y | z_k) for block k: returns a distribution with the labels' batch shape."""

    def __call__(
        self, chain: BLLChain, k: int, z: Tensor, cache: StepCache | None = None
    ) -> Distribution: ...


def detach_message(inp: Any) -> Any:
    """A block input or forward message (a tensor or a tuple of parameters) without its
    graph."""
    if isinstance(inp, tuple):
        return tuple(t.detach() for t in inp)
    return inp.detach()


class BLLChain(nn.Module):
    """A forward network cut into blocks, each read as a latent family, with its guide.

    Args:
        blocks: block k maps its input (``x`` for k = 0) to raw parameters
            ``[..., family.n_raw * C]``.
        families: one family per block (a single family is used for all blocks).
        feedback: the feedback network (``pyro_bll.guides``): ``feedback(y, k)`` gives block
            k's raw potential, ``class_outputs(k)`` the one of every label (prototype
            likelihood), ``block_module(k)`` the parameters block k owns.
        head: the output head f_out with ``distribution(h)``; the last block's likelihood.
        event_dim: latent axes per example (1 for ``[B, C]``, 2 for ``[B, T, C]``, 3 for
            feature maps ``[B, H, W, C]``).
        label_event_dim: label axes per example (default ``event_dim - 1``: one label per
            position, as for sequences ``[B, T]``; 0 for one label per image ``[B]``).
        spatial_message: how a per-example feedback potential meets a feature map
            (``pyro_bll.guides.spatial``: pool or broadcast); ``None`` when the potential
            already has the latent's shape.
        local_likelihoods: "prototype" (tied to the feedback weights), ``None`` (off), or
            one ``LocalLikelihood`` per block below the last.
        pred_heads: optional predictive heads (Noekland & Eidnes 2019) for blocks < N.
        pred_weight: lambda, the weight of the predictive cross-entropy.
        propagate: what block k+1 consumes (see module docstring).
        likelihood: how E_rho[log q_k(y | z_k)] of the prototype likelihood is estimated:
            "bound" (the sampling-free lower bound, ``likelihoods.prototype_bound``) or
            "sample" (at the guide's draw: pathwise, or score function for discrete z).
        head_input: "mean" feeds m(alpha_N) to f_out, "sample" feeds z_N. With "mean" no
            likelihood depends on z_N, so the last block has no latent site (its KL would
            be a label-driven pull that no ELBO term pays for; docs/math.md).
        detach: stop gradients at block boundaries (block-local learning).
        register_params: register the parameters with Pyro's param store (``pyro.module``,
            with ``update_module_params``) so that ``pyro.infer.SVI`` with ``pyro.optim``
            sees them, and a saved param store loads back into a newly built chain.
            Training with a torch optimiser does not need it.
        name: the chain's prefix in the param store; the default comes from the
            structure (``bll_chain_<N>_<families>``), so a chain rebuilt the same way finds
            the parameters of a loaded param store. Two chains that train side by side in
            one store need two names: the chain that registers last owns the entries.

    Setting ``chain.stack = True`` (``--method bll`` does) computes neighbouring blocks
    whose latent sites agree as one vectorised site per group when guide and model run
    under a step cache (``pyro_bll.core.stacked_program``; the same losses and gradients).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        families: Family | Sequence[Family],
        feedback: nn.Module,
        head: nn.Module,
        *,
        event_dim: int = 1,
        label_event_dim: int | None = None,
        spatial_message: SpatialMessage | None = None,
        local_likelihoods: str | Sequence[LocalLikelihood] | None = "prototype",
        pred_heads: Sequence[nn.Module] | None = None,
        pred_weight: float = 1.0,
        propagate: Propagate = "mean",
        likelihood: LikelihoodEstimator = "bound",
        head_input: Literal["mean", "sample"] = "mean",
        detach: bool = True,
        register_params: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        n = len(blocks)
        if n < 1:
            raise ValueError("a chain needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.families = [families] * n if isinstance(families, Family) else list(families)
        if len(self.families) != n:
            raise ValueError(f"{len(self.families)} families for {n} blocks")
        self.feedback = feedback
        self.head = head
        self.event_dim = event_dim
        self.label_event_dim = event_dim - 1 if label_event_dim is None else label_event_dim
        self.spatial_message = spatial_message
        if local_likelihoods == "prototype":
            local_likelihoods = [_prototype] * (n - 1)
        elif isinstance(local_likelihoods, str):
            raise ValueError(f"unknown local likelihood {local_likelihoods!r}; use 'prototype'")
        self.local_likelihoods = None if local_likelihoods is None else list(local_likelihoods)
        self.pred_heads = None if pred_heads is None else nn.ModuleList(pred_heads)
        self.pred_weight = pred_weight
        self.propagate = propagate
        if likelihood not in LIKELIHOOD_ESTIMATORS:
            raise ValueError(
                f"unknown likelihood estimator {likelihood!r}; valid: "
                f"{', '.join(LIKELIHOOD_ESTIMATORS)}"
            )
        self.likelihood = likelihood
        self.head_input = head_input
        self.detach = detach
        self.register_params = register_params
        # compute the terms of blocks whose sites agree together (pyro_bll.core.stacked);
        # the training methods turn it on, Predictive and the diagnostics see one site per block
        self.stack = False
        self.lookahead: Lookahead | None = None  # use_lookahead: the backward message
        self.critic: Critic | None = None  # use_critic: the backward message
        kinds = "-".join(dict.fromkeys(f.name for f in self.families))
        self.name = f"bll_chain_{n}_{kinds}" if name is None else name

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def has_latent(self, k: int) -> bool:
        """Block k has a site z_k unless it is the last one and the head reads m(alpha_N)."""
        return k < self.num_blocks - 1 or self.head_input == "sample"

    # ---- messages ---------------------------------------------------------------------
    def forward_message(self, k: int, inp: Any, cache: StepCache | None = None) -> Params:
        """alpha_k = F_k.params(f_k(inp)); cached per step so blocks run once."""
        if cache is not None and k in cache.alpha:
            return cache.alpha[k]
        if self.detach and k > 0:  # no gradient crosses the boundary (provenance does)
            inp = detach_message(inp)
            if cache is not None and cache.sweep is not None:  # a leaf the sweep reads
                inp = cache.sweep.tap(k, inp)
        alpha = self.families[k].params(self.blocks[k](inp))
        if cache is not None:
            cache.alpha[k] = alpha
        return alpha

    def next_input(self, k: int, alpha: Params, z: Tensor | None) -> Any:
        """m(alpha_k): the input of block k + 1."""
        if self.propagate == "mean":
            return self.families[k].mean(alpha)
        if self.propagate == "params":
            return alpha
        if z is None:
            raise ValueError("propagate='sample' needs a draw of z_k")
        return self.families[k].features(z).to(alpha[0].dtype)

    def feedback_message(
        self, k: int, y: Tensor, mask: Tensor | None, alpha: Params | None = None
    ) -> Natural:
        """beta_k ``[..., C]`` per natural parameter; zero (no information) where masked.

        With a ``spatial_message`` the potential is placed on alpha_k's map (needs alpha).
        """
        beta = self.families[k].feedback_potential(self.feedback(y, k))
        if self.spatial_message is not None:
            if alpha is None:
                raise ValueError("a chain with a spatial message needs alpha_k for beta_k")
            beta = self.spatial_message.place(beta, alpha)
        return mask_potential(beta, mask)

    def class_potentials(self, k: int) -> Natural:
        """beta_c for every class c, each ``[num_classes, C]`` (prototype likelihood)."""
        return self.families[k].feedback_potential(self.feedback.class_outputs(k))

    def predict_logits(self, x: Tensor) -> Tensor:
        """Deterministic prediction f_out(m(alpha_N)) (z_k replaced by E_alpha z_k)."""
        inp: Any = x
        for k in range(self.num_blocks):
            alpha = self.families[k].params(self.blocks[k](inp))
            inp = alpha if self.propagate == "params" else self.families[k].mean(alpha)
        return self.head(self.families[-1].mean(alpha))

    # ---- the Pyro program -------------------------------------------------------------
    def latent_params(self, k: int, alpha: Params, cache: StepCache | None = None) -> Params:
        """Parameters of site z_k: alpha_k itself, or the law of the channel summary the
        chain's ``spatial_message`` puts the latent on (``--message mean``: the law of the
        map's mean ``[B, C]``). With the step's ``cache`` it is computed once for guide and
        model."""
        if self.spatial_message is None:
            return alpha
        if cache is not None and k in cache.latent:
            return cache.latent[k]
        law = self.spatial_message.latent_params(self.families[k], alpha)
        if cache is not None:
            cache.latent[k] = law
        return law

    @property
    def latent_event_dim(self) -> int:
        """Event axes of every site z_k."""
        if self.spatial_message is None:
            return self.event_dim
        return self.spatial_message.latent_event_dim(self.event_dim)

    def _latent(self, k: int, params: Params) -> Distribution:
        return self.families[k].distribution(params).to_event(self.latent_event_dim)

    def _observed(self, fn: Distribution, mask: Tensor | None) -> Distribution:
        if mask is not None:
            fn = fn.mask(mask)
        return fn.to_event(self.label_event_dim)

    def _segment(self, segment: tuple[int, int] | None) -> range:
        if segment is None:
            return range(self.num_blocks)
        a, b = segment
        if not 0 <= a < b <= self.num_blocks:
            raise ValueError(f"segment {segment} is not a range of the {self.num_blocks} blocks")
        return range(a, b)

    def _register(self) -> None:
        """``pyro.module`` with ``update_module_params``: values loaded into the param store
        (``param_store.load``) flow into this chain. Entries that another chain built in
        this process registered under the same name are replaced by this chain's own
        parameters, so the chain that runs is the chain that trains."""
        if not self.register_params:
            return
        store = pyro.get_param_store()
        mine = {id(p) for p in self.parameters()}
        for pname, _ in self.named_parameters():
            key = param_with_module_name(self.name, pname)
            held = store._params.get(key)
            if held is not None and id(held) not in mine and _registered_elsewhere(held):
                del store[key]
        pyro.module(self.name, self, update_module_params=True)
        _REGISTERED.update((id(p), p) for p in self.parameters())

    def _batch_size(self, x: Any, y: Tensor | None) -> int:
        if y is not None:
            return y.shape[0]
        return (x[0] if isinstance(x, tuple) else x).shape[0]

    def guide(
        self,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        segment: tuple[int, int] | None = None,
    ):
        """Structured guide: rho_k proportional to alpha_k * beta_k for every block."""
        self._register()
        cache = active_cache()
        inp: Any = x
        noise = None if cache is None else cache.noise
        if self.stacks(cache):  # groups of agreeing blocks as one site each
            return stacked_program.guide(self, x, y, mask, self._segment(segment), cache)
        with pyro.plate("data", y.shape[0], dim=-1):
            for k in self._segment(segment):
                alpha = self.forward_message(k, inp, cache)
                z = self._guide_site(k, alpha, y, mask, cache, noise)
                if k < self.num_blocks - 1:  # what block k + 1 (or the next rank) reads
                    inp = self.next_input(k, alpha, z)
        if cache is not None:  # plain tensors: the value may cross a process boundary
            cache.outgoing = plain_message(inp)

    def _guide_site(self, k: int, alpha: Params, y, mask, cache, noise) -> Tensor | None:
        """Block k's guide site ``z_k ~ rho_k`` (none where the block has no latent)."""
        if not self.has_latent(k):
            return None
        site = self.latent_params(k, alpha, cache)
        rho = self.families[k].posterior(site, self.feedback_message(k, y, mask, site))
        if cache is not None:
            cache.rho[k] = rho  # the prototype bound reads it in the model
        with block_noise(noise, k, rho[0].device):
            return pyro.sample(f"z_{k}", self._latent(k, rho), infer={"block": k})

    def model(
        self,
        x: Tensor,
        y: Tensor | None = None,
        mask: Tensor | None = None,
        segment: tuple[int, int] | None = None,
    ):
        """The forward network as a latent chain with block-local likelihood sites.

        With ``y=None`` the local likelihoods and predictive losses (which need a label)
        are left out and the output site ``y`` is sampled: the posterior predictive."""
        self._register()
        cache = active_cache()
        inp: Any = x
        last = self.num_blocks - 1
        blocks = self._segment(segment)
        labelled = y is not None
        together = labelled and self.stacks(cache)
        with pyro.plate("data", self._batch_size(x, y), dim=-1):
            if together:  # the guide ran every block: the groups' sites, then the head
                z = stacked_program.model(self, y, mask, blocks, cache)
                alpha = cache.alpha[blocks[-1]]
            else:
                for k in blocks:
                    alpha = self.forward_message(k, inp, cache)
                    z = self._model_site(k, alpha, cache)
                    if labelled and k < last:
                        self._local_sites(k, z, alpha, y, mask, cache)
                    if k < last:
                        inp = self.next_input(k, alpha, z)
            if blocks.stop <= last:  # the output head belongs to the last block
                return None
            fam = self.families[last]
            h = (
                fam.features(z).to(alpha[0].dtype)
                if self.head_input == "sample"
                else (fam.mean(alpha))
            )
            fn = self._observed(self.head.distribution(h), mask)
            infer = (
                {"block": last, "latent": f"z_{last}"}
                if self.head_input == "sample"
                else {"block": last}
            )
            return pyro.sample("y", fn, obs=y, infer=infer)

    def _local_sites(
        self, k: int, z: Tensor | None, alpha: Params, y: Tensor, mask: Tensor | None, cache
    ) -> None:
        """Block k's local likelihood site ``y_k`` and predictive factor ``pred_k``."""
        if self.local_likelihoods is not None:
            q = self.local_likelihoods[k](self, k, z, cache)
            fn = self._observed(q, mask)
            pyro.sample(f"y_{k}", fn, obs=y, infer={"block": k, "latent": f"z_{k}"})
        self._pred_site(k, alpha, y, mask)

    def _pred_site(self, k: int, alpha: Params, y: Tensor, mask: Tensor | None) -> None:
        if self.pred_heads is not None and self.pred_weight > 0:
            logits = self.pred_heads[k](self.families[k].mean(alpha))
            block_factor(f"pred_{k}", -self.pred_weight * masked_cross_entropy(logits, y, mask), k)

    # ---- the vectorised program (pyro_bll.core.stacked_program) -----------------------
    def stacks(self, cache: StepCache | None) -> bool:
        """Whether this evaluation computes groups of blocks together: ``stack`` is on, a
        step cache carries the messages from guide to model, and no forward message
        depends on a draw."""
        return self.stack and cache is not None and self.propagate != "sample"

    def forward_messages(self, x: Any, blocks: range, cache: StepCache) -> None:
        """Every forward message of ``blocks`` into the cache, ``x`` being the first one's
        input, and the outgoing value (no draw is read: ``propagate`` is not "sample")."""
        inp = x
        for k in blocks:
            alpha = self.forward_message(k, inp, cache)
            if k < self.num_blocks - 1:
                inp = self.next_input(k, alpha, None)
        cache.outgoing = plain_message(inp)

    def uses_prototypes(self, k: int) -> bool:
        """Whether block k's local likelihood is the label's prototype likelihood."""
        return self.local_likelihoods is not None and self.local_likelihoods[k] is _prototype

    def _model_site(self, k: int, alpha: Params, cache) -> Tensor | None:
        """Block k's model site ``z_k ~ alpha_k`` (none where the block has no latent)."""
        if not self.has_latent(k):
            return None
        law = self._latent(k, self.latent_params(k, alpha, cache))
        return pyro.sample(f"z_{k}", law, infer={"block": k})

    def use_lookahead(self, lookahead: Lookahead) -> None:
        """Evaluate every block's local likelihood through frozen copies of the blocks
        above it (``pyro_bll.core.lookahead``) instead of the label-only prototypes; the
        training method refreshes the copies (``lookahead.maybe_refresh``)."""
        self.local_likelihoods = list(lookahead.likelihoods(self))
        self.lookahead = lookahead
        lookahead.refresh(self)

    def use_critic(self, critic: Critic) -> None:
        """Evaluate every block's local likelihood through the critic of the block above
        it (``pyro_bll.core.critic``); block j owns critic j, which the training method
        fits to block j's read-out."""
        self.local_likelihoods = list(critic.likelihoods(self))
        self.critic = critic  # a submodule: its parameters train with the chain's

    # ---- block ownership --------------------------------------------------------------
    def block_modules(self, k: int) -> list[nn.Module]:
        """The modules whose parameters belong to block k (theta_k, phi_k and heads)."""
        mods: list[nn.Module] = [self.blocks[k]]
        fb = getattr(self.feedback, "block_module", None)
        if fb is not None:
            mods.append(fb(k))
        if self.pred_heads is not None and k < self.num_blocks - 1:
            mods.append(self.pred_heads[k])
        if self.local_likelihoods is not None and k < self.num_blocks - 1:
            if isinstance(self.local_likelihoods[k], nn.Module):
                mods.append(self.local_likelihoods[k])
        if k == self.num_blocks - 1:
            mods.append(self.head)
        critic = None if self.critic is None else self.critic.module_of(k)
        if critic is not None:
            mods.append(critic)
        return mods

    def block_parameters(self, k: int) -> list[nn.Parameter]:
        return [p for m in self.block_modules(k) for p in m.parameters()]


def plain_message(inp: Any) -> Any:
    """A message without the provenance tracking of ``BlockLocalELBO``'s score functions."""
    if isinstance(inp, tuple):
        return tuple(detach_provenance(t) for t in inp)
    return detach_provenance(inp)


def _prototype(chain: BLLChain, k: int, z: Tensor, cache: StepCache | None = None) -> Distribution:
    """The prototype likelihood of block k (``likelihoods.PrototypeLikelihood``), with
    the step's rho_k for the sampling-free bound."""
    rho = None
    if chain.likelihood == "bound" and cache is not None:
        rho = cache.rho.get(k)
    return PrototypeLikelihood().distribution(
        chain.families[k],
        z,
        chain.class_potentials(k),
        chain.spatial_message,
        rho=rho,
        label_shape=z.shape[: 1 + chain.label_event_dim],  # [B] or [B, T]
    )
