"""Where a run is assembled: the configuration checked against the registries, and the
family, task, chain and method it names.

``config.py`` holds data only; everything here needs the registries (families, tasks,
methods, feedback networks, spatial messages), so this module sits above them in the
import graph and nothing below imports it.
"""

from __future__ import annotations

from typing import Any

import torch

from pyro_bll.config import BLL_TERMS, COMMON_DEFAULTS, LR_SCHEDULES, ConfigError, RunConfig
from pyro_bll.core.chain import LIKELIHOOD_ESTIMATORS, BLLChain
from pyro_bll.families import FAMILIES, Family, FamilyError, make_family
from pyro_bll.guides import FEEDBACKS, MESSAGES
from pyro_bll.methods import METHODS, check_method_options
from pyro_bll.models import RESNET_ARCHS
from pyro_bll.run.distributed_options import validate_options
from pyro_bll.tasks import TASKS

_POSITIVE = ("layers", "d_model", "seq_len", "epochs", "train_size", "test_size", "val_size",
             "batch_size")  # fmt: skip


def fill_defaults(cfg: RunConfig) -> RunConfig:
    """Set every option left unset (``None``): first ``--family`` (the task's choice, else
    the paper's Gaussian), then the defaults that depend on the family and the method
    (``--propagate`` on tasks that take the family's choice, ``--backward``), then the
    task's ``DEFAULTS``, then ``COMMON_DEFAULTS``; options the
    user set are kept. Idempotent; returns ``cfg``. The command line and
    ``config_for_task`` both come here."""
    task = TASKS.get(cfg.task)
    task_defaults = getattr(task, "DEFAULTS", {})
    if cfg.family is None:  # first: the defaults below depend on it
        cfg.family = task_defaults.get("family", COMMON_DEFAULTS["family"])
    if cfg.propagate is None and getattr(task, "params_propagation", False):
        if cfg.family in FAMILIES:
            cfg.propagate = FAMILIES[cfg.family].default_propagate
    if cfg.backward is None and cfg.method in METHODS and not METHODS[cfg.method].local:
        cfg.backward = "joint"  # one loss over the whole network; local methods: per task
    return cfg.fill_defaults(task_defaults)


def config_for_task(task: str, **options: Any) -> RunConfig:
    """A config for ``task`` with ``options`` set and every other option at its default."""
    return fill_defaults(RunConfig(task=task, **options))


def validate(cfg: RunConfig) -> RunConfig:
    """Check ``cfg`` before any work starts (ConfigError: one line naming the fix) and fill
    its defaults. Returns ``cfg``."""
    fill_defaults(cfg)  # unset options never fail a check below; set ones are unchanged
    for name, choices, what in [
        (cfg.task, TASKS, "task"),
        (cfg.method, METHODS, "method"),
        (cfg.family, FAMILIES, "family"),
        (cfg.feedback, FEEDBACKS, "feedback"),
        (cfg.feedback_update, ("grad", "solve"), "feedback update"),
        (cfg.arch, RESNET_ARCHS, "arch"),
    ]:
        if name not in choices:
            raise ConfigError(f"unknown {what} {name!r}; valid: {', '.join(choices)}")
    for name in _POSITIVE:
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}"
            )
    if cfg.likelihood is not None and cfg.likelihood not in LIKELIHOOD_ESTIMATORS:
        raise ConfigError(
            f"unknown likelihood {cfg.likelihood!r}; valid: {', '.join(LIKELIHOOD_ESTIMATORS)}"
        )
    for name, choices, what in [
        (cfg.propagate, ("mean", "params", "sample"), "propagate"),
        (cfg.lr_schedule, LR_SCHEDULES, "lr schedule"),
        (cfg.message, MESSAGES, "message"),
    ]:
        if name not in choices:
            raise ConfigError(f"unknown {what} {name!r}; valid: {', '.join(choices)}")
    TASKS[cfg.task].check_config(cfg)  # per task: blocks divide layers, or fit the ResNet
    if cfg.amp and not cfg.device.startswith("cuda"):
        raise ConfigError("--amp (bf16 autocast) needs --device cuda; drop --amp on CPU")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise ConfigError(f"--max-minutes must be positive, got {cfg.max_minutes}")
    if cfg.checkpoint_every is not None and cfg.checkpoint_every <= 0:
        raise ConfigError(
            f"--checkpoint-every must be a positive number of steps, got {cfg.checkpoint_every}"
        )
    if not cfg.lr > 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")
    if cfg.ridge < 0:
        raise ConfigError(f"--ridge must be >= 0, got {cfg.ridge}")
    if not cfg.width > 0:
        raise ConfigError(f"--width must be positive, got {cfg.width}")
    if not 0 <= cfg.sim_weight <= 1:
        raise ConfigError(f"--sim-weight must lie in [0, 1], got {cfg.sim_weight}")
    unknown = [t for t in cfg.bll_terms if t not in BLL_TERMS]
    if unknown:
        raise ConfigError(f"unknown --bll-terms {','.join(unknown)}; valid: {','.join(BLL_TERMS)}")
    check_method_options(cfg)
    if cfg.backward not in ("per-block", "joint"):
        raise ConfigError(f"unknown --backward {cfg.backward!r}; valid: per-block, joint")
    if cfg.backward == "per-block" and not METHODS[cfg.method].local:
        raise ConfigError(
            f"--backward per-block needs block-local losses (--method bll or predsim); "
            f"--method {cfg.method} has one loss over the whole network: use --backward joint"
        )
    if cfg.clip_grad < 0:
        raise ConfigError(f"--clip-grad must be >= 0 (0: no clipping), got {cfg.clip_grad}")
    if cfg.pred_weight < 0:
        raise ConfigError(f"--pred-weight must be >= 0, got {cfg.pred_weight}")
    if cfg.device not in ("cpu",) and not cfg.device.startswith("cuda"):
        raise ConfigError(f"unknown --device {cfg.device!r}; use cpu or cuda[:N]")
    if cfg.distributed:
        validate_options(cfg)
    return cfg


def build_from_config(cfg: RunConfig) -> tuple[Family, Any, BLLChain]:
    """Family, task and chain of a validated run config (fresh weights).

    Training, the diagnostics and the distributed runtime all build through this.
    """
    try:
        family = make_family(cfg.family, **cfg.family_args)
        # the block outputs must fit the family's parameter layout: check it up front
        family.params(torch.zeros(1, family.raw_size(cfg.d_model)))
    except FamilyError as e:
        raise ConfigError(str(e)) from None
    task = TASKS[cfg.task](cfg)
    return family, task, task.build_chain(family)  # pyro_bll.tasks.assembly wires --likelihood


__all__ = ["build_from_config", "config_for_task", "fill_defaults", "validate"]
