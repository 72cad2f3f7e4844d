"""BLL: every block trained on its block-local loss l_k (docs/math.md §2).

``loss`` logs per block ``loss`` (l_k), its terms ``kl``, ``likelihood`` and ``pred``, and
the cheap agreement statistics ``agreement_*`` (``pyro_bll.core.agreement.StepAgreement``). It
takes the step's ``noise`` key (``pyro_bll.core.noise``: every block's Monte Carlo draw gets its
own stream, so a block draws the same noise in one process as on a rank of its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pyro_bll.config import ConfigError, Section, at_least_one, non_negative, option
from pyro_bll.core.agreement import StepAgreement
from pyro_bll.core.chain import LIKELIHOOD_ESTIMATORS, BLLChain, detach_message
from pyro_bll.core.critic import Critic, critic_widths
from pyro_bll.core.elbo import BlockLocalELBO, BlockLosses
from pyro_bll.core.lookahead import LOOKAHEAD_READS, Lookahead
from pyro_bll.core.lookahead_sweep import LookaheadSweep
from pyro_bll.core.noise import NoiseKey
from pyro_bll.core.step_cache import StepCache, step_cache
from pyro_bll.core.targets import DelayedTargets
from pyro_bll.methods.base import Method
from pyro_bll.methods.solve import FEEDBACK_UPDATES, check_solvable, solve_feedback

if TYPE_CHECKING:
    from pyro_bll.run.options import RunConfig

# the terms of BLL's local loss l_k that --bll-terms may keep (the output head's
# likelihood of the last block is always kept): KL(rho_k || alpha_k), the local
# likelihood -E[log q_k(y | z_k)] of the blocks below the last, the predictive loss
BLL_TERMS = ("kl", "likelihood", "pred")
# the backward messages beta_k (docs/math.md §5-6): the paper's label-only feedback, or
# the local likelihood through frozen copies of the blocks above, through the critic of the
# block above, or the delayed targets the blocks above send back
BETA_KINDS = ("label", "lookahead", "critic", "target")
# the kinds whose backward traffic does not cross processes, and why
_NOT_DISTRIBUTED = {
    "critic": "its critics do not travel over the transport",
    "target": "its targets come from a sweep through the whole chain in one process",
}
_KIND_OPTIONS = {
    "lookahead_depth": "lookahead",
    "lookahead_input": "lookahead",
    "lookahead_refresh": "lookahead",
    "critic_refresh": "critic",
    "target_delay": "target",
}


@dataclass(frozen=True)
class BLLOptions(Section):
    """The options of ``--method bll``."""

    name = "bll"
    title = "--method bll"

    bll_terms: list[str] = option(
        help="ablation: the terms of the local loss l_k that are optimised, from kl "
        "(KL(rho_k || alpha_k)), likelihood (the local likelihood q_k of blocks below the "
        "last) and pred (the predictive loss); the last block's output likelihood is "
        "always kept (default: kl,likelihood,pred, the full loss; e.g. 'pred' trains "
        "every block on its predictive head alone)",
        factory=lambda: list(BLL_TERMS),
        choices=BLL_TERMS,
        metavar="T1,T2,...",
        parse="list[str]",
    )
    likelihood: str | None = option(
        None,
        "how the local likelihood term E_rho[log q_k(y | z_k)] is estimated: {choices}; "
        "bound (sampling-free Jensen bound, exact gradients) or sample (at a draw of "
        "z_k: pathwise, or score function for discrete families); default: the "
        "family's own, chosen from measurements (sample for gaussian, bound for "
        "the others: docs/families.md)",
        choices=LIKELIHOOD_ESTIMATORS,
    )
    feedback_update: str = option(
        "grad",
        "{choices}: train the feedback weights by gradient steps, or set them on every "
        "batch to the closed-form ridge least-squares optimum (linear feedback, "
        "--family gaussian)",
        choices=FEEDBACK_UPDATES,
    )
    ridge: float = option(1.0, "ridge term of --feedback-update solve", check=non_negative)
    beta: str = option(
        "label",
        "the backward message of every block, {choices}: label (the paper's: the feedback "
        "sees only the label, with the tied prototype likelihood) or lookahead (the local "
        "likelihood of block k through frozen copies of the blocks above it and their "
        "read-out) or critic (through a linear model of block k+1's read-out that block "
        "k+1 learns and sends back) or target (the backpropagated gradient of the output "
        "likelihood, sent back and used --target-delay steps later on the stashed input, "
        "in place of the local likelihood); docs/math.md section 6",
        choices=BETA_KINDS,
    )
    lookahead_depth: int = option(
        1,
        "--beta lookahead: L, the blocks above block k its likelihood reads (blocks near "
        "the top read the ones that remain; 0: every block above, up to the output head)",
        check=non_negative,
    )
    lookahead_refresh: int = option(
        1,
        "--beta lookahead: T, copy the weights of the blocks above every T training steps "
        "(1: every step; larger T moves fewer bytes, with copies up to T - 1 steps stale; "
        "with --distributed the ranks above send them, and a refresh step waits for them)",
        check=at_least_one,
    )

    lookahead_input: str = option(
        "sample",
        "--beta lookahead: what the copies read, {choices}: sample (a draw z_k ~ rho_k: "
        "the Monte Carlo estimate of E_rho[log q_k]) or mean (m(alpha_k): the plug-in "
        "estimate log q_k(y | m(alpha_k)), deterministic)",
        choices=LOOKAHEAD_READS,
    )
    critic_refresh: int = option(
        1,
        "--beta critic: T, the blocks below copy the critics every T training steps",
        check=at_least_one,
    )
    target_delay: int = option(
        1,
        "--beta target: d, the steps between the sweep of block k's target at step t and "
        "its use at step t + d (each block holds d stashed inputs and targets)",
        check=at_least_one,
    )

    stack_blocks: bool = option(
        True,
        "one Pyro site per block instead of one vectorised site per group of neighbouring "
        "blocks whose latent sites agree (one family, one shape): the same losses and "
        "gradients, computed block by block (slower: docs/results.md, step cost)",
        flag="--no-stack-blocks",
    )

    def check(self, cfg: Any) -> None:
        if "ridge" in cfg.given and not cfg.loaded and self.feedback_update != "solve":
            raise ConfigError(
                "--ridge applies to --feedback-update solve only; add it or drop --ridge"
            )
        for name, kind in _KIND_OPTIONS.items():
            if self.beta != kind and name in cfg.given and not cfg.loaded:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} applies to --beta {kind}; add it or drop {flag}")
        why = _NOT_DISTRIBUTED.get(self.beta)
        if why is not None and getattr(cfg, "dist", None) is not None:
            raise ConfigError(
                f"--beta {self.beta} is not available with --distributed ({why}); use "
                "--beta lookahead or label, or one process"
            )


class BLL(Method):
    """Sum of block-local losses l_k (inputs detached at every block boundary).

    With ``feedback_update="solve"`` the linear feedback weights are set to their
    closed-form optimum on each batch instead of taking gradient steps.
    """

    name = "bll"
    SECTION = BLLOptions
    trains_feedback = True
    local = True

    def __init__(self, chain: BLLChain, cfg: RunConfig) -> None:
        chain.detach = True
        chain.stack = cfg.bll.stack_blocks  # groups of agreeing blocks as one site each
        self.elbo = BlockLocalELBO(chain.num_blocks)
        opts = cfg.bll
        self.terms = frozenset(opts.bll_terms)  # --bll-terms: the terms that are optimised
        # forward/feedback agreement for the logs: one per segment of blocks computed at
        # once (the whole chain, one block with --backward per-block, or a rank's blocks)
        self.agreements: dict[tuple[int, int] | None, StepAgreement] = {}
        self.solve = opts.feedback_update == "solve"
        self.ridge = opts.ridge
        # --beta target: the targets in flight (pyro_bll.core.targets); no local likelihood
        self.targets: DelayedTargets | None = None
        try:
            if opts.beta == "lookahead":
                chain.use_lookahead(
                    Lookahead(opts.lookahead_depth, opts.lookahead_refresh, opts.lookahead_input)
                )
            elif opts.beta == "critic":
                classes = chain.feedback.num_classes
                chain.use_critic(Critic(critic_widths(chain), classes, opts.critic_refresh))
            elif opts.beta == "target":
                DelayedTargets.check(chain)
                self.targets = DelayedTargets(opts.target_delay)
                chain.local_likelihoods = None  # the delayed term stands in for it
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.solve:
            try:
                check_solvable(chain)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            shared = chain.lookahead is None and chain.critic is None  # the prototypes
            if "likelihood" in self.terms and chain.local_likelihoods is not None and shared:
                raise ConfigError(
                    "--feedback-update solve sets the feedback weights to the KL term's "
                    "optimum, but the local likelihood shares those weights, so the solve is "
                    "not the local loss's optimum; add --bll-terms kl,pred, or use "
                    "--feedback-update grad"
                )
            chain.feedback.requires_grad_(False)

    def loss(
        self,
        chain: BLLChain,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None,
        *,
        noise: NoiseKey | None = None,
        segment: tuple[int, int] | None = None,
        cache: StepCache | None = None,
    ):
        """Sum of l_k; with ``segment=(a, b)`` only blocks a..b-1 (``x`` is block a's input
        message, other blocks log zeros) and ``cache.outgoing`` receives m(alpha_{b-1})."""
        cache = StepCache() if cache is None else cache
        cache.noise = noise
        step = None if noise is None else noise.step
        targets = self.targets is not None and chain.num_blocks > 1
        if targets and segment is not None:
            raise ValueError("--beta target computes the whole chain in one step")
        if segment is None and self._swept(chain):  # every G_k by one sweep of the live blocks
            cache.sweep = LookaheadSweep(chain, y, mask)
        if chain.lookahead is not None and cache.sweep is not None:
            chain.lookahead.defer_refresh()  # no copy is read: copied only if something reads
        elif chain.lookahead is not None:  # the copies of the blocks above: every T steps
            chain.lookahead.maybe_refresh(chain, step)
        if chain.critic is not None:
            chain.critic.maybe_refresh(step)
        if self.solve:
            blocks = None if segment is None else range(*segment)
            solve_feedback(chain, x, y, mask, self.ridge, cache, blocks)
        with step_cache(cache):  # guide and model share the step's messages
            losses = self.elbo.block_losses(chain.model, chain.guide, x, y, mask, segment=segment)
        per_block = self.optimised(losses)
        terms = dict(losses.terms)
        if targets:  # tau_k of the targets due now; this step's targets join the queue
            tau = self._delayed_term(chain, x, cache)
            terms["target"] = tau
            if "likelihood" in self.terms:
                per_block = per_block + tau
        if chain.critic is not None:  # block j fits its critic (logged with "pred")
            fit = self._critic_fit(chain, x, y, mask, cache, segment)
            per_block, terms["pred"] = per_block + fit, terms["pred"] + fit
        per_block = per_block / y.shape[0]
        logs = {"loss": per_block.detach()}
        logs.update({k: v.detach() / y.shape[0] for k, v in terms.items()})
        agreement = self.agreements.setdefault(segment, StepAgreement())
        logs.update(agreement(chain, cache, y, mask))  # agreement_*: no grad
        return per_block.sum(), logs

    def _swept(self, chain: BLLChain) -> bool:
        """Whether a step over the whole chain computes every block's message by one sweep
        (``pyro_bll.core.lookahead_sweep``): the look-ahead to the top with current
        weights, or ``--beta target``, which stashes the sweep's messages."""
        look = chain.lookahead
        return self.targets is not None or (look is not None and look.sweeps(chain))

    def _delayed_term(self, chain: BLLChain, x: Tensor, cache: StepCache) -> Tensor:
        """``[N]``: tau_k of the stash due at this step (``DelayedTargets.step``), after
        this step's inputs x_k and messages G_k are swept and stashed."""
        grads = cache.sweep.messages(cache)
        last = chain.num_blocks - 1
        inputs = [x, *(cache.sweep.inputs[k] for k in range(1, last))]
        return self.targets.step(chain, inputs, [grads[k] for k in range(last)])  # type: ignore[union-attr]

    @staticmethod
    def _critic_fit(chain, x, y, mask, cache: StepCache, segment) -> Tensor:
        """``[N]``: block j's least-squares fit of its critic (blocks j >= 1 of the segment)."""
        n = chain.num_blocks
        a, b = (0, n) if segment is None else segment
        fit = [torch.zeros((), device=y.device)] * n
        for j in range(max(a, 1), b):
            h = x if j == a else chain.families[j - 1].mean(cache.alpha[j - 1])
            fit[j] = chain.critic.regression(chain, j, h, cache.alpha[j], y, mask).sum()
        return torch.stack(fit)

    def start_epoch(self) -> None:
        for agreement in self.agreements.values():
            agreement.reset()  # agreement statistics restart per epoch

    def local_losses(
        self,
        chain: BLLChain,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None,
        *,
        noise: NoiseKey | None = None,
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """l_k and logs (zeros outside block k) of one block at a time: block k's graph
        can be backpropagated and freed before block k + 1 runs. The blocks see the same
        inputs and noise as in ``loss``, so the gradients are the joint ones.

        The look-ahead's sweep (``pyro_bll.core.lookahead_sweep``) reads every block's
        forward graph, so where it applies the blocks come as one joint loss; so do they
        with ``--beta target``, whose sweep is the same."""
        if self._swept(chain):
            yield self.loss(chain, x, y, mask, noise=noise)
            return
        inp = x
        for k in range(chain.num_blocks):
            cache = StepCache()
            loss, logs = self.loss(
                chain, inp, y, mask, noise=noise, segment=(k, k + 1), cache=cache
            )
            yield loss, logs
            if k + 1 < chain.num_blocks:  # block k's graph is not kept alive by it
                inp = detach_message(cache.outgoing)

    def state_dict(self) -> dict:
        """The agreement statistics held between steps (``StepAgreement``), per segment, and
        with ``--beta target`` the targets in flight (``DelayedTargets``)."""
        state: dict = {
            "agreement": [
                (None if seg is None else list(seg), a.calls, a.last)
                for seg, a in self.agreements.items()
            ]
        }
        if self.targets is not None:
            state["targets"] = self.targets.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.agreements = {}
        for seg, calls, last in state.get("agreement", []):
            agreement = StepAgreement()
            agreement.calls, agreement.last = calls, last
            self.agreements[None if seg is None else tuple(seg)] = agreement
        if self.targets is not None:
            try:
                self.targets.load_state_dict(state.get("targets", {}))
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def optimised(self, losses: BlockLosses) -> Tensor:
        """l_k ``[N]`` restricted to ``--bll-terms`` (all three: ``losses.per_block``).

        The "likelihood" term of the last block is the output head's cross-entropy and
        always counts; below the last it is the local likelihood q_k, kept with
        "likelihood".
        """
        if len(self.terms) == len(BLL_TERMS):
            return losses.per_block
        t = losses.terms
        out = torch.zeros_like(losses.per_block)
        out[-1] = out[-1] + t["likelihood"][-1]
        if "likelihood" in self.terms:
            out[:-1] = out[:-1] + t["likelihood"][:-1]
        for name in ("kl", "pred"):
            if name in self.terms:
                out = out + t[name]
        return out
