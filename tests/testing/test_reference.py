"""The Pyro block-local ELBO and the plain-torch loss (``pyro_bll.testing.reference``):
equal to each other on the s2s_reverse transformer for every family, and both equal to
l_k written out by hand on a tiny MLP chain
(``test_both_losses_equal_the_block_losses_by_hand``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from pyro_bll import BlockLocalELBO, make_family, seed_everything
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks import S2SReverseTask
from pyro_bll.testing.reference import plain_block_losses

from utils import assert_close, mlp_chain, toy_batch


@pytest.mark.parametrize("stack", [False, True], ids=["per-site", "stacked"])
@pytest.mark.parametrize("likelihood", ["bound", "sample"])
def test_pyro_and_plain_losses_agree(family, likelihood, stack):
    cfg = RunConfig(layers=3, d_model=6, seq_len=4, train_size=8, batch_size=8, test_size=4)
    task = S2SReverseTask(cfg)
    chain = task.build_chain(family).double()
    chain.likelihood = likelihood
    chain.stack = stack  # blocks 0 and 1 as one group
    x, y, mask = next(task.train_batches(0))
    seed_everything(5)
    pyro_losses = BlockLocalELBO(3).block_losses(chain.model, chain.guide, x, y, mask)
    seed_everything(5)
    plain = plain_block_losses(chain, x, y, mask)
    assert_close(pyro_losses.per_block, plain, atol=1e-9, rtol=1e-9)


# ---- an independent check: l_k written out by hand on a tiny MLP chain ----------------------


def _draws(chain, x, y, seed):
    """The z_k the guide draws after ``seed_everything(seed)`` (what both implementations
    draw with that seed), read from a Pyro trace of the guide."""
    seed_everything(seed)
    trace = poutine.trace(chain.guide).get_trace(x, y)
    return [trace.nodes[f"z_{k}"]["value"] for k in range(chain.num_blocks - 1)]


@torch.no_grad()
def _block_losses_by_hand(chain, x, y, likelihood, draws):
    """l_k per block ``[N]``, summed over the batch, written out for the fixed-variance
    Gaussian N(a, sigma^2) and the Bernoulli (logits a); b_c is the linear feedback's
    row of class c, sent as the potential of N(b_c, sigma^2) or as logits b_c:

    * rho = N((a + b_y) / 2, sigma^2 / 2) (the paper's), or Bernoulli(logits a + b_y);
    * KL(rho || alpha): the closed form of two Gaussians or two Bernoullis;
    * the prototype classifier logit_c(z) = sum_C log pi_c(z) + const, with the class law
      pi_c = N(b_c, sigma^2) or Bernoulli(logits b_c); ``bound``: E_rho[logit_y] -
      log sum_c prod_C E_rho pi_c(z) (E_rho N(z; b, sigma^2) = N(m; b, s^2 + sigma^2); a
      Bernoulli's expectation by enumerating z in {0, 1}); ``sample``: the cross-entropy
      of logit(z) at the guide's draw z;
    * the predictive head's and (last block) the output head's cross-entropy of m(alpha).
    """
    name = chain.families[0].name
    losses, inp, last = [], x, chain.num_blocks - 1
    for k in range(chain.num_blocks):
        a = chain.blocks[k](inp)  # [B, C]: the block's raw output
        mean = a if name == "gaussian" else torch.sigmoid(a)  # m(alpha)
        if k == last:
            losses.append(F.cross_entropy(chain.head(mean), y, reduction="sum"))
            break
        b = chain.feedback.class_outputs(k)  # [V, C]
        if name == "gaussian":
            var = chain.families[0].sigma ** 2
            m, s2 = (a + b[y]) / 2, var / 2
            kl = 0.5 * math.log(2) + (s2 + (m - a) ** 2) / (2 * var) - 0.5
            sq = (m[:, None, :] - b) ** 2  # [B, V, C]
            mean_logit = (-0.5 * math.log(2 * math.pi * var) - (sq + s2) / (2 * var)).sum(-1)
            log_mgf = (-0.5 * math.log(2 * math.pi * (s2 + var)) - sq / (2 * (s2 + var))).sum(-1)
            law = torch.distributions.Normal(b, var**0.5)
        else:
            r = a + b[y]
            p = torch.sigmoid(r)
            kl = p * (F.logsigmoid(r) - F.logsigmoid(a)) + (1 - p) * (
                F.logsigmoid(-r) - F.logsigmoid(-a)
            )
            p, q_c = p[:, None, :], torch.sigmoid(b)  # [B, 1, C], [V, C]
            mean_logit = (p * q_c.log() + (1 - p) * torch.log1p(-q_c)).sum(-1)
            log_mgf = torch.log(p * q_c + (1 - p) * (1 - q_c)).sum(-1)
            law = torch.distributions.Bernoulli(probs=q_c)
        if likelihood == "bound":
            lik = -(mean_logit.gather(1, y[:, None])[:, 0] - torch.logsumexp(log_mgf, -1))
        else:
            logits = law.log_prob(draws[k][:, None, :]).sum(-1)  # [B, V]
            lik = F.cross_entropy(logits, y, reduction="none")
        pred = chain.pred_weight * F.cross_entropy(chain.pred_heads[k](mean), y, reduction="none")
        losses.append(kl.sum() + lik.sum() + pred.sum())
        inp = mean  # --propagate mean
    return torch.stack(losses)


@pytest.mark.parametrize("likelihood", ["bound", "sample"])
@pytest.mark.parametrize("name", ["gaussian", "bernoulli"])
def test_both_losses_equal_the_block_losses_by_hand(name, likelihood):
    """The Pyro ELBO and the plain-torch loss against l_k written out in the test
    (``_block_losses_by_hand``), on a 3-block MLP chain in float64; ``sample`` at the
    draws both make with the same seed."""
    family = make_family(name, **({"sigma": 0.8} if name == "gaussian" else {}))
    chain = mlp_chain(family, likelihood=likelihood).double()
    x, y = toy_batch(n=8)
    x = x.double()
    draws = _draws(chain, x, y, seed=5)
    want = _block_losses_by_hand(chain, x, y, likelihood, draws)
    seed_everything(5)
    pyro_losses = BlockLocalELBO(3).block_losses(chain.model, chain.guide, x, y).per_block
    seed_everything(5)
    plain = plain_block_losses(chain, x, y, None)
    assert_close(pyro_losses.detach(), want, atol=1e-10, rtol=1e-10)
    assert_close(plain.detach(), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("beta", ["label", "lookahead"])
def test_pyro_and_plain_losses_agree_on_feature_maps(beta):
    """The ResNet's channel latents and, with the look-ahead to the top, the sweep: the
    method's per-block losses equal the plain loss at the same draws."""
    from pyro_bll.methods.bll import BLL
    from pyro_bll.tasks.vision import build_resnet_chain

    cfg = RunConfig(task="fashion_mnist", width=1 / 16, blocks=3, beta=beta,
                    **({"lookahead_depth": 0, "lookahead_input": "mean"} if beta != "label"
                       else {}))  # fmt: skip
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg).double()
    method = BLL(chain, cfg)
    x, y = torch.randn(4, 1, 12, 12, dtype=torch.float64), torch.tensor([1, 4, 7, 1])
    seed_everything(5)
    _, logs = method.loss(chain, x, y, None)
    seed_everything(5)
    plain = plain_block_losses(chain, x, y, None)
    assert_close(logs["loss"] * y.shape[0], plain.detach(), atol=1e-9, rtol=1e-9)
    assert logs["likelihood"][:-1].abs().min() > 0
