"""The drop-in contract of BlockLocalELBO and BLLChain: tags, errors, particles, the param
store and the posterior predictive, in the Pyro workflow a user would write."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.inspect import get_dependencies

import pyro_bll
from pyro_bll import BlockLocalELBO, make_family

from utils import assert_close, mlp_chain, toy_batch


def two_block_model(x, **unused):
    with pyro_bll.block(0):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.deterministic("a_twice", 2 * a)
    with pyro_bll.block(1):
        b = pyro.sample("b", dist.Normal(a, 1.0))
        pyro.factor("pull", -0.5 * b**2)
        pyro.sample("x", dist.Normal(b, 0.5), obs=x)


def two_block_guide(x, tag_b=None):
    loc = pyro.param("loc", torch.tensor([0.3, -0.2]))
    pyro.sample("a", dist.Normal(loc[0], 0.8))
    infer = {} if tag_b is None else {"block": tag_b}
    pyro.sample("b", dist.Normal(loc[1], 0.6), infer=infer)


X = torch.tensor(0.7)


def test_tags_come_from_the_model_and_the_guide_may_omit_them():
    losses = BlockLocalELBO(2).block_losses(two_block_model, two_block_guide, X)
    assert losses.per_block.shape == (2,)
    assert losses.terms["pred"][1] != 0 and losses.terms["pred"][0] == 0  # the factor
    assert losses.terms["likelihood"][0] == 0 and losses.terms["likelihood"][1] != 0


def test_a_guide_tag_must_agree_with_the_model():
    BlockLocalELBO(2).block_losses(two_block_model, two_block_guide, X, tag_b=1)  # agrees
    with pytest.raises(ValueError, match="'b' is in block 1 in the model but in block 0"):
        BlockLocalELBO(2).block_losses(two_block_model, two_block_guide, X, tag_b=0)


@pytest.mark.parametrize("num_blocks, needle", [(1, "site 'b' has block 1, but the ELBO has 1")])
def test_a_block_out_of_range_names_the_site(num_blocks, needle):
    with pytest.raises(ValueError, match=needle):
        BlockLocalELBO(num_blocks).block_losses(two_block_model, two_block_guide, X)


def test_a_negative_block_is_refused():
    with pytest.raises(ValueError, match="integer >= 0"):
        pyro_bll.block(-1)

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0), infer={"block": -1})

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 'z' has block -1"):
        BlockLocalELBO(2).block_losses(model, guide)


def test_an_untagged_site_in_a_many_block_program_is_named():
    def model():
        with pyro_bll.block(1):
            pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("loose", torch.tensor(-1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 'loose' has no block.*pyro_bll.block"):
        BlockLocalELBO().block_losses(model, guide)


def test_an_inner_tag_wins_over_an_outer_block():
    def model():
        with pyro_bll.block(0):
            pyro.sample("z", dist.Normal(0.0, 1.0), infer={"block": 1})

    def guide():
        pyro.sample("z", dist.Normal(1.0, 1.0))

    losses = BlockLocalELBO(2).block_losses(model, guide)
    assert losses.per_block[0] == 0 and losses.per_block[1] > 0


def test_num_particles_average_independent_draws():
    pyro.set_rng_seed(0)
    single = [BlockLocalELBO(2).loss(two_block_model, two_block_guide, X) for _ in range(4)]
    pyro.set_rng_seed(0)
    averaged = BlockLocalELBO(2, num_particles=4).loss(two_block_model, two_block_guide, X)
    assert abs(averaged - sum(single) / 4) < 1e-5  # the same four draws, averaged
    pyro.set_rng_seed(0)
    many = BlockLocalELBO(
        2, num_particles=2000, vectorize_particles=True, max_plate_nesting=0, analytic_kl=False
    )
    vectorised = many.loss(two_block_model, two_block_guide, X)
    pyro.set_rng_seed(0)
    reference = Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=0)
    assert abs(vectorised - reference.loss(two_block_model, two_block_guide, X)) < 1e-4


# ---- the chain in the Pyro workflow ------------------------------------------------------
def test_the_param_store_round_trips_into_a_new_chain(tmp_path):
    x, y = toy_batch()
    family = make_family("gaussian")
    chain = mlp_chain(family)
    svi = SVI(chain.model, chain.guide, pyro.optim.Adam({"lr": 0.01}), BlockLocalELBO(3))
    for _ in range(5):
        svi.step(x, y)
    pyro.set_rng_seed(1)
    before = BlockLocalELBO(3).loss(chain.model, chain.guide, x, y)
    pyro.get_param_store().save(tmp_path / "params.pt")
    del chain, svi
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    fresh = mlp_chain(family)  # new weights, same structure: same default name
    pyro.set_rng_seed(1)
    after = BlockLocalELBO(3).loss(fresh.model, fresh.guide, x, y)
    assert after == pytest.approx(before, rel=1e-6)
    svi = SVI(fresh.model, fresh.guide, pyro.optim.Adam({"lr": 0.01}), BlockLocalELBO(3))
    first = fresh.blocks[0][0].weight.detach().clone()
    svi.step(x, y)
    assert not torch.equal(first, fresh.blocks[0][0].weight)  # it keeps training


def test_a_second_chain_under_the_same_name_trains_its_own_parameters():
    """Not the first chain's: the chain that registers last owns the store entries."""
    x, y = toy_batch()
    family = make_family("gaussian")
    first = mlp_chain(family)
    BlockLocalELBO(3).loss(first.model, first.guide, x, y)
    second = mlp_chain(family)
    svi = SVI(second.model, second.guide, pyro.optim.Adam({"lr": 0.05}), BlockLocalELBO(3))
    before = [p.detach().clone() for p in second.parameters()]
    frozen = [p.detach().clone() for p in first.parameters()]
    svi.step(x, y)
    assert any(not torch.equal(b, p) for b, p in zip(before, second.parameters(), strict=True))
    assert all(torch.equal(f, p) for f, p in zip(frozen, first.parameters(), strict=True))


