"""ResNet-18/50 cut into blocks (models/resnet.py) and feedback messages on feature maps."""

import pytest
import torch
import torchvision
from torch import nn

from pyro_bll import BlockLocalELBO, seed_everything
from pyro_bll.config import ConfigError
from pyro_bll.core.likelihoods import ConvPooledHead, GridPooledHead
from pyro_bll.core.step_cache import StepCache
from pyro_bll.families import FAMILIES, make_family
from pyro_bll.guides import BroadcastMessage, PoolMessage
from pyro_bll.models import RESNET_ARCHS, ModelError, resnet_blocks
from pyro_bll.models.resnet import block_layer_counts, split_units
from pyro_bll.run.build import config_for_task, validate
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks.vision import build_resnet_chain

from utils import (
    assert_block_local,
    assert_close,
    reference_inner,
    reference_log_normalizer,
    reference_stats,
)

TINY = 1 / 16  # stage widths (4, 8, 16, 32)


def tiny_chain(arch="resnet18", family="gaussian", **cfg):
    cfg = RunConfig(**{"task": "cifar10", "message": "pool", "pred_weight": 1.0, "width": TINY,
                       "arch": arch, **cfg})  # fmt: skip
    return build_resnet_chain(arch, 1, 10, make_family(family), cfg)


def latent_shapes(chain, x):
    shapes, inp, cache = [], x, StepCache()
    for k in range(chain.num_blocks):
        alpha = chain.forward_message(k, inp, cache)
        inp = chain.families[k].mean(alpha)
        shapes.append(tuple(inp.shape[1:]))
    return shapes


# (arch, blocks) -> units per block and latent [H, W, C] of every block, 12x12 grey input,
# worked out by hand: stage s (0-based) halves the map s times (12, 6, 3, 2) and has
# 4 * 2^s channels (ResNet-18) or 16 * 2^s (ResNet-50, bottleneck expansion 4).
CASES = {
    ("resnet18", 1): ([8], [(2, 2, 32)]),
    ("resnet18", 3): ([3, 3, 2], [(6, 6, 8), (3, 3, 16), (2, 2, 32)]),
    ("resnet18", 4): ([2, 2, 2, 2], [(12, 12, 4), (6, 6, 8), (3, 3, 16), (2, 2, 32)]),
    ("resnet50", 1): ([16], [(2, 2, 128)]),
    ("resnet50", 4): ([4, 4, 4, 4], [(6, 6, 32), (3, 3, 64), (3, 3, 64), (2, 2, 128)]),
}


@pytest.mark.parametrize(("arch", "blocks"), sorted(CASES))
def test_units_and_latent_shapes(arch, blocks):
    units, shapes = CASES[arch, blocks]
    chain = tiny_chain(arch, blocks=blocks)
    assert [len(b.units) for b in chain.blocks] == units
    assert latent_shapes(chain, torch.randn(4, 1, 12, 12)) == shapes
    assert chain.predict_logits(torch.randn(4, 1, 12, 12)).shape == (4, 10)


@pytest.mark.parametrize("arch", sorted(RESNET_ARCHS))
def test_one_block_per_unit(arch):
    n = RESNET_ARCHS[arch].num_units
    chain = tiny_chain(arch, blocks=n)
    assert [len(b.units) for b in chain.blocks] == [1] * n
    shapes = latent_shapes(chain, torch.randn(2, 1, 8, 8))
    assert len(shapes) == n and shapes[-1][:2] == (1, 1)


def test_layer_counts_against_the_paper():
    assert block_layer_counts("resnet18", 4) == [5, 4, 4, 5]  # paper: (4, 5, 4, 5)
    assert block_layer_counts("resnet50", 4) == [13, 12, 12, 13]  # paper: (12, 13, 12, 13)
    for arch, total in (("resnet18", 18), ("resnet50", 50)):
        for n in range(1, RESNET_ARCHS[arch].num_units + 1):
            assert sum(block_layer_counts(arch, n)) == total
    assert split_units(16, 5) == [4, 3, 3, 3, 3]


