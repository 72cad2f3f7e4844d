"""What every task provides, and the configuration checks that several tasks share.

A task (``TASKS[name](cfg)``) owns its data, its network and its evaluation:

    DEFAULTS                  class attribute: RunConfig values this task wants when the
                              user does not set them (``RunConfig.fill_defaults``)
    check_config(cfg)         classmethod: ConfigError for options this task cannot take
    build_chain(family)       the forward network, feedback guide and heads as a BLLChain
    steps_per_epoch()         optimiser steps in one epoch
    train_batches(epoch)      ``(x, y, mask)`` batches of one epoch, the same for a given
                              (seed, epoch)
    evaluate(chain, device)   ``{"test_accuracy": ..., ...}`` on the test set
    diagnostic_batch(n)       the first n test examples as ``(x, y, mask)``, inputs as the
                              chain consumes them (diagnostics)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from pyro_bll.config import ConfigError, RunConfig
from pyro_bll.core.chain import BLLChain
from pyro_bll.families import Family

Batch = tuple[Tensor, Tensor, Tensor | None]


class Task(Protocol):
    DEFAULTS: ClassVar[dict[str, Any]]

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None: ...

    def build_chain(self, family: Family) -> BLLChain: ...

    def steps_per_epoch(self) -> int: ...

    def train_batches(self, epoch: int) -> Iterator[Batch]: ...

    def evaluate(self, chain: BLLChain, device: torch.device) -> dict[str, float]: ...

    def diagnostic_batch(self, n: int) -> Batch: ...


def check_blocks_divide_layers(cfg: RunConfig) -> None:
    """Layer-stack tasks (transformer, MLP): N blocks of L / N layers each."""
    if cfg.num_blocks <= 0 or cfg.layers % cfg.num_blocks:
        raise ConfigError(
            f"--blocks {cfg.num_blocks} must be positive and divide --layers {cfg.layers}"
        )


def evaluation_split(
    cfg: RunConfig, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """The examples to train on and to evaluate on, and the evaluation split's name.

    Without ``--val-size``: the training and test sets, ``"test"``. With ``--val-size N``
    (image tasks): training examples ``[:-N]`` (the first ``--train-size`` of them are
    trained on) and the validation split ``[-N:]``, which takes the test split's place, so
    that settings can be chosen without ever reading the test set; ``"val"`` (the task then
    reports ``val_accuracy`` instead of ``test_accuracy``).
    """
    if not cfg.val_size:
        return x_train, y_train, x_test, y_test, "test"
    n, keep = cfg.val_size, len(y_train) - cfg.val_size
    if keep <= 0:
        raise ConfigError(
            f"--val-size {n} leaves no training images of the {len(y_train)}; use fewer"
        )
    if cfg.train_size is not None and cfg.train_size > keep:
        raise ConfigError(
            f"--train-size {cfg.train_size} overlaps the --val-size {n} held-out images "
            f"of the {len(y_train)} training images; use --train-size <= {keep}"
        )
    return x_train[:keep], y_train[:keep], x_train[keep:], y_train[keep:], "val"


def refuse_vision_options(cfg: RunConfig, images: bool = False) -> None:
    """Tasks without ResNets: ``--pred-head`` and ``--split`` belong to the vision tasks,
    and ``--val-size`` to the tasks on images (``images``: the MLP takes it)."""
    vision_only = (
        ("--pred-head", cfg.pred_head != "linear", "the vision tasks"),
        ("--val-size", cfg.val_size and not images, "the image tasks"),
        ("--split", cfg.split != "even", "the vision tasks"),
    )
    for flag, given, where in vision_only:
        if given:
            raise ConfigError(f"{flag} applies to {where}; drop it for --task {cfg.task}")


def check_diagnostic_size(n: int, available: int) -> int:
    if n <= 0:
        raise ValueError(f"diagnostic_batch needs n > 0, got {n}")
    return min(n, available)
