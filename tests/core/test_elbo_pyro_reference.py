"""BlockLocalELBO as a drop-in Pyro ELBO, with Pyro's own ELBOs as the only reference.

Plain Pyro programs (no pyro_bll chain): reparameterised ones must give Trace_ELBO's and
TraceMeanField_ELBO's loss and gradients to 1e-10 in float64 (same draws: same seed), with
plates, subsampling, scales and masks; non-reparameterised ones must give TraceEnum_ELBO's
exact gradient on average, within a few standard errors.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO, config_enumerate

import pyro_bll
from pyro_bll import BlockLocalELBO

from utils import assert_close

N, SUB = 8, 5
DATA = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)
SUBSET = torch.tensor([0, 2, 3, 6, 7])


def _params():
    return {
        "m_loc": pyro.param("m_loc", torch.tensor(0.2, dtype=torch.float64)),
        "q_loc": pyro.param("q_loc", torch.linspace(-0.5, 0.5, N, dtype=torch.float64)),
        "q_scale": pyro.param(
            "q_scale",
            torch.full((N,), 0.7, dtype=torch.float64),
            constraint=dist.constraints.positive,
        ),
        "g_loc": pyro.param("g_loc", torch.tensor(0.1, dtype=torch.float64)),
    }


MASK = torch.tensor([True, False, True, True, False])


def model(data, blocks=True):
    """A global latent g (block 0), per-point latents z_i (block 1) in a subsampled plate,
    one of them masked, a scaled observation and a factor."""
    p = _params()
    with pyro_bll.block(0):
        g = pyro.sample("g", dist.Normal(p["m_loc"], 1.5))
    with pyro_bll.block(1 if blocks else 0):
        with pyro.plate("data", N, subsample=SUBSET, dim=-1) as idx:
            with poutine.mask(mask=MASK):
                z = pyro.sample("z", dist.Normal(g, 1.0))
            with poutine.scale(scale=0.5):
                pyro.sample("x", dist.Normal(z, 0.8), obs=data[idx])
        pyro.factor("prior_on_g", -0.1 * g**2)
        pyro.deterministic("g_squared", g**2)


def guide(data, blocks=True):
    p = _params()
    g = pyro.sample("g", dist.Normal(p["g_loc"], 0.9))
    with pyro.plate("data", N, subsample=SUBSET, dim=-1) as idx:
        with poutine.mask(mask=MASK):
            pyro.sample("z", dist.Normal(p["q_loc"][idx] + 0.1 * g, p["q_scale"][idx]))


def _loss_and_grads(elbo, *args):
    pyro.set_rng_seed(11)
    loss = elbo.differentiable_loss(model, guide, *args)
    names = sorted(pyro.get_param_store().keys())
    params = [pyro.param(n).unconstrained() for n in names]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


@pytest.mark.parametrize("blocks", [True, False], ids=["two_blocks", "one_block"])
@pytest.mark.parametrize(
    "ours, reference",
    [
        (dict(analytic_kl=False), Trace_ELBO()),
        (dict(analytic_kl=True), TraceMeanField_ELBO()),
    ],
    ids=["trace_elbo", "mean_field"],
)
def test_reparameterised_programs_match_pyro(blocks, ours, reference):
    want_loss, want_grads = _loss_and_grads(reference, DATA, blocks)
    got_loss, got_grads = _loss_and_grads(BlockLocalELBO(**ours), DATA, blocks)
    assert_close(got_loss, want_loss, atol=1e-10)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w, atol=1e-10)


def test_the_blocks_partition_the_loss():
    pyro.set_rng_seed(3)
    losses = BlockLocalELBO(2, analytic_kl=False).block_losses(model, guide, DATA)
    pyro.set_rng_seed(3)
    whole = Trace_ELBO().differentiable_loss(model, guide, DATA)
    assert losses.per_block.shape == (2,)
    assert_close(losses.total, whole, atol=1e-10)
    # block 0 holds g's terms and the factor, block 1 the plate: both nonzero
    assert (losses.per_block.abs() > 1e-3).all()


def test_the_analytic_kl_respects_the_mask():
    """The masked-out z_i contribute no KL: the loss equals TraceMeanField_ELBO's, and
    differs from the same program without the mask by exactly their KL."""
    elbo = BlockLocalELBO()
    pyro.set_rng_seed(0)
    got = elbo.loss(model, guide, DATA)
    pyro.set_rng_seed(0)
    want = TraceMeanField_ELBO().loss(model, guide, DATA)
    assert abs(got - want) < 1e-10
    p = {k: v.detach() for k, v in _params().items()}
    pyro.set_rng_seed(0)
    g = dist.Normal(p["g_loc"], 0.9).sample()
    q = dist.Normal(p["q_loc"][SUBSET] + 0.1 * g, p["q_scale"][SUBSET])
    kl = torch.distributions.kl_divergence(q, dist.Normal(g, 1.0)) * (N / SUB)
    assert kl[~MASK].sum() > 0.1  # the masked entries would have mattered


# ---- non-reparameterised latents: TraceEnum_ELBO's exact gradient as the reference -------
K = 6
OBS = torch.tensor([0.1, 1.9, 2.2, -0.4, 0.3, 2.5], dtype=torch.float64)


def discrete_model():
    prior = torch.tensor(0.4, dtype=torch.float64)
    with pyro.plate("data", K, dim=-1):
        z = pyro.sample("z", dist.Bernoulli(prior))
        with pyro_bll.block(0):  # the observation names its block only: no "latent" tag
            pyro.sample("x", dist.Normal(2.0 * z, 0.7), obs=OBS)


def discrete_guide():
    logits = pyro.param("logits", torch.linspace(-1.0, 1.0, K, dtype=torch.float64))
    with pyro.plate("data", K, dim=-1):
        pyro.sample("z", dist.Bernoulli(logits=logits), infer={"block": 0})


def _exact_gradient() -> torch.Tensor:
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(discrete_model, config_enumerate(discrete_guide))
    return torch.autograd.grad(loss, pyro.param("logits").unconstrained())[0]


def _mean_gradients(elbo, batches: int) -> torch.Tensor:
    grads = []
    for b in range(batches):
        pyro.set_rng_seed(100 + b)
        loss = elbo.differentiable_loss(discrete_model, discrete_guide)
        grads.append(torch.autograd.grad(loss, pyro.param("logits").unconstrained())[0])
    return torch.stack(grads)  # [batches, K]


@pytest.mark.parametrize("dependencies", ["graph", "block"])
def test_score_function_gradients_are_unbiased(dependencies):
    exact = _exact_gradient()
    elbo = BlockLocalELBO(
        1, num_particles=400, vectorize_particles=True, max_plate_nesting=1,
        dependencies=dependencies,
    )  # fmt: skip
    grads = _mean_gradients(elbo, batches=10)
    mean, se = grads.mean(0), grads.std(0) / grads.shape[0] ** 0.5
    assert (exact.abs() > 0.1).sum() >= 4  # a reference with signal in it
    assert ((mean - exact).abs() <= 4 * se + 1e-3).all(), (mean, exact, se)


def noisy_model():
    """discrete_model plus a reparameterised latent u in the same block whose sampled
    cost does not depend on z: the whole-block estimator puts it on z's score function."""
    discrete_model()
    with pyro.plate("data_u", K, dim=-1):
        pyro.sample("u", dist.Normal(torch.zeros(K, dtype=torch.float64), 1.0))


