"""Delayed targets: the blocks above send block k its backpropagated message, used d steps later.

At training step t the whole-chain step sweeps every block's message once
(``pyro_bll.core.lookahead_sweep``, with means propagated between blocks):

    G_k^(t) = d ell^(t) / d m_k          [B, ...] like m_k,   k = 0..N-2

where ell = sum_b log p(y_b | f_out(m_{N-1})) is the output head's log-likelihood of the
live forward pass and m_k = m(alpha_k) block k's output (the input of block k + 1). Block
k stashes what it read at step t, x_k^(t) (its input, detached), beside G_k^(t) (detached).
At step t + d it recomputes its forward on the stashed input with its *current* weights
theta_k and adds to its local loss the term (summed over the batch, the scale of every
Pyro ELBO term)

    tau_k^(t+d) = - < m_k(x_k^(t); theta_k), G_k^(t) >                       (T)

in place of the local likelihood (dropped below the last block; the last block keeps its
output likelihood). In the first d steps no target has arrived and tau_k = 0.

* **What it approximates.** With unchanged weights, d tau_k / d theta_k = -J_theta^T G_k
  is backprop's gradient of -ell^(t) with respect to theta_k (tests/core/test_targets.py),
  so block k follows the gradient of step t's output likelihood d steps late, as in
  delayed-gradient pipelines. The difference-target-propagation form, block k regressing
  m_k onto the target m_k^(t) + G_k^(t) by (1/2) ||m_k - (m_k^(t) + G_k^(t))||^2, has the
  same gradient at m_k = m_k^(t) and adds a pull back to m_k^(t) once the weights moved;
  the linear form (T) is the one implemented (it needs no stashed m_k^(t)).
* **Which premise it relaxes.** Backward locking, to a delay of d steps: block k needs
  G_k from the blocks above d steps after its forward, not in the same step. It still
  needs the blocks above to send G_k back (their vector-Jacobian products; no weights
  cross). Recomputing the forward avoids backpropagating through a graph whose
  parameters the optimiser has since changed in place.
* **What it holds.** d stashed inputs and targets per block (``bytes_held``); the stash
  is part of the method's state, saved in checkpoints for an exact resume.
* **rho_k.** beta_k stays the label potential; (T) is evaluated at m(alpha_k), pathwise:
  it trains block k's forward layers, not its feedback.

Batch norm in a recomputed block normalises with the stashed batch's statistics (training
mode, as at step t); its running statistics are left as the live forward set them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pyro_bll.core.lookahead_sweep import sweep_obstacle

if TYPE_CHECKING:
    from pyro_bll.core.chain import BLLChain

# one step's stash: (x_k, G_k) for blocks k = 0..N-2, each [B, ...]
Stash = list[tuple[Tensor, Tensor]]


class DelayedTargets:
    """The targets in flight: the stashes of the last ``delay`` steps, oldest first.

    Args:
        delay: d >= 1, the steps between a target's sweep and its use.
    """

    def __init__(self, delay: int = 1) -> None:
        if delay < 1:
            raise ValueError(f"--target-delay must be at least 1, got {delay}")
        self.delay = delay
        self.pending: deque[Stash] = deque()

    @staticmethod
    def check(chain: BLLChain) -> None:
        """ValueError, in one line, for a chain whose messages the sweep cannot compute."""
        why = sweep_obstacle(chain)
        if why is not None:
            raise ValueError(f"--beta target: {why}")
        if chain.head_input != "mean":
            raise ValueError("--beta target needs the output head to read m(alpha_N)")

    def step(self, chain: BLLChain, inputs: list[Tensor], grads: list[Tensor]) -> Tensor:
        """One training step: tau ``[N]`` from the stash that is due (zeros while fewer
        than d are in flight), then this step's stash (``inputs[k]`` x_k^(t),
        ``grads[k]`` G_k^(t), k = 0..N-2) joins the queue."""
        due = self.pending.popleft() if len(self.pending) >= self.delay else None
        self.pending.append([(x.detach(), g.detach()) for x, g in zip(inputs, grads, strict=True)])
        ref = grads[0] if grads else inputs[0] if inputs else None
        return self.term(chain, due, ref)

    @staticmethod
    def term(chain: BLLChain, stash: Stash | None, ref: Tensor | None = None) -> Tensor:
        """tau ``[N]`` (T) of a stash with the current weights, a graph into block k's
        parameters only (the last block's entry is 0); zeros for ``None``."""
        device = ref.device if ref is not None else next(chain.parameters()).device
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        out = [torch.zeros((), device=device, dtype=dtype)] * chain.num_blocks
        for k, (x, g) in enumerate(stash or []):
            with buffers_kept(chain.blocks[k]):
                alpha = chain.families[k].params(chain.blocks[k](x))
            m = chain.next_input(k, alpha, None)  # [B, ...] like g
            out[k] = -(m * g.to(m.dtype)).sum()
        return torch.stack(out)

    def bytes_held(self) -> int:
        """The activation memory spent waiting: every pending x_k and G_k, over the blocks
        (up to d stashes per block)."""
        return sum(t.numel() * t.element_size() for s in self.pending for p in s for t in p)

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"delay": self.delay, "pending": [[list(p) for p in s] for s in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("delay", self.delay) != self.delay:
            raise ValueError(
                f"the checkpoint's targets were sent with --target-delay {state['delay']}, "
                f"this run has {self.delay}"
            )
        self.pending = deque([[(x, g) for x, g in s] for s in state.get("pending", [])])


@contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Run the block on copies of its buffers (batch norm's running statistics), so that
    they stay as the live forward left them. The buffers are swapped, not written back in
    place: the live forward's graph saved them for its backward."""
    held = [(m, name, b) for m in module.modules() for name, b in m._buffers.items()
            if b is not None]  # fmt: skip
    for m, name, b in held:
        m._buffers[name] = b.clone()
    try:
        yield
    finally:
        for m, name, b in held:
            m._buffers[name] = b


__all__ = ["DelayedTargets", "buffers_kept"]
