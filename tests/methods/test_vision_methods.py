"""Feedback alignment, Pred-Sim, BLL and BP on the ResNet chains (and FA/Pred-Sim alone)."""

import math

import pytest
import torch
from torch import nn

from pyro_bll.config import ConfigError
from pyro_bll.families import make_family
from pyro_bll.methods import METHODS
from pyro_bll.methods.alignment import FAConv2d, FALinear, convert_to_feedback_alignment
from pyro_bll.methods.predsim import similarity_loss, similarity_matrix
from pyro_bll.models import RESNET_ARCHS
from pyro_bll.run.build import config_for_task, validate
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks.vision import build_resnet_chain

from utils import assert_close, mlp_chain


def _grads(layer, x, g):
    x = x.clone().requires_grad_(True)
    layer(x).backward(g)
    return x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_fa_linear_sends_the_error_through_the_fixed_backward_weight(shape):
    bp = nn.Linear(5, 3).double()
    net = nn.Sequential(bp)
    assert convert_to_feedback_alignment(net) == 1
    fa = net[0]
    assert isinstance(fa, FALinear) and fa.weight is bp.weight and fa.bias is bp.bias
    back = fa.backward_weight
    assert not back.requires_grad and "0.backward_weight" in net.state_dict()
    assert back.abs().max() <= math.sqrt(6 / 5)  # Kaiming-uniform bound sqrt(6 / fan_in)
    x, g = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape[:-1], 3).double()
    gx_fa, gw_fa, gb_fa = _grads(fa, x, g)
    bp.weight.grad = bp.bias.grad = None
    gx_bp, gw_bp, gb_bp = _grads(bp, x, g)
    assert_close(gx_fa, g @ back, atol=1e-12)  # hand computation: g B, not g W
    assert_close(gx_bp, g @ bp.weight.detach(), atol=1e-12)
    assert (gx_fa - gx_bp).abs().max() > 1e-3
    assert_close(gw_fa, gw_bp, atol=1e-12)
    assert_close(gb_fa, gb_bp, atol=1e-12)
    assert_close(gw_fa, g.reshape(-1, 3).T @ x.reshape(-1, 5), atol=1e-12)


def test_fa_conv2d_sends_the_error_through_the_fixed_backward_weight():
    bp = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    net = nn.Sequential(bp)
    convert_to_feedback_alignment(net)
    fa = net[0]
    assert isinstance(fa, FAConv2d) and fa.weight is bp.weight
    back = fa.backward_weight
    assert back.shape == bp.weight.shape
    assert back.abs().max() <= math.sqrt(6 / 27)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    g = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    gx_fa, gw_fa, gb_fa = _grads(fa, x, g)
    bp.weight.grad = bp.bias.grad = None
    gx_bp, gw_bp, gb_bp = _grads(bp, x, g)
    hand = torch.nn.grad.conv2d_input(x.shape, back, g, stride=2, padding=1)
    assert_close(gx_fa, hand, atol=1e-12)
    assert (gx_fa - gx_bp).abs().max() > 1e-3
    assert_close(gw_fa, gw_bp, atol=1e-12)
    assert_close(gb_fa, gb_bp, atol=1e-12)


def test_fa_refuses_layers_it_cannot_align():
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        convert_to_feedback_alignment(nn.Sequential(nn.MultiheadAttention(4, 1)))


def test_similarity_loss_on_hand_made_inputs():
    y = torch.tensor([0, 1, 1])
    onehot = torch.eye(3)[y]
    assert_close(similarity_loss(onehot, y, 3), 0.0, atol=1e-7)  # identical matrices
    assert_close(similarity_loss(5 * onehot + 1, y, 3), 0.0, atol=1e-7)  # scale and shift
    # centred one-hot codes of different classes among V = 3 have cosine -1/2
    assert_close(similarity_matrix(onehot)[0], torch.tensor([1.0, -0.5, -0.5]), atol=1e-6)
    # identical rows: S = 1 everywhere; labels 0, 1: off-diagonal error 1.5 -> mse 2 * 2.25 / 4
    u = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert_close(similarity_loss(u, torch.tensor([0, 1]), 3), 1.125, atol=1e-6)
    # maps with > 3 channels: the per-channel spread over space is what is compared
    m = torch.randn(2, 4, 3, 3)
    assert_close(similarity_matrix(m), similarity_matrix(m.flatten(2).std(2)), atol=1e-6)
    assert_close(similarity_matrix(m + 7.0), similarity_matrix(m), atol=1e-5)


