"""Frozen copies of live modules, refreshed on a schedule: what a backward message sends
down to the blocks below (``pyro_bll.core.lookahead``, ``pyro_bll.core.critic``)."""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence

import torch
from torch import nn


class RefreshSchedule:
    """When the copies are due: at the first step, every ``every`` steps after the last
    refresh, when the step count goes back (a new run), and on every call without a step.

    Args:
        every: T, the refresh period in training steps.
        what: the message's name, for the error on a bad period.
    """

    def __init__(self, every: int, what: str) -> None:
        if every < 1:
            raise ValueError(f"{what} refresh period must be at least 1 step, got {every}")
        self.every = every
        self.last: int | None = None  # the step of the last refresh

    def pending(self, step: int | None) -> bool:
        """Whether training step ``step`` will refresh, without recording it (``due``)."""
        last = self.last
        return step is None or last is None or step < last or step - last >= self.every

    def due(self, step: int | None) -> bool:
        """Whether training step ``step`` refreshes; records it when it does."""
        if not self.pending(step):
            return False
        self.last = step
        return True


class FrozenCopies:
    """Clones of live modules without gradients. The first refresh clones them; later ones
    copy the live tensors into the clones in place, and clone again when the live modules
    changed number, shape, dtype or device."""

    def __init__(self) -> None:
        self.clones: list[nn.Module] = []

    @torch.no_grad()
    def refresh(self, live: Sequence[nn.Module], skip: Collection[int] = ()) -> None:
        """Copy ``live`` into the clones; the positions in ``skip`` keep their values (their
        train/eval mode follows the live module): a caller fills them from elsewhere (the
        state another rank sends, ``pyro_bll.distributed.lookahead_link``). A re-clone
        clones them too."""
        if len(self.clones) == len(live) and all(map(_same_layout, self.clones, live)):
            for i, (clone, module) in enumerate(zip(self.clones, live, strict=True)):
                if i in skip:
                    clone.train(module.training)
                else:
                    _copy_into(clone, module)
        else:
            self.clones = [copy.deepcopy(m).requires_grad_(False) for m in live]


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's parameters, then its buffers: what a copy of it holds."""
    return [*module.parameters(), *module.buffers()]


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers: what sending it moves."""
    return sum(t.numel() * t.element_size() for t in module_tensors(module))


def _same_layout(clone: nn.Module, module: nn.Module) -> bool:
    """The clone's tensors match the live module's in number, shape, dtype and device."""
    a, b = module_tensors(clone), module_tensors(module)
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
        for x, y in zip(a, b, strict=True)
    )


def _copy_into(clone: nn.Module, module: nn.Module) -> None:
    """The live module's parameters and buffers into its frozen clone, in place."""
    for dst, src in zip(clone.parameters(), module.parameters(), strict=True):
        dst.copy_(src)
    for dst, src in zip(clone.buffers(), module.buffers(), strict=True):
        dst.copy_(src)
    clone.train(module.training)


__all__ = ["FrozenCopies", "RefreshSchedule", "module_bytes", "module_tensors"]
