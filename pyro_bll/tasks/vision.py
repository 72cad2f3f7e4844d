"""Image classification with ResNets cut into blocks: ``fashion_mnist`` and ``cifar10``.

Data (``pyro_bll.data``): the whole training and test splits live on the run's device
as uint8 ``[N, H, W, C]``; each epoch is a seeded permutation there, and training batches
are augmented on the device:

    fashion_mnist   28x28x1, random crop with 2 pixels of zero padding (the garments
                    fill most of the frame; 4 would cut off sleeves and soles), no flip
    cifar10         32x32x3, random crop with 4 pixels of zero padding and a random
                    horizontal flip (the standard CIFAR augmentation)

then normalised with the per-channel mean and std of the training images in use.
``--no-augment`` switches crop and flip off. ``--train-size N`` trains on the first N
training images; the test accuracy is on the full test set (10,000 images) unless
``--test-size`` says otherwise. The test set is only ever evaluated, after every epoch,
and never used to choose anything: the reported number is the last epoch's. Settings are
chosen with ``--val-size N``: the last N training images are held out and evaluated
(``val_accuracy``) in the test set's place.

Network: ``models/resnet.py`` (``--arch resnet18|resnet50``, ``--width``, ``--blocks``,
default 4 as in the paper) with linear feedback from the one-hot label per block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from pyro_bll.config import ConfigError, Section, option, positive
from pyro_bll.core.chain import BLLChain
from pyro_bll.core.likelihoods import PRED_HEADS, PooledHead
from pyro_bll.data import (
    DEFAULT_CIFAR10,
    DEFAULT_FASHION_MNIST,
    DataError,
    DeviceImageData,
    load_cifar10,
    load_fashion_mnist,
)
from pyro_bll.data.device_data import Augmentation
from pyro_bll.families import Family, FamilyError
from pyro_bll.guides import MESSAGES, MeanMessage
from pyro_bll.models.errors import ModelError
from pyro_bll.models.resnet import RESNET_ARCHS, block_map_sizes, memory_split, resnet_blocks
from pyro_bll.tasks.assembly import assemble_chain
from pyro_bll.tasks.base import ImageOptions, check_diagnostic_size, evaluation_split

if TYPE_CHECKING:
    from pyro_bll.run.options import RunConfig


@dataclass(frozen=True)
class VisionOptions(Section):
    """The ResNet tasks' network, heads, messages and image pipeline."""

    name = "vision"
    title = "vision tasks (fashion_mnist, cifar10)"
    applies_to = "the vision tasks"

    arch: str = option(
        "resnet18",
        "{choices}: resnet18 (basic units 2,2,2,2) or resnet50 (bottleneck units "
        "3,4,6,3), split into --blocks blocks after residual units",
        choices=RESNET_ARCHS,
    )
    split: str = option(
        "even",
        "residual units per block: even (as even as possible), memory "
        "(balance the blocks' activation memory of a training step, measured per unit "
        "on one image; block 1 otherwise holds most of it), or N1,N2,... explicitly",
        metavar="even|memory|N1,N2,...",
    )
    width: float = option(
        1.0,
        "channel multiplier of the stage widths 64,128,256,512 (e.g. "
        "0.25 for CPU-sized runs; 1 = the full network)",
        check=positive,
    )
    message: str = option(
        "channel",
        "how the feedback message beta_k meets a block's feature map ({choices}): "
        "channel (the paper's: one latent per channel with the channel's spatial mean"
        " and the family's own variance, so beta_k weighs as much as alpha_k), mean "
        "(the latent z_k is the law of the spatial mean of the map, per channel, with"
        " variance sigma^2 / (H W), so beta_k barely acts; Gaussian families), grid "
        "(channel on every cell of an s x s grid tiling the map: a class template "
        "per block), pool "
        "(a potential on the spatial mean of the statistics, beta_k / (H W) at every "
        "location) or broadcast (beta_k at every location)",
        choices=MESSAGES,
    )
    pred_head: str = option(
        "linear",
        "the per-block predictive head of bll and predsim ({choices}): linear (the "
        "paper's: ReLU, average pool to <= 2048 features, linear) or conv (a 3x3 conv"
        " C -> 2C with batch norm before that read-out, an auxiliary net with some "
        "depth)",
        choices=PRED_HEADS,
    )
    channels_last: bool = option(
        False,
        "run convolutions and batches in the channels_last memory format (faster on recent GPUs)",
    )
    augment: bool = option(
        True,
        "no random crop / flip of training batches",
        flag="--no-augment",
    )


