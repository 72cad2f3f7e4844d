"""Training methods on the same chain, chosen by name with ``--method``.

``build_method`` is the one place a method is made (training, diagnostics and the
distributed runtime all call it); a method's own options are declared beside it (its
``SECTION``). Adding a method: one ``Method`` subclass in its own file and one
line in ``METHODS`` (docs/methods.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyro_bll.methods.base import Method
from pyro_bll.methods.bll import BLL, BLLOptions
from pyro_bll.methods.end_to_end import Backprop, EndToEnd, FeedbackAlignment
from pyro_bll.methods.predsim import PredSim, PredSimOptions

if TYPE_CHECKING:
    from pyro_bll.core.chain import BLLChain
    from pyro_bll.run.options import RunConfig

METHODS: dict[str, type[Method]] = {
    "bll": BLL,
    "bp": Backprop,
    "fa": FeedbackAlignment,
    "predsim": PredSim,
}


def build_method(chain: BLLChain, cfg: RunConfig) -> Method:
    """The configured method, which prepares ``chain`` (call before building the optimiser)."""
    return METHODS[cfg.method](chain, cfg)


__all__ = [
    "BLL",
    "METHODS",
    "BLLOptions",
    "Backprop",
    "EndToEnd",
    "FeedbackAlignment",
    "Method",
    "PredSim",
    "PredSimOptions",
    "build_method",
]
