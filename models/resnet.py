"""ResNet-18 and ResNet-50 for small images, cut into blocks after residual units.

The networks follow He et al. (2016) as torchvision defines them (basic units (2, 2, 2, 2)
for ResNet-18, bottleneck units (3, 4, 6, 3) with expansion 4 for ResNet-50, stride 2 at
the first unit of stages 2-4, BatchNorm, 1x1 projection shortcuts where the shape changes),
adapted to 28x28 grey and 32x32 colour images: a 3x3 stride-1 stem convolution and no
max-pool. Stage widths are (64, 128, 256, 512) times ``width`` (rounded, at least 1).

Blocks. The U residual units (8 for ResNet-18, 16 for ResNet-50) are split into N blocks
of consecutive units, as evenly as possible (the first U mod N blocks get one more); the
stem belongs to block 1 and the classifier (ReLU, global average pool, linear) is f_out.
Conv layers per block on the main path (stem 1, basic unit 2, bottleneck 3, classifier 1;
shortcut projections not counted), for the default N = 4:

    ResNet-18: units (2, 2, 2, 2), layers (5, 4, 4, 5)     paper: (4, 5, 4, 5)
    ResNet-50: units (4, 4, 4, 4), layers (13, 12, 12, 13) paper: (12, 13, 12, 13)

Both sum to the paper's 18 and 50 layers; they differ from the paper's grouping by one
layer in blocks 1 and 2 (the paper does not say how it counts; splitting after residual
units cannot give it). Any N from 1 to U works.

Latents. Block k maps ``[B, C_in, H, W]`` images (k = 1) or the previous block's message
``[B, H, W, C]`` (channels last, permuted to NCHW and passed through the ReLU that ends a
residual unit) to raw parameters ``[B, H', W', n_raw * C_k]`` (channels last, as the
families expect; the permute is free when the network runs in channels_last memory
format). For one-parameter families (the paper's Gaussian) the raw output is the last
unit's pre-activation (residual sum), so m(alpha) = E[z] is exactly what a plain ResNet
would pass on; families with n_raw > 1 read their parameters off the unit's output with a
1x1 convolution to n_raw * C_k channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pyro_bll.families import Family, FamilyError
from pyro_bll.models.errors import ModelError

STAGE_WIDTHS = (64, 128, 256, 512)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return [conv, nn.BatchNorm2d(cout)]


class _Unit(nn.Module):
    """A residual unit: ``h [B, cin, H, W] -> residual(h) + shortcut(h)`` (no final ReLU)."""

    expansion = 1
    layers = 0

    def __init__(self, residual: list[nn.Module], cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(*residual)
        self.shortcut = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.out_channels = cout
        self.stride = stride

    def forward(self, h: Tensor) -> Tensor:
        return self.residual(h) + self.shortcut(h)


class BasicUnit(_Unit):
    """3x3 conv, BN, ReLU, 3x3 conv, BN (ResNet-18/34)."""

    layers = 2

    def __init__(self, cin: int, width: int, stride: int) -> None:
        res = [*_conv_bn(cin, width, 3, stride), nn.ReLU(), *_conv_bn(width, width, 3)]
        super().__init__(res, cin, width, stride)


class BottleneckUnit(_Unit):
    """1x1 conv to ``width``, 3x3 conv (stride), 1x1 conv to 4 * ``width`` (ResNet-50)."""

    expansion = 4
    layers = 3

    def __init__(self, cin: int, width: int, stride: int) -> None:
        cout = self.expansion * width
        res = [
            *_conv_bn(cin, width, 1),
            nn.ReLU(),
            *_conv_bn(width, width, 3, stride),
            nn.ReLU(),
            *_conv_bn(width, cout, 1),
        ]
        super().__init__(res, cin, cout, stride)


@dataclass(frozen=True)
class ResNetSpec:
    unit: type[_Unit]
    stages: tuple[int, ...]  # residual units per stage

    @property
    def num_units(self) -> int:
        return sum(self.stages)


RESNET_ARCHS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(BasicUnit, (2, 2, 2, 2)),
    "resnet50": ResNetSpec(BottleneckUnit, (3, 4, 6, 3)),
}


class ResNetBlock(nn.Module):
    """Consecutive residual units (plus the stem in block 1) read as one latent block.

    ``channels`` is the latent's channel count C_k; ``units`` and ``layers`` the number of
    residual units and main-path conv layers it holds.
    """

    def __init__(self, stem: nn.Module | None, units: list[_Unit], n_raw: int) -> None:
        super().__init__()
        self.stem = stem
        self.units = nn.ModuleList(units)
        self.channels = units[-1].out_channels
        self.layers = (stem is not None) + sum(u.layers for u in units)
        self.param_conv = nn.Conv2d(self.channels, n_raw * self.channels, 1) if n_raw > 1 else None

    def forward(self, inp: Tensor) -> Tensor:
        # images [B, C_in, H, W] (block 1) or m(alpha_{k-1}) [B, H, W, C] -> NCHW
        h = self.stem(inp) if self.stem is not None else torch.relu(inp.permute(0, 3, 1, 2))
        s = h
        for i, unit in enumerate(self.units):
            s = unit(torch.relu(s) if i else h)
        if self.param_conv is not None:
            s = self.param_conv(torch.relu(s))
        return s.permute(0, 2, 3, 1)  # [B, H', W', n_raw * C_k]


def split_units(num_units: int, num_blocks: int) -> list[int]:
    """Units per block, as even as possible, larger blocks first: split_units(16, 5)."""
    q, r = divmod(num_units, num_blocks)
    return [q + (i < r) for i in range(num_blocks)]


def _spec(arch: str) -> ResNetSpec:
    if arch not in RESNET_ARCHS:
        raise ModelError("arch", f"{arch!r} is unknown; valid: {', '.join(RESNET_ARCHS)}")
    return RESNET_ARCHS[arch]


def check_num_blocks(arch: str, num_blocks: int) -> None:
    """ModelError unless 1 <= num_blocks <= the architecture's residual units."""
    u = _spec(arch).num_units
    if not 1 <= num_blocks <= u:
        raise ModelError(
            "blocks",
            f"{num_blocks} exceeds the {u} residual units of {arch}; use 1..{u}"
            if num_blocks > u
            else f"must be positive, got {num_blocks}; use 1..{u} for {arch}",
        )


