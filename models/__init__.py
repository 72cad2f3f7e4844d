"""Forward networks N_A as lists of blocks."""

from pyro_bll.models.errors import ModelError
from pyro_bll.models.linear_gaussian import LinearGaussianSpec, build_linear_gaussian_chain
from pyro_bll.models.mlp import mlp_blocks
from pyro_bll.models.resnet import RESNET_ARCHS, resnet_blocks
from pyro_bll.models.transformer import TransformerBlock, transformer_blocks

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
