"""Forward messages between neighbouring ranks: torch.distributed point-to-point.

A message is what block b-1 hands to block b, ``m(alpha_{b-1})``: one tensor
``[B, ...]`` or a tuple of them (``propagate="params"``). Only the batch size B changes
from step to step, and every rank knows it from its own copy of the labels, so the
sender describes the trailing shapes and dtypes once, in a small header before its first
message (``int64[HEADER]``: tuple flag, count, then dtype code, rank and trailing sizes
per tensor), and afterwards sends the raw tensors only. These messages travel forward
only (rank r to r + 1); the only traffic the other way is the look-ahead's weights
(``lookahead_link``, on its own tag).

Backends: gloo (CPU tensors) and NCCL (CUDA tensors, one GPU per rank). With gloo and a
CUDA device the tensors are staged through host memory, so several ranks can share one
GPU for testing. Any communication error is re-raised as ``PeerFailure`` naming the peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

HEADER = 32
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]

Message = Tensor | tuple[Tensor, ...]


class PeerFailure(RuntimeError):
    """Communication with ``peer`` failed (it died, hung past the timeout, or closed)."""

    def __init__(self, peer: int | None, what: str, cause: BaseException) -> None:
        who = "" if peer is None else f" rank {peer}"
        super().__init__(f"{what}{who} failed: {brief(cause)}")
        self.peer = peer


def collective(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, a call that needs the other ranks or the rendezvous store; a
    ``RuntimeError`` or ``OSError`` from it (a peer died, hung or closed) becomes a
    ``PeerFailure`` naming ``what``."""
    try:
        return fn()
    except (RuntimeError, OSError) as e:
        raise PeerFailure(None, what, e) from e


def brief(e: BaseException) -> str:
    """The first line of an error, without gloo's boilerplate, at most 200 characters."""
    lines = str(e).strip().splitlines()
    text = (lines[0] if lines else "").split(" This is typically caused")[0]
    return f"{type(e).__name__}: {text[:200]}"


@dataclass(frozen=True)
class Spec:
    """Trailing shapes and dtypes of a message's tensors; ``is_tuple`` for tuple messages."""

    is_tuple: bool
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, message: Message) -> Spec:
        ts = message if isinstance(message, tuple) else (message,)
        return cls(isinstance(message, tuple), tuple(tuple(t.shape[1:]) for t in ts),
                   tuple(t.dtype for t in ts))  # fmt: skip

    def encode(self) -> Tensor:
        vals = [int(self.is_tuple), len(self.shapes)]
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            vals += [DTYPES.index(dtype), len(shape), *shape]
        if len(vals) > HEADER:
            raise ValueError(f"message layout {self} does not fit the {HEADER}-entry header")
        return torch.tensor(vals + [0] * (HEADER - len(vals)), dtype=torch.int64)

    @classmethod
    def decode(cls, header: Tensor) -> Spec:
        vals = header.tolist()
        is_tuple, n, i = bool(vals[0]), vals[1], 2
        shapes, dtypes = [], []
        for _ in range(n):
            dtypes.append(DTYPES[vals[i]])
            ndim = vals[i + 1]
            shapes.append(tuple(vals[i + 2 : i + 2 + ndim]))
            i += 2 + ndim
        return cls(is_tuple, tuple(shapes), tuple(dtypes))


def _guard(peer: int, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except PeerFailure:
        raise
    except (RuntimeError, OSError) as e:  # DistBackendError, gloo IO errors, timeouts
        raise PeerFailure(peer, what, e) from e


class PendingSend:
    """An in-flight send; keeps its buffers alive until ``wait``."""

    def __init__(self, works: list, buffers: list[Tensor], peer: int) -> None:
        self.works, self.buffers, self.peer = works, buffers, peer

    def wait(self) -> None:
        _guard(self.peer, "sending a message to", lambda: [w.wait() for w in self.works])
        self.works, self.buffers = [], []


class PendingRecv:
    """An in-flight receive; ``wait`` returns the message on the compute device."""

    def __init__(self, works: list, buffers: list[Tensor], spec: Spec, device, peer: int):
        self.works, self.buffers, self.spec, self.device, self.peer = (
            works, buffers, spec, device, peer
        )  # fmt: skip

    def wait(self) -> Message:
        _guard(self.peer, "receiving a message from", lambda: [w.wait() for w in self.works])
        ts = tuple(b.to(self.device, non_blocking=True) for b in self.buffers)
        return ts if self.spec.is_tuple else ts[0]


class Channel:
    """The forward links of one rank: receive from ``rank - 1``, send to ``rank + 1``,
    within its replica's pipeline of ``stages`` consecutive ranks (``group.Layout``)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        backend: str,
        stages: int | None = None,
    ) -> None:
        stage, stages = (rank, world_size) if stages is None else (rank % stages, stages)
        self.prev = rank - 1 if stage > 0 else None
        self.next = rank + 1 if stage + 1 < stages else None
        self.device = device
        # gloo moves CPU tensors only: stage CUDA messages through host memory
        self.wire = torch.device("cpu") if backend == "gloo" else device
        self._spec_out: Spec | None = None
        self._spec_in: Spec | None = None

    def isend(self, message: Message) -> PendingSend:
        assert self.next is not None, "the last rank sends nothing"
        ts = message if isinstance(message, tuple) else (message,)
        bufs = [t.detach().to(self.wire).contiguous() for t in ts]
        spec = Spec.of(message)
        works = []

        def post() -> None:
            if self._spec_out is None:
                header = spec.encode().to(self.wire)
                bufs.append(header)  # keep it alive until the send completes
                works.append(dist.isend(header, self.next))
                self._spec_out = spec
            elif spec != self._spec_out:
                raise ValueError(f"message layout changed from {self._spec_out} to {spec}")
            works.extend(dist.isend(b, self.next) for b in bufs[: len(ts)])

        _guard(self.next, "sending a message to", post)
        return PendingSend(works, bufs, self.next)

    def send(self, message: Message) -> None:
        self.isend(message).wait()

    def irecv(self, batch_size: int) -> PendingRecv:
        assert self.prev is not None, "rank 0 receives nothing"
        if self._spec_in is None:
            header = torch.empty(HEADER, dtype=torch.int64, device=self.wire)
            _guard(self.prev, "receiving the message header from",
                   lambda: dist.recv(header, self.prev))  # fmt: skip
            self._spec_in = Spec.decode(header.cpu())
        spec = self._spec_in
        bufs = [
            torch.empty((batch_size, *shape), dtype=dtype, device=self.wire)
            for shape, dtype in zip(spec.shapes, spec.dtypes, strict=True)
        ]
        works = _guard(self.prev, "receiving a message from",
                       lambda: [dist.irecv(b, self.prev) for b in bufs])  # fmt: skip
        return PendingRecv(works, bufs, spec, self.device, self.prev)

    def recv(self, batch_size: int) -> Message:
        return self.irecv(batch_size).wait()
