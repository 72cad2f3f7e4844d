"""The block-parallel options (``--distributed`` and the options after it), declared and
checked here, before any process group exists and without knowing the world size.

They live here, below ``pyro_bll.distributed``, so that resolving a configuration never
imports the distributed runtime; the runtime reads the names from here. The section is
part of a run's configuration only with ``--distributed``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyro_bll.config import ConfigError, Section, at_least_one, finite_positive, option

BACKENDS = ("auto", "gloo", "nccl")
SCHEDULE_NAMES = ("pipelined", "sync")  # pyro_bll.distributed.schedule.SCHEDULES
# the methods a block-parallel run trains: stages of blocks (bll), data parallel (bp)
DISTRIBUTED_METHODS = ("bll", "bp")


def format_sizes(sizes: Iterable[int]) -> str:
    return ",".join(str(n) for n in sizes)


@dataclass(frozen=True)
class DistributedOptions(Section):
    """Block-parallel training across processes (launched by torchrun)."""

    name = "dist"
    title = "block-parallel training (launch with torchrun --nproc_per_node=K ... --distributed)"
    applies_to = "--distributed runs"

    replicas: int | None = option(
        None,
        "data-parallel replicas R of every stage (group of blocks): the world is K stages "
        "x R replicas, every replica trains on its shard of each batch and the replicas "
        "of a stage average their gradients (default: world size / number of "
        "--rank-blocks, else 1; --method bp: the world size)",
        metavar="R",
        check=at_least_one,
    )
    schedule: str = option(
        "pipelined",
        "{choices}; pipelined: ranks work on successive micro-batches at once; sync: "
        "lock-step, one rank after the other (reference); both give the single-process "
        "result",
        choices=SCHEDULE_NAMES,
    )
    rank_blocks: list[int] | None = option(
        None,
        "blocks per stage, in order (default: as even as possible); must add up to "
        "--blocks; one number per stage (a stage has --replicas ranks)",
        metavar="N0,N1,...",
        parse="list[int]",
    )
    dist_backend: str = option(
        "auto",
        "{choices}; auto: gloo on CPU, NCCL with --device cuda (one GPU per rank); gloo "
        "with cuda stages messages through host memory (ranks may share a GPU)",
        choices=BACKENDS,
    )
    dist_timeout: float = option(
        300.0,
        "seconds to wait for the rendezvous, a message or a silent rank before the "
        "job stops with an error naming the rank",
        check=finite_positive,
    )
    pipeline_depth: int = option(
        2,
        "pipelined schedule: forward messages a rank may have in flight to the next",
        check=at_least_one,
    )

    def check(self, cfg: Any) -> None:
        """The options that can be checked without knowing the world size."""
        if cfg.method not in DISTRIBUTED_METHODS:
            raise ConfigError(
                f"--distributed runs --method bll (stages of blocks, and replicas of them) or "
                f"--method bp (data parallel); --method {cfg.method} is not supported there"
            )
        if cfg.method == "bp" and self.rank_blocks is not None and len(self.rank_blocks) != 1:
            raise ConfigError(
                "--method bp --distributed trains the whole network on every rank (one "
                "stage); drop --rank-blocks"
            )
        if self.rank_blocks is not None:
            sizes = format_sizes(self.rank_blocks)
            if any(n <= 0 for n in self.rank_blocks):
                raise ConfigError(f"--rank-blocks {sizes}: every rank needs >= 1 block")
            if sum(self.rank_blocks) != cfg.num_blocks:
                raise ConfigError(
                    f"--rank-blocks {sizes} covers {sum(self.rank_blocks)} blocks, but the "
                    f"network has {cfg.num_blocks}; the numbers must add up to --blocks"
                )
