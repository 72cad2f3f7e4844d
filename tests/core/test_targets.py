"""Delayed targets (``--beta target``, pyro_bll.core.targets) against computations by hand:
with the weights kept, block k's delayed term has backprop's gradient of the output
log-likelihood of d steps before (MLP and ResNet with batch norm, float64); with the
weights moved, its value is -<m_k(x_k^(t); theta_now), G_k^(t)>; nothing arrives in the
first d steps; the term is block-local; the options and chains it cannot serve are
refused; the command line trains with it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pyro_bll import make_family
from pyro_bll.config import ConfigError
from pyro_bll.core.noise import NoiseKey
from pyro_bll.core.targets import buffers_kept
from pyro_bll.methods.bll import BLL
from pyro_bll.run.build import config_for_task
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks.vision import build_resnet_chain

from utils import assert_block_local, assert_close, mlp_chain, toy_batch


def _mlp(delay: int = 1, **kw):
    chain = mlp_chain(make_family("gaussian", sigma=0.5), register_params=False,
                      widths=(6, 5, 6, 4), **kw).double()  # fmt: skip
    x, y = toy_batch(n=12)
    cfg = config_for_task("s2s_reverse", beta="target", target_delay=delay)
    return chain, x.double(), y, cfg


def _resnet(delay: int = 1):
    cfg = RunConfig(task="fashion_mnist", width=1 / 16, blocks=4, beta="target",
                    target_delay=delay)  # fmt: skip
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg).double()
    x, y = torch.randn(5, 1, 12, 12, dtype=torch.float64), torch.tensor([1, 4, 7, 1, 0])
    return chain, x, y, cfg


def _by_hand(chain, x, y):
    """A non-detached forward with means between blocks: every block's input x_k and
    output m_k (k = 0..N-2, m_k feeding block k + 1) and ell = sum_b log p(y_b | ...).
    Batch norm's running statistics are left alone (other graphs saved them)."""
    inputs, outputs, inp = [], [], x
    for k in range(chain.num_blocks):
        inputs.append(inp)
        with buffers_kept(chain.blocks[k]):
            inp = chain.families[k].mean(chain.families[k].params(chain.blocks[k](inp)))
        outputs.append(inp)
    ell = -F.cross_entropy(chain.head(inp), y, reduction="sum")
    return inputs, outputs[:-1], ell


def _forward_grads(chain, loss, k):
    params = list(chain.blocks[k].parameters())
    return torch.autograd.grad(loss, params, retain_graph=True)


@pytest.mark.parametrize("build", [_mlp, _resnet])
@pytest.mark.parametrize("delay", [1, 3])
def test_with_the_weights_kept_the_delayed_term_is_backprops_gradient(build, delay):
    """The same batch and noise every step, no optimiser: the loss at step d minus the
    loss at step 0 (no target yet) is the delayed term, whose gradient for block k's
    forward layers is d(-ell)/d theta_k of a non-detached forward, by hand."""
    torch.manual_seed(0)
    chain, x, y, cfg = build(delay)
    method = BLL(chain, cfg)
    key = NoiseKey(0, 0)
    first, _ = method.loss(chain, x, y, None, noise=key)
    blocks = range(chain.num_blocks - 1)
    before = [_forward_grads(chain, first, k) for k in blocks]  # (batch norm: before the
    for _ in range(delay):  # next forward updates the running statistics it saved)
        later, logs = method.loss(chain, x, y, None, noise=key)
    _, _, ell = _by_hand(chain, x, y)
    for k in blocks:
        pairs = zip(_forward_grads(chain, later, k), before[k], strict=True)
        got = [a - b for a, b in pairs]
        want = _forward_grads(chain, -ell / y.shape[0], k)
        assert sum(w.abs().sum() for w in want) > 0
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert (logs["target"][:-1] != 0).all() and logs["target"][-1] == 0


