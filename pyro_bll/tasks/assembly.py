"""One helper that turns a task's forward blocks into a ``BLLChain``.

Every task (sequence reversal, the MLP, the ResNets) hands over its blocks, the latent
width of each block, its output head and its predictive heads; the feedback network
(``--feedback``), the predictive weight, ``--propagate`` and ``--likelihood`` are wired
the same way for all of them here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from pyro_bll.core.chain import BLLChain
from pyro_bll.families import Family
from pyro_bll.guides import FEEDBACKS

if TYPE_CHECKING:
    from pyro_bll.run.options import RunConfig


def assemble_chain(
    cfg: RunConfig,
    family: Family,
    blocks: Sequence[nn.Module],
    widths: Sequence[int],
    num_classes: int,
    head: Callable[[], nn.Module],
    pred_head: Callable[[int], nn.Module] | None,
    feedback_scales: Sequence[float] | None = None,
    **chain_options: Any,
) -> BLLChain:
    """The chain of ``blocks`` with the configured feedback network and heads.

    Args:
        widths: latent channels of every block (the feedback outputs one potential each).
        head: builds the output head f_out (called after the feedback network and the
            predictive heads, so that every task initialises its modules in one order).
        pred_head: ``pred_head(k)`` builds block k's predictive head (blocks below the
            last, only when ``cfg.pred_weight > 0``); ``None``: no predictive heads.
        feedback_scales: per block, a factor on the family's initial feedback scale
            (``SpatialMessage.feedback_scale``); None: 1 for every block.
        chain_options: passed on to ``BLLChain`` (``event_dim``, ``message``, ...).
    """
    scales = [1.0] * len(widths) if feedback_scales is None else feedback_scales
    feedback = FEEDBACKS[cfg.feedback](
        num_classes,
        [family.feedback_size(w) for w in widths],
        [family.feedback_init_std * s for s in scales],
    )
    preds = None
    if pred_head is not None and cfg.pred_weight > 0:
        preds = [pred_head(k) for k in range(len(blocks) - 1)]
    return BLLChain(
        blocks,
        family,
        feedback,
        head(),
        pred_heads=preds,
        pred_weight=cfg.pred_weight,
        propagate=cfg.propagate,
        # --likelihood is BLL's (resolved to the family's own); the others never read it
        likelihood=family.default_likelihood if cfg.bll is None else cfg.bll.likelihood,
        register_params=False,
        **chain_options,
    )
