"""Look-ahead backward messages: block k's likelihood through frozen copies of later blocks.

The paper's local likelihood q_k(y | z_k) stands in for p(y | z_k), the label's
likelihood through the rest of the network (Eq. 2). A label-only feedback cannot carry
that (docs/math.md §5). The look-ahead message carries it explicitly: block k evaluates

    q_k(y | z_k) = Categorical(y; logits = r( f'_{k+L}( ... f'_{k+1}( in(z_k) ) ) ))

where f'_j are *frozen copies* of blocks k+1..k+L (depth L) and r is a frozen copy of
the read-out after block k+L (its predictive head, or the output head when k+L is the
last block), taken from the live weights every T steps (the refresh period). Each copy
maps its input to the family's parameters and hands m(alpha_j) on, as the live chain does.

* **What crosses blocks.** Gradients flow through the copies' activations into z_k, hence
  into block k's own parameters (through rho_k's reparameterised draw); the copies have
  no trainable parameters, so no parameter outside block k gets a gradient from l_k.
* **Which premise it relaxes.** Weight transport: block k holds a copy of the weights of
  blocks k+1..k+L, refreshed every T steps (``bytes_per_refresh``); with T > 1 the copy is
  up to T - 1 steps stale. Backward locking is not reintroduced: block k needs no
  backward pass from the blocks above it, only their weights. Across ranks
  (``pyro_bll.distributed.lookahead_link``) the weights of the same step cost a wait for
  the ranks above to finish their previous update, at refresh steps only.
* **What the copies are fed** (``in``): the draw z_k ~ rho_k as the next block's input
  (``Family.features``). On feature maps, where the latent is a per-channel summary
  ``[B, C]`` of a map ``[B, H, W, C]`` (``--message channel`` / ``mean``), the map of
  means m(alpha_k) shifted per channel by z_k - E[z_k]: the spatial pattern of alpha_k
  with the channel values of the draw.
* **rho_k.** beta_k stays the conjugate label potential (rho_k proportional to
  alpha_k beta_k); the look-ahead likelihood is not conjugate, so its expectation is
  taken at the guide's draw (pathwise for reparameterised families, a per-position score
  function for discrete ones), never by the sampling-free bound.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from pyro.distributions import Categorical
from torch import Tensor, nn
from torch.distributions import Distribution

from pyro_bll.core.frozen import FrozenCopies, RefreshSchedule, module_bytes
from pyro_bll.core.lookahead_sweep import sweep_obstacle

if TYPE_CHECKING:
    from pyro_bll.core.chain import BLLChain
    from pyro_bll.core.step_cache import StepCache


LOOKAHEAD_READS = ("sample", "mean")


class Lookahead:
    """Frozen copies of the blocks and read-outs every block looks ahead through.

    Args:
        depth: L, the number of later blocks each block evaluates its likelihood through
            (blocks near the top look through the blocks that remain); 0: every block
            above, up to the output head.
        refresh: T, copy the live weights every T training steps (1: every step).
        read: what the copies read: "sample" (the guide's draw z_k ~ rho_k, a Monte Carlo
            estimate of E_rho[log q_k]) or "mean" (m(alpha_k), the block's forward message
            itself: the plug-in estimate log q_k(y | m(alpha_k)), deterministic; the term
            then trains the forward block only, not the feedback).
        sweep: where the copies equal the live blocks (``sweeps``), compute the whole
            chain's messages by one sweep of vector-Jacobian products through the live
            forward graphs (``pyro_bll.core.lookahead_sweep``): the same values and
            gradients at O(N) instead of O(N^2) block passes. ``False``: always the copies.
    """

    def __init__(
        self, depth: int = 1, refresh: int = 1, read: str = "sample", sweep: bool = True
    ) -> None:
        if read not in LOOKAHEAD_READS:
            raise ValueError(f"look-ahead input must be one of {LOOKAHEAD_READS}, got {read!r}")
        self.read = read
        if depth < 0:
            raise ValueError(f"look-ahead depth must be >= 0 (0: to the top), got {depth}")
        self.depth = depth
        self.schedule = RefreshSchedule(refresh, "look-ahead")
        self.copies = FrozenCopies()
        self.blocks: list[nn.Module] = []  # frozen copies, indexed like chain.blocks
        self.readouts: dict[int, nn.Module] = {}  # frozen read-out after block j
        self._bytes: int | None = None  # bytes_per_refresh, for the current copies
        self.sweep = sweep
        self._stale = False  # defer_refresh: the copies are refreshed when next read
        self._index: dict[int, int] = {}  # id of a live module -> position of its copy

    @property
    def refreshed_at(self) -> int | None:
        """The training step of the last refresh."""
        return self.schedule.last

    def last(self, k: int, num_blocks: int) -> int:
        """The last block block k looks through (its read-out follows it)."""
        return num_blocks - 1 if self.depth == 0 else min(k + self.depth, num_blocks - 1)

    def sweeps(self, chain: BLLChain) -> bool:
        """Whether a step over the whole chain computes the messages by the sweep: every
        block to the top (L = 0, or L at least N - 1), current weights (T = 1), the
        plug-in read of m(alpha_k) passed on as the live blocks pass it
        (``propagate="mean"``, detached inputs) and no dropout that would draw in a copy."""
        return (
            self.sweep
            and self.last(0, chain.num_blocks) == chain.num_blocks - 1  # block 0 sees the top
            and self.schedule.every == 1
            and self.read == "mean"
            and sweep_obstacle(chain) is None
        )

    def likelihoods(self, chain: BLLChain) -> list[LookaheadLikelihood]:
        """One local likelihood per block below the last (``BLLChain.local_likelihoods``)."""
        check_lookahead(chain, self.depth, self.read)
        return [LookaheadLikelihood(self, k) for k in range(chain.num_blocks - 1)]

    def maybe_refresh(
        self, chain: BLLChain, step: int | None, skip: Collection[nn.Module] = ()
    ) -> int:
        """Copy the live weights when training step ``step`` starts a refresh period (every
        ``refresh`` steps, and whenever nothing is copied yet; ``None``: every call).
        Returns the bytes copied (0 when the copies are kept); ``skip``: as in ``refresh``."""
        return self.refresh(chain, skip) if self.schedule.due(step) else 0

    def defer_refresh(self) -> None:
        """Mark the copies stale without copying: the next ``logits`` refreshes them first.

        A step computed by the sweep reads the live blocks, not the copies; with T = 1 the
        copies are due every step, so copying them then would be work that only the
        logged statistics (every tenth step) and the diagnostics read."""
        self._stale = True

    def refresh(self, chain: BLLChain, skip: Collection[nn.Module] = ()) -> int:
        """Copy blocks 1..N-1 and their read-outs from ``chain``; the bytes moved. The live
        modules in ``skip`` are not copied: their copies keep their values until the caller
        loads them (``copy_of``), as a rank does with the state of another rank's blocks."""
        self._stale = False
        live = self._live(chain)
        before = self.copies.clones
        skipped = {id(m) for m in skip}
        self.copies.refresh(list(live), [i for i, m in enumerate(live) if id(m) in skipped])
        clones = self.copies.clones
        self._index = {id(m): i for i, m in enumerate(live)}
        n = chain.num_blocks
        self.blocks = [None, *clones[: n - 1]]  # type: ignore[list-item]
        self.readouts = dict(zip(self._readout_blocks(chain), clones[n - 1 :], strict=True))
        if clones is not before or self._bytes is None:  # cloned again: count again
            self._bytes = self.bytes_per_refresh(chain)
        return self._bytes

    def copy_of(self, module: nn.Module) -> nn.Module:
        """The frozen copy of the live block or read-out ``module`` (after a refresh)."""
        return self.copies.clones[self._index[id(module)]]

    def reads(self, chain: BLLChain, k: int) -> list[tuple[int, nn.Module]]:
        """The live modules block k's look-ahead reads, each with the block that owns it:
        blocks k+1..k+L, then the read-out after block k+L (owned by that block)."""
        last = self.last(k, chain.num_blocks)
        mods = [(j, chain.blocks[j]) for j in range(k + 1, last + 1)]
        return [*mods, (last, readout(chain, last))]

    def bytes_per_refresh(self, chain: BLLChain) -> int:
        """What one refresh moves: every block's look-ahead weights (parameters and
        buffers of blocks k+1..k+L and block k+L's read-out), summed over the blocks."""
        return sum(
            module_bytes(m) for k in range(chain.num_blocks - 1) for _, m in self.reads(chain, k)
        )

    @staticmethod
    def _readout_blocks(chain: BLLChain) -> list[int]:
        """The blocks whose read-outs are copied, in the order of ``_live``."""
        n = chain.num_blocks
        heads = [] if chain.pred_heads is None else list(range(len(chain.pred_heads)))
        return [*[j for j in heads if j != n - 1], n - 1]

    def _live(self, chain: BLLChain) -> list[nn.Module]:
        """The live modules the copies mirror: blocks 1..N-1, then the read-outs."""
        blocks = list(chain.blocks)[1:]
        return [*blocks, *(readout(chain, j) for j in self._readout_blocks(chain))]

    def logits(
        self, chain: BLLChain, k: int, z: Tensor, alpha: Any = None, read: str | None = None
    ) -> Tensor:
        """Read-out logits of block k's draw z_k through the frozen copies (``alpha``:
        block k's forward message, needed on feature maps; ``read``: what the copies read,
        the look-ahead's own ``read`` by default, "sample" to read ``z`` whatever it is)."""
        if not self.blocks:
            raise RuntimeError("the look-ahead copies are empty: call refresh(chain) first")
        if self._stale:  # deferred by a swept step: the live weights of that step
            self.refresh(chain)
        last = self.last(k, chain.num_blocks)
        if (self.read if read is None else read) == "mean":
            if alpha is None:
                raise ValueError("the look-ahead of the mean needs block k's forward message")
            inp: Any = alpha if chain.propagate == "params" else chain.families[k].mean(alpha)
        else:
            inp = _input(chain, k, z, alpha)
        for j in range(k + 1, last + 1):
            alpha = chain.families[j].params(self.blocks[j](inp))
            inp = alpha if chain.propagate == "params" else chain.families[j].mean(alpha)
        return self.readouts[last](inp)


