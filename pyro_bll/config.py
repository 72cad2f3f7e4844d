"""Typed run configuration; ``experiments/run.py`` parses the command line into it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2."""


LR_SCHEDULES = ("constant", "cosine")
# the terms of BLL's local loss l_k that --bll-terms may keep (the output head's
# likelihood of the last block is always kept): KL(rho_k || alpha_k), the local
# likelihood -E[log q_k(y | z_k)] of the blocks below the last, the predictive loss
BLL_TERMS = ("kl", "likelihood", "pred")


@dataclass
class RunConfig:
    """Everything a run needs. ``validate`` checks it before any work starts."""

    task: str = "s2s_reverse"
    method: str = "bll"
    family: str = "gaussian"
    family_args: dict[str, Any] = field(default_factory=dict)
    layers: int = 20
    blocks: int | None = None  # None: the task's default (one block per layer; vision: 4)
    d_model: int = 32
    seq_len: int = 10
    epochs: int = 5
    train_size: int | None = None  # None: the task's default (s2s_reverse: 10,000 per epoch)
    test_size: int | None = None  # None: the task's default (s2s_reverse: 1,000)
    val_size: int | None = None  # vision: evaluate on the last N training images, not the test set
    data_dir: str | None = None  # None: the task's default (its DEFAULTS["data_dir"])
    batch_size: int = 50
    lr: float = 2e-3
    lr_schedule: str = "constant"  # constant | cosine (decay to 0 over the epochs)
    pred_weight: float = 1.0
    pred_head: str = "linear"  # vision: predictive head of BLL/Pred-Sim blocks (linear | conv)
    bll_terms: list[str] = field(default_factory=lambda: list(BLL_TERMS))  # ablations
    feedback: str = "linear"
    feedback_update: str = "grad"
    ridge: float = 1.0
    propagate: str = "mean"
    likelihood: str | None = None  # bound | sample; None: the family's default_likelihood
    arch: str = "resnet18"  # vision tasks: resnet18 | resnet50 (models/resnet.py)
    width: float = 1.0  # vision tasks: channel multiplier of the stage widths (64, ..., 512)
    message: str = "pool"  # vision tasks: how beta_k meets the feature map (guides/spatial.py)
    sim_weight: float = 0.99  # predsim: beta, the similarity-matching share of the local loss
    seed: int = 0
    out: str = "runs/s2s_reverse"
    device: str = "cpu"
    channels_last: bool = False  # channels_last memory format for convolutions and batches
    amp: bool = False  # bf16 autocast of forward passes and losses (CUDA only)
    max_minutes: float | None = None  # time budget: stop after the epoch that uses it up
    augment: bool = True  # vision: random crop (and flip, cifar10) of training batches
    threads: int = 0  # 0: leave torch's default
    resume: bool = False
    overwrite: bool = False  # allow a fresh run into a directory that holds checkpoints
    # block-parallel training across processes (pyro_bll.distributed, launched by torchrun)
    distributed: bool = False
    schedule: str = "pipelined"  # pipelined | sync
    rank_blocks: list[int] | None = None  # blocks per rank; None: as even as possible
    dist_backend: str = "auto"  # auto (gloo on CPU, nccl on CUDA) | gloo | nccl
    dist_timeout: float = 300.0  # seconds before a silent peer or rendezvous counts as failed
    pipeline_depth: int = 2  # forward messages a rank may have in flight to the next rank

    @property
    def num_blocks(self) -> int:
        return self.layers if self.blocks is None else self.blocks

    def validate(self) -> None:
        from .families import FAMILIES
        from .guides import FEEDBACKS, MESSAGES
        from .methods import METHODS
        from .models import RESNET_ARCHS
        from .tasks import TASKS

        for name, choices, what in [
            (self.task, TASKS, "task"),
            (self.method, METHODS, "method"),
            (self.family, FAMILIES, "family"),
            (self.propagate, ("mean", "params", "sample"), "propagate"),
            (self.feedback, FEEDBACKS, "feedback"),
            (self.feedback_update, ("grad", "solve"), "feedback update"),
            (self.lr_schedule, LR_SCHEDULES, "lr schedule"),
            (self.arch, RESNET_ARCHS, "arch"),
            (self.message, MESSAGES, "message"),
        ]:
            if name not in choices:
                raise ConfigError(f"unknown {what} {name!r}; valid: {', '.join(choices)}")
        for name in (
            "layers",
            "d_model",
            "seq_len",
            "epochs",
            "train_size",
            "test_size",
            "val_size",
            "batch_size",
        ):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.likelihood is not None and self.likelihood not in ("bound", "sample"):
            raise ConfigError(f"unknown likelihood {self.likelihood!r}; valid: bound, sample")
        task = TASKS[self.task]
        for key, value in task.DEFAULTS.items():  # fill only the options left unset (None)
            if getattr(self, key) is None:
                setattr(self, key, value)
        task.check_config(self)  # per task: blocks divide layers, or fit the ResNet's units
        if self.amp and not self.device.startswith("cuda"):
            raise ConfigError("--amp (bf16 autocast) needs --device cuda; drop --amp on CPU")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.ridge < 0:
            raise ConfigError(f"--ridge must be >= 0, got {self.ridge}")
        if not self.width > 0:
            raise ConfigError(f"--width must be positive, got {self.width}")
        if not 0 <= self.sim_weight <= 1:
            raise ConfigError(f"--sim-weight must lie in [0, 1], got {self.sim_weight}")
        unknown = [t for t in self.bll_terms if t not in BLL_TERMS]
        if unknown:
            raise ConfigError(
                f"unknown --bll-terms {','.join(unknown)}; valid: {','.join(BLL_TERMS)}"
            )
        if self.likelihood is not None and self.method != "bll":
            raise ConfigError("--likelihood applies to --method bll only; drop it")
        if self.method != "bll" and sorted(self.bll_terms) != sorted(BLL_TERMS):
            raise ConfigError("--bll-terms applies to --method bll only; drop it")
        if self.pred_weight < 0:
            raise ConfigError(f"--pred-weight must be >= 0, got {self.pred_weight}")
        if self.device not in ("cpu",) and not self.device.startswith("cuda"):
            raise ConfigError(f"unknown --device {self.device!r}; use cpu or cuda[:N]")
        if self.distributed:
            from .distributed.group import validate_options

            validate_options(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def for_task(cls, task: str, **options: Any) -> RunConfig:
        """A config with ``task``'s defaults (``TASKS[task].DEFAULTS``) under ``options``."""
        from .tasks import TASKS

        defaults = getattr(TASKS.get(task), "DEFAULTS", {})
        return cls(task=task, **{**defaults, **options})