def noisy_guide():
    discrete_guide()
    with pyro.plate("data_u", K, dim=-1):
        pyro.sample("u", dist.Normal(torch.full((K,), 0.5, dtype=torch.float64), 2.0))


def test_graph_dependencies_have_the_smaller_variance():
    """Restricted to the costs downstream of z, the graph estimator's per-particle
    variance is below the whole-block one (experiments/bench_score_function.py)."""
    spread = {}
    for dependencies in ("graph", "block"):
        elbo = BlockLocalELBO(1, dependencies=dependencies, analytic_kl=False)
        grads = []
        for b in range(100):
            pyro.set_rng_seed(100 + b)
            loss = elbo.differentiable_loss(noisy_model, noisy_guide)
            grads.append(torch.autograd.grad(loss, pyro.param("logits").unconstrained())[0])
        spread[dependencies] = torch.stack(grads).var(0).sum()
    assert spread["graph"] < 0.8 * spread["block"], spread


def test_a_score_function_baseline_keeps_the_mean():
    exact = _exact_gradient()
    elbo = BlockLocalELBO(1, num_particles=400, vectorize_particles=True, max_plate_nesting=1,
                          baseline=False)  # fmt: skip
    grads = _mean_gradients(elbo, batches=10)
    mean, se = grads.mean(0), grads.std(0) / grads.shape[0] ** 0.5
    assert ((mean - exact).abs() <= 4 * se + 1e-3).all()


def test_svi_trains_a_plain_pyro_program():
    elbo = BlockLocalELBO(2)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    pyro.set_rng_seed(0)
    losses = [svi.step(DATA) for _ in range(150)]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