_VISION_DEFAULTS: dict[str, Any] = {
    "blocks": 4,
    "batch_size": 128,
    # chosen on the validation split (first 50,000 training images, scored on the last
    # 10,000; docs/results.md): Adam 4e-3 and a predictive weight of 4
    "lr": 4e-3,
    "pred_weight": 4.0,
    "lr_schedule": "cosine",
    # one backward per block: as fast as one joint backward on ResNets (within 1 %), with
    # the activation memory of one block (docs/memory.md)
    "backward": "per-block",
    # --method bll: block k's local likelihood through copies of every block above it,
    # read at m(alpha_k); chosen on the validation split over the label feedback and the
    # other messages at K = 4 and 8 (docs/results.md, backward messages)
    "beta": "lookahead",
    "lookahead_input": "mean",
    "lookahead_depth": 0,
    # --beta label's prototype likelihood by its bound, as every label-feedback result on
    # these tasks was measured (the family's own default may be pathwise draws)
    "likelihood": "bound",
}


class VisionTask(ABC):
    """Shared by the image tasks; subclasses say how to load their splits and augment."""

    SECTIONS = (ImageOptions, VisionOptions)
    DEFAULTS: ClassVar[dict[str, Any]] = _VISION_DEFAULTS
    num_classes = 10
    augmentation = Augmentation()
    params_propagation = False  # ResNet blocks read means or draws

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        try:
            x_train, y_train = self.load(cfg, "train")
            x_test, y_test = self.load(cfg, "test")
        except DataError as e:
            raise ConfigError(str(e)) from None
        # with --val-size the last training images replace the test set
        x_train, y_train, x_test, y_test, self.split = evaluation_split(
            cfg, x_train, y_train, x_test, y_test
        )
        n_train = cfg.train_size or len(x_train)
        n_test = cfg.test_size or len(x_test)
        fmt = torch.channels_last if cfg.vision.channels_last else torch.contiguous_format
        self.data = DeviceImageData(
            (x_train[:n_train], y_train[:n_train]),
            (x_test[:n_test], y_test[:n_test]),
            torch.device(cfg.device),
            self.augmentation,
            memory_format=fmt,
        )

    # ---- per data set ------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, cfg: RunConfig, split: str) -> tuple[Tensor, Tensor]:
        """``(images [N, H, W, C] uint8, labels [N] int64)`` on the CPU."""

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        from pyro_bll.models.resnet import check_num_blocks, check_split

        try:
            check_num_blocks(cfg.arch, cfg.num_blocks)
            units = parse_split(cfg.split)
            if units is not None:
                check_split(cfg.arch, cfg.num_blocks, units)
        except ModelError as e:
            raise ConfigError(e.as_flag_message()) from None

    # ---- network -----------------------------------------------------------------------
    def build_chain(self, family: Family) -> BLLChain:
        return build_resnet_chain(
            self.cfg.arch,
            self.data.in_channels,
            self.num_classes,
            family,
            self.cfg,
            image_size=self.data.image_size,
        )

    # ---- data --------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return -(-len(self.data.y_train) // self.cfg.batch_size)

    def train_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, None]]:
        """Shuffled, augmented, normalised batches ``[B, C, H, W]``, on the run's device."""
        cfg = self.cfg
        for x, y in self.data.batches(cfg.batch_size, cfg.seed, epoch, augment=cfg.augment):
            yield x, y, None

    def diagnostic_batch(self, n: int) -> tuple[Tensor, Tensor, None]:
        """The first n test images (normalised, not augmented) and labels, on the device."""
        n = check_diagnostic_size(n, len(self.data.y_test))
        return self.data.prepare(self.data.x_test[:n]), self.data.y_test[:n], None

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, chain: BLLChain, device: torch.device) -> dict[str, float]:
        """Top-1 accuracy of f_out(m(alpha_N)) on the test split (BatchNorm in eval mode);
        ``val_accuracy`` on the held-out training images with ``--val-size``."""
        was_training = chain.training
        chain.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.data.device)
        for x, y in self.data.test_batches(1000):
            correct += (chain.predict_logits(x).argmax(-1) == y).sum()
        chain.train(was_training)
        return {f"{self.split}_accuracy": correct.item() / len(self.data.y_test)}


