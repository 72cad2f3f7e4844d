"""What one training step computes once and shares: the typed step cache.

``BlockLocalELBO`` passes one ``StepCache`` to the guide and the model of a step
(``BLLChain.guide`` / ``.model``), so that the forward blocks run once; the method, the
feedback solve and the agreement logging read the same values.

Names: the *forward message* alpha_k is block k's output read as a distribution's
parameters; the *outgoing* value is what the last block of a segment hands to the next
(m(alpha_{b-1}): what a rank sends on in block-parallel training); the *spatial message*
(``pyro_bll.guides.spatial``) is how a per-image potential meets a feature map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyro_bll.core.noise import NoiseKey
from pyro_bll.families import Params


@dataclass
class StepCache:
    """Per-step values, keyed by block index."""

    alpha: dict[int, Params] = field(default_factory=dict)  # forward messages alpha_k
    latent: dict[int, Params] = field(default_factory=dict)  # the law of site z_k
    rho: dict[int, Params] = field(default_factory=dict)  # the guide's rho_k
    noise: NoiseKey | None = None  # the step's random streams (pyro_bll.core.noise)
    outgoing: Any = None  # m(alpha_{b-1}) of a segment (blocks a..b-1): sent to the next rank