def block_layer_counts(arch: str, num_blocks: int) -> list[int]:
    """Main-path conv layers per block, the classifier counted in the last block."""
    spec = _spec(arch)
    check_num_blocks(arch, num_blocks)
    counts = [spec.unit.layers * n for n in split_units(spec.num_units, num_blocks)]
    counts[0] += 1  # stem
    counts[-1] += 1  # classifier
    return counts


def _stem_and_units(arch: str, in_channels: int, width: float) -> tuple[nn.Module, list[_Unit]]:
    spec = _spec(arch)
    if not width > 0:
        raise ModelError("width", f"must be positive, got {width}")
    widths = [max(1, round(c * width)) for c in STAGE_WIDTHS]
    stem = nn.Sequential(*_conv_bn(in_channels, widths[0], 3), nn.ReLU())
    units: list[_Unit] = []
    cin = widths[0]
    for stage, (n, w) in enumerate(zip(spec.stages, widths, strict=True)):
        for i in range(n):
            units.append(spec.unit(cin, w, 2 if stage > 0 and i == 0 else 1))
            cin = units[-1].out_channels
    return stem, units


def check_split(arch: str, num_blocks: int, units_per_block: Sequence[int]) -> None:
    """ModelError unless ``units_per_block`` cuts the architecture's units into
    ``num_blocks`` non-empty blocks."""
    u = _spec(arch).num_units
    sizes = list(units_per_block)
    if len(sizes) != num_blocks or any(n < 1 for n in sizes) or sum(sizes) != u:
        raise ModelError(
            "split",
            f"{','.join(map(str, sizes))} does not cut the {u} residual units of {arch} "
            f"into {num_blocks} non-empty blocks; give {num_blocks} positive counts that "
            f"add up to {u} (e.g. {','.join(map(str, split_units(u, num_blocks)))}), "
            "even, or memory",
        )


def _unit_saved_bytes(stem: nn.Module, units: list[_Unit], in_channels: int, side: int):
    """Bytes autograd saves in each unit (the stem counted with unit 1) for one image."""
    from pyro_bll.measure.memory import SavedTensorMeter

    costs, h = [], torch.zeros(1, in_channels, side, side)
    modules = [nn.Sequential(stem, units[0]), *units[1:]]
    for i, module in enumerate(modules):
        module.train()
        x = (torch.relu(h) if i else h).requires_grad_(i > 0)
        meter = SavedTensorMeter.for_module(module)
        with meter:
            h = module(x)
        costs.append(meter.peak)
        h = h.detach()
    return costs


def unit_activation_bytes(arch: str, in_channels: int, width: float, image_size: int) -> list[int]:
    """Activation bytes of one training step per residual unit, per image (stem in unit 1):
    the costs that ``--split memory`` balances (``pyro_bll.measure.memory``)."""
    stem, units = _stem_and_units(arch, in_channels, width)
    return _unit_saved_bytes(stem, units, in_channels, image_size)


def memory_split(
    arch: str, in_channels: int, num_blocks: int, width: float, image_size: int
) -> list[int]:
    """Units per block that balance the blocks' activation memory (``--split memory``)."""
    from pyro_bll.measure.memory import balanced_split

    check_num_blocks(arch, num_blocks)
    return balanced_split(unit_activation_bytes(arch, in_channels, width, image_size), num_blocks)


def resnet_blocks(
    arch: str,
    in_channels: int,
    num_blocks: int,
    width: float,
    family: Family,
    units_per_block: Sequence[int] | None = None,
) -> list[ResNetBlock]:
    """The network as ``num_blocks`` blocks whose outputs parametrise ``family``;
    ``units_per_block`` (default: as even as possible) sets the residual units of each."""
    check_num_blocks(arch, num_blocks)
    stem, units = _stem_and_units(arch, in_channels, width)
    sizes = split_units(len(units), num_blocks) if units_per_block is None else units_per_block
    check_split(arch, num_blocks, sizes)
    blocks, start = [], 0
    for k, n in enumerate(sizes):
        block = ResNetBlock(stem if k == 0 else None, units[start : start + n], family.n_raw)
        start += n
        try:  # the channel count must fit the family (e.g. categorical groups)
            family.params(torch.zeros(1, family.raw_size(block.channels)))
        except FamilyError as e:
            raise ModelError(
                "family", f"does not fit {arch} block {k + 1} ({block.channels} channels): {e}"
            ) from None
        blocks.append(block)
    return blocks


def block_map_sizes(blocks: list[ResNetBlock], image_size: int) -> list[int]:
    """Side of every block's latent map for square ``image_size`` inputs.

    Every stride-2 unit halves the side (rounding up, as a padded 3x3 conv does).
    """
    sizes, side = [], image_size
    for block in blocks:
        for unit in block.units:
            side = -(-side // unit.stride)
        sizes.append(side)
    return sizes