@pytest.mark.parametrize("arch", sorted(RESNET_ARCHS))
def test_same_function_as_torchvision(arch):
    """Full width: with torchvision's weights copied in, the chain's deterministic
    prediction equals torchvision's ResNet with a 3x3 stride-1 stem and no max-pool."""
    seed_everything(0)
    tv = getattr(torchvision.models, arch)(num_classes=10)
    tv.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    tv.maxpool = nn.Identity()
    chain = build_resnet_chain(
        arch,
        3,
        10,
        make_family("gaussian"),
        RunConfig(task="cifar10", message="pool", pred_weight=0),
    )
    ours = [t for b in chain.blocks for t in b.state_dict().values()]
    ours += list(chain.head.state_dict().values())
    theirs = list(tv.state_dict().values())
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    with torch.no_grad():
        for a, b in zip(ours, theirs, strict=True):
            if b.is_floating_point():  # move BatchNorm off its identity initialisation
                b.add_(0.01 * torch.randn_like(b))
            a.copy_(b)
    chain.eval()
    tv.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = chain.predict_logits(x)
        assert out.abs().max() > 0.1  # not a degenerate comparison
        assert_close(out, tv(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("arch", sorted(RESNET_ARCHS))
def test_every_family_on_a_tiny_resnet(name, arch):
    chain = tiny_chain(arch, name)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    assert losses.per_block.shape == (4,) and torch.isfinite(losses.per_block).all()
    losses.total.backward()
    grads = [p.grad for p in chain.blocks[0].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


def test_locality_of_the_resnet_chain():
    """As tests/core/test_locality.py: block k's parameters get gradients from l_k only."""
    chain = tiny_chain("resnet18", blocks=3).double()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    assert_block_local(chain, losses.per_block)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pool_is_broadcast_of_beta_over_hw_and_a_potential_on_mean_statistics(name):
    """rho_pool(z) is proportional to alpha(z) exp(<beta, mean_hw T(z_hw)>): the log ratio
    minus that potential is the same for every z; and it equals broadcast with beta / HW."""
    fam = make_family(name)
    b, h, w, c = 3, 4, 5, 8
    alpha = fam.params(torch.randn(b, h, w, fam.raw_size(c), dtype=torch.float64))
    beta = fam.feedback_potential(torch.randn(b, fam.feedback_size(c), dtype=torch.float64))
    pool = fam.posterior(alpha, PoolMessage().place(beta, alpha))
    scaled = BroadcastMessage().place(tuple(t / (h * w) for t in beta), alpha)
    for p, q in zip(pool, fam.posterior(alpha, scaled), strict=True):
        assert_close(p, q, atol=1e-12, rtol=1e-12)
    broad = fam.posterior(alpha, BroadcastMessage().place(beta, alpha))
    placed = tuple(t[:, None, None] for t in beta)  # [B, 1, 1, C(, K)]
    for rho, reduce in ((pool, lambda t: t.mean((1, 2))), (broad, lambda t: t.sum((1, 2)))):
        offsets = []
        for _ in range(3):
            z = fam.distribution(rho).sample()
            log_ratio = (fam.log_prob(rho, z) - fam.log_prob(alpha, z)).sum((1, 2, 3))
            potential = reduce(fam.inner(placed, fam.sufficient_stats(z))).sum(-1)
            offsets.append(log_ratio - potential)  # -log normaliser, independent of z
        for o in offsets[1:]:
            assert_close(o, offsets[0], atol=1e-9, rtol=1e-9)


# eta_ref of the class-conditional laws, from the families' docstrings
CLASS_REFERENCE = {"gaussian": (0.0, 0.0), "categorical": (0.0,), "gamma": (0.0, -1.0)}


@pytest.mark.parametrize("message", ["pool", "broadcast"])
@pytest.mark.parametrize("name", sorted(CLASS_REFERENCE))
def test_prototype_logits_on_the_map(message, name):
    """PrototypeLikelihood's logits on a map, written out from its docstring: at every
    location l_c(z_hw) = <beta_c, T(z_hw)> - A(eta_ref + beta_c), summed over the map
    (broadcast: a product of per-location class densities) or averaged (pool: the
    prototype classifier on spatially averaged statistics). T and eta_ref from the
    family's docstring, A by summation or quadrature (``utils.reference_log_normalizer``),
    a loop over the locations, float64."""
    chain = tiny_chain("resnet18", name, message=message)
    fam = chain.families[0]
    x = torch.randn(4, 1, 6, 6)
    z = fam.distribution(chain.forward_message(0, x)).sample()  # [4, 6, 6, C(/K)]
    protos = tuple(p.double() for p in chain.class_potentials(0))  # [V, C(/K)(, K)]
    v = protos[0].shape[0]
    classes = tuple(p + r for p, r in zip(protos, CLASS_REFERENCE[name], strict=True))
    a_ref = reference_log_normalizer(name, classes).sum(-1)  # [V]: A summed over channels
    stats = reference_stats(name, z, getattr(fam, "group_size", None))  # [4, 6, 6, ...]
    b, h, w = z.shape[:3]
    hand = torch.zeros(b, v, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            at = tuple(t[:, i, j].unsqueeze(1) for t in stats)  # [B, 1, C(/K)(, K)]
            hand += reference_inner(name, protos, at).sum(-1) - a_ref  # [B, V]
    if message == "pool":
        hand /= h * w
    q = chain.local_likelihoods[0](chain, 0, z)
    assert q.batch_shape == (4,)
    assert_close(q.logits, torch.log_softmax(hand, -1).float(), atol=1e-4, rtol=1e-5)


def test_bad_input_names_the_fix():
    """The model names the argument at fault (plain ModelError); the task layer turns it
    into the command-line flag."""
    fam = make_family("gaussian")
    with pytest.raises(ModelError, match=r"^blocks 9 exceeds the 8 residual units of resnet18"):
        resnet_blocks("resnet18", 1, 9, TINY, fam)
    with pytest.raises(ModelError, match="^width must be positive"):
        resnet_blocks("resnet18", 1, 4, 0.0, fam)
    with pytest.raises(ModelError, match="group_size 3 does not divide the 4 channels"):
        resnet_blocks("resnet18", 1, 4, TINY, make_family("categorical", group_size=3))
    with pytest.raises(
        ConfigError, match=r"--blocks 17 exceeds the 16 residual units of resnet50; use 1\.\.16"
    ):
        tiny_chain("resnet50", blocks=17)
    with pytest.raises(ConfigError, match="--blocks must be positive"):
        tiny_chain(blocks=0)
    with pytest.raises(ConfigError, match="unknown arch 'resnet34'; valid: resnet18, resnet50"):
        tiny_chain("resnet34")
    for bad, match in (
        ({"arch": "vgg"}, "unknown arch 'vgg'"),
        ({"message": "sum"}, "unknown message 'sum'"),
        ({"width": -1.0}, "--width must be positive"),
        ({"sim_weight": 1.5}, "--sim-weight"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate(RunConfig(task="cifar10", **bad))
    with pytest.raises(ConfigError, match="unknown pred head 'mlp'; valid: linear, conv"):
        tiny_chain(pred_head="mlp")
    with pytest.raises(ConfigError, match="--pred-head applies to the vision tasks .*; drop it"):
        validate(config_for_task("s2s_reverse", pred_head="conv"))


@pytest.mark.parametrize(
    ("channels", "spatial", "side"),
    [(8, 28, 14), (16, 14, 11), (32, 7, 7), (64, 7, 5), (64, 4, 4), (3, 5, 5)],
)
def test_predictive_head_pools_to_a_grid(channels, spatial, side):
    """The grid keeps <= 2048 features: tiles when a divisor of the map keeps at least half
    of the largest grid's features, adaptive pooling to the largest grid otherwise; either
    way the head is the linear map of the pooled means (by hand)."""
    head = GridPooledHead(channels, 10, spatial)
    assert head.side == side and channels * side**2 <= 2048
    h = torch.randn(2, spatial, spatial, channels)
    if spatial % side == 0:
        w = spatial // side
        pooled = h.relu().reshape(2, side, w, side, w, channels).mean((2, 4))  # [2, s, s, C]
    else:  # adaptive windows [floor(i H / s), ceil((i + 1) H / s))
        edges = [(i * spatial // side, -(-(i + 1) * spatial // side)) for i in range(side)]
        pooled = torch.stack(
            [
                torch.stack([h[:, a:b, c:d].relu().mean((1, 2)) for c, d in edges], 1)
                for a, b in edges
            ],
            1,
        )
    hand = head.linear(pooled.permute(0, 3, 1, 2).flatten(1))
    assert_close(head(h), hand, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("channels", "spatial", "inner"), [(8, 28, 14), (16, 14, 7), (8, 6, 6)])
def test_conv_predictive_head(channels, spatial, inner):
    """--pred-head conv: ReLU, 3x3 conv C -> 2C (stride 2 from side 8 up), batch norm, then
    the grid head on the result (by hand with torch's functional conv and batch norm)."""
    head = ConvPooledHead(channels, 10, spatial).train()
    h = torch.randn(6, spatial, spatial, channels)
    out = head(h)
    assert out.shape == (6, 10)
    stride = 2 if spatial >= 8 else 1
    u = nn.functional.conv2d(
        h.relu().permute(0, 3, 1, 2), head.conv.weight, stride=stride, padding=1
    )
    assert u.shape == (6, 2 * channels, inner, inner)
    mean, var = u.mean((0, 2, 3), keepdim=True), u.var((0, 2, 3), unbiased=False, keepdim=True)
    u = (u - mean) / (var + head.norm.eps).sqrt()  # fresh batch norm: weight 1, bias 0
    assert_close(out, head.read(u.permute(0, 2, 3, 1)), atol=1e-5, rtol=1e-4)
    assert head.read.side <= inner


def test_conv_heads_train_locally():
    """The conv heads are the chain's predictive heads (BLL's, and Pred-Sim's prediction
    heads): the block-local loss gives them gradients and stays block-local with them."""
    chain = tiny_chain(pred_head="conv")
    assert all(isinstance(h, ConvPooledHead) for h in chain.pred_heads)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    losses.total.backward()
    for head in chain.pred_heads:
        assert head.conv.weight.grad is not None and head.conv.weight.grad.abs().max() > 0
    chain = tiny_chain(pred_head="conv", blocks=3).double()
    x = x.double()
    losses = BlockLocalELBO(chain.num_blocks).block_losses(chain.model, chain.guide, x, y)
    assert_block_local(chain, losses.per_block)
