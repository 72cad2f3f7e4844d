"""Monte Carlo noise streams: one seed per (run seed, training step, block).

The guide draws z_k ~ rho_k for every block. If all blocks drew from one global random
stream, block k's draw would depend on how many numbers blocks 0..k-1 consumed before it,
so a process that owns only blocks a..b-1 (``pyro_bll.distributed``) could not reproduce
the single-process draws. Instead the training step passes a ``NoiseKey`` (run seed and
global step index) to the chain through the step's cache, and the guide draws block k's
z_k under

    seed(k) = mix(run seed, step, k)            (a SplitMix64-style integer hash)

with the device's default generator seeded to seed(k) for the draw and restored
afterwards (``block_noise``). The draw is then a function of (seed, step, k) alone: the
same in a single process and on whichever rank owns block k, for reparameterised and
discrete (score-function) families alike, and nothing else that uses the global
generator is disturbed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit hash of integers (SplitMix64 finaliser applied after each value)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


@dataclass(frozen=True)
class NoiseKey:
    """Identifies one training step's noise: ``block_seed(k)`` seeds block k's draw."""

    seed: int
    step: int
    particle: int = 0  # Monte Carlo particle of the step (BlockLocalELBO(num_particles=P))

    def block_seed(self, k: int) -> int:
        if self.particle:
            return _mix(self.seed, self.step, k, self.particle)
        return _mix(self.seed, self.step, k)


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


@contextmanager
def block_noise(key: NoiseKey | None, k: int, device: torch.device) -> Iterator[None]:
    """Draw block k's noise from its own stream (no-op when ``key`` is None)."""
    if key is None:
        yield
        return
    gen = _generator(device)
    state = gen.get_state()
    gen.manual_seed(key.block_seed(k))
    try:
        yield
    finally:
        gen.set_state(state)
