"""Schedules: how one rank walks through an epoch's micro-batches.

Every rank runs the same loop over the same batches. Per micro-batch i a rank

1. takes its input: the batch ``x`` (rank 0) or the forward message of micro-batch i from
   rank r - 1;
2. computes the local losses of its blocks (``stage.compute``) and with them the message
   m(alpha_{b-1}) for rank r + 1, which it sends on;
3. takes its own optimiser step on its own losses (``stage.update``).

No gradient travels backwards; with ``--beta lookahead`` the weights of the blocks above
do, on refresh steps, at ``stage.start_step()`` before the input is awaited
(``lookahead_link``: they are those of the same step as in one process, and the pipeline
drains at refresh steps). Both schedules compute exactly the same
thing: rank r's step i uses the message that rank r - 1 computed at *its* step i, i.e.
with block parameters that have seen i - 1 updates, which is what a single process does
(all blocks forward with the parameters after step i - 1, then all update). The messages
are therefore 0 steps stale relative to the single-process run, whatever the timing, and
the two schedules differ only in timing:

* ``sync``: lock-step. After every step all ranks meet at a barrier, so rank 0 starts
  step i + 1 only when the last rank has finished step i; the ranks work one after the
  other, as the blocks do in one process (no speed-up; the reference schedule).
* ``pipelined``: no barrier. Rank r posts the receive of micro-batch i + 1 before it
  computes micro-batch i and sends without waiting for delivery (``isend``), keeping at
  most ``depth`` sends in flight; so rank r works on micro-batch i while rank r + 1
  works on i - 1, and in steady state every rank is busy. When rank r uses a message,
  rank r - 1 may already have taken up to ``depth`` (+ transport buffering) further
  optimiser steps: those newer parameters are never seen by rank r, which is why the
  result does not change.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from pyro_bll.distributed.transport import Channel, Message, collective
from pyro_bll.run.distributed_options import SCHEDULE_NAMES

Batch = tuple[Tensor, Tensor, Tensor | None]


class Stage(Protocol):
    """One rank's blocks: local losses and message of a micro-batch, then its update."""

    def compute(
        self, inp: Any, y: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], Message | None]: ...

    def start_step(self) -> None: ...

    def update(self, loss: Tensor) -> None: ...


@dataclass
class StageStats:
    """Per-block log sums over the epoch and where the rank's time went."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    count: int = 0
    busy: float = 0.0  # seconds computing and updating
    wait: float = 0.0  # seconds blocked on messages or barriers

    def add(self, logs: dict[str, Tensor]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1


def _barrier() -> None:
    collective("the step barrier", dist.barrier)


OnStep = Callable[[StageStats], None]


def run_sync(
    stage: Stage,
    channel: Channel,
    batches: Iterable[Batch],
    depth: int = 1,
    stats: StageStats | None = None,
    on_step: OnStep | None = None,
) -> StageStats:
    """Lock-step schedule (``depth`` unused): a barrier after every step.

    ``stats`` continues an epoch's sums (a mid-epoch resume); ``on_step(stats)`` runs
    after every update (mid-epoch checkpoints)."""
    stats = StageStats() if stats is None else stats
    for x, y, mask in batches:
        t0 = time.perf_counter()
        stage.start_step()
        inp = x if channel.prev is None else channel.recv(y.shape[0])
        t1 = time.perf_counter()
        loss, logs, out = stage.compute(inp, y, mask)
        if out is not None:
            channel.send(out)
        stage.update(loss)
        t2 = time.perf_counter()
        _barrier()
        stats.add(logs)
        stats.wait += (t1 - t0) + (time.perf_counter() - t2)
        stats.busy += t2 - t1
        if on_step is not None:
            on_step(stats)
    return stats


def run_pipelined(
    stage: Stage,
    channel: Channel,
    batches: Iterable[Batch],
    depth: int = 2,
    stats: StageStats | None = None,
    on_step: OnStep | None = None,
) -> StageStats:
    """Pipelined schedule: pre-posted receives, at most ``depth`` sends in flight
    (``stats``, ``on_step``: as in ``run_sync``)."""
    stats = StageStats() if stats is None else stats
    it = iter(batches)
    nxt = next(it, None)
    receiving = channel.prev is not None
    pending = None  # posted after the first start_step: the first receive blocks (header)
    sends: deque = deque()
    while nxt is not None:
        x, y, mask = nxt
        nxt = next(it, None)
        t0 = time.perf_counter()
        stage.start_step()
        if receiving:
            inp = (channel.irecv(y.shape[0]) if pending is None else pending).wait()
            if nxt is not None:
                pending = channel.irecv(nxt[1].shape[0])
        else:
            inp = x
        t1 = time.perf_counter()
        loss, logs, out = stage.compute(inp, y, mask)
        t2 = time.perf_counter()
        if out is not None:
            sends.append(channel.isend(out))
            while len(sends) > depth:
                sends.popleft().wait()
        t3 = time.perf_counter()
        stage.update(loss)
        stats.add(logs)
        stats.wait += (t1 - t0) + (t3 - t2)
        stats.busy += (t2 - t1) + (time.perf_counter() - t3)
        if on_step is not None:
            on_step(stats)
    t0 = time.perf_counter()
    while sends:
        sends.popleft().wait()
    stats.wait += time.perf_counter() - t0
    return stats


SCHEDULES: dict[str, Callable[..., StageStats]] = {"pipelined": run_pipelined, "sync": run_sync}
assert tuple(SCHEDULES) == SCHEDULE_NAMES  # the names --schedule is checked against


def device_batches(batches: Iterable[Batch], device: torch.device, needs_x: bool):
    """Move micro-batches to ``device`` (x only where the rank consumes it)."""
    for x, y, mask in batches:
        yield (
            x.to(device) if needs_x else x,
            y.to(device),
            None if mask is None else mask.to(device),
        )
