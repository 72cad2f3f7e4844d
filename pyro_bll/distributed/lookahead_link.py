"""The look-ahead's backward traffic between ranks: the state of the blocks above.

With ``--beta lookahead`` (``pyro_bll.core.lookahead``) block k evaluates its local
likelihood through frozen copies of blocks k+1..k+L and the read-out after block k+L
(its predictive head; the output head when k+L = N-1), copied from the live weights
every T steps. On stage s, owning blocks [a_s, b_s), the copies of modules that another
stage owns cannot be taken from the rank's own chain (that stage trains them). So:

* **What crosses.** For every pair of stages u > s, stage u sends stage s the parameters
  and buffers of the modules it owns in

      R(s, u) = union over k in [a_s, b_s), k < N-1, of {f_j : k < j <= last(k), j in
      [a_u, b_u)} plus {r_last(k) : last(k) in [a_u, b_u)},

  last(k) = N-1 for L = 0, else min(k+L, N-1); r_j is the read-out after block j, owned by
  block j. Nothing else crosses: no gradient, no activation. Replica r of stage u sends to
  replica r of stage s (replicas hold the same weights).
* **How many bytes.** Per refresh, stage s receives sum_{u > s} bytes(R(s, u)), the
  float bytes of those parameters and buffers (``received_bytes``; every rank prints its
  own and ``metrics.json`` holds ``rank_lookahead_bytes_per_refresh``). Unlike the one-
  process ``Lookahead.bytes_per_refresh``, which counts every block's look-ahead set
  separately, a module that several blocks of one stage read crosses once, and modules of
  the stage's own blocks do not cross.
* **When, and how stale.** The copies of refresh step t hold the weights W_t every block
  had at the start of step t (after t updates), exactly as in one process, whatever T:
  at the start of its step t, before it waits for its input message, every rank sends the
  state of its modules (taken after its update of step t-1) to the stages below that read
  them, and waits for the state of the stages above. So with T = 1 the run equals the
  one-process run, and with T > 1 the copies are up to T - 1 steps stale in both. The
  price is a wait (backward locking at refresh steps): stage s starts step t only once
  every stage above it has finished step t-1. Under ``--schedule sync`` that wait is the
  barrier the schedule already has; under ``--schedule pipelined`` the pipeline drains at
  every refresh step, so with T = 1 it runs at the synchronous pace, and T > 1 amortises
  the drain over T steps.

The messages are flat buffers, one per dtype, with the tensors of R(s, u) in a fixed
order; every rank built the same chain, so the receiver knows the layout without a
header. They travel on ``TAG``, in the direction opposite to the forward messages.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pyro_bll.core.chain import BLLChain
from pyro_bll.core.frozen import module_bytes, module_tensors
from pyro_bll.core.lookahead import Lookahead
from pyro_bll.distributed.group import Layout
from pyro_bll.distributed.transport import PeerFailure

TAG = 7  # the look-ahead's state messages; forward messages use the default tag 0


def needed(
    chain: BLLChain, lookahead: Lookahead, layout: Layout, reader: int, owner: int
) -> list[nn.Module]:
    """R(reader, owner): the modules of stage ``owner`` that stage ``reader``'s
    look-ahead copies read, each once, in block order (the same list on both stages)."""
    a, b = layout.groups.segment(reader)
    lo, hi = layout.groups.segment(owner)
    seen: dict[int, nn.Module] = {}
    for k in range(a, min(b, chain.num_blocks - 1)):
        for j, module in lookahead.reads(chain, k):
            if lo <= j < hi:
                seen.setdefault(id(module), module)
    return list(seen.values())


class LookaheadLink:
    """The look-ahead traffic of one rank (stage ``stage``, replica ``replica``).

    ``exchange(step)`` at the start of every training step: on a refresh step it sends
    this stage's modules to the stages below that read them, receives the modules of the
    stages above, refreshes the copies of its own modules from the live chain and loads
    the received state into the other copies in place (module docstring)."""

    def __init__(self, chain: BLLChain, lookahead: Lookahead, layout: Layout, rank: int) -> None:
        self.chain, self.lookahead, self.layout = chain, lookahead, layout
        self.stage, self.replica = layout.stage_of(rank), layout.replica_of(rank)
        stages = range(layout.stages)
        # stage -> modules: what this stage receives from each stage above, sends below
        self.inbound = {u: m for u in stages if u > self.stage
                        if (m := needed(chain, lookahead, layout, self.stage, u))}  # fmt: skip
        self.outbound = {s: m for s in stages if s < self.stage
                         if (m := needed(chain, lookahead, layout, s, self.stage))}  # fmt: skip
        self.received_bytes = sum(_bytes(ms) for ms in self.inbound.values())
        self.sent_bytes = sum(_bytes(ms) for ms in self.outbound.values())
        self.remote = [m for ms in self.inbound.values() for m in ms]
        self.refreshes = 0  # refresh steps exchanged so far
        self.exchanged: int | None = None  # the last step exchange() ran for
        self._sends: list = []  # in-flight sends and their buffers

    def describe(self) -> str:
        """One line for the rank's log: what crosses per refresh."""
        recv = ", ".join(f"{_bytes(ms)} B from stage {u}" for u, ms in self.inbound.items())
        send = ", ".join(f"{_bytes(ms)} B to stage {s}" for s, ms in self.outbound.items())
        return (
            f"look-ahead: stage {self.stage} receives {self.received_bytes} bytes per refresh"
            f" ({recv or 'nothing'}), sends {self.sent_bytes} ({send or 'nothing'}), every "
            f"{self.lookahead.schedule.every} step(s)"
        )

    def exchange(self, step: int) -> int:
        """Send and receive the state of refresh step ``step`` (nothing on other steps) and
        refresh the copies; returns the bytes received."""
        self.exchanged = step
        if not self.lookahead.schedule.pending(step):
            return 0
        self.wait_sends()  # the previous refresh's: received by now (module docstring)
        wire = _wire(self.chain)
        for s, modules in self.outbound.items():
            peer = self.layout.rank_of(s, self.replica)
            for flat in _flatten(modules, wire):
                work = _guard(peer, lambda f=flat, p=peer: dist.isend(f, p, tag=TAG))
                self._sends.append((work, flat, peer))
        received = []
        for u, modules in self.inbound.items():
            peer = self.layout.rank_of(u, self.replica)
            bufs = _empty(modules, wire)
            for buf in bufs:
                _guard(peer, lambda b=buf, p=peer: dist.recv(b, p, tag=TAG))
            received.append((modules, bufs))
        self.lookahead.maybe_refresh(self.chain, step, skip=self.remote)
        for modules, bufs in received:
            _unflatten([self.lookahead.copy_of(m) for m in modules], bufs)
        self.refreshes += 1
        return self.received_bytes

    def wait_sends(self) -> None:
        """Wait for the sends in flight (each is received at the step it was sent for)."""
        sends, self._sends = self._sends, []
        for work, _, peer in sends:
            _guard(peer, work.wait)


