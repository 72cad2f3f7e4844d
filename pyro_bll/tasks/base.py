"""What every task provides, the options the tasks own, and the checks several share.

A task (``TASKS[name](cfg)``, ``cfg`` a resolved ``RunConfig``) owns its data, its
network and its evaluation:

    SECTIONS                  class attribute: the option sections this task reads beyond
                              the ones every task reads (``NetworkOptions``,
                              ``DataOptions``); options of other sections are refused
    DEFAULTS                  class attribute: option values this task wants when the user
                              does not set them (resolved once, by ``RunConfig``)
    params_propagation        class attribute: whether blocks can read alpha's
                              unconstrained parameters (``--propagate params``; then the
                              family's ``default_propagate`` is the default)
    check_config(cfg)         classmethod: ConfigError for option values this task cannot take
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, get_args

import torch
from torch import Tensor

from pyro_bll.config import ConfigError, Section, non_negative, option, positive
from pyro_bll.core.chain import BLLChain, Propagate
from pyro_bll.families import FAMILIES, Family
from pyro_bll.guides import FEEDBACKS

if TYPE_CHECKING:
    from pyro_bll.run.options import RunConfig

Batch = tuple[Tensor, Tensor, Tensor | None]


@dataclass(frozen=True)
class NetworkOptions(Section):
    """The network every task builds: its latent family, blocks, feedback and heads."""

    name = "network"
    title = "network (every task)"

    family: str = option(
        "gaussian",
        "latent distribution family of every block: {choices} (the paper's: gaussian, "
        "fixed variance)",
        choices=FAMILIES,
        validated_later=True,
    )
    family_args: dict[str, Any] = option(
        help="family option, e.g. sigma=0.5 (repeatable)",
        factory=dict,
        metavar="KEY=VALUE",
        flag="--family-arg",
        parse="key=value",
    )
    blocks: int | None = option(
        None,
        "number of blocks N; must divide --layers (default: N = L, a local loss after"
        " every layer as in the paper); vision tasks: 1 to the residual units of "
        "--arch (4, the paper)",
    )
    feedback: str = option(
        "linear",
        "feedback network: {choices}; linear (the paper: one linear map per block from "
        "the one-hot label) or mlp (a small MLP per block)",
        choices=FEEDBACKS,
    )
    propagate: str = option(
        "mean",
        "what the next block consumes: the mean of z_k (the paper), its unconstrained "
        "parameters (e.g. logits; s2s_reverse only) or a draw: {choices} (on tasks whose "
        "blocks read parameters the default is the family's default_propagate, params "
        "for the families with bounded or positive means and mean for the Gaussians)",
        choices=get_args(Propagate),
    )
    pred_weight: float = option(
        1.0,
        "weight lambda of the per-block predictive loss (0 switches it off)",
        check=non_negative,
    )


@dataclass(frozen=True)
class DataOptions(Section):
    """How much of the task's data is used."""

    name = "data"
    title = "data (every task)"

    train_size: int | None = option(
        None,
        "s2s_reverse: fresh training sequences per epoch (default 10000); image "
        "tasks: train on the first N images (default all)",
        check=positive,
    )
    test_size: int | None = option(
        None,
        "test examples (default: s2s_reverse 1000 held-out permutations, image tasks "
        "the full test set)",
        check=positive,
    )


@dataclass(frozen=True)
class LayerStackOptions(Section):
    """Tasks whose network is a stack of equal layers cut into blocks."""

    name = "stack"
    title = "layer stack (transformer and MLP tasks)"
    applies_to = "the tasks with a stack of layers"

    layers: int = option(20, "layers of the transformer or MLP (the paper's: 20)", check=positive)
    d_model: int = option(
        32,
        "width of the transformer's residual stream or of the MLP's layers",
        check=positive,
    )

    def check(self, cfg: Any) -> None:
        """N blocks of L / N layers each."""
        if cfg.num_blocks <= 0 or self.layers % cfg.num_blocks:
            raise ConfigError(
                f"--blocks {cfg.num_blocks} must be positive and divide --layers {self.layers}"
            )


@dataclass(frozen=True)
class ImageOptions(Section):
    """Tasks on image files: where they are, and a validation split of them."""

    name = "images"
    title = "image data (fashion_mnist_mlp and the vision tasks)"
    applies_to = "the image tasks"

    val_size: int | None = option(
        None,
        "hold out the last N training images and report their accuracy "
        "(val_accuracy) instead of the test set's, to choose settings without the "
        "test set; --train-size then counts from the remaining images",
        metavar="N",
        check=positive,
    )
    data_dir: str | None = option(
        None,
        "fashion_mnist(_mlp): directory with the idx files (Debian package "
        "dataset-fashion-mnist); cifar10: directory holding cifar-10-batches-py/ "
        "(tried: torchvision's download)",
    )


# the sections every task reads; a task's SECTIONS adds its own
TASK_SECTIONS: tuple[type[Section], ...] = (NetworkOptions, DataOptions)


class Task(Protocol):
    SECTIONS: ClassVar[tuple[type[Section], ...]]
    DEFAULTS: ClassVar[dict[str, Any]]
    params_propagation: ClassVar[bool]

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None: ...

    def build_chain(self, family: Family) -> BLLChain: ...

    def steps_per_epoch(self) -> int: ...

    def train_batches(self, epoch: int) -> Iterator[Batch]: ...

    def evaluate(self, chain: BLLChain, device: torch.device) -> dict[str, float]: ...

    def diagnostic_batch(self, n: int) -> Batch: ...


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


def check_diagnostic_size(n: int, available: int) -> int:
    if n <= 0:
        raise ValueError(f"diagnostic_batch needs n > 0, got {n}")
    return min(n, available)
