"""One training step's forward and backward, an epoch's running state and its record.

``backward_pass`` computes the gradients of one batch, with one backward over the summed
loss or one backward per block (``--backward per-block``, docs/memory.md); the training
step (``Trainer.step``) adds the optimiser step, after ``clip_block_gradients``
(``--clip-grad``). ``EpochState`` is what an epoch has done
so far, which a mid-epoch checkpoint stores for an exact resume (docs/runs.md).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pyro_bll.core.chain import BLLChain
from pyro_bll.core.noise import NoiseKey
from pyro_bll.methods import Method

# --backward: one backward per block (freeing its graph), or one over the summed losses
BACKWARD_MODES = ("per-block", "joint")
# --lr-schedule: the per-step learning-rate factor at step t of total_steps
LR_SCHEDULES: dict[str, Callable[[int], Callable[[int], float]]] = {
    "constant": lambda total_steps: lambda t: 1.0,
    "cosine": lambda total_steps: (
        lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))
    ),
}


class TrainingDiverged(RuntimeError):
    """A local loss became NaN or infinite."""


def step_noise(seed: int, steps_done: int) -> NoiseKey:
    """The noise key of the optimiser step after ``steps_done`` steps of run ``seed``: the
    same in one process and on every rank (``pyro_bll.core.noise``)."""
    return NoiseKey(seed, steps_done)


def check_finite(losses: torch.Tensor, epoch: int, kept: str, first: int = 0) -> None:
    """TrainingDiverged naming the first block whose local loss is NaN or infinite.

    ``losses`` are blocks ``first..`` of a step's per-block losses; ``kept`` says where the
    results of the epochs before ``epoch`` are (an empty string: nowhere named)."""
    if torch.isfinite(losses).all():
        return
    bad = int((~torch.isfinite(losses)).nonzero()[0])
    raise TrainingDiverged(
        f"block {first + bad} local loss is {losses[bad].item()} in epoch {epoch + 1}; "
        f"metrics and checkpoints up to epoch {epoch} are kept{kept}; try a smaller --lr"
    )


def trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters of ``module`` that train (``requires_grad``)."""
    return [p for p in module.parameters() if p.requires_grad]


def differentiate(loss: torch.Tensor, params: list[torch.Tensor]) -> None:
    """``loss.backward()`` into ``params`` only. The graph of a BLL step also reaches
    tensors that are not parameters: the block inputs that the look-ahead's sweep made
    leaves of (``pyro_bll.core.lookahead_sweep``) to read its messages off. Naming the
    parameters keeps autograd from computing the gradients of those inputs again (a
    tenth of the ResNet step's backward, docs/results.md); the parameters' gradients are
    the same."""
    if params:
        loss.backward(inputs=params)
    else:
        loss.backward()


def backward_pass(
    method: Method,
    chain: BLLChain,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None,
    noise: NoiseKey | None,
    *,
    per_block: bool,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    on_block: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Forward and backward of one batch (gradients accumulate; no optimiser step).

    ``per_block``: block k's local loss is backpropagated, and its graph freed, before
    block k + 1 runs (``Method.local_losses``); otherwise one backward over the summed
    loss. ``on_block(k)`` is called after block k's forward, before its backward (memory
    measurements). ``autocast()`` wraps the forward passes only. Returns the logs ``[N]``.
    Only the chain's trainable parameters receive gradients (``differentiate``).
    """
    params = trainable(chain)
    if not per_block:
        with autocast():
            loss, logs = method.loss(chain, x, y, mask, noise=noise)
        if on_block is not None:
            on_block(chain.num_blocks - 1)
        differentiate(loss, params)
        return logs
    blocks = method.local_losses(chain, x, y, mask, noise=noise)
    total: dict[str, torch.Tensor] = {}
    for k in itertools.count():
        with autocast():  # the forward of one block
            item = next(blocks, None)
        if item is None:
            return total
        loss, logs = item
        if on_block is not None:
            on_block(k)
        differentiate(loss, params)
        del loss, item  # nothing of block k's graph outlives this iteration
        total = logs if not total else {name: total[name] + v for name, v in logs.items()}
    raise AssertionError("unreachable")


def clip_block_gradients(chain: BLLChain, max_norm: float, blocks: Iterable[int]) -> None:
    """Scale each listed block's gradient to an L2 norm of at most ``max_norm``.

    Block k's norm is taken over ``chain.block_parameters(k)`` alone (its layers, its part
    of the feedback network, its heads), so a block's update never depends on another
    block's gradient: clipping stays block-local and every rank of a block-parallel run
    can do it for its own blocks. ``max_norm = 0`` leaves the gradients as they are.
    Parameters a method adds outside the chain's blocks (FA's backward weights) are not
    clipped.
    """
    if max_norm <= 0:
        return
    for k in blocks:
        params = [p for p in chain.block_parameters(k) if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm)


@dataclass
class EpochState:
    """Where an epoch stands; a mid-epoch checkpoint stores it for an exact resume.

    ``step`` batches of the epoch's (seeded) order are done; ``totals`` are the sums of
    their per-block logs ``[N]``, ``seconds`` their training time.
    """

    epoch: int
    step: int = 0
    totals: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        logs = {k: v.detach() for k, v in logs.items()}
        self.totals = (
            logs if self.totals is None else {k: self.totals[k] + v for k, v in logs.items()}
        )
        self.step += 1

    def to_dict(self) -> dict[str, Any]:
        totals = {k: v.cpu() for k, v in (self.totals or {}).items()}
        return {"step": self.step, "totals": totals, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, epoch: int, d: dict[str, Any], device: torch.device) -> EpochState:
        totals = {k: v.to(device) for k, v in d["totals"].items()} or None
        return cls(epoch, int(d["step"]), totals, float(d["seconds"]))


def epoch_record(
    epoch: int,
    totals: dict[str, torch.Tensor] | None,
    count: int,
    metrics: dict[str, float],
    **timing: Any,
) -> dict[str, Any]:
    """One epoch's entry of the run history (``metrics.json``).

    ``totals`` are the per-block logs ``[N]`` summed over the epoch's ``count`` steps; the
    entry holds their means: ``block_losses`` (l_k), ``block_terms`` (BLL's kl,
    likelihood and pred), ``block_agreement`` (BLL's forward/feedback agreement,
    ``pyro_bll.core.agreement``), then ``timing`` (seconds) and the task's ``metrics``.
    """
    n = max(count, 1)
    means = {k: _json_list(v / n) for k, v in (totals or {}).items()}
    block_losses = means.pop("loss", [])
    agreement = {
        k.removeprefix("agreement_"): means.pop(k) for k in list(means) if "agreement_" in k
    }
    return {
        "epoch": epoch + 1,
        "block_losses": block_losses,
        "block_terms": means,
        **({"block_agreement": agreement} if agreement else {}),
        **timing,
        **metrics,
    }


def _json_list(v: torch.Tensor) -> list[float | None]:
    """``v.tolist()`` with NaN (an undefined statistic, e.g. of a block without a latent)
    as None, so that the history is valid JSON and compares equal to itself."""
    return [None if x != x else x for x in v.tolist()]
