"""--backward per-block: the same parameters as one joint backward, and its bad input."""

import sys
from pathlib import Path

import pytest
import torch
from vision_files import tiny_fashion_mnist

from pyro_bll.config import ConfigError
from pyro_bll.families import FAMILIES
from pyro_bll.run.build import validate
from pyro_bll.run.training import Trainer

from utils import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import run  # noqa: E402

# one site per block in both: a joint step would compute blocks 0 and 1 as one group
# (pyro_bll.core.stacked), the same gradients in another summation order, and Adam turns
# the rounding noise of the key biases' zero gradient into steps of 1e-12
S2S = ["--layers", "3", "--d-model", "12", "--seq-len", "4", "--train-size", "48",
       "--test-size", "8", "--batch-size", "8", "--threads", "1", "--no-stack-blocks"]  # fmt: skip


def _trainer(argv: list[str], backward: str) -> Trainer:
    cfg, _ = run.parse_config([*argv, "--backward", backward])
    trainer = Trainer(validate(cfg))
    trainer.chain.double()  # float64: differences are summation order only
    return trainer


def _train_both(argv: list[str], steps: int = 3) -> tuple[Trainer, Trainer]:
    joint, per_block = _trainer(argv, "joint"), _trainer(argv, "per-block")
    batches = joint.task.train_batches(0)
    for _, (x, y, mask) in zip(range(steps), batches, strict=False):
        x = x.double() if x.is_floating_point() else x
        logs_j = joint.step(x, y, mask)
        logs_p = per_block.step(x, y, mask)
        assert logs_j.keys() == logs_p.keys()
        for k in logs_j:
            assert_close(logs_p[k], logs_j[k], rtol=1e-10, atol=1e-12, msg=k, equal_nan=True)
    return joint, per_block


def _same_parameters(a: Trainer, b: Trainer) -> None:
    pa, pb = dict(a.chain.named_parameters()), dict(b.chain.named_parameters())
    assert pa.keys() == pb.keys()
    moved = 0
    for name, p in pa.items():
        assert_close(pb[name], p, rtol=1e-10, atol=1e-12, msg=name)
        moved += int(p.requires_grad)
    assert moved > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_block_backward_gives_the_joint_parameters_on_the_transformer(family):
    joint, per_block = _train_both([*S2S, "--family", family])
    _same_parameters(joint, per_block)
    start = _trainer([*S2S, "--family", family], "joint")  # the steps did move them
    changed = [
        not torch.equal(p, q)
        for p, q in zip(start.chain.parameters(), joint.chain.parameters(), strict=True)
    ]
    assert sum(changed) > len(changed) // 2


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return tiny_fashion_mnist(tmp_path_factory.mktemp("data") / "fashion", n_train=16)


@pytest.mark.parametrize(
    "method, family", [("bll", "gaussian"), ("bll", "bernoulli"), ("predsim", "gaussian")]
)
def test_per_block_backward_gives_the_joint_parameters_on_a_resnet(fashion, method, family):
    argv = ["--task", "fashion_mnist", "--data-dir", str(fashion), "--width", "0.05",
            "--train-size", "16", "--test-size", "8", "--batch-size", "8", "--threads", "1",
            "--method", method, "--family", family]  # fmt: skip
    joint, per_block = _train_both(argv, steps=2)
    _same_parameters(joint, per_block)
    for a, b in zip(joint.chain.buffers(), per_block.chain.buffers(), strict=True):
        assert_close(b.double(), a.double(), rtol=1e-10, atol=1e-12)  # BatchNorm statistics


def test_per_block_is_the_vision_default_for_local_methods_only():
    for method, expected in [("bll", "per-block"), ("predsim", "per-block"), ("bp", "joint"),
                             ("fa", "joint")]:  # fmt: skip
        cfg, _ = run.parse_config(["--task", "fashion_mnist", "--method", method])
        assert validate(cfg).backward == expected
    for task in ("s2s_reverse", "fashion_mnist_mlp"):  # measured slower there
        cfg, _ = run.parse_config(["--task", task])
        assert validate(cfg).backward == "joint"


@pytest.mark.parametrize("method", ["bp", "fa"])
def test_per_block_with_a_method_without_local_losses_is_refused(method, capsys):
    args = [a for a in S2S if a != "--no-stack-blocks"]  # a BLL option
    with pytest.raises(ConfigError, match="--backward per-block needs block-local losses"):
        run.parse_config([*args, "--method", method, "--backward", "per-block"])
    assert run.cli([*args, "--method", method, "--backward", "per-block", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "use --backward joint" in err
