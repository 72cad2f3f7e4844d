"""The activation-memory meter against hand-counted bytes, the split, and bench_memory.py."""

import itertools
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyro_bll.measure.memory import SavedTensorMeter, balanced_split, state_bytes
from pyro_bll.models.resnet import memory_split, unit_activation_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import bench_memory  # noqa: E402
import run  # noqa: E402


def test_saved_bytes_of_a_small_network_match_a_hand_count():
    """Linear(784, 256) -> ReLU -> Linear(256, 10) -> cross-entropy, batch B, float32:
    the first layer saves x (B x 784), ReLU its output h (B x 256; the second layer saves
    the same h, counted once), log_softmax its output (B x 10), nll_loss the targets
    (B int64) and its total weight (one float). Weights are parameters, not counted."""
    torch.manual_seed(0)
    b = 32
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(b, 784), torch.randint(0, 10, (b,))
    meter = SavedTensorMeter.for_module(net)
    with meter:
        loss = F.cross_entropy(net(x), y)
        held = meter.current
        loss.backward()
    expected = 4 * b * 784 + 4 * b * 256 + 4 * b * 10 + 8 * b + 4
    assert held == meter.peak == expected
    assert meter.current == 0 and not meter.alive  # backward freed everything


def test_one_block_at_a_time_holds_the_largest_block_not_the_sum():
    torch.manual_seed(0)
    widths = (64, 128, 32, 64)
    blocks = [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in itertools.pairwise(widths)]
    x = torch.randn(16, widths[0])

    def step(per_block: bool) -> tuple[int, list[int]]:
        meter, held = SavedTensorMeter([p for b in blocks for p in b.parameters()]), []
        with meter:
            inp, losses = x, []
            for blk in blocks:
                out = blk(inp)
                loss = out.square().mean()
                held.append(meter.current)
                if per_block:
                    loss.backward()
                else:
                    losses.append(loss)
                inp = out.detach()
            if losses:
                sum(losses).backward()
        return meter.peak, held

    joint, _ = step(False)
    peak, held = step(True)
    # per block: Linear saves its input (16 x d_in floats), Tanh its output (16 x d_out),
    # square its input (the same storage as tanh's output, counted once)
    per = [4 * 16 * a + 4 * 16 * b for a, b in itertools.pairwise(widths)]
    assert held == per and peak == max(per)
    # joint: all alive at once; a block's input is the previous output's storage (detach
    # shares memory), so only x and the outputs count
    assert joint == 4 * 16 * sum(widths)


def test_state_bytes_count_parameters_gradients_and_adam():
    net = nn.Linear(10, 5)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(3, 10)).sum().backward()
    opt.step()
    s = state_bytes(net, opt)
    assert s["parameters"] == s["gradients"] == 4 * 55
    assert s["optimizer"] == 2 * 4 * 55  # exp_avg and exp_avg_sq (steps are scalars)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_split_is_optimal_by_enumeration(seed):
    rng = random.Random(seed)
    costs = [rng.uniform(0.1, 3.0) for _ in range(8)]
    for groups in (1, 3, 4, 8):
        sizes = balanced_split(costs, groups)
        assert len(sizes) == groups and sum(sizes) == len(costs) and min(sizes) >= 1

        def worst(sz):
            cuts = list(itertools.accumulate(sz))
            return max(sum(costs[a:b]) for a, b in zip([0, *cuts[:-1]], cuts, strict=True))

        best = min(
            worst([b - a for a, b in zip((0, *c), (*c, 8), strict=True)])
            for c in itertools.combinations(range(1, 8), groups - 1)
        )
        assert worst(sizes) == pytest.approx(best)
    with pytest.raises(ValueError):
        balanced_split(costs, 9)


def test_memory_split_moves_units_out_of_the_first_block():
    costs = unit_activation_bytes("resnet18", 1, 0.25, 28)
    assert len(costs) == 8 and costs[0] > costs[-1] > 0  # the stem's block is the largest
    split = memory_split("resnet18", 1, 4, 0.25, 28)
    assert sum(split) == 8 and split[0] < 2  # the even split gives block 1 two units


@pytest.mark.parametrize("bad", ["1,1,1", "0,2,3,3", "2,2,2,3", "x", "1,,2"])
def test_a_split_that_does_not_fit_exits_2(bad, capsys):
    args = ["--task", "fashion_mnist", "--split", bad, "--out", "unused"]
    assert run.cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --split")


def test_bench_memory_reports_every_variant(tmp_path):
    record = bench_memory.main(
        [
            "--configs",
            "resnet18_grey28",
            "transformer20",
            "--width",
            "0.05",
            "--batch-size",
            "4",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]  # fmt: skip
    )
    rows = record["results"]
    assert set(rows["resnet18_grey28"]) == set(bench_memory.VARIANTS)
    assert "predsim" not in rows["transformer20"]
    for config in rows.values():
        per_block = config["bll_per_block"]
        assert len(per_block["activation_bytes_per_block"]) == per_block["num_blocks"]
        assert per_block["activation_peak_bytes"] < config["bll_joint"]["activation_peak_bytes"]
        assert config["bp"]["activation_vs_bp"] == 1.0
    text = (tmp_path / "bench_memory.md").read_text()
    assert "| transformer20 | bll_per_block |" in text
