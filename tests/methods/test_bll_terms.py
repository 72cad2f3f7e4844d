"""``--bll-terms``: ablations of BLL's local loss keep exactly the named terms."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pyro_bll.config import ConfigError
from pyro_bll.families import make_family
from pyro_bll.methods import BLL
from pyro_bll.methods.bll import BLL_TERMS
from pyro_bll.run.build import config_for_task, validate
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks.vision import build_resnet_chain

from utils import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from run import parse_config  # noqa: E402


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)


def _loss(terms, seed=0):
    cfg = RunConfig(task="fashion_mnist", width=1 / 16, blocks=3, message="mean", pred_weight=1.0,
                    beta="label",
                    bll_terms=list(terms))  # fmt: skip
    torch.manual_seed(seed)
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg)
    method = BLL(chain, cfg)
    x, y = _batch()
    loss, logs = method.loss(chain, x, y, None)
    loss.backward()
    return chain, loss, logs


@torch.no_grad()
def _terms_by_hand(chain, x, y):
    """The terms of l_k per block ``{name: [N]}``, averaged over the batch, written out for
    the paper's Gaussian N(mu, sigma^2) under ``--message mean`` (float64):

    * the latent is the map's mean zbar with alpha = N(mean_hw mu, sigma^2 / n), n = H W,
      and the feedback's potential N(b_y, sigma^2) (b = the linear feedback's row of y)
      gives rho = N((n mean_hw mu + b_y) / (n + 1), sigma^2 / (n + 1));
    * kl: KL(rho || alpha) of two Gaussians in closed form;
    * likelihood (blocks below the last): minus the Jensen bound of the prototype
      classifier logit_c = sum_C log N(z; b_c, sigma^2) + const,
      E_rho[logit_y] - log sum_c E_rho exp(logit_c), with E_rho N(z; b, sigma^2) =
      N(m; b, s^2 + sigma^2); last block: the output head's cross-entropy;
    * pred: the predictive head's cross-entropy (torch's ``F.cross_entropy``).
    The blocks and heads are the chain's networks; nothing else is the library's.
    """
    n_blocks, sigma = chain.num_blocks, chain.families[0].sigma
    out = {name: torch.zeros(n_blocks, dtype=torch.float64) for name in BLL_TERMS}
    batch, inp = y.shape[0], x
    for k in range(n_blocks):
        mu = chain.blocks[k](inp)  # [B, H, W, C]: the Gaussian's mean map is the raw output
        if k == n_blocks - 1:
            out["likelihood"][k] = F.cross_entropy(chain.head(mu), y, reduction="sum") / batch
            break
        out["pred"][k] = F.cross_entropy(chain.pred_heads[k](mu), y, reduction="sum") / batch
        n = mu.shape[1] * mu.shape[2]
        m_a, var_a = mu.double().mean((1, 2)), sigma**2 / n  # [B, C]
        protos = chain.feedback.class_outputs(k).double()  # [V, C]: b_c
        m_r, var_r = (n * m_a + protos[y]) / (n + 1), sigma**2 / (n + 1)
        kl = 0.5 * math.log(var_a / var_r) + (var_r + (m_r - m_a) ** 2) / (2 * var_a) - 0.5
        out["kl"][k] = kl.sum() / batch
        sq = (m_r[:, None, :] - protos) ** 2  # [B, V, C]
        mean_logit = (-math.log(sigma) - (sq + var_r) / (2 * sigma**2)).sum(-1)  # E_rho logit_c
        log_mgf = (-0.5 * math.log(var_r + sigma**2) - sq / (2 * (var_r + sigma**2))).sum(-1)
        bound = mean_logit.gather(1, y[:, None])[:, 0] - torch.logsumexp(log_mgf, -1)
        out["likelihood"][k] = -bound.sum() / batch
        inp = mu  # --propagate mean: m(alpha) = mu
    return out


@pytest.mark.parametrize(
    "terms", [BLL_TERMS, ("pred",), ("kl", "pred"), ("likelihood", "pred"), ("kl",), ()]
)
def test_the_loss_is_the_sum_of_the_kept_terms(terms):
    """Every logged term equals its computation by hand (``_terms_by_hand``), and the loss
    is the sum of the kept ones plus the output head's cross-entropy."""
    chain, loss, logs = _loss(terms)
    x, y = _batch()
    by_hand = _terms_by_hand(chain, x, y)
    for name in BLL_TERMS:
        assert_close(logs[name].double(), by_hand[name], atol=1e-5, rtol=1e-5, msg=name)
    n = chain.num_blocks
    hand = by_hand["likelihood"][n - 1]  # the output head always counts
    if "likelihood" in terms:
        hand = hand + by_hand["likelihood"][: n - 1].sum()
    for name in ("kl", "pred"):
        if name in terms:
            hand = hand + by_hand[name].sum()
    assert_close(loss.detach().double(), hand, atol=1e-5, rtol=1e-5)
    assert_close(logs["loss"].sum().double(), hand, atol=1e-5, rtol=1e-5)
    # the feedback enters l_k only through the KL and the prototype likelihood
    fb = [p.grad for k in range(n - 1) for p in chain.feedback.block_module(k).parameters()]
    reached = any(g is not None and g.abs().max() > 0 for g in fb)
    assert reached == bool({"kl", "likelihood"} & set(terms))
    heads = [p.grad for h in chain.pred_heads for p in h.parameters()]
    assert all(g is not None and g.abs().max() > 0 for g in heads) == ("pred" in terms)


def test_bad_terms_name_the_fix():
    with pytest.raises(ConfigError, match=r"unknown --bll-terms prior; valid: kl,likelihood,pred"):
        validate(config_for_task("fashion_mnist", bll_terms=["prior"]))
    with pytest.raises(ConfigError, match="applies to --method bll only"):
        validate(config_for_task("fashion_mnist", method="bp", bll_terms=["pred"]))


def test_cli_reads_a_comma_list():
    cfg, _ = parse_config(["--task", "fashion_mnist", "--bll-terms", "kl, pred"])
    assert cfg.bll_terms == ["kl", "pred"]
    cfg, _ = parse_config(["--task", "fashion_mnist"])
    assert cfg.bll_terms == list(BLL_TERMS)
