"""pyro-bll: block-local learning with probabilistic latent representations, on Pyro."""

import os as _os

import torch as _torch

# torch 2.14.1's CPU build corrupts the heap in oneDNN's convolution weight gradient for
# the very narrow ResNets the tests use (a "double free" abort under one thread, a hang
# under two). PYRO_BLL_NO_ONEDNN=1 falls back to torch's own convolution kernels; the
# test suite sets it, full-width runs keep the faster oneDNN path.
if _os.environ.get("PYRO_BLL_NO_ONEDNN") == "1":
    _torch.backends.mkldnn.enabled = False

from pyro_bll.core.chain import BLLChain
from pyro_bll.core.elbo import BlockLocalELBO, BlockLosses
from pyro_bll.core.likelihoods import (
    AffineGaussian,
    CategoricalHead,
    LinearGaussianHead,
    PrototypeLikelihood,
)
from pyro_bll.core.tags import block, blocks_plate
from pyro_bll.families import FAMILIES, Family, FamilyError, make_family
from pyro_bll.seed import seed_everything

__all__ = [
    "FAMILIES",
    "AffineGaussian",
    "BLLChain",
    "BlockLocalELBO",
    "BlockLosses",
    "CategoricalHead",
    "Family",
    "FamilyError",
    "LinearGaussianHead",
    "PrototypeLikelihood",
    "block",
    "blocks_plate",
    "make_family",
    "seed_everything",
]
