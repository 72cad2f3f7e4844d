"""The look-ahead's sweep (pyro_bll.core.lookahead_sweep) against the frozen copies it
replaces: with the messages to the top, current weights and the plug-in read, the per-block
losses and every parameter's gradient agree in float64 on the MLP, the transformer (masked
sequence labels) and the ResNet (batch norm in training mode); the sweep keeps the loss
block-local, and it is used only where it is exact."""

from __future__ import annotations

import copy

import pytest
import torch

from pyro_bll import BlockLocalELBO, make_family
from pyro_bll.core.lookahead import Lookahead
from pyro_bll.core.lookahead_sweep import LookaheadSweep
from pyro_bll.core.step_cache import StepCache, step_cache
from pyro_bll.methods.bll import BLL
from pyro_bll.run.build import config_for_task
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks import S2SReverseTask
from pyro_bll.tasks.vision import build_resnet_chain

from utils import assert_block_local, assert_close, mlp_chain, toy_batch

LOOKAHEAD = {"beta": "lookahead", "lookahead_depth": 0, "lookahead_input": "mean"}


def _mlp():
    chain = mlp_chain(make_family("gaussian", sigma=0.5), register_params=False,
                      widths=(6, 5, 6, 4)).double()  # fmt: skip
    x, y = toy_batch(n=12)
    return chain, (x.double(), y, None), config_for_task("s2s_reverse", **LOOKAHEAD)


def _transformer():
    cfg = config_for_task("s2s_reverse", layers=4, d_model=8, batch_size=6, **LOOKAHEAD)
    task = S2SReverseTask(cfg)
    chain = task.build_chain(make_family("gaussian")).double()
    x, y, mask = next(task.train_batches(0))
    mask = mask.clone()
    mask[0, -3:] = False  # some labels left out
    return chain, (x, y, mask), cfg


def _resnet():
    cfg = RunConfig(task="fashion_mnist", width=1 / 16, blocks=4, **LOOKAHEAD)
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg).double()
    x, y = torch.randn(5, 1, 12, 12, dtype=torch.float64), torch.tensor([1, 4, 7, 1, 0])
    return chain, (x, y, None), cfg


def _losses_and_grads(chain, method, batch):
    torch.manual_seed(3)  # the same draws of z_k on both paths
    total, logs = method.loss(chain, *batch)
    params = [p for p in chain.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    pairs = zip(params, grads, strict=True)
    return logs, [torch.zeros_like(p) if g is None else g for p, g in pairs]


@pytest.mark.parametrize("build", [_mlp, _transformer, _resnet])
def test_the_sweep_equals_the_copies(build):
    chain, batch, cfg = build()
    reference = copy.deepcopy(chain)
    method, copies = BLL(chain, cfg), BLL(reference, cfg)
    reference.lookahead.sweep = False
    assert chain.lookahead.sweeps(chain) and not reference.lookahead.sweeps(reference)
    logs, grads = _losses_and_grads(chain, method, batch)
    want_logs, want_grads = _losses_and_grads(reference, copies, batch)
    for name in ("loss", "kl", "likelihood", "pred"):
        assert_close(logs[name], want_logs[name], rtol=1e-10, atol=1e-10)
    assert logs["likelihood"][:-1].abs().sum() > 0  # the term is there
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_the_sweep_keeps_the_loss_block_local():
    chain, (x, y, mask), _ = _transformer()
    chain.use_lookahead(Lookahead(depth=0, read="mean"))
    cache = StepCache(sweep=LookaheadSweep(chain, y, mask))
    with step_cache(cache):
        losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y, mask)
    assert set(cache.sweep.inputs) == set(range(1, chain.num_blocks))
    assert_block_local(chain, losses.per_block)


@pytest.mark.parametrize(
    "kw", [{"depth": 1, "read": "mean"}, {"depth": 0, "refresh": 2, "read": "mean"},
           {"depth": 0, "read": "sample"}],
)  # fmt: skip
def test_the_copies_serve_where_the_sweep_would_not_be_exact(kw):
    chain, _, _ = _mlp()
    chain.use_lookahead(Lookahead(**kw))
    assert not chain.lookahead.sweeps(chain)
    chain.lookahead = Lookahead(depth=0, read="mean")
    assert chain.lookahead.sweeps(chain)
    chain.blocks[1].append(torch.nn.Dropout(0.1))  # a copy would draw other masks
    assert not chain.lookahead.sweeps(chain)


def test_the_sweep_equals_the_copies_for_every_family(family):
    """The generic check over every registered family, on the MLP."""
    chain = mlp_chain(family, register_params=False, widths=(6, 6, 6, 6)).double()
    x, y = toy_batch(n=10)
    cfg = config_for_task("s2s_reverse", **LOOKAHEAD)
    reference = copy.deepcopy(chain)
    method, copies = BLL(chain, cfg), BLL(reference, cfg)
    reference.lookahead.sweep = False
    batch = (x.double(), y, None)
    logs, grads = _losses_and_grads(chain, method, batch)
    want_logs, want_grads = _losses_and_grads(reference, copies, batch)
    for name in ("loss", "kl", "likelihood", "pred"):
        assert_close(logs[name], want_logs[name], rtol=1e-10, atol=1e-10)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_a_swept_step_copies_nothing_until_the_copies_are_read():
    """The sweep reads the live blocks; the copies follow them only when something reads
    them (the logged statistics, the diagnostics), and then hold the live weights."""
    chain, batch, cfg = _mlp()
    method = BLL(chain, cfg)
    method.loss(chain, *batch)
    live = chain.blocks[2][-1].weight
    copy_ = chain.lookahead.copy_of(chain.blocks[2])[-1].weight
    with torch.no_grad():
        live.add_(1.0)  # an optimiser step
    method.loss(chain, *batch)
    assert not torch.equal(copy_, live)  # not copied by the swept step
    alpha = chain.forward_message(1, chain.families[0].mean(chain.forward_message(0, batch[0])))
    chain.lookahead.logits(chain, 1, None, alpha)
    assert torch.equal(copy_, live)