def test_predictive_samples_labels_and_posterior_latents():
    x, y = toy_batch(n=32)
    chain = mlp_chain(make_family("gaussian", sigma=0.3), register_params=False).eval()
    draws = Predictive(chain.model, num_samples=300, return_sites=["y", "z_0"])(x)
    assert draws["y"].shape == (300, 32) and draws["z_0"].shape == (300, 32, 6)
    # the majority vote agrees with the deterministic prediction where the head is sure
    logits = chain.predict_logits(x)
    probs = logits.softmax(-1)
    votes = torch.nn.functional.one_hot(draws["y"], 4).float().mean(0)  # [B, C]
    assert_close(votes, probs_of_samples(chain, x, 300), atol=0.15)
    assert probs.shape == votes.shape
    # with labels and the guide: z_k from rho_k, whose mean moves towards the feedback
    post = Predictive(chain.model, guide=chain.guide, num_samples=200, return_sites=["z_0"])
    z_post = post(x, y)["z_0"].mean(0)
    prior = Predictive(chain.model, num_samples=200, return_sites=["z_0"])(x)["z_0"].mean(0)
    rho_loc, _ = chain.families[0].posterior(
        chain.forward_message(0, x), chain.feedback_message(0, y, None)
    )
    assert_close(z_post, rho_loc, atol=0.12)
    assert (z_post - prior).abs().mean() > 0.01 or rho_loc.sub(prior).abs().max() < 0.05


def probs_of_samples(chain, x, n):
    """Monte Carlo class probabilities of the forward program, computed by hand."""
    counts = torch.zeros(x.shape[0], 4)
    for _ in range(n):
        y = chain.model(x)
        counts += torch.nn.functional.one_hot(y, 4).float()
    return counts / n


def test_the_chain_shows_its_real_dependencies():
    x, y = toy_batch()
    chain = mlp_chain(make_family("gaussian"), register_params=False)
    deps = get_dependencies(chain.model, (x, y))["prior_dependencies"]
    # propagate="mean": z_k feeds only its own local likelihood, never a later block
    assert deps["y_0"] == {"y_0": set(), "z_0": set()}
    assert "z_0" not in deps["z_1"] and "z_0" not in deps["y"]
    sampled = mlp_chain(make_family("gaussian"), register_params=False, propagate="sample")
    deps = get_dependencies(sampled.model, (x, y))["prior_dependencies"]
    assert "z_0" in deps["z_1"]  # --propagate sample: z_0 is block 1's input
