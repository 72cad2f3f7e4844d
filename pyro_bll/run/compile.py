"""``--compile``: every block, head and feedback module compiled in place with
``torch.compile`` (``nn.Module.compile``), so parameter names, checkpoints and the
param store stay as they are.

Optional and never required: a run refuses it cleanly where the platform cannot compile
(``compile_unavailable``: no C++ compiler for the CPU backend, no Triton for CUDA). What it
buys is measured by ``experiments/bench_step.py --compile`` (docs/results.md): on the
2-core CPU it did not pay.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from torch import nn

from pyro_bll.core.chain import BLLChain

CXX = ("c++", "g++", "clang++")


def compile_unavailable(device: str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None where it can."""
    if device.startswith("cuda"):
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs Triton, which is not installed"
        return None
    cxx = os.environ.get("CXX")
    if not (cxx and shutil.which(cxx)) and not any(shutil.which(c) for c in CXX):
        return "torch.compile on the CPU needs a C++ compiler (c++, g++ or clang++), none found"
    return None


def compile_chain(chain: BLLChain) -> list[nn.Module]:
    """Compile every block, the output head, the predictive heads and the feedback in
    place; returns the modules compiled. The first step pays the compilation."""
    mods: list[nn.Module] = [*chain.blocks, chain.head, chain.feedback]
    if chain.pred_heads is not None:
        mods.extend(chain.pred_heads)
    for m in mods:
        m.compile()
    return mods


__all__ = ["compile_chain", "compile_unavailable"]
