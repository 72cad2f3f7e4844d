"""Which block a Pyro site belongs to: ``infer={"block": k}`` and the ``block`` handler.

``BlockLocalELBO`` groups a program's ELBO terms by block. A site's block is read from the
model: the site's own ``infer={"block": k}``, or the innermost enclosing ``block(k)``
handler. Guide sites may carry the same tag; where they do, it must agree with the model's.
A program whose sites carry no tag at all is one block (block 0).

    with pyro_bll.block(1):
        z = pyro.sample("z", dist.Normal(loc, 1.0))       # infer["block"] == 1
        pyro.factor("penalty", -z.pow(2).sum())           # block 1 as well
"""

from __future__ import annotations

from typing import Any

from pyro.poutine.messenger import Messenger

MODEL_BLOCK = "_bll_model_block"  # the model's own tag, kept where replay overwrites infer


class BlockMessenger(Messenger):
    """Tags every sample site inside it with ``infer["block"] = k``; a tag set closer to
    the site (its own ``infer`` or an inner ``block``) wins."""

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
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


class RecordModelTags(Messenger):
    """Keeps each model site's own block tag under ``MODEL_BLOCK``: ``poutine.replay``
    replaces a replayed site's ``infer`` by the guide's, so this must sit inside replay."""

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample":
            msg[MODEL_BLOCK] = (msg.get("infer") or {}).get("block")  # type: ignore[literal-required]