def test_after_the_weights_move_the_term_reads_the_stashed_input_and_target():
    torch.manual_seed(1)
    chain, x, y, cfg = _mlp(delay=1)
    method = BLL(chain, cfg)
    method.loss(chain, x, y, None, noise=NoiseKey(0, 0))
    inputs, outputs, ell = _by_hand(chain, x, y)
    targets = torch.autograd.grad(ell, outputs)  # G_k^(t)
    stashed = [t.detach() for t in inputs]
    with torch.no_grad():
        for p in chain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x2, y2 = toy_batch(n=12)
    _, logs = method.loss(chain, x2.double(), y2, None, noise=NoiseKey(0, 1))
    for k, g in enumerate(targets):
        m = chain.families[k].mean(chain.families[k].params(chain.blocks[k](stashed[k])))
        want = -(m * g).sum() / y2.shape[0]
        assert_close(logs["target"][k], want, rtol=1e-12, atol=1e-12)
    assert method.targets.bytes_held() == sum(
        t.numel() * 8 for t in [*stashed[:-1], *targets]
    )  # d = 1 stash of float64 inputs and targets


@pytest.mark.parametrize("delay", [1, 2])
def test_nothing_arrives_in_the_first_d_steps(delay):
    """Before step d the gradients are those of the loss without a local likelihood
    (--beta label --bll-terms kl,pred on an identical chain)."""
    torch.manual_seed(2)
    chain, x, y, cfg = _mlp(delay)
    reference = mlp_chain(make_family("gaussian", sigma=0.5), register_params=False,
                          widths=(6, 5, 6, 4)).double()  # fmt: skip
    reference.load_state_dict(chain.state_dict())
    method = BLL(chain, cfg)
    plain = BLL(reference, config_for_task("s2s_reverse", bll_terms=["kl", "pred"]))
    for step in range(delay + 1):
        key = NoiseKey(0, step)
        loss, logs = method.loss(chain, x, y, None, noise=key)
        if step == delay:
            assert (logs["target"][:-1] != 0).all()
            break
        assert (logs["target"] == 0).all()
        want, _ = plain.loss(reference, x, y, None, noise=key)
        got_g = torch.autograd.grad(loss, list(chain.parameters()), allow_unused=True)
        want_g = torch.autograd.grad(want, list(reference.parameters()), allow_unused=True)
        for g, w in zip(got_g, want_g, strict=True):
            if w is None or g is None:
                assert (g is None or g.abs().max() == 0) and (w is None or w.abs().max() == 0)
            else:
                assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_the_delayed_term_is_block_local():
    chain, x, y, cfg = _mlp()
    method = BLL(chain, cfg)
    method.loss(chain, x, y, None)
    term = method.targets.term(chain, method.targets.pending[0])
    assert term[:-1].abs().min() > 0
    assert_block_local(chain, term)


def test_chains_and_options_the_targets_cannot_serve_are_refused():
    with pytest.raises(ConfigError, match="--propagate mean"):
        chain, _, _, cfg = _mlp(propagate="sample")
        BLL(chain, cfg)
    chain, _, _, cfg = _mlp()
    chain.blocks[1].append(torch.nn.Dropout(0.1))
    with pytest.raises(ConfigError, match="dropout"):
        BLL(chain, cfg)
    with pytest.raises(ValueError, match="at least 1"):
        config_for_task("s2s_reverse", beta="target", target_delay=0)


def test_per_block_backward_runs_the_blocks_as_one_joint_loss():
    chain, x, y, cfg = _mlp()
    parts = list(BLL(chain, cfg).local_losses(chain, x, y, None))
    assert len(parts) == 1


def _cli():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    import run

    return run


def test_the_command_line_trains_with_targets_and_refuses_stray_options(tmp_path, capsys):
    run = _cli()
    tiny = ["--task", "s2s_reverse", "--layers", "3", "--d-model", "8", "--seq-len", "4",
            "--train-size", "32", "--test-size", "8", "--batch-size", "16", "--epochs", "1",
            "--threads", "1", "--no-progress"]  # fmt: skip
    out = tmp_path / "t"
    argv = [*tiny, "--beta", "target", "--target-delay", "1", "--backward", "per-block"]
    assert run.cli([*argv, "--out", str(out)]) == 0
    assert '"beta": "target"' in (out / "config.json").read_text()
    assert "target" in (out / "metrics.json").read_text()
    assert run.cli([*tiny, "--target-delay", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--target-delay applies to --beta target" in capsys.readouterr().err
    assert run.cli([*argv, "--target-delay", "0", "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert run.cli([*argv, "--out", str(tmp_path / "x"), "--distributed"]) == 2
    assert "not available with --distributed" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
