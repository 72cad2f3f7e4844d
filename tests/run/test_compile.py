"""``--compile`` (pyro_bll.run.compile): refused in one line where the platform cannot
compile, with nothing created; in place where it can, so the parameter names stay."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from pyro_bll.config import ConfigError
from pyro_bll.run import compile as compile_mod
from pyro_bll.run.build import build_run
from pyro_bll.run.options import RunConfig

TINY = dict(task="s2s_reverse", layers=2, d_model=8, seq_len=3, train_size=8, test_size=4)


def test_no_cxx_compiler_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C.. compiler") as err:
        RunConfig(**TINY, compile=True, out=str(tmp_path / "run"))
    assert "\n" not in str(err.value) and "drop --compile" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_cuda_without_triton_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    assert "Triton" in compile_mod.compile_unavailable("cuda")
    assert compile_mod.compile_unavailable("cpu") is None or not any(
        shutil.which(c) for c in compile_mod.CXX
    )


@pytest.mark.skipif(not any(shutil.which(c) for c in compile_mod.CXX), reason="no C++ compiler")
def test_the_chain_is_compiled_in_place():
    plain = build_run(RunConfig(**TINY))
    compiled = build_run(RunConfig(**TINY, compile=True))
    assert list(compiled.chain.state_dict()) == list(plain.chain.state_dict())
    mods = [*compiled.chain.blocks, compiled.chain.head, compiled.chain.feedback]
    assert all(m._compiled_call_impl is not None for m in mods)
    assert all(m._compiled_call_impl is None for m in plain.chain.blocks)
    for a, b in zip(plain.chain.parameters(), compiled.chain.parameters(), strict=True):
        assert torch.equal(a, b)  # the same seed builds the same network
