"""Forward networks N_A as lists of blocks."""

from .linear_gaussian import LinearGaussianSpec, build_linear_gaussian_chain
from .mlp import mlp_blocks
from .transformer import TransformerBlock, transformer_blocks

__all__ = [
    "LinearGaussianSpec",
    "TransformerBlock",
    "build_linear_gaussian_chain",
    "mlp_blocks",
    "transformer_blocks",
]
