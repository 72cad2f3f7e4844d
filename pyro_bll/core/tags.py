"""Which block a Pyro site belongs to: ``infer={"block": k}`` and the ``block`` handler.

``BlockLocalELBO`` groups a program's ELBO terms by block. A site's block is read from the
model: the site's own ``infer={"block": k}``, or the innermost enclosing ``block(k)``
handler. Guide sites may carry the same tag; where they do, it must agree with the model's.
A program whose sites carry no tag at all is one block (block 0).

    with pyro_bll.block(1):
        z = pyro.sample("z", dist.Normal(loc, 1.0))       # infer["block"] == 1
        pyro.factor("penalty", -z.pow(2).sum())           # block 1 as well

Several blocks whose sites agree in shape can share one vectorised site: inside
``blocks_plate(name, first, size, dim)`` (a ``pyro.plate`` over blocks) index i of batch
axis ``dim`` belongs to block ``first + i`` (``BlockAxis``), and the ELBO splits the site's
terms along that axis, so each block's loss still has gradients only in its own slice:

    with pyro_bll.blocks_plate("blocks", first=0, size=3, dim=-2):
        z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))   # loc [3, B, C]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
from pyro.poutine.messenger import Messenger
from torch import Tensor

MODEL_BLOCK = "_bll_model_block"  # the model's own tag, kept where replay overwrites infer


class BlockMessenger(Messenger):
    """Tags every sample site inside it with ``infer["block"] = k``; a tag set closer to
    the site (its own ``infer`` or an inner ``block``) wins."""

    def __init__(self, k: int | BlockAxis) -> None:
        if isinstance(k, BlockAxis):
            pass
        elif isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"pyro_bll.block({k!r}): a block index is an integer >= 0")
        super().__init__()
        self.k = k

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample":
            msg["infer"] = {"block": self.k, **(msg.get("infer") or {})}


def block(k: int, fn: Any = None) -> Any:
    """``with block(k): ...`` tags the sites inside with block k; ``block(k, fn)`` wraps a
    callable, as Pyro's effect handlers do."""
    messenger = BlockMessenger(k)
    return messenger if fn is None else messenger(fn)


@dataclass(frozen=True)
class BlockAxis:
    """Blocks ``first .. first + size - 1`` along batch axis ``dim`` (negative) of a site."""

    first: int
    size: int
    dim: int

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in vars(self).values())
        if not ints or self.first < 0 or self.size < 1 or self.dim >= 0:
            raise ValueError(
                f"{self}: a block axis needs first >= 0, size >= 1 and a negative batch dim"
            )

    @property
    def blocks(self) -> range:
        return range(self.first, self.first + self.size)

    def split(self, value: Any) -> Any:
        """``[..., size (at dim), ...]`` -> ``[size]``: the sum of each block's slice."""
        if value.dim() < -self.dim or value.shape[self.dim] != self.size:
            raise ValueError(
                f"a site of blocks {self.first}..{self.first + self.size - 1} has batch shape "
                f"{tuple(value.shape)}, without the {self.size} blocks at dim {self.dim}"
            )
        return value.movedim(self.dim, 0).reshape(self.size, -1).sum(-1)


@contextmanager
def blocks_plate(name: str, first: int, size: int, dim: int) -> Iterator[BlockAxis]:
    """A ``pyro.plate`` over blocks ``first .. first + size - 1`` at batch ``dim``; every
    sample site inside is tagged with the ``BlockAxis`` (a closer tag wins)."""
    axis = BlockAxis(first, size, dim)
    with pyro.plate(name, size, dim=dim), BlockMessenger(axis):
        yield axis


class RecordModelTags(Messenger):
    """Keeps each model site's own block tag under ``MODEL_BLOCK``: ``poutine.replay``
    replaces a replayed site's ``infer`` by the guide's, so this must sit inside replay."""

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample":
            msg[MODEL_BLOCK] = (msg.get("infer") or {}).get("block")  # type: ignore[literal-required]


def block_factor(name: str, log_factor: Tensor, block: int | None) -> None:
    """Like ``pyro.factor``, but tagged with the block that owns the term (``None``: the
    enclosing ``blocks_plate``'s)."""
    unit = dist.Unit(log_factor, has_rsample=True)
    infer: dict = (
        {"is_auxiliary": True} if block is None else {"block": block, "is_auxiliary": True}
    )
    pyro.sample(name, unit, obs=unit.sample(), infer=infer)
