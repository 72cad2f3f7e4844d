"""pyro-bll: block-local learning with probabilistic latent representations, on Pyro."""

from .chain import BLLChain
from .elbo import BlockLocalELBO, BlockLosses
from .families import FAMILIES, Family, FamilyError, make_family
from .likelihoods import AffineGaussian, CategoricalHead, LinearGaussianHead, PrototypeLikelihood
from .seed import seed_everything

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
    "make_family",
    "seed_everything",
]
