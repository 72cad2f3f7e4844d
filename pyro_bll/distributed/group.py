"""Which rank owns which blocks: stages of contiguous blocks, and replicas of each stage.

The world is K stages x R replicas (``Layout``): rank = replica * K + stage, so one
replica's K stages are consecutive ranks (one pipeline, typically on one node) and the R
replicas of a stage are K ranks apart. Stage s owns the blocks ``segment(s) = [a_s,
b_s)``; the segments tile 0..N-1 in order, so replica r of stage s receives its input
message m(alpha_{a_s - 1}) from replica r of stage s - 1 and sends m(alpha_{b_s - 1}) to
replica r of stage s + 1. Stage 0 also owns the input, the last stage the output head. By
default the N blocks are split as evenly as possible (the first N mod K stages get one
block more); ``--rank-blocks`` gives the number of blocks of every stage. With R = 1
(the default) a stage is a rank, as before replicas existed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyro_bll.config import ConfigError
from pyro_bll.core.chain import BLLChain
from pyro_bll.run.distributed_options import format_sizes as _fmt
from pyro_bll.run.options import RunConfig


@dataclass(frozen=True)
class Layout:
    """K stages x R replicas; ``groups`` says which blocks every stage owns."""

    groups: BlockGroups
    replicas: int

    @property
    def stages(self) -> int:
        return self.groups.world_size

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage

    def stage_ranks(self, stage: int) -> list[int]:
        """The ranks of the replicas of ``stage`` (their gradients are averaged)."""
        return [self.rank_of(stage, r) for r in range(self.replicas)]

    def __str__(self) -> str:
        if self.replicas == 1:
            return self.groups.describe("rank")
        return f"{self.stages} stage(s) x {self.replicas} replicas; " + self.groups.describe(
            "stage"
        )

    @classmethod
    def make(cls, cfg: RunConfig, world_size: int) -> Layout:
        """The layout of ``world_size`` ranks for ``cfg``; ConfigError (one line) if the
        world is not K stages x R replicas."""
        if cfg.method == "bp":  # data parallel: the whole network on every rank
            if cfg.replicas not in (None, world_size):
                raise ConfigError(
                    f"--method bp --distributed replicates the whole network on every rank: "
                    f"--replicas must be the world size {world_size}, got {cfg.replicas}"
                )
            return cls(BlockGroups((cfg.num_blocks,)), world_size)
        replicas = cfg.replicas
        if replicas is None and cfg.rank_blocks is not None:
            if world_size % len(cfg.rank_blocks):
                raise ConfigError(
                    f"--rank-blocks {_fmt(cfg.rank_blocks)} describes {len(cfg.rank_blocks)} "
                    f"ranks, but the world size is {world_size}; give one number per stage "
                    "(the world is stages x --replicas: torchrun's --nnodes x --nproc_per_node)"
                )
            replicas = world_size // len(cfg.rank_blocks)
        replicas = 1 if replicas is None else replicas
        stages = world_size // max(replicas, 1)
        if replicas < 1 or stages * replicas != world_size:
            raise ConfigError(
                f"a world of {world_size} ranks is not K stages x {replicas} replicas; launch "
                f"a multiple of {replicas} processes, or choose --replicas dividing "
                f"{world_size}"
            )
        if cfg.rank_blocks is not None and len(cfg.rank_blocks) * replicas != world_size:
            raise ConfigError(
                f"--rank-blocks {_fmt(cfg.rank_blocks)} gives {len(cfg.rank_blocks)} stages, "
                f"which with {replicas} replicas need {len(cfg.rank_blocks) * replicas} ranks, "
                f"but the world size is {world_size}"
            )
        return cls(BlockGroups.make(cfg.num_blocks, stages, cfg.rank_blocks), replicas)


@dataclass(frozen=True)
class BlockGroups:
    """Blocks per rank, ``sizes[r]``; rank r owns the contiguous blocks ``segment(r)``."""

    sizes: tuple[int, ...]

    @classmethod
    def make(cls, num_blocks: int, world_size: int, sizes: list[int] | None = None) -> BlockGroups:
        """Validate (or choose) the grouping for ``world_size`` ranks; ConfigError if bad."""
        if world_size > num_blocks:
            raise ConfigError(
                f"{world_size} ranks for {num_blocks} blocks: every rank needs at least one "
                f"block; launch at most {num_blocks} processes or split the network into more "
                "--blocks"
            )
        if sizes is None:
            q, extra = divmod(num_blocks, world_size)
            return cls(tuple(q + 1 if r < extra else q for r in range(world_size)))
        if len(sizes) != world_size:
            raise ConfigError(
                f"--rank-blocks {_fmt(sizes)} describes {len(sizes)} ranks, but the world size "
                f"is {world_size}; give one number per rank (torchrun's --nnodes x "
                "--nproc_per_node)"
            )
        if any(n <= 0 for n in sizes) or sum(sizes) != num_blocks:
            raise ConfigError(
                f"--rank-blocks {_fmt(sizes)} must be positive and add up to the {num_blocks} "
                "blocks"
            )
        return cls(tuple(sizes))

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def num_blocks(self) -> int:
        return sum(self.sizes)

    def segment(self, rank: int) -> tuple[int, int]:
        a = sum(self.sizes[:rank])
        return a, a + self.sizes[rank]

    def __str__(self) -> str:
        return self.describe("rank")

    def describe(self, unit: str) -> str:
        """ "rank 0: blocks 0-1; rank 1: block 2" (``unit``: rank or stage)."""
        parts = []
        for r in range(self.world_size):
            a, b = self.segment(r)
            parts.append(
                f"{unit} {r}: block{'s' if b - a > 1 else ''} "
                + (f"{a}" if b - a == 1 else f"{a}-{b - 1}")
            )
        return "; ".join(parts)


def owned_state_keys(chain: BLLChain, segment: tuple[int, int], rank: int) -> list[str]:
    """The ``chain.state_dict()`` keys a rank saves: its blocks' modules (rank 0 also any
    entry no block owns, which then keeps its initial value on every rank)."""
    prefixes = []
    named = {id(m): name for name, m in chain.named_modules()}
    for k in range(*segment):
        for mod in chain.block_modules(k):
            prefixes.append(named[id(mod)] + ".")
    all_prefixes = []
    for k in range(chain.num_blocks):
        all_prefixes += [named[id(m)] + "." for m in chain.block_modules(k)]

    def under(key: str, pre: list[str]) -> bool:
        return any(key.startswith(p) for p in pre)

    keys = list(chain.state_dict())
    mine = [k for k in keys if under(k, prefixes)]
    if rank == 0:
        mine += [k for k in keys if not under(k, all_prefixes)]
    return mine


def owned_parameter_index(chain: BLLChain, segment: tuple[int, int]) -> list[int]:
    """Positions in ``list(chain.parameters())`` of the parameters of blocks a..b-1."""
    mine = {id(p) for k in range(*segment) for p in chain.block_parameters(k)}
    return [i for i, p in enumerate(chain.parameters()) if id(p) in mine]
