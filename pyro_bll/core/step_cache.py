"""What one training step computes once and shares: the typed step cache.

``BlockLocalELBO`` makes one ``StepCache`` active (``step_cache``) while it runs the guide
and the model of a step, so that ``BLLChain``'s forward blocks run once; model and guide
take no extra argument for it (``active_cache``). A caller that needs the step's values
afterwards (the training method, the feedback solve, the agreement logging, the
block-parallel runtime) activates its own cache around the ELBO call:

    cache = StepCache()
    with step_cache(cache):
        losses = elbo.block_losses(chain.model, chain.guide, x, y)
    cache.alpha[0]   # block 0's forward message of this step

Names: the *forward message* alpha_k is block k's output read as a distribution's
parameters; the *outgoing* value is what the last block of a segment hands to the next
(m(alpha_{b-1}): what a rank sends on in block-parallel training); the *spatial message*
(``pyro_bll.guides.spatial``) is how a per-image potential meets a feature map.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from pyro_bll.core.noise import NoiseKey
from pyro_bll.families import Params


@dataclass
class StepCache:
    """Per-step values, keyed by block index."""

    alpha: dict[int, Params] = field(default_factory=dict)  # forward messages alpha_k
    latent: dict[int, Params] = field(default_factory=dict)  # the law of site z_k
    rho: dict[int, Params] = field(default_factory=dict)  # the guide's rho_k
    # a group's stacked site parameters and rho, by its first block (pyro_bll.core.stacked)
    stacked: dict[int, tuple[Params, Params]] = field(default_factory=dict)
    groups: dict[tuple[int, int], list[list[int]]] = field(default_factory=dict)  # by segment
    noise: NoiseKey | None = None  # the step's random streams (pyro_bll.core.noise)
    outgoing: Any = None  # m(alpha_{b-1}) of a segment (blocks a..b-1): sent to the next rank
    # the look-ahead's sweep of the step (``pyro_bll.core.lookahead_sweep``): while set,
    # every block input is a leaf that records its gradient path (``sweep.inputs``)
    sweep: Any = None

    def for_particle(self, i: int) -> StepCache:
        """The cache of Monte Carlo particle ``i`` of the same step: the deterministic
        messages are shared, the noise streams are the particle's own (particle 0 is the
        step itself)."""
        if i == 0:
            return self
        noise = None if self.noise is None else replace(self.noise, particle=i)
        return StepCache(
            alpha=self.alpha,
            latent=self.latent,
            rho=self.rho,
            stacked=self.stacked,
            groups=self.groups,
            noise=noise,
            sweep=self.sweep,
        )


_ACTIVE: ContextVar[StepCache | None] = ContextVar("pyro_bll_step_cache", default=None)


@contextmanager
def step_cache(cache: StepCache | None = None) -> Iterator[StepCache]:
    """Make ``cache`` (default: a new one) the active step cache inside the block."""
    cache = StepCache() if cache is None else cache
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def active_cache() -> StepCache | None:
    """The step cache of the ELBO evaluation in progress (``None`` outside one)."""
    return _ACTIVE.get()
