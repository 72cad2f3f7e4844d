"""The method contract: what every training method (BLL, BP, FA, Pred-Sim) provides.

A method is built once per run from the chain and the config (``build_method``), after the
chain and before the optimiser, so that any module it adds to the chain (FA's fixed
backward weights, Pred-Sim's heads) is trained and checkpointed with it. Then, every step,
``loss`` turns a batch into a scalar loss plus per-block logs ``[N]`` (``loss`` always;
BLL adds its terms ``kl``, ``likelihood``, ``pred`` and ``agreement_*``); the training
step owns ``backward()`` and the optimiser. ``start_epoch`` is called before every
epoch (BLL restarts its agreement statistics there).

Adding a method: one file with a ``Method`` subclass and one line in
``pyro_bll.methods.METHODS``. A method with options of its own declares them beside its
code as a section (a frozen dataclass of ``pyro_bll.config.option`` fields, e.g.
``BLLOptions``) named by ``SECTION``; the configuration (``RunConfig``) holds that
section only for that method, and refuses its options, with one line, for the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from pyro_bll.config import Section

if TYPE_CHECKING:
    from pyro_bll.core.chain import BLLChain
    from pyro_bll.core.noise import NoiseKey
    from pyro_bll.run.options import RunConfig


class Method(ABC):
    """One way of training a ``BLLChain``. Subclasses set ``name`` (and ``SECTION``)."""

    name: ClassVar[str]
    # the options only this method reads (``cfg.<SECTION.name>``), or None
    SECTION: ClassVar[type[Section] | None] = None
    # whether the loss is a sum of block-local losses (``local_losses``, --backward per-block)
    local: ClassVar[bool] = False
    # whether the label-driven feedback network (beta_k) is trained: the agreement
    # diagnostics compare it with the forward network and mean nothing otherwise
    trains_feedback: ClassVar[bool] = False

    @abstractmethod
    def __init__(self, chain: BLLChain, cfg: RunConfig) -> None:
        """Prepare ``chain`` for this method (detaching, added modules) from ``cfg``."""

    @abstractmethod
    def loss(
        self,
        chain: BLLChain,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None,
        *,
        noise: NoiseKey | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss of a batch (per example) and detached per-block logs ``[N]``."""

    def local_losses(
        self,
        chain: BLLChain,
        x: Tensor,
        y: Tensor,
        mask: Tensor | None,
        *,
        noise: NoiseKey | None = None,
    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]] | None:
        """Block by block: (l_k, logs ``[N]`` zero outside block k), so that the training
        step can backpropagate and free block k's graph before block k + 1 runs
        (``--backward per-block``). The sum of the yielded losses and logs equals ``loss``.
        None for methods without block-local losses (one backward over the network)."""
        return None

    def start_epoch(self) -> None:  # noqa: B027 (a hook: most methods need nothing)
        """Called before every epoch; stateless methods need nothing."""

    def state_dict(self) -> dict[str, Any]:
        """State held between steps (tensors and plain values), saved in every checkpoint
        (``start_epoch`` may reset what an epoch does not carry); stateless methods have
        none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a hook)
        """Restore ``state_dict()`` when a run resumes."""
