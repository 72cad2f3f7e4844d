"""Training methods on the same chain: BLL, backprop, feedback alignment and Pred-Sim.

A method turns a batch into a scalar loss (per example) plus, for logging, a dict of
per-block values ``[N]``: ``loss`` (l_k) and, for BLL, its terms ``kl``, ``nll``, ``pred``
and the cheap agreement statistics ``agreement_*`` (``pyro_bll.agreement.StepAgreement``);
the training step (``training.py``) owns ``backward()`` and the optimiser. ``loss`` takes
the step's ``noise`` key (``pyro_bll.noise``: every block's Monte Carlo draw gets its own
stream, so a block draws the same noise in one process as on a rank of its own).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .agreement import StepAgreement
from .chain import BLLChain
from .config import BLL_TERMS, ConfigError, RunConfig
from .elbo import BlockLocalELBO, BlockLosses
from .feedback_alignment import FeedbackAlignment
from .feedback_solve import check_solvable, solve_feedback
from .likelihoods import masked_cross_entropy
from .noise import NoiseKey
from .predsim import PredSim


class BLL:
    """Sum of block-local losses l_k (inputs detached at every block boundary).

    With ``feedback_update="solve"`` the linear feedback weights are set to their
    closed-form optimum on each batch instead of taking gradient steps.
    """

    def __init__(self, chain: BLLChain, cfg: RunConfig) -> None:
        chain.detach = True
        self.elbo = BlockLocalELBO(chain.num_blocks)
        self.terms = frozenset(cfg.bll_terms)  # --bll-terms: the terms that are optimised
        self.agreement = StepAgreement()  # forward/feedback agreement for the logs
        self.solve = cfg.feedback_update == "solve"
        self.ridge = cfg.ridge
        if self.solve:
            try:
                check_solvable(chain)
            except ValueError as e:
                raise ConfigError(str(e)) from None
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
        cache: dict | None = None,
    ):
        """Sum of l_k; with ``segment=(a, b)`` only blocks a..b-1 (``x`` is block a's input
        message, other blocks log zeros) and ``cache["message"]`` receives m(alpha_{b-1})."""
        cache = {} if cache is None else cache
        cache["noise"] = noise
        if self.solve:
            blocks = None if segment is None else range(*segment)
            solve_feedback(chain, x, y, mask, self.ridge, cache, blocks)
        losses = self.elbo.block_losses(
            chain.model, chain.guide, x, y, mask, cache=cache, segment=segment
        )
        per_block = self.optimised(losses) / y.shape[0]
        logs = {"loss": per_block.detach()}
        logs.update({k: v.detach() / y.shape[0] for k, v in losses.terms.items()})
        logs.update(self.agreement(chain, cache, y, mask))  # agreement_*: no grad
        return per_block.sum(), logs

    def optimised(self, losses: BlockLosses) -> Tensor:
        """l_k ``[N]`` restricted to ``--bll-terms`` (all three: ``losses.per_block``).

        The "nll" term of the last block is the output head's likelihood and always counts;
        below the last it is the local likelihood q_k, kept with "likelihood".
        """
        if len(self.terms) == len(BLL_TERMS):
            return losses.per_block
        t = losses.terms
        out = torch.zeros_like(losses.per_block)
        out[-1] = out[-1] + t["nll"][-1]
        if "likelihood" in self.terms:
            out[:-1] = out[:-1] + t["nll"][:-1]
        for name in ("kl", "pred"):
            if name in self.terms:
                out = out + t[name]
        return out


class Backprop:
    """End-to-end cross-entropy of f_out(m(alpha_N)) through every block."""

    def __init__(self, chain: BLLChain, cfg: RunConfig) -> None:
        if cfg.feedback_update != "grad":
            raise ConfigError("--feedback-update solve applies to --method bll only")
        chain.detach = False

    def loss(
        self,
        chain: BLLChain,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None,
        *,
        noise: NoiseKey | None = None,  # BP draws no latents
    ):
        loss = masked_cross_entropy(chain.predict_logits(x), y, mask).sum() / y.shape[0]
        return loss, {"loss": loss.detach().reshape(1)}


METHODS = {"bll": BLL, "bp": Backprop, "fa": FeedbackAlignment, "predsim": PredSim}
