"""Feedback networks: the closed-form solve, the MLP guide, and locality with both."""

import pytest
import torch

from pyro_bll import BlockLocalELBO, make_family
from pyro_bll.config import ConfigError
from pyro_bll.core.step_cache import StepCache, step_cache
from pyro_bll.guides import MLPFeedback
from pyro_bll.methods.bll import BLL
from pyro_bll.methods.solve import class_mean_prototypes, solve_feedback
from pyro_bll.run.build import config_for_task
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks import S2SReverseTask

from utils import assert_close, mlp_chain, toy_batch


def test_closed_form_equals_the_optimum_of_many_gradient_steps():
    m = torch.randn(200, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (200,))
    mask = torch.rand(200) > 0.3
    ridge = 2.5
    solved = class_mean_prototypes(m, y, mask, 4, ridge)
    w = torch.zeros(4, 5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15)

    def objective():
        opt.zero_grad()
        loss = (((m - w[y]) ** 2).sum(-1) * mask).sum() + ridge * (w**2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    assert_close(w.detach(), solved, atol=1e-8)


def _solved_chain():
    cfg = RunConfig(
        layers=2, d_model=6, seq_len=4, train_size=32, batch_size=32, test_size=4, pred_weight=0.0
    )
    task = S2SReverseTask(cfg)
    chain = task.build_chain(make_family("gaussian")).double()
    x, y, mask = next(task.train_batches(0))
    cache = StepCache()
    solve_feedback(chain, x, y, mask, ridge=0.0, cache=cache)
    with step_cache(cache):
        losses = BlockLocalELBO(2).block_losses(chain.model, chain.guide, x, y, mask)
    return chain, losses, y, mask


def test_the_solve_is_the_optimum_of_the_kl_and_not_of_the_likelihood():
    """At the ridge-free solve the KL term of every block is stationary in the feedback
    weights, while the prototype likelihood, which shares them, is not: so the method
    refuses the solve unless the likelihood term is dropped (--bll-terms kl,pred)."""
    chain, losses, y, mask = _solved_chain()
    for k in filter(chain.has_latent, range(2)):  # the last block has no z: head reads m
        weight = chain.feedback.layers[k].weight
        (g,) = torch.autograd.grad(losses.terms["kl"][k], weight, retain_graph=True)
        (lik,) = torch.autograd.grad(losses.terms["likelihood"][k], weight, retain_graph=True)
        seen = torch.zeros(weight.shape[0], dtype=torch.bool)
        seen[y[mask]] = True  # classes absent from the batch get no gradient either way
        assert g[seen].abs().max() < 1e-9
        assert lik[seen].abs().max() > 1e-3  # the solve ignores this term


def test_the_solve_is_refused_while_the_likelihood_shares_the_weights():
    chain, _, _, _ = _solved_chain()
    with pytest.raises(ConfigError, match="--bll-terms kl,pred"):
        BLL(chain, config_for_task("s2s_reverse", feedback_update="solve"))
    method = BLL(chain, config_for_task("s2s_reverse", feedback_update="solve",
                                        bll_terms=["kl", "pred"]))  # fmt: skip
    assert method.solve


def test_mlp_feedback_keeps_learning_local():
    fam = make_family("gaussian")
    chain = mlp_chain(fam).double()
    chain.feedback = MLPFeedback(4, [fam.feedback_size(6)] * 3, hidden=8).double()
    x, y = toy_batch()
    losses = BlockLocalELBO(3).block_losses(chain.model, chain.guide, x.double(), y)
    owned = {id(p) for k in range(3) for p in chain.block_parameters(k)}
    assert owned == {id(p) for p in chain.parameters()}
    for k in range(3):
        others = [p for j in range(3) if j != k for p in chain.block_parameters(j)]
        grads = torch.autograd.grad(
            losses.per_block[k], others, retain_graph=True, allow_unused=True
        )
        assert all(g is None or g.abs().max() == 0 for g in grads)
    assert chain.class_potentials(0)[0].shape == (4, 6)
