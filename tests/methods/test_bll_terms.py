"""``--bll-terms``: ablations of BLL's local loss keep exactly the named terms."""

import sys
from pathlib import Path

import pytest
import torch

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


def _loss(terms, seed=0):
    cfg = RunConfig(task="fashion_mnist", width=1 / 16, blocks=3, message="mean", pred_weight=1.0,
                    bll_terms=list(terms))  # fmt: skip
    torch.manual_seed(seed)
    chain = build_resnet_chain("resnet18", 1, 10, make_family("gaussian"), cfg)
    method = BLL(chain, cfg)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss, logs = method.loss(chain, x, y, None)
    loss.backward()
    return chain, loss, logs


@pytest.mark.parametrize(
    "terms", [BLL_TERMS, ("pred",), ("kl", "pred"), ("likelihood", "pred"), ("kl",), ()]
)
def test_the_loss_is_the_sum_of_the_kept_terms(terms):
    chain, loss, logs = _loss(terms)
    n = chain.num_blocks
    hand = logs["likelihood"][n - 1].clone()  # the output head always counts
    if "likelihood" in terms:
        hand = hand + logs["likelihood"][: n - 1].sum()
    for name in ("kl", "pred"):
        if name in terms:
            hand = hand + logs[name].sum()
    assert_close(loss.detach(), hand, atol=1e-5, rtol=1e-5)
    assert_close(logs["loss"].sum(), hand, atol=1e-5, rtol=1e-5)
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
