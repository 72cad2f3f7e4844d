"""Blocks computed together (pyro_bll.core.stacked, pyro_bll.blocks_plate): a group of
agreeing blocks as one vectorised site gives the per-site program's losses and gradients
to 1e-10 in float64, for every family and estimator and on every task; the ELBO splits a
block axis into block-local losses; the stacked predictive heads equal the per-head loop."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

import pyro_bll
from pyro_bll import BlockLocalELBO, make_family
from pyro_bll.core import stacked, stacked_heads
from pyro_bll.core.noise import NoiseKey
from pyro_bll.core.step_cache import StepCache, step_cache
from pyro_bll.methods.bll import BLL
from pyro_bll.run.build import config_for_task
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks import S2SReverseTask
from pyro_bll.tasks.vision import build_resnet_chain

from utils import assert_block_local, assert_close, mlp_chain, toy_batch

# ---- the ELBO's block axis on a plain Pyro program ------------------------------------------


def _program(stack: bool, loc: torch.Tensor, scale: torch.Tensor, y: torch.Tensor):
    """Three blocks, each with z_k ~ N(loc_k, 1) in the model, N(loc_k + scale_k, .5) in the
    guide and y ~ N(z_k, 1): as three tagged sites, or as one site in a blocks plate."""

    def model():
        with pyro.plate("data", y.shape[0], dim=-1):
            if stack:
                with pyro_bll.blocks_plate("blocks", first=0, size=3, dim=-2):
                    z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
                    pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)
                return
            for k in range(3):
                with pyro_bll.block(k):
                    z = pyro.sample(f"z_{k}", dist.Normal(loc[k], 1.0).to_event(1))
                    pyro.sample(f"y_{k}", dist.Normal(z, 1.0).to_event(1), obs=y)

    def guide():
        with pyro.plate("data", y.shape[0], dim=-1):
            if stack:
                with pyro_bll.blocks_plate("blocks", first=0, size=3, dim=-2):
                    pyro.sample("z", dist.Normal(loc + scale, 0.5).to_event(1))
                return
            for k in range(3):
                pyro.sample(f"z_{k}", dist.Normal(loc[k] + scale[k], 0.5).to_event(1))

    return model, guide


def test_a_block_axis_splits_into_the_per_site_losses_and_stays_local():
    torch.manual_seed(0)
    loc = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)  # [blocks, B, C]
    scale = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 2, dtype=torch.float64)
    model, guide = _program(True, loc, scale, y)
    site_model, site_guide = _program(False, loc, scale, y)
    drawn = poutine.trace(guide).get_trace()  # the per-site guide gets the same draws
    per_site = poutine.trace(site_guide).get_trace()
    for k in range(3):
        per_site.nodes[f"z_{k}"]["value"] = drawn.nodes["z"]["value"][k]
    out = {}
    for stack, (m, g) in [(True, (model, guide)), (False, (site_model, site_guide))]:
        g = poutine.replay(g, trace=drawn if stack else per_site)
        losses = BlockLocalELBO(3).block_losses(m, g)
        out[stack] = losses.per_block, torch.autograd.grad(losses.total, (loc, scale))
    assert_close(out[True][0], out[False][0], atol=1e-12, rtol=1e-12)
    for a, b in zip(out[True][1], out[False][1], strict=True):
        assert_close(a, b, atol=1e-12, rtol=1e-12)
    per_block = BlockLocalELBO(3).block_losses(*_program(True, loc, scale, y)).per_block
    for k in range(3):  # l_k has gradients only in slice k
        (g,) = torch.autograd.grad(per_block[k], loc, retain_graph=True)
        assert g[k].abs().sum() > 0
        assert g[[i for i in range(3) if i != k]].abs().max() == 0


def test_block_axis_errors_name_the_problem():
    with pytest.raises(ValueError, match="first >= 0"):
        pyro_bll.core.tags.BlockAxis(-1, 2, -2)
    loc = torch.zeros(3, 5, 2)

    def model():
        with pyro.plate("data", 5, dim=-1), pyro_bll.blocks_plate("b", 2, 3, -2):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    def guide():
        with pyro.plate("data", 5, dim=-1), pyro_bll.blocks_plate("b", 2, 3, -2):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    with pytest.raises(ValueError, match="has block 4, but the ELBO has 3 blocks"):
        BlockLocalELBO(3).block_losses(model, guide)
    assert BlockLocalELBO(5).block_losses(model, guide).per_block.shape == (5,)


def test_a_score_function_never_reads_another_axis():
    """A non-reparameterised axis site read by a cost of one of its blocks outside the
    axis is refused: that cost does not split into blocks, so its score function would
    mix them."""
    probs = torch.full((2, 4), 0.3)

    def model():
        with pyro.plate("data", 4, dim=-1):
            with pyro_bll.blocks_plate("b", 0, 2, -2):
                z = pyro.sample("z", dist.Bernoulli(probs))
            with pyro_bll.block(1):
                pyro.sample("y", dist.Normal(z.sum(0), 1.0), obs=torch.zeros(4))

    def guide():
        with pyro.plate("data", 4, dim=-1), pyro_bll.blocks_plate("b", 0, 2, -2):
            pyro.sample("z", dist.Bernoulli(probs))

    with pytest.raises(ValueError, match="outside its block axis"):
        BlockLocalELBO(3).block_losses(model, guide)


# ---- the chain: stacked groups against one site per block ----------------------------------


def _s2s(family, likelihood=None, **opts):
    cfg = config_for_task(
        "s2s_reverse",
        layers=4,
        d_model=6,
        seq_len=5,
        batch_size=6,
        train_size=12,
        test_size=4,
        **opts,
    )
    task = S2SReverseTask(cfg)
    chain = task.build_chain(family).double()
    if likelihood is not None:
        chain.likelihood = likelihood
    x, y, mask = next(task.train_batches(0))
    mask = mask.clone()
    mask[0, -2:] = False  # some labels left out
    return chain, (x, y, mask), cfg


def _resnet(**opts):
    cfg = RunConfig(task="fashion_mnist", width=1 / 16, blocks=6, **opts)
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg).double()
    x, y = torch.randn(5, 1, 12, 12, dtype=torch.float64), torch.tensor([1, 4, 7, 1, 0])
    return chain, (x, y, None), cfg


def _mlp(**opts):
    chain = mlp_chain(make_family("gaussian_gated"), register_params=False,
                      widths=(6, 6, 6, 4)).double()  # fmt: skip
    x, y = toy_batch(n=12)
    return chain, (x.double(), y, None), config_for_task("fashion_mnist_mlp", **opts)


def _step(chain, cfg, batch, stack: bool):
    """Per-block logs and every parameter's gradient of one BLL step (a fresh method, so
    that the delayed targets start empty), with per-block noise streams."""
    method = BLL(chain, cfg)
    chain.double()  # the critic's modules, made by BLL
    chain.stack = stack
    total, logs = method.loss(chain, *batch, noise=NoiseKey(seed=1, step=2))
    params = [p for p in chain.parameters() if p.requires_grad]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return logs, [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


def _assert_same_step(build, **opts):
    chain, batch, cfg = build(**opts)
    logs, grads = _step(chain, cfg, batch, stack=False)
    stacked_logs, stacked_grads = _step(chain, cfg, batch, stack=True)
    for name in ("loss", "kl", "likelihood", "pred"):
        assert_close(stacked_logs[name], logs[name], atol=1e-10, rtol=1e-10, msg=name)
    assert logs["likelihood"][:-1].abs().sum() > 0 or cfg.bll.beta == "target"
    for g, want in zip(stacked_grads, grads, strict=True):
        assert_close(g, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("likelihood", ["bound", "sample"])
def test_every_family_gives_the_per_site_step(family, likelihood):
    chain, batch, cfg = _s2s(family, likelihood)
    logs, grads = _step(chain, cfg, batch, stack=False)
    with step_cache(StepCache()) as cache:  # the groups the step used
        chain.stack = True
        trace = poutine.trace(chain.guide).get_trace(*batch)
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    groups = stacked.groups(chain, range(chain.num_blocks), cache)
    # a score function's draws keep their own sites (theirs would mix the blocks' costs)
    pathwise = family.distribution(chain.latent_params(0, cache.alpha[0])).has_rsample
    grouped = likelihood == "bound" or pathwise
    assert bool([g for g in groups if len(g) > 1]) == grouped, family.name
    assert any(":" in n for n in names) == grouped
    stacked_logs, stacked_grads = _step(chain, cfg, batch, stack=True)
    for name in ("loss", "kl", "likelihood", "pred"):
        assert_close(stacked_logs[name], logs[name], atol=1e-10, rtol=1e-10, msg=name)
    for g, want in zip(stacked_grads, grads, strict=True):
        assert_close(g, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "build, opts",
    [
        (_s2s, {"beta": "lookahead"}),
        (_s2s, {"beta": "lookahead", "lookahead_depth": 0, "lookahead_input": "mean"}),
        (_s2s, {"beta": "critic"}),
        (_s2s, {"beta": "target"}),
        (_mlp, {}),
        (_mlp, {"beta": "label"}),
        (_resnet, {"beta": "label"}),
        (_resnet, {"beta": "label", "message": "mean"}),
        (_resnet, {"beta": "lookahead", "lookahead_depth": 0, "lookahead_input": "mean"}),
    ],
    ids=["s2s-lookahead", "s2s-sweep", "s2s-critic", "s2s-target", "mlp-default", "mlp-label",
         "resnet-label", "resnet-mean", "resnet-sweep"],
)  # fmt: skip
def test_every_task_and_message_gives_the_per_site_step(build, opts):
    if build is _s2s:
        _assert_same_step(lambda **o: _s2s(make_family("gaussian"), **o), **opts)
    else:
        _assert_same_step(build, **opts)


def test_a_head_that_reads_a_draw_keeps_its_site():
    """``head_input="sample"``: the last block's z_N is drawn and read by the head, after
    the group of the blocks below it."""
    chain = mlp_chain(make_family("gaussian"), register_params=False, head_input="sample",
                      widths=(5, 5, 5, 4)).double()  # fmt: skip
    x, y = toy_batch(n=10)
    out = {}
    for stack in (False, True):
        chain.stack = stack
        with step_cache(StepCache(noise=NoiseKey(0, 1))):
            losses = BlockLocalELBO(4).block_losses(chain.model, chain.guide, x.double(), y)
        params = list(chain.parameters())
        out[stack] = losses.per_block, torch.autograd.grad(losses.total, params, allow_unused=True)
    assert_close(out[True][0], out[False][0], atol=1e-10, rtol=1e-10)
    assert out[False][0][-1] != 0
    for a, b in zip(out[True][1], out[False][1], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_stacked_steps_stay_block_local():
    chain, (x, y, mask), cfg = _s2s(make_family("gaussian"))
    BLL(chain, cfg)
    assert chain.stack
    with step_cache(StepCache(noise=NoiseKey(0, 0))):
        per_block = (
            BlockLocalELBO(chain.num_blocks)
            .block_losses(chain.model, chain.guide, x, y, mask)
            .per_block
        )
    assert_block_local(chain, per_block)


def test_groups_follow_the_shapes():
    """On the 6-block ResNet only blocks 2 and 3 share a latent shape below the last
    (channel summaries of 4, 8, 16, 16, 32 and 32 channels); the head's block is never in a
    group; the per-site program (``stack`` off, as Predictive runs it) names every z_k."""
    chain, (x, y, _), _ = _resnet(beta="label")
    cache = StepCache()
    inp = x
    for k in range(chain.num_blocks):
        inp = chain.next_input(k, chain.forward_message(k, inp, cache), None)
    widths = [chain.latent_params(k, cache.alpha[k])[0].shape[-1] for k in range(6)]
    assert widths == [4, 8, 16, 16, 32, 32]
    assert stacked.groups(chain, range(6), cache) == [[0], [1], [2, 3], [4]]
    assert stacked.groups(chain, range(1, 4), cache) == [[1], [2, 3]]
    trace = poutine.trace(chain.guide).get_trace(x, y)
    assert [n for n in trace.nodes if n.startswith("z_")] == [f"z_{k}" for k in range(5)]


# ---- stacked predictive heads --------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: nn.Linear(4, 3), lambda: nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3))]
)
def test_stacked_heads_equal_the_loop(make):
    heads = [make().double() for _ in range(3)]
    for h in heads:  # LayerNorm's affine parameters away from their 1 / 0 start
        for p in h.parameters():
            p.data.normal_()
    h = torch.randn(3, 5, 2, 4, dtype=torch.float64)  # [n, B, T, C]
    y = torch.randint(0, 3, (5, 2))
    mask = torch.rand(5, 2) > 0.3
    want = torch.stack(
        [
            (torch.nn.functional.cross_entropy(heads[i](h[i]).reshape(-1, 3), y.reshape(-1),
                                               reduction="none").reshape(5, 2) * mask).sum(-1)
            for i in range(3)
        ]
    )  # fmt: skip
    assert stacked_heads.stackable_heads(heads)
    got = stacked_heads.stacked_cross_entropy(stacked_heads.stacked_heads(heads, h), y, mask)
    assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_heads_of_different_structure_do_not_stack():
    assert not stacked_heads.stackable_heads([nn.Linear(4, 3), nn.Linear(5, 3)])
    assert not stacked_heads.stackable_heads([nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3))])
    assert not stacked_heads.stackable_heads([nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1)])
    assert not stacked_heads.stackable_heads([nn.Linear(4, 3)])


def test_the_option_turns_it_off_and_belongs_to_bll(capsys):
    import sys
    from pathlib import Path

    from pyro_bll.config import ConfigError
    from pyro_bll.run.build import build_run, validate

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    import run

    tiny = ["--layers", "3", "--d-model", "6", "--seq-len", "5", "--train-size", "8",
            "--test-size", "4", "--threads", "1"]  # fmt: skip
    for extra, stack in ([], True), (["--no-stack-blocks"], False):
        cfg, _ = run.parse_config([*tiny, *extra])
        assert build_run(validate(cfg)).chain.stack is stack
    with pytest.raises(ConfigError, match="--no-stack-blocks applies to --method bll"):
        run.parse_config([*tiny, "--method", "bp", "--no-stack-blocks"])
    assert run.cli([*tiny, "--method", "bp", "--no-stack-blocks", "--out", "x"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