def _bytes(modules: Iterable[nn.Module]) -> int:
    return sum(module_bytes(m) for m in modules)


def _tensors(modules: Iterable[nn.Module]) -> list[Tensor]:
    return [t for m in modules for t in module_tensors(m)]


def _by_dtype(tensors: list[Tensor]) -> dict[torch.dtype, list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return groups


@torch.no_grad()
def _flatten(modules: list[nn.Module], wire: torch.device) -> list[Tensor]:
    """One flat snapshot per dtype (a copy: the live tensors change after the send)."""
    return [torch.cat([t.detach().reshape(-1).to(wire) for t in ts])
            for ts in _by_dtype(_tensors(modules)).values()]  # fmt: skip


def _empty(modules: list[nn.Module], wire: torch.device) -> list[Tensor]:
    """Receive buffers matching ``_flatten`` of the same modules."""
    return [torch.empty(sum(t.numel() for t in ts), dtype=dtype, device=wire)
            for dtype, ts in _by_dtype(_tensors(modules)).items()]  # fmt: skip


@torch.no_grad()
def _unflatten(copies: list[nn.Module], bufs: list[Tensor]) -> None:
    """Load the flat buffers into the tensors of ``copies`` in place."""
    for buf, ts in zip(bufs, _by_dtype(_tensors(copies)).values(), strict=True):
        offset = 0
        for t in ts:
            t.copy_(buf[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _wire(chain: BLLChain) -> torch.device:
    """Where the buffers live: host memory for gloo, the compute device for NCCL."""
    device = next(chain.parameters()).device
    return torch.device("cpu") if dist.get_backend() == "gloo" else device


def _guard(peer: int, fn):
    try:
        return fn()
    except (RuntimeError, OSError) as e:
        raise PeerFailure(peer, "exchanging the look-ahead weights with", e) from e