class FashionMNISTTask(VisionTask):
    """``--task fashion_mnist``: the idx files of the Debian package dataset-fashion-mnist."""

    DEFAULTS = {**_VISION_DEFAULTS, "data_dir": DEFAULT_FASHION_MNIST}
    augmentation = Augmentation(crop_padding=2, flip=False)

    @classmethod
    def load(cls, cfg: RunConfig, split: str) -> tuple[Tensor, Tensor]:
        images, labels = load_fashion_mnist(cfg.data_dir or DEFAULT_FASHION_MNIST, split)
        return images.unsqueeze(-1), labels  # [N, 28, 28, 1]


class CIFAR10Task(VisionTask):
    """``--task cifar10``: the python-format batches (torchvision's download as fallback)."""

    DEFAULTS = {**_VISION_DEFAULTS, "data_dir": DEFAULT_CIFAR10}
    augmentation = Augmentation(crop_padding=4, flip=True)

    @classmethod
    def load(cls, cfg: RunConfig, split: str) -> tuple[Tensor, Tensor]:
        return load_cifar10(cfg.data_dir or DEFAULT_CIFAR10, split)


def parse_split(split: str) -> list[int] | None:
    """``--split``: None for even or memory (decided with the network), else the counts."""
    if split in ("even", "memory"):
        return None
    try:
        return [int(v) for v in split.split(",")]
    except ValueError:
        raise ModelError(
            "split", f"{split!r} is not even, memory or comma-separated unit counts"
        ) from None


def build_resnet_chain(
    arch: str,
    in_channels: int,
    num_classes: int,
    family: Family,
    cfg: RunConfig,
    image_size: int = 32,
) -> BLLChain:
    """A ResNet chain with the paper's linear feedback and pooled heads, from a config.

    The configuration layer over ``pyro_bll.models.resnet`` (whose functions take plain
    arguments): it reads the options and turns the model's errors into flag names.

    Reads ``cfg.blocks`` (None: 4, the paper), ``cfg.width``, ``cfg.message``,
    ``cfg.feedback``, ``cfg.pred_weight`` (per-block predictive heads when > 0: average
    pool to at most 2048 features, then linear, ``GridPooledHead``) and ``cfg.propagate``.
    Inputs are images ``[B, in_channels, image_size, image_size]``, labels ``[B]``.
    """
    if cfg.propagate not in ("mean", "sample"):
        raise ConfigError(f"--propagate {cfg.propagate!r}: ResNet blocks take mean or sample")
    # mean, channel and grid put the latent on a summary of the map (MeanMessage's kind)
    if issubclass(MESSAGES[cfg.message], MeanMessage) and cfg.propagate != "mean":
        raise ConfigError(
            f"--message {cfg.message} puts the latent on a summary of the map, so there is no "
            "map to sample for the next block; use --propagate mean or --message pool"
        )
    num_blocks = 4 if cfg.blocks is None else cfg.blocks
    try:
        units = parse_split(cfg.split)
        if cfg.split == "memory":
            units = memory_split(arch, in_channels, num_blocks, cfg.width, image_size)
        blocks = resnet_blocks(arch, in_channels, num_blocks, cfg.width, family, units)
    except ModelError as e:  # the model names its argument; the flag is named here
        raise ConfigError(e.as_flag_message()) from None
    channels = [b.channels for b in blocks]
    message = MESSAGES[cfg.message](spatial_dims=2)
    try:  # e.g. --message mean needs a family closed under averaging
        probe = family.params(torch.zeros(1, 1, 1, family.raw_size(channels[0])))
        message.latent_params(family, probe)
    except FamilyError as e:
        raise ConfigError(f"--message {cfg.message}: {e}") from None
    sides = block_map_sizes(blocks, image_size)
    head = PRED_HEADS[cfg.pred_head]
    # the feedback writes one potential per latent channel: C, or s * s * C under grid
    widths = [message.latent_width(c, side) for c, side in zip(channels, sides, strict=True)]
    scales = [message.feedback_scale(c, side) for c, side in zip(channels, sides, strict=True)]
    return assemble_chain(
        cfg,
        family,
        blocks,
        widths,
        num_classes,
        lambda: PooledHead(channels[-1], num_classes),
        lambda k: head(channels[k], num_classes, sides[k]),
        feedback_scales=scales,
        event_dim=3,  # latents [B, H, W, C]
        label_event_dim=0,  # one label per image
        spatial_message=message,
    )
