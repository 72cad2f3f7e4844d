"""One helper that seeds every random number generator the project touches."""

from __future__ import annotations

import random

import numpy as np
import pyro
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy, torch (CPU and CUDA) and Pyro."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
