"""End-to-end methods: backprop (BP) and feedback alignment (FA).

Both minimise the output cross-entropy of f_out(m(alpha_N)) through every block (no
detaching, no latents drawn); FA differs only in how the chain's layers send errors
backwards (``pyro_bll.methods.alignment``), so the two share their loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from pyro_bll.config import ConfigError
from pyro_bll.core.chain import BLLChain
from pyro_bll.core.likelihoods import masked_cross_entropy
from pyro_bll.core.noise import NoiseKey
from pyro_bll.methods.alignment import convert_to_feedback_alignment
from pyro_bll.methods.base import Method

if TYPE_CHECKING:
    from pyro_bll.run.options import RunConfig


class EndToEnd(Method):
    """Cross-entropy of the output head through the whole chain; logs ``loss`` ``[1]``."""

    def __init__(self, chain: BLLChain, cfg: RunConfig) -> None:
        chain.detach = False

    def loss(
        self,
        chain: BLLChain,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None,
        *,
        noise: NoiseKey | None = None,  # end-to-end methods draw no latents
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss = masked_cross_entropy(chain.predict_logits(x), y, mask).sum() / y.shape[0]
        return loss, {"loss": loss.detach().reshape(1)}


class Backprop(EndToEnd):
    """Backpropagation through every block (the reference)."""

    name = "bp"


class FeedbackAlignment(EndToEnd):
    """Feedback alignment: every Linear and Conv2d of the blocks and the head sends its
    error back through a fixed random matrix instead of its transposed weight."""

    name = "fa"

    def __init__(self, chain: BLLChain, cfg: RunConfig) -> None:
        super().__init__(chain, cfg)
        n = convert_to_feedback_alignment(chain.blocks) + convert_to_feedback_alignment(chain.head)
        if n == 0:
            raise ConfigError("--method fa found no Linear or Conv2d layer in the network")
