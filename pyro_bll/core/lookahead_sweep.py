"""The look-ahead to the top with current weights, by one sweep of vector-Jacobian products.

With depth L = top, refresh T = 1 and the plug-in read (``--lookahead-input mean``) the
copies of ``pyro_bll.core.lookahead`` equal the live blocks, and they read m_k = m(alpha_k),
the very input the live block k + 1 reads. Block k's likelihood is then

    log q_k(y | m_k) = ell(y) = log p(y | f_out(m_{N-1}))          the same for every k

(the output head's log-likelihood of the live forward pass), and its gradient with
respect to m_k is backpropagation's:

    G_{N-2} = d ell / d m_{N-2}            through block N-1 and f_out
    G_{k-1} = J_k^T G_k                    J_k = d m_k / d m_{k-1}, block k's Jacobian

So block k's term has the value and the gradient of the surrogate (per example b)

    ell_b  +  < m_k - stop(m_k), stop(G_k) >_b                               (S)

and the chain needs one sweep of N - 2 vector-Jacobian products through the forward
graphs the live blocks built anyway (``torch.autograd.grad`` with respect to each block's
input, so no parameter gets a gradient from it), instead of a forward and a backward
through N - 1 - k copies for every block k: O(N) block passes instead of O(N^2), and no
copy is read. The gradients equal the copies' to rounding
(tests/core/test_lookahead_sweep.py).

What it says about the method (docs/math.md §6): in this setting block k's message *is*
the backpropagated gradient of the output likelihood, so BLL's gradient is backprop's for
the output likelihood plus the gradients of the local terms (KL, predictive heads). Across
processes, computing G_k needs the blocks above to finish their forward and send G back
in the same step, which is backward locking; the copies (or T > 1, or L < top) are what
let a block compute its message alone.

Shapes: m_k ``[B, ...]`` (a feature map, a sequence or a vector per example), G_k like
m_k, ell ``[B, *L]`` per label (``L``: the labels' event axes, e.g. ``[T]`` for sequences).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pyro_bll.core.chain import BLLChain
    from pyro_bll.core.step_cache import StepCache


def stochastic_modules(chain: BLLChain) -> list[str]:
    """Names of dropout layers that would draw in training: a copy would draw other masks
    than the live block, so the sweep would not equal the copies."""
    return [
        name
        for name, m in chain.blocks.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
    ]


def sweep_obstacle(chain: BLLChain) -> str | None:
    """Why one sweep through the live blocks cannot give their messages on ``chain``, or
    None where it can: it differentiates the means the blocks pass on, with each block's
    input detached, and a copied or recomputed block must draw no dropout masks of its
    own."""
    if chain.propagate != "mean":
        return (
            "the sweep differentiates the means the blocks pass on; use --propagate mean "
            f"(got {chain.propagate})"
        )
    if not chain.detach:
        return "the sweep reads block inputs detached at every boundary (chain.detach)"
    drawn = stochastic_modules(chain)
    if drawn:
        return f"dropout ({drawn[0]}) would draw other masks; use a model without dropout"
    return None


class LookaheadSweep:
    """One step's sweep: the block inputs it differentiates with respect to, then ell and
    every G_k, computed once when the model asks for the first block's likelihood (the
    guide has run every block by then).

    Args:
        chain: the chain whose live forward graphs the sweep reads (``chain.detach``).
        y: the labels ``[B, *L]``.
        mask: valid labels ``[B, *L]`` or ``None``.
    """

    def __init__(self, chain: BLLChain, y: Tensor, mask: Tensor | None) -> None:
        self.chain, self.y, self.mask = chain, y, mask
        self.inputs: dict[int, Tensor] = {}  # block k's input, a leaf that records its graph
        self._ell: Tensor | None = None  # [B, *L], detached
        self._grads: dict[int, Tensor] = {}  # G_k, [B, ...] like m_k

    def tap(self, k: int, inp: Tensor) -> Tensor:
        """Block k's (detached) input as a leaf whose gradient path the sweep can read: no
        gradient reaches block k - 1 through it."""
        leaf = inp.requires_grad_(True)
        self.inputs[k] = leaf
        return leaf

    def messages(self, cache: StepCache) -> dict[int, Tensor]:
        """Every G_k ``[B, ...]`` (k = 0..N-2, detached), swept once per step: what the
        look-ahead's likelihood reads, and what ``--beta target`` stashes
        (``pyro_bll.core.targets``). Needs the guide or the model to have run every block
        with ``cache.sweep`` set (so that ``inputs`` holds blocks 1..N-1)."""
        if self._ell is None:
            self._run(cache)
        return self._grads

    def _run(self, cache: StepCache) -> None:
        chain, alpha = self.chain, cache.alpha
        last = chain.num_blocks - 1
        logits = chain.head(chain.families[last].mean(alpha[last]))  # [B, *L, V]
        ell = dist.Categorical(logits=logits).log_prob(self.y)  # [B, *L]
        total = ell if self.mask is None else ell * self.mask.to(ell.dtype)
        (g,) = torch.autograd.grad(total.sum(), self.inputs[last], retain_graph=True)
        self._grads = {last - 1: g}
        for k in range(last - 1, 0, -1):  # G_{k-1} = J_k^T G_k
            m = chain.next_input(k, alpha[k], None)  # the value of block k + 1's input
            (g,) = torch.autograd.grad(m, self.inputs[k], grad_outputs=g, retain_graph=True)
            self._grads[k - 1] = g
        self._ell = ell.detach()

    def likelihood(self, k: int, cache: StepCache) -> SweptCategorical:
        """Block k's look-ahead likelihood as the surrogate (S), label-shaped."""
        g = self.messages(cache)[k]
        m = self.chain.next_input(k, cache.alpha[k], None)  # [B, ...], block k's graph
        linear = ((m - m.detach()) * g).reshape(m.shape[0], -1).sum(1)  # [B]
        return SweptCategorical(self._ell, linear, self.y, self.mask)  # type: ignore[arg-type]


class SweptCategorical(dist.TorchDistribution):
    """The surrogate (S) as a distribution over the observed labels: ``log_prob(y)`` is
    ell ``[B, *L]`` plus each example's linear term spread over its valid labels (a
    masked label carries none of it, so a masked sum keeps all of it). It is defined at
    the labels it was swept with only."""

    arg_constraints: dict = {}
    support = dist.constraints.nonnegative_integer

    def __init__(self, ell: Tensor, linear: Tensor, y: Tensor, mask: Tensor | None) -> None:
        self.ell, self.linear, self.y, self.valid = ell, linear, y, mask
        super().__init__(ell.shape, torch.Size(), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != self.batch_shape:
            raise ValueError(f"the swept likelihood has shape {tuple(self.batch_shape)}")
        return self

    def log_prob(self, value: Tensor) -> Tensor:
        if value is not self.y and not torch.equal(value, self.y):
            raise ValueError("the swept look-ahead likelihood is defined at its labels only")
        label_axes = tuple(range(1, self.ell.dim()))
        if not label_axes:  # one label per example: the whole term on it
            return self.ell + self.linear
        if self.valid is None:
            share = self.ell.new_full(self.ell.shape, 1.0 / max(1, self.ell[0].numel()))
        else:
            valid = self.valid.to(self.ell.dtype)
            share = valid / valid.sum(label_axes, keepdim=True).clamp(min=1.0)
        spread = self.linear.reshape(-1, *([1] * len(label_axes))) * share  # [B, *L]
        return self.ell + spread


__all__ = ["LookaheadSweep", "SweptCategorical", "stochastic_modules", "sweep_obstacle"]
