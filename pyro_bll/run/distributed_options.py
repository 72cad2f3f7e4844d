"""The block-parallel options (``--distributed`` and the options after it) that can be
checked before any process group exists, without knowing the world size.

They live here, below ``pyro_bll.distributed``, so that validating a configuration never
imports the distributed runtime; the runtime reads the names from here.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyro_bll.config import ConfigError, RunConfig

BACKENDS = ("auto", "gloo", "nccl")
SCHEDULE_NAMES = ("pipelined", "sync")  # pyro_bll.distributed.schedule.SCHEDULES


def format_sizes(sizes: Iterable[int]) -> str:
    return ",".join(str(n) for n in sizes)


def validate_options(cfg: RunConfig) -> None:
    """The distributed options that can be checked without knowing the world size."""
    if cfg.method not in ("bll", "bp"):
        raise ConfigError(
            f"--distributed runs --method bll (stages of blocks, and replicas of them) or "
            f"--method bp (data parallel); --method {cfg.method} is not supported there"
        )
    if cfg.replicas is not None and cfg.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {cfg.replicas}")
    if cfg.method == "bp" and cfg.rank_blocks is not None and len(cfg.rank_blocks) != 1:
        raise ConfigError(
            "--method bp --distributed trains the whole network on every rank (one stage); "
            "drop --rank-blocks"
        )
    if cfg.schedule not in SCHEDULE_NAMES:
        raise ConfigError(
            f"unknown --schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULE_NAMES)}"
        )
    if cfg.dist_backend not in BACKENDS:
        raise ConfigError(
            f"unknown --dist-backend {cfg.dist_backend!r}; valid: {', '.join(BACKENDS)}"
        )
    if not cfg.dist_timeout > 0:
        raise ConfigError(f"--dist-timeout must be positive, got {cfg.dist_timeout}")
    if cfg.pipeline_depth < 1:
        raise ConfigError(f"--pipeline-depth must be at least 1, got {cfg.pipeline_depth}")
    if cfg.rank_blocks is not None:
        sizes = format_sizes(cfg.rank_blocks)
        if any(n <= 0 for n in cfg.rank_blocks):
            raise ConfigError(f"--rank-blocks {sizes}: every rank needs >= 1 block")
        if sum(cfg.rank_blocks) != cfg.num_blocks:
            raise ConfigError(
                f"--rank-blocks {sizes} covers {sum(cfg.rank_blocks)} blocks, "
                f"but the network has {cfg.num_blocks}; the numbers must add up to --blocks"
            )
