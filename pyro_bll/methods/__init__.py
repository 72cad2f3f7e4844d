"""Training methods on the same chain, chosen by name with ``--method``.

``build_method`` is the one place a method is made (training, diagnostics and the
distributed runtime all call it); ``check_method_options`` refuses options the chosen
method does not read. Adding a method: one ``Method`` subclass in its own file and one
line in ``METHODS`` (docs/methods.md).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pyro_bll.config import ConfigError
from pyro_bll.methods.base import METHOD_OPTIONS, Method
from pyro_bll.methods.bll import BLL
from pyro_bll.methods.end_to_end import Backprop, EndToEnd, FeedbackAlignment
from pyro_bll.methods.predsim import PredSim

if TYPE_CHECKING:
    from pyro_bll.config import RunConfig
    from pyro_bll.core.chain import BLLChain

METHODS: dict[str, type[Method]] = {
    "bll": BLL,
    "bp": Backprop,
    "fa": FeedbackAlignment,
    "predsim": PredSim,
}


def check_method_options(cfg: RunConfig) -> None:
    """ConfigError naming the flag when a method-specific option is given to a method that
    does not read it (an option left at RunConfig's default counts as not given)."""
    method = METHODS[cfg.method]
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name, flag in METHOD_OPTIONS.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if name not in method.options and getattr(cfg, name) != default:
            users = [m for m, cls in METHODS.items() if name in cls.options]
            raise ConfigError(
                f"{flag} applies to --method {' / '.join(users)} only; drop it for "
                f"--method {cfg.method}"
            )


def build_method(chain: BLLChain, cfg: RunConfig) -> Method:
    """The configured method, which prepares ``chain`` (call before building the optimiser)."""
    return METHODS[cfg.method](chain, cfg)


__all__ = [
    "BLL",
    "METHODS",
    "Backprop",
    "EndToEnd",
    "FeedbackAlignment",
    "Method",
    "PredSim",
    "build_method",
    "check_method_options",
]
