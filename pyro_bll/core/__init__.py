"""The Pyro program of block-local learning, with no run configuration in it.

The latent chain (``BLLChain``: forward blocks as model, feedback network as guide), the
block-local ELBO that groups Pyro's per-site terms into one loss per block, the local
likelihoods and output heads, the per-step message cache and the per-block noise streams,
and the forward/feedback agreement statistics read off a step.
"""

from pyro_bll.core.chain import BLLChain
from pyro_bll.core.elbo import BlockLocalELBO, BlockLosses
from pyro_bll.core.likelihoods import (
    AffineGaussian,
    CategoricalHead,
    LinearGaussianHead,
    PrototypeLikelihood,
)
from pyro_bll.core.noise import NoiseKey
from pyro_bll.core.step_cache import StepCache

__all__ = [
    "AffineGaussian",
    "BLLChain",
    "BlockLocalELBO",
    "BlockLosses",
    "CategoricalHead",
    "LinearGaussianHead",
    "NoiseKey",
    "PrototypeLikelihood",
    "StepCache",
]
