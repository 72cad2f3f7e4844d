"""Look-ahead backward messages (pyro_bll.core.lookahead): the likelihood through frozen
copies of later blocks, computed again by hand; locality; staleness and bytes moved."""

from __future__ import annotations

import pytest
import torch

from pyro_bll import BlockLocalELBO, make_family
from pyro_bll.core.lookahead import Lookahead
from pyro_bll.core.noise import NoiseKey
from pyro_bll.core.step_cache import StepCache
from pyro_bll.methods.bll import BLL
from pyro_bll.run.build import config_for_task
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks.vision import build_resnet_chain

from utils import assert_block_local, assert_close, mlp_chain, toy_batch


def _chain(depth=1, refresh=1, **kw):
    family = make_family("gaussian", sigma=0.5)
    chain = mlp_chain(family, register_params=False, widths=(6, 6, 6, 6), **kw).double()
    chain.use_lookahead(Lookahead(depth=depth, refresh=refresh))
    return chain


def _by_hand(chain, k, z, depth):
    """Logits of the draw z_k through the live blocks k+1..k+depth and their read-out."""
    inp = z
    last = min(k + depth, chain.num_blocks - 1)
    for j in range(k + 1, last + 1):
        inp = chain.families[j].mean(chain.families[j].params(chain.blocks[j](inp)))
    head = chain.head if last == chain.num_blocks - 1 else chain.pred_heads[last]
    return head(inp)


@pytest.mark.parametrize("depth", [1, 2, 5, 0])
def test_the_likelihood_reads_the_blocks_above_through_their_copies(depth):
    chain = _chain(depth=depth)
    depth = depth or chain.num_blocks  # 0: to the top
    z = torch.randn(5, 6, dtype=torch.float64)
    for k in range(chain.num_blocks - 1):
        got = chain.local_likelihoods[k](chain, k, z).logits
        want = _by_hand(chain, k, z, depth).log_softmax(-1)
        assert_close(got, want, atol=1e-12)


def test_block_k_alone_gets_gradients_from_its_loss():
    chain = _chain(depth=2)
    x, y = toy_batch()
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x.double(), y)
    assert_block_local(chain, losses.per_block)
    # the look-ahead term reaches block 0's weights (through z_0), not block 1's copy
    grads = torch.autograd.grad(losses.terms["likelihood"][0], list(chain.blocks[0].parameters()))
    assert sum(g.abs().sum() for g in grads) > 0


def test_the_copies_are_stale_between_refreshes_and_bytes_are_counted():
    chain = _chain(depth=1, refresh=3)
    la = chain.lookahead
    expected = 0
    for k in range(chain.num_blocks - 1):
        mods = [chain.blocks[k + 1], chain.head if k + 1 == 3 else chain.pred_heads[k + 1]]
        expected += sum(p.numel() * 8 for m in mods for p in m.parameters())
    assert la.bytes_per_refresh(chain) == expected
    assert la.maybe_refresh(chain, 0) == expected
    z = torch.randn(4, 6, dtype=torch.float64)
    before = chain.local_likelihoods[0](chain, 0, z).logits
    with torch.no_grad():
        for p in chain.blocks[1].parameters():
            p.add_(0.5)
    for step in (1, 2):  # inside the refresh period: the copy is 1-2 steps stale
        assert la.maybe_refresh(chain, step) == 0
        assert_close(chain.local_likelihoods[0](chain, 0, z).logits, before, atol=0)
    assert la.maybe_refresh(chain, 3) == expected
    after = chain.local_likelihoods[0](chain, 0, z).logits
    assert_close(after, _by_hand(chain, 0, z, 1).log_softmax(-1), atol=1e-12)
    assert (after - before).abs().max() > 1e-3


