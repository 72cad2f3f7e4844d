"""docs/math.md §2: with detaching and local likelihoods off, our objective is
Pyro's own negative ELBO for the same model and guide."""

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyro_bll import BlockLocalELBO, seed_everything

from utils import assert_close, mlp_chain, toy_batch


@pytest.mark.parametrize("head_input", ["mean", "sample"])
@pytest.mark.parametrize("propagate", ["mean", "sample"])
def test_matches_trace_elbo_and_mean_field_elbo(family, head_input, propagate):
    chain = mlp_chain(
        family,
        detach=False,
        local_likelihoods=None,
        pred_heads=None,
        head_input=head_input,
        propagate=propagate,
    ).double()
    x, y = toy_batch()
    x = x.double()
    ours_mc = BlockLocalELBO(chain.num_blocks, analytic_kl=False)
    ours = BlockLocalELBO(chain.num_blocks)
    # loss() is the ELBO estimate itself (differentiable_loss adds score-function
    # surrogates for discrete latents, which differ by design between the two ELBOs)
    # Pyro's mean-field ELBO refuses guides that are not reparameterised (discrete, von Mises)
    reparam = family.distribution(family.params(torch.randn(1, family.raw_size(6)))).has_rsample
    for mine, theirs in [(ours_mc, Trace_ELBO()), (ours, TraceMeanField_ELBO())]:
        seed_everything(3)
        a = mine.loss(chain.model, chain.guide, x, y)
        seed_everything(3)
        with pyro.validation_enabled(reparam):
            b = theirs.loss(chain.model, chain.guide, x, y)
        assert_close(a, b, atol=1e-9, rtol=1e-10)


def test_svi_with_pyro_optim_trains_the_chain(family):
    chain = mlp_chain(family)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    svi = SVI(chain.model, chain.guide, pyro.optim.Adam({"lr": 0.02}), BlockLocalELBO(3))
    first = svi.step(x, y)
    for _ in range(150):
        last = svi.step(x, y)
    assert last < 0.5 * first
    acc = (chain.predict_logits(x).argmax(-1) == y).float().mean()
    assert acc > 0.8
