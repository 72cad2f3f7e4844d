"""Where a run is assembled from its resolved options: the family, task, chain and
method it names, built once for the single-process trainer and for every rank.

``RunConfig`` (``pyro_bll.run.options``) resolves and checks the options when it is
made; everything here needs the registries (families, tasks, methods), so this module
sits above them in the import graph and nothing below imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pyro_bll.config import ConfigError
from pyro_bll.core.chain import BLLChain
from pyro_bll.families import Family, FamilyError, make_family
from pyro_bll.methods import Method, build_method
from pyro_bll.run.compile import compile_chain
from pyro_bll.run.options import RunConfig, config_for_task
from pyro_bll.seed import seed_everything
from pyro_bll.tasks import TASKS


def validate(cfg: RunConfig) -> RunConfig:
    """``cfg`` itself: a ``RunConfig`` is resolved and checked once, when it is made
    (kept for the callers that checked a config before building it)."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"expected a RunConfig, got {type(cfg).__name__}")
    return cfg


def build_from_config(cfg: RunConfig) -> tuple[Family, Any, BLLChain]:
    """Family, task and chain of a run config (fresh weights).

    Training, the diagnostics and the distributed runtime all build through this.
    """
    try:
        family = make_family(cfg.family, **cfg.family_args)
        if cfg.stack is not None:  # the block outputs must fit the family's parameter layout
            family.params(torch.zeros(1, family.raw_size(cfg.stack.d_model)))
    except FamilyError as e:
        raise ConfigError(str(e)) from None
    task = TASKS[cfg.task](cfg)
    return family, task, task.build_chain(family)  # pyro_bll.tasks.assembly wires --likelihood


@dataclass
class BuiltRun:
    """A run's family, task, chain (on its device) and method, before any optimiser."""

    cfg: RunConfig
    family: Family
    task: Any
    chain: BLLChain
    method: Method
    device: torch.device
    amp: bool  # --amp: bf16 autocast of forward passes and losses

    def autocast(self) -> torch.autocast:
        """bf16 autocast on the run's device with ``amp``; a no-op context otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


def build_run(cfg: RunConfig) -> BuiltRun:
    """Everything a run trains, built from the run seed: the same on every rank.

    The single-process ``Trainer`` and every rank's ``RankStage`` build through this,
    then make their own optimiser over the parameters they own.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda requested but no CUDA device is available; use --device cpu"
        )
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    family, task, chain = build_from_config(cfg)
    chain = chain.to(device)
    if cfg.vision is not None and cfg.vision.channels_last:
        chain.to(memory_format=torch.channels_last)
    method = build_method(chain, cfg)  # before the optimiser: it may add modules
    if cfg.compile:
        compile_chain(chain)
    return BuiltRun(cfg, family, task, chain, method, device, cfg.amp)


__all__ = ["BuiltRun", "build_from_config", "build_run", "config_for_task", "validate"]