def test_the_method_refreshes_once_per_step():
    chain = _chain(depth=1, refresh=2)
    x, y = toy_batch()
    method = BLL(chain, config_for_task("s2s_reverse"))
    for step in range(4):
        for segment in ((0, 2), (2, 4)):  # per-block backward: several calls per step
            method.loss(chain, x.double(), y, None, noise=NoiseKey(0, step), segment=segment)
            assert chain.lookahead.refreshed_at == 2 * (step // 2)


def test_refusals_are_one_line():
    family = make_family("gaussian")
    chain = mlp_chain(family, register_params=False, propagate="params")
    with pytest.raises(ValueError, match="propagate='params'"):
        chain.use_lookahead(Lookahead())
    bare = mlp_chain(family, register_params=False, pred_heads=None)
    with pytest.raises(ValueError, match="switch the predictive heads on"):
        bare.use_lookahead(Lookahead(depth=1))
    bare.use_lookahead(Lookahead(depth=5))  # to the top: the output head reads it
    with pytest.raises(ValueError, match="depth must be >= 0"):
        Lookahead(depth=-1)


@pytest.mark.parametrize("message", ["channel", "pool"])
def test_feature_maps_feed_the_copies_the_draw_on_the_map(message):
    """Channel latents: the next block's copy reads m(alpha_k) shifted per channel by the
    draw's deviation from the channel mean, so a draw at the mean gives the live block's
    prediction from m(alpha_k); locality holds on the ResNet too."""
    cfg = RunConfig(task="cifar10", width=1 / 16, message=message)
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg).double()
    chain.use_lookahead(Lookahead(depth=1))
    x, y = torch.randn(3, 1, 12, 12, dtype=torch.float64), torch.tensor([1, 4, 7])
    cache = StepCache()
    alpha = chain.forward_message(0, x, cache)
    mean_map = chain.families[0].mean(alpha)
    at_mean = chain.families[0].mean(chain.latent_params(0, alpha))
    got = chain.local_likelihoods[0](chain, 0, at_mean, cache).logits
    want = _by_hand(chain, 0, mean_map, 1).log_softmax(-1)
    assert_close(got, want, atol=1e-10)
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    assert_block_local(chain, losses.per_block)


def test_the_command_line_trains_with_the_lookahead_and_refuses_stray_options(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    import run

    tiny = ["--task", "s2s_reverse", "--layers", "3", "--d-model", "8", "--seq-len", "4",
            "--train-size", "32", "--test-size", "8", "--batch-size", "16", "--epochs", "1",
            "--threads", "1", "--no-progress"]  # fmt: skip
    out = tmp_path / "la"
    argv = [*tiny, "--beta", "lookahead", "--lookahead-depth", "2", "--out", str(out)]
    assert run.cli(argv) == 0
    assert '"beta": "lookahead"' in (out / "config.json").read_text()
    assert run.cli([*tiny, "--lookahead-refresh", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--lookahead-refresh applies to --beta lookahead" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_plug_in_read_uses_the_forward_message():
    """read="mean": log q_k(y | m(alpha_k)) through the copies; the term trains block k's
    forward layers and leaves the feedback alone."""
    family = make_family("gaussian", sigma=0.5)
    chain = mlp_chain(family, register_params=False, widths=(6, 6, 6)).double()
    chain.use_lookahead(Lookahead(depth=2, read="mean"))
    x, y = toy_batch()
    x = x.double()
    cache = StepCache()
    alpha = chain.forward_message(0, x, cache)
    got = chain.local_likelihoods[0](chain, 0, torch.zeros(16, 6, dtype=torch.float64), cache)
    want = _by_hand(chain, 0, family.mean(alpha), 2).log_softmax(-1)
    assert_close(got.logits, want, atol=1e-12)
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    lik = losses.terms["likelihood"][0]
    fb = list(chain.feedback.block_module(0).parameters())
    assert all(g is None for g in torch.autograd.grad(lik, fb, retain_graph=True,
                                                      allow_unused=True))  # fmt: skip
    grads = torch.autograd.grad(lik, list(chain.blocks[0].parameters()))
    assert sum(g.abs().sum() for g in grads) > 0


def test_a_refresh_follows_the_chain_to_another_dtype():
    """Refreshes copy in place, but re-clone when the live blocks changed dtype."""
    family = make_family("gaussian")
    chain = mlp_chain(family, register_params=False)
    chain.use_lookahead(Lookahead(depth=1))
    clone = chain.lookahead.blocks[1]
    chain.lookahead.maybe_refresh(chain, 1)
    assert chain.lookahead.blocks[1] is clone  # in place
    chain.double()
    chain.lookahead.maybe_refresh(chain, 2)
    z = torch.randn(3, 6, dtype=torch.float64)
    got = chain.local_likelihoods[0](chain, 0, z).logits
    assert_close(got, _by_hand(chain, 0, z, 1).log_softmax(-1), atol=1e-12)
