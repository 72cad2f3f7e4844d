"""Forward networks N_A as lists of blocks."""

from .errors import ModelError
from .linear_gaussian import LinearGaussianSpec, build_linear_gaussian_chain
from .mlp import mlp_blocks
from .resnet import RESNET_ARCHS, resnet_blocks
from .transformer import TransformerBlock, transformer_blocks

__all__ = [
    "RESNET_ARCHS",
    "LinearGaussianSpec",
    "ModelError",
    "TransformerBlock",
    "build_linear_gaussian_chain",
    "mlp_blocks",
    "resnet_blocks",
    "transformer_blocks",
]