class LookaheadLikelihood:
    """q_k(y | z_k) of one block through the shared ``Lookahead`` copies (a
    ``LocalLikelihood`` of ``BLLChain``: not a module, so it owns no parameters)."""

    def __init__(self, lookahead: Lookahead, k: int) -> None:
        self.lookahead, self.k = lookahead, k

    def __call__(
        self, chain: BLLChain, k: int, z: Tensor, cache: StepCache | None = None
    ) -> Distribution:
        if z is None:
            raise ValueError(f"block {k} has no latent to look ahead from")
        if cache is not None and cache.sweep is not None:  # current weights, to the top
            return cache.sweep.likelihood(k, cache)
        alpha = None if cache is None else cache.alpha.get(k)
        return Categorical(logits=self.lookahead.logits(chain, k, z, alpha))


def check_lookahead(chain: BLLChain, depth: int, read: str = "sample") -> None:
    """One-line errors for chains the look-ahead cannot read."""
    if chain.propagate == "params" and read == "sample":
        raise ValueError(
            "the look-ahead feeds a draw z_k to the next block, which reads alpha's "
            "parameters under propagate='params'; use propagate='mean' or 'sample'"
        )
    n = chain.num_blocks
    short = depth > 0 and any(k + depth < n - 1 for k in range(n - 1))
    if chain.pred_heads is None and short:
        raise ValueError(
            f"a look-ahead of depth {depth} ends below the last block, whose read-out is "
            "a predictive head: switch the predictive heads on, or look ahead to the top"
        )
    message = getattr(chain.spatial_message, "name", None)
    if message == "grid" and read == "sample":
        raise ValueError(
            "the look-ahead cannot rebuild a feature map from --message grid's cell latents; "
            "use --message channel, mean, pool or broadcast"
        )


def readout(chain: BLLChain, j: int) -> nn.Module:
    """The read-out after block j: its predictive head, the output head for the last."""
    if j == chain.num_blocks - 1:
        return chain.head
    if chain.pred_heads is None:
        raise ValueError(f"block {j} has no predictive head to read out")
    return chain.pred_heads[j]


def _input(chain: BLLChain, k: int, z: Tensor, alpha: Any) -> Any:
    """What block k + 1's copy reads for the draw z_k (see the module docstring)."""
    family = chain.families[k]
    z = family.features(z)
    if chain.spatial_message is None or z.dim() == chain.event_dim + 1:
        return z
    if alpha is None:
        raise ValueError(
            "the look-ahead on feature maps needs block k's forward message: evaluate the "
            "chain through BlockLocalELBO, which shares it in the step cache"
        )
    mean_map = family.mean(alpha)  # [B, H, W, C]
    summary = family.mean(chain.latent_params(k, alpha))  # [B, C]
    shift = (z - summary).to(mean_map.dtype)
    return mean_map + shift.reshape(shift.shape[0], *([1] * (mean_map.dim() - 2)), -1)


__all__ = ["Lookahead", "LookaheadLikelihood", "check_lookahead", "readout"]
