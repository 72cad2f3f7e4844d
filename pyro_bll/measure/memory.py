"""Activation memory on any device: the bytes autograd saves for backward, alive at once.

A training step's activation memory is what the forward pass leaves for the backward pass:
the tensors autograd saves (inputs of linear layers and convolutions, ReLU outputs,
normalisation statistics, ...). ``SavedTensorMeter`` counts them through
``torch.autograd.graph.saved_tensors_hooks``: every saved tensor is wrapped on packing,
its storage counted once however many ops save it (views and shared inputs), and
uncounted when autograd drops the last reference to it (after ``backward`` frees the
graph, or when the graph is garbage). ``peak`` is the largest total seen during the step.
Parameters (saved by the layers that use them) are not activations and are skipped.

On a CPU, where torch keeps no allocator statistics, this is the measurement of
``experiments/bench_memory.py``; ``tests/measure/test_memory.py`` checks it against byte counts
worked out by hand. On a GPU the benchmark also reports torch.cuda.max_memory_allocated.

``balanced_split`` cuts a sequence of per-unit costs into contiguous groups with the
smallest possible largest group (the ResNets' ``--split memory``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class _Saved:
    """What autograd holds instead of a saved tensor while the meter is on."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """Count the bytes of tensors saved for backward (current, peak) while active.

    Args:
        exclude: tensors whose storage is never counted (the model's parameters and
            buffers).
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.alive: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
        self.current = 0
        self.peak = 0
        self._hooks: Any = None

    @classmethod
    def for_module(cls, module: nn.Module) -> SavedTensorMeter:
        return cls([*module.parameters(), *module.buffers()])

    def _pack(self, tensor: Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.skip or storage.nbytes() == 0:
            return tensor
        entry = self.alive.get(key)
        if entry is None:
            self.alive[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        # detached: holding the tensor itself (with its grad_fn) would let a node that saves
        # its own output keep itself alive in a reference cycle when backward never runs
        saved = _Saved(tensor.detach())
        weakref.finalize(saved, self._release, key)
        return saved

    @staticmethod
    def _unpack(packed: Any) -> Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: int) -> None:
        entry = self.alive[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.alive[key]

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes of parameters, buffers, gradients and optimiser state (each storage once)."""

    def total(tensors: Iterable[Tensor]) -> int:
        seen: dict[int, int] = {}
        for t in tensors:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    params = list(module.parameters())
    opt = [] if optimizer is None else [
        v for st in optimizer.state.values() for v in st.values()
        if isinstance(v, Tensor) and v.dim() > 0
    ]  # fmt: skip
    return {
        "parameters": total(params),
        "buffers": total(module.buffers()),
        "gradients": total(p.grad for p in params if p.grad is not None),
        "optimizer": total(opt),
    }


def balanced_split(costs: Sequence[float], groups: int) -> list[int]:
    """Sizes of ``groups`` contiguous, non-empty groups of ``costs`` whose largest sum is as
    small as possible (dynamic programming over cut points; ties: earlier cuts)."""
    n = len(costs)
    if not 1 <= groups <= n:
        raise ValueError(f"cannot cut {n} units into {groups} non-empty groups")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[g][i]: smallest largest-group cost of the first i units in g groups
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for i in range(g, n + 1):
            for j in range(g - 1, i):
                value = max(best[g - 1][j], prefix[i] - prefix[j])
                if value < best[g][i]:
                    best[g][i], cut[g][i] = value, j
    sizes, i = [], n
    for g in range(groups, 0, -1):
        j = cut[g][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]
