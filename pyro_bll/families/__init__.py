"""Latent distribution families. Adding one = one class + one line in ``FAMILIES``, or a
class advertised under the ``pyro_bll.families`` entry-point group by another package
(``pyro_bll.families.plugins``; docs/families.md)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pyro_bll.families.base import Family, FamilyError, Natural, Params, register_bregman_kl
from pyro_bll.families.dirichlet import Dirichlet
from pyro_bll.families.discrete import Bernoulli, GroupedCategorical, Poisson
from pyro_bll.families.gaussian import FixedVarianceGaussian, GatedGaussian, LearnedVarianceGaussian
from pyro_bll.families.plugins import FamilyPluginWarning, FamilyRegistry
from pyro_bll.families.positive import Beta, Gamma
from pyro_bll.families.vonmises import VonMises

# the built-in families, then the entry-point plugins (read on first use)
FAMILIES: FamilyRegistry = FamilyRegistry(
    {
        "gaussian": FixedVarianceGaussian,
        "gaussian_learned": LearnedVarianceGaussian,
        "gaussian_gated": GatedGaussian,
        "bernoulli": Bernoulli,
        "categorical": GroupedCategorical,
        "poisson": Poisson,
        "gamma": Gamma,
        "beta": Beta,
        "dirichlet": Dirichlet,
        "vonmises": VonMises,
    }
)


def make_family(name: str, **options: Any) -> Family:
    """Build a registered family by name, with its dataclass options (e.g. ``sigma``)."""
    if name not in FAMILIES:
        if name in FAMILIES.broken:  # a plugin refused at load: its reason and fix
            raise FamilyError(FAMILIES.broken[name])
        raise FamilyError(f"unknown family {name!r}; valid families: {', '.join(FAMILIES)}")
    cls = FAMILIES[name]
    cls.check_class()
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = set(options) - fields
    if unknown:
        raise FamilyError(
            f"family {name!r} has no option(s) {sorted(unknown)}; valid: {sorted(fields) or 'none'}"
        )
    return cls(**options)


__all__ = [
    "FAMILIES",
    "Bernoulli",
    "Beta",
    "Dirichlet",
    "Gamma",
    "GroupedCategorical",
    "Poisson",
    "VonMises",
    "Family",
    "FamilyError",
    "FamilyPluginWarning",
    "FamilyRegistry",
    "FixedVarianceGaussian",
    "GatedGaussian",
    "LearnedVarianceGaussian",
    "Natural",
    "Params",
    "make_family",
    "register_bregman_kl",
]
