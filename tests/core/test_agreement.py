"""Agreement statistics and their InferenceData: known cases, every family and model kind."""

import math
from functools import cache

import arviz as az
import numpy as np
import torch
from conftest import TEST_OPTIONS
from test_learning import _clusters

from pyro_bll import BlockLocalELBO, make_family, seed_everything
from pyro_bll.analysis.diagnostics import (
    BLOCK_SCALARS,
    collect,
    forward_messages,
    to_inference_data,
)
from pyro_bll.core.agreement import (
    LOGGED,
    StepAgreement,
    block_sums,
    step_statistics,
    summarise,
)
from pyro_bll.core.step_cache import StepCache
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks import S2SReverseTask
from pyro_bll.tasks.s2s_reverse import make_sequences
from pyro_bll.tasks.vision import build_resnet_chain

from utils import assert_close, mlp_chain


def _ks(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two-sample Kolmogorov-Smirnov distance of the draws (axis 0) of every coordinate."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    out = []
    for u, v in zip(a.T, b.T, strict=True):
        grid = np.concatenate([u, v])
        cdf_u = np.searchsorted(np.sort(u), grid, side="right") / len(u)
        cdf_v = np.searchsorted(np.sort(v), grid, side="right") / len(v)
        out.append(np.abs(cdf_u - cdf_v).max())
    return np.array(out)


def test_statistics_of_the_papers_gaussian_by_hand():
    """kl, mean_msd, proto_msd, proto_cos and feedback_weight from the Gaussian formulas in
    numpy (rho = N((a + b_y) / 2, sigma^2 / 2), prototypes b_c), not from the library."""
    sigma = 0.8
    chain = mlp_chain(make_family("gaussian", sigma=sigma), register_params=False).double()
    with torch.no_grad():
        for layer in chain.feedback.layers:
            layer.weight.normal_(0, 1.5)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    for k, alpha in enumerate(forward_messages(chain, x)[:-1]):
        s = summarise(block_sums(chain, k, alpha, y, None, draws=2))
        a = alpha[0].detach().numpy()
        protos = chain.feedback.layers[k].weight.detach().numpy()
        b = protos[y.numpy()]
        m_r = (a + b) / 2
        kl = (0.5 * (0.5 + (m_r - a) ** 2 / sigma**2 - 1 - np.log(0.5))).sum(-1)
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert_close(s["kl"], [kl.mean()], atol=1e-9, rtol=1e-9)
        assert_close(s["mean_msd"], [((m_r - a) ** 2).mean()], atol=1e-9, rtol=1e-9)
        assert_close(s["proto_msd"], [((a - b) ** 2).mean()], atol=1e-9, rtol=1e-9)
        assert_close(s["proto_cos"], [cos.mean()], atol=1e-9, rtol=1e-9)
        assert_close(s["feedback_weight"], [0.5], atol=1e-9)


def test_an_untrained_feedback_network_leaves_rho_at_alpha(family):
    """Zero raw feedback outputs (the contract of every family but the paper's Gaussian):
    the densities of rho and alpha overlap and the reported disagreement vanishes."""
    if not family.zero_raw_is_uninformative:
        return  # the paper's Gaussian: covered by test_statistics_of_the_papers_gaussian_by_hand
    chain = mlp_chain(family, register_params=False).eval()
    with torch.no_grad():
        for layer in chain.feedback.layers:
            layer.weight.zero_()
    x, y = _clusters(64, torch.Generator().manual_seed(1))
    run = collect(chain, x, y, None, draws=400, examples=2, positions=1, channels=6)
    for name, value in (("kl", 0.0), ("mean_msd", 0.0), ("mean_cos", 1.0)):
        with_latent = run.stats[name][..., :-1]  # the last block has no latent: NaN
        assert_close(with_latent, np.full_like(with_latent, value), atol=2e-3, msg=name)
    ks = _ks(run.z_rho, run.z_alpha)  # rho = alpha: the densities overlap
    # two samples of 400 from one law: E[KS] is about 0.87 * sqrt(2 / 400) = 0.061
    assert ks.mean() < 0.075 and ks.max() < 0.2, ks


@cache
def _trained(name: str):
    """A 3-block MLP trained briefly with BLL on four clusters, and a held-out batch."""
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = _clusters(512, g)
    chain = mlp_chain(make_family(name, **TEST_OPTIONS.get(name, {})), register_params=False)
    elbo, opt = BlockLocalELBO(chain.num_blocks), torch.optim.Adam(chain.parameters(), lr=1e-2)
    for _ in range(80):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = elbo.block_losses(chain.model, chain.guide, x_train[idx], y_train[idx]).total / 64
        opt.zero_grad()
        loss.backward()
        opt.step()
    return chain.eval(), _clusters(256, g)


def _stats(chain, x, y, draws=8):
    return [summarise(block_sums(chain, k, a, y, None, draws)) for k, a in
            enumerate(forward_messages(chain, x))]  # fmt: skip


def test_scrambled_feedback_gives_large_kl_and_chance_accuracy(family):
    chain, (x, y) = _trained(family.name)
    trained = _stats(chain, x, y)
    assert trained[0]["local_acc"].item() > 0.5  # the trained feedback carries the label
    scrambled_acc = []
    for rep in range(6):
        torch.manual_seed(rep)
        bad = mlp_chain(chain.families[0], register_params=False).eval()
        bad.load_state_dict(chain.state_dict())
        with torch.no_grad():
            for layer in bad.feedback.layers:  # random feedback, unrelated to the network
                layer.weight.copy_(5 * torch.randn_like(layer.weight))
        stats = _stats(bad, x, y)
        for k in filter(chain.has_latent, range(chain.num_blocks)):  # trained feedback only
            assert stats[k]["kl"].item() > 3 * trained[k]["kl"].item(), (k, rep)
        scrambled_acc += [s["local_acc"].item() for s in stats[:-1]]  # last: the head
        if rep == 0:
            runs = [collect(m, x, y, None, draws=200, positions=1) for m in (chain, bad)]
    assert 0.15 < np.mean(scrambled_acc) < 0.35, scrambled_acc  # chance: 1 / 4
    # and the densities of rho and alpha move apart
    assert _ks(runs[1].z_rho, runs[1].z_alpha).mean() > _ks(runs[0].z_rho, runs[0].z_alpha).mean()


def _tiny_models(family):
    """(chain, x, y, mask, sites, channels): an MLP, a transformer and a ResNet.

    ``sites`` is the fewest valid sites of any block, ``channels`` the narrowest block's
    latent values per site (read from the family: channels, or a categorical's groups).
    """

    def values(width):  # values of one draw of a latent of ``width`` channels
        d = family.distribution(family.params(torch.zeros(1, family.raw_size(width))))
        return d.batch_shape[-1] * math.prod(d.event_shape)

    g = torch.Generator().manual_seed(0)
    x, y = _clusters(10, g)
    yield mlp_chain(family, register_params=False, widths=(6, 12, 6)), x, y, None, 1, values(6)
    task = S2SReverseTask(RunConfig(layers=2, d_model=12, seq_len=3))
    x, y, mask = make_sequences(task.test_perms[:5])
    yield task.build_chain(family), x, y, mask, 3, values(12)  # positions 3..5 carry labels
    cfg = RunConfig(task="fashion_mnist", width=6 / 64, blocks=3, message="pool", pred_weight=1.0)
    resnet = build_resnet_chain("resnet18", 1, 4, family, cfg)  # maps 8x8, 4x4, 2x2
    yield resnet, torch.randn(3, 1, 16, 16), torch.tensor([0, 3, 1]), None, 4, values(12)


def test_inference_data_groups_dims_and_shapes_for_every_model_kind(family, tmp_path):
    for i, (chain, x, y, mask, sites, width) in enumerate(_tiny_models(family)):
        chain.eval()
        runs = [collect(chain, x, y, mask, draws=12, examples=2, positions=5, channels=5, seed=s)
                for s in range(2)]  # fmt: skip
        idata = to_inference_data(runs, y, mask, {"runs": ["a", "b"]})
        assert set(idata.groups()) == {
            "posterior", "prior", "observed_data", "constant_data", "agreement"
        }  # fmt: skip
        n, v = chain.num_blocks, chain.feedback.num_classes
        p, c = min(5, sites), min(5, width)
        for group in ("posterior", "prior"):
            z = idata[group]["z"]
            assert z.dims == ("chain", "draw", "block", "example", "position", "channel")
            assert z.shape == (2, 12, n, 2, p, c)
        for name in BLOCK_SCALARS:
            assert idata.agreement[name].dims == ("chain", "draw", "block")
            assert idata.agreement[name].shape == (2, 12, n)
        # the label feedback is constant within a class; the effective message is a share
        assert not (np.abs(idata.agreement["feedback_within"].values) > 1e-6).any()
        share = idata.agreement["message_within"].values
        assert not ((share < 0) | (share > 1 + 1e-9)).any() and np.isnan(share[..., -1]).all()
        assert idata.agreement["local_acc_class"].shape == (2, 12, n, v)
        assert idata.agreement["kl_channel"].dims[-1] == "channel"
        assert idata.observed_data["y"].shape == tuple(y.shape)
        assert idata.constant_data["position_index"].shape == (n, p)
        kl = idata.agreement["kl"].values  # [chain, draw, block]
        assert np.isfinite(kl[..., :-1]).all() and np.isnan(kl[..., -1]).all()  # no z_N
        assert np.isfinite(idata.agreement["local_acc"].values).all()  # the head's, for N
        if i != 1:  # the netCDF round trip once, on the transformer (it has every group)
            continue
        path = tmp_path / "transformer.nc"
        idata.to_netcdf(str(path))
        back = az.from_netcdf(str(path))
        assert set(back.groups()) == set(idata.groups())
        for group in idata.groups():
            assert back[group].identical(idata[group]), group
        assert back.agreement.attrs["runs"] == '["a", "b"]'


def test_step_statistics_leave_the_rng_alone_and_equal_block_sums(family):
    chain = mlp_chain(family, register_params=False)
    x, y = _clusters(32, torch.Generator().manual_seed(2))
    cache = StepCache()
    inp = x
    for k in range(chain.num_blocks):
        inp = chain.next_input(k, chain.forward_message(k, inp, cache), None)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    logged = step_statistics(chain, cache, y, None)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(logged) == {f"agreement_{n}" for n in LOGGED}
    for k in range(chain.num_blocks):
        expected = summarise(block_sums(chain, k, cache.alpha[k], y, None, draws=1))
        for name in LOGGED:
            value = logged[f"agreement_{name}"][k]
            assert_close(value, expected[name][0], atol=1e-6, equal_nan=True)
            # the last block has no latent z_N: only the head's accuracy is defined there
            undefined = k == chain.num_blocks - 1 and name != "local_acc"
            assert bool(value.isnan()) == undefined, (k, name)


def test_step_agreement_computes_every_tenth_step_and_restarts_per_epoch():
    chain = mlp_chain(make_family("gaussian"), register_params=False)
    x, y = _clusters(16, torch.Generator().manual_seed(3))
    cache = StepCache()
    inp = x
    for k in range(chain.num_blocks):
        inp = chain.next_input(k, chain.forward_message(k, inp, cache), None)
    log = StepAgreement(every=10)
    first = [log(chain, cache, y, None) for _ in range(10)]
    assert all(f is first[0] for f in first)  # held between computations
    assert log(chain, cache, y, None) is not first[0]  # step 10 computes again
    log.reset()
    assert log(chain, cache, y, None) is not first[0]