def _one_step(chain, method, cfg, x, y):
    m = METHODS[method](chain, cfg)  # before the optimiser: Pred-Sim adds its heads
    opt = torch.optim.Adam(chain.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in chain.named_parameters()}
    loss, logs = m.loss(chain, x, y, None)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = {n for n, p in chain.named_parameters() if not torch.equal(p, before[n])}
    return loss, logs, changed


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", sorted(RESNET_ARCHS))
def test_one_step_of_every_method_on_every_arch(method, arch):
    cfg = RunConfig(task="cifar10", message="pool", pred_weight=1.0, method=method, width=1 / 16)
    chain = build_resnet_chain(arch, 1, 10, make_family("gaussian"), cfg)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    loss, logs, changed = _one_step(chain, method, cfg, x, y)
    assert torch.isfinite(loss) and torch.isfinite(logs["loss"]).all()
    for k in range(chain.num_blocks):  # every method trains every block
        assert any(n.startswith(f"blocks.{k}.") for n in changed), (method, k)
    assert any(n.startswith("head.") for n in changed)
    if method in ("bll", "predsim"):
        assert logs["loss"].shape == (4,)  # one local loss per block
    if method == "predsim":
        assert any(n.startswith("predsim_heads.") for n in changed)
        assert "predsim_heads.0.sim.conv.weight" in chain.state_dict()
    if method == "fa":
        state = chain.state_dict()
        backs = [k for k in state if k.endswith("backward_weight")]
        convs = [m for m in chain.modules() if isinstance(m, nn.Conv2d)]
        assert len(backs) == len(convs) + 1  # every conv, and the head's linear layer
        assert not any(n.endswith("backward_weight") for n, _ in chain.named_parameters())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_takes_a_step_under_the_grid_message(method):
    """Under --message grid the feedback is wider than the block (s^2 C): the methods that
    build heads of their own size them by the block's channels, not by the feedback."""
    cfg = RunConfig(task="cifar10", pred_weight=1.0, method=method, width=0.125, message="grid")
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg, image_size=28)
    x, y = torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,))
    loss, logs, changed = _one_step(chain, method, cfg, x, y)
    assert torch.isfinite(loss) and torch.isfinite(logs["loss"]).all()
    assert all(any(n.startswith(f"blocks.{k}.") for n in changed) for k in range(4))


def test_predsim_blocks_are_local():
    """Block k's parameters (with its Pred-Sim heads) get gradients from l_k only."""
    cfg = RunConfig(
        task="cifar10", message="pool", pred_weight=1.0, method="predsim", width=1 / 16, blocks=3
    )
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg).double()
    m = METHODS["predsim"](chain, cfg)
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    per_block, _ = m.block_losses(chain, x, y, None)
    n = chain.num_blocks
    owners = [
        [*chain.blocks[k].parameters(), *chain.predsim_heads[k].parameters()] for k in range(n - 1)
    ] + [[*chain.blocks[-1].parameters(), *chain.head.parameters()]]
    everything = [p for ps in owners for p in ps]
    total = torch.autograd.grad(per_block.sum(), everything, retain_graph=True)
    total = dict(zip(map(id, everything), total, strict=True))
    for k in range(n):
        local = torch.autograd.grad(per_block[k], owners[k], retain_graph=True)
        for p, g in zip(owners[k], local, strict=True):
            assert_close(g, total[id(p)], atol=1e-12, rtol=1e-10)
        others = [p for j in range(n) if j != k for p in owners[j]]
        leak = torch.autograd.grad(per_block[k], others, retain_graph=True, allow_unused=True)
        assert all(g is None or g.abs().max() == 0 for g in leak)


def test_methods_on_vector_chains():
    """Pred-Sim and FA also run on the MLP chain of fashion_mnist_mlp (vectors)."""
    for method in ("predsim", "fa"):
        chain = mlp_chain(make_family("gaussian"))
        x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
        loss, _, changed = _one_step(chain, method, RunConfig(method=method), x, y)
        assert torch.isfinite(loss) and any(n.startswith("blocks.0.") for n in changed)


def test_methods_that_do_not_apply_say_so():
    seq = mlp_chain(make_family("gaussian"), event_dim=2)  # per-position labels like s2s
    with pytest.raises(ConfigError, match="predsim needs one label per example"):
        METHODS["predsim"](seq, RunConfig(method="predsim", task="s2s_reverse"))
    cfg = RunConfig(
        task="cifar10", message="pool", pred_weight=1.0, width=1 / 16, feedback_update="solve"
    )
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg)
    with pytest.raises(ConfigError, match="not feature maps"):
        METHODS["bll"](chain, cfg)
    for method in ("fa", "predsim", "bp"):  # the run's validation refuses BLL-only options
        with pytest.raises(ConfigError, match="--feedback-update applies to --method bll only"):
            validate(config_for_task("fashion_mnist", method=method, feedback_update="solve"))


def test_bll_on_a_tiny_resnet_learns_a_toy_task():
    """Four classes = which quadrant of a noisy 8x8 image is bright; 64 BLL steps."""
    g = torch.Generator().manual_seed(0)

    def data(n):
        y = torch.randint(0, 4, (n,), generator=g)
        x = 0.5 * torch.randn(n, 1, 8, 8, generator=g)
        for c in range(4):
            r, s = divmod(c, 2)
            x[y == c, :, 4 * r : 4 * r + 4, 4 * s : 4 * s + 4] += 1.0
        return x, y

    (x, y), (x_test, y_test) = data(1024), data(256)
    cfg = RunConfig(task="cifar10", message="pool", pred_weight=1.0, width=1 / 8)
    chain = build_resnet_chain("resnet18", 1, 4, make_family("gaussian"), cfg)
    bll = METHODS["bll"](chain, cfg)
    opt = torch.optim.Adam(chain.parameters(), lr=3e-3)
    for _ in range(64):
        i = torch.randint(0, len(x), (32,), generator=g)
        loss, _ = bll.loss(chain, x[i], y[i], None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    chain.eval()
    with torch.no_grad():
        acc = (chain.predict_logits(x_test).argmax(-1) == y_test).float().mean().item()
    assert acc > 0.9  # chance: 0.25
