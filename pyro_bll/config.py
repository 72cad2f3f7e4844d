"""Typed run configuration: data only.

``experiments/run.py`` parses the command line into a ``RunConfig``;
``pyro_bll.build.validate`` checks it against the registries and fills the options left
unset (``None``): first from the task's ``DEFAULTS``, then from ``COMMON_DEFAULTS``, the
same from Python and from the command line.
"""

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


# defaults of the options a task may set for itself (``TASKS[name].DEFAULTS``)
COMMON_DEFAULTS: dict[str, Any] = {
    "layers": 20,
    "d_model": 32,
    "epochs": 5,
    "batch_size": 50,
    "lr": 2e-3,
    "lr_schedule": "constant",
    "pred_weight": 1.0,
    "message": "pool",
}


@dataclass
class RunConfig:
    """Everything a run needs; ``None`` means "the task's default" (``COMMON_DEFAULTS``).

    ``pyro_bll.build.validate`` checks it before any work starts."""

    task: str = "s2s_reverse"
    method: str = "bll"
    family: str = "gaussian"
    family_args: dict[str, Any] = field(default_factory=dict)
    layers: int | None = None
    blocks: int | None = None  # None: the task's default (one block per layer; vision: 4)
    d_model: int | None = None
    seq_len: int = 10
    epochs: int | None = None
    train_size: int | None = None  # None: the task's default (s2s_reverse: 10,000 per epoch)
    test_size: int | None = None  # None: the task's default (s2s_reverse: 1,000)
    val_size: int | None = None  # vision: evaluate on the last N training images, not the test set
    data_dir: str | None = None  # None: the task's default (its DEFAULTS["data_dir"])
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None  # constant | cosine (decay to 0 over the epochs)
    pred_weight: float | None = None
    pred_head: str = "linear"  # vision: predictive head of BLL/Pred-Sim blocks (linear | conv)
    bll_terms: list[str] = field(default_factory=lambda: list(BLL_TERMS))  # ablations
    feedback: str = "linear"
    feedback_update: str = "grad"
    ridge: float = 1.0
    propagate: str = "mean"
    likelihood: str | None = None  # bound | sample; None: the family's default_likelihood
    arch: str = "resnet18"  # vision tasks: resnet18 | resnet50 (models/resnet.py)
    width: float = 1.0  # vision tasks: channel multiplier of the stage widths (64, ..., 512)
    message: str | None = None  # vision: where the latent sits on a map (guides/spatial.py)
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

    def fill_defaults(self, task_defaults: dict[str, Any]) -> RunConfig:
        """Set every option left unset (``None``) from ``task_defaults`` (the task's
        ``DEFAULTS``), then from ``COMMON_DEFAULTS``. Idempotent; returns ``self``."""
        for source in (task_defaults, COMMON_DEFAULTS):
            for key, value in source.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
