"""Block-parallel runtime, in one process: grouping, message headers, noise streams,
chain segments, and the bad input that must fail before any training."""

import json
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import run  # noqa: E402
from dist_harness import free_port  # noqa: E402

from pyro_bll import make_family  # noqa: E402
from pyro_bll.config import ConfigError  # noqa: E402
from pyro_bll.core.noise import NoiseKey, block_noise  # noqa: E402
from pyro_bll.core.step_cache import StepCache
from pyro_bll.distributed.group import (  # noqa: E402
    BlockGroups,
    owned_parameter_index,
    owned_state_keys,
)
from pyro_bll.distributed.rank_checkpoints import merge  # noqa: E402
from pyro_bll.distributed.transport import Spec  # noqa: E402
from pyro_bll.methods import BLL  # noqa: E402
from pyro_bll.run.options import RunConfig  # noqa: E402
from pyro_bll.tasks import S2SReverseTask  # noqa: E402

from utils import assert_close  # noqa: E402


def test_block_groups_split_validate_and_tile():
    assert BlockGroups.make(5, 2).sizes == (3, 2)
    assert BlockGroups.make(4, 4).sizes == (1, 1, 1, 1)
    g = BlockGroups.make(6, 3, [1, 3, 2])
    assert [g.segment(r) for r in range(3)] == [(0, 1), (1, 4), (4, 6)]
    with pytest.raises(ConfigError, match="3 ranks for 2 blocks"):
        BlockGroups.make(2, 3)
    with pytest.raises(ConfigError, match="describes 3 ranks, but the world size is 2"):
        BlockGroups.make(3, 2, [1, 1, 1])
    with pytest.raises(ConfigError, match="add up to the 4 blocks"):
        BlockGroups.make(4, 2, [1, 2])


@pytest.mark.parametrize(
    "message",
    [torch.zeros(3, 5, 8), (torch.zeros(2, 4), torch.ones(2, 4, 3, dtype=torch.float64))],
)
def test_message_header_round_trips(message):
    spec = Spec.of(message)
    assert Spec.decode(spec.encode()) == spec


def _chain(family="gaussian", layers=3, propagate="mean", **kw):
    cfg = RunConfig(layers=layers, d_model=8, seq_len=4, train_size=16, batch_size=8,
                    test_size=4, propagate=propagate, **kw)  # fmt: skip
    task = S2SReverseTask(cfg)
    fam = make_family(family)
    return cfg, task, task.build_chain(fam)


def test_noise_stream_of_a_block_ignores_the_other_blocks():
    key = NoiseKey(seed=3, step=7)
    with block_noise(key, 1, torch.device("cpu")):
        a = torch.randn(4)
    torch.randn(100)  # other draws in between change nothing
    before = torch.get_rng_state()
    with block_noise(key, 1, torch.device("cpu")):
        b = torch.randn(4)
    assert torch.equal(a, b)
    assert torch.equal(before, torch.get_rng_state()), "the global stream is restored"
    with block_noise(NoiseKey(3, 8), 1, torch.device("cpu")):
        assert not torch.equal(a, torch.randn(4))


@pytest.mark.parametrize(
    "family, propagate", [("gaussian", "mean"), ("bernoulli", "sample"), ("gamma", "mean")]
)
def test_segments_reproduce_the_full_chain_losses_and_gradients(family, propagate):
    """What a rank computes for blocks a..b-1 from the message it receives equals the
    single-process losses of those blocks, values and gradients, for every split."""
    cfg, task, chain = _chain(family, layers=3, propagate=propagate)
    chain = chain.double()
    method = BLL(chain, cfg)
    x, y, mask = next(task.train_batches(0))
    key = NoiseKey(cfg.seed, 5)
    loss, logs = method.loss(chain, x, y, mask, noise=key)
    full = torch.autograd.grad(loss, list(chain.parameters()), allow_unused=True)
    full = dict(zip(map(id, chain.parameters()), full, strict=True))
    for cut in ([(0, 1), (1, 3)], [(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)]):
        inp = x
        for seg in cut:
            cache = StepCache()
            part, part_logs = method.loss(chain, inp, y, mask, noise=key, segment=seg, cache=cache)
            a, b = seg
            assert_close(part_logs["loss"][a:b], logs["loss"][a:b], atol=1e-12)
            assert (part_logs["loss"][:a] == 0).all() and (part_logs["loss"][b:] == 0).all()
            mine = [p for k in range(a, b) for p in chain.block_parameters(k)]
            grads = torch.autograd.grad(part, mine, allow_unused=True)
            for p, g in zip(mine, grads, strict=True):
                ref = full[id(p)]
                if ref is None:
                    assert g is None or g.abs().max() == 0
                else:
                    assert_close(g, ref, atol=1e-12)
            inp = cache.outgoing  # what the next rank receives (detached on the wire)
            inp = tuple(t.detach() for t in inp) if isinstance(inp, tuple) else inp.detach()


def test_ownership_covers_every_parameter_and_state_entry_once():
    _, _, chain = _chain(layers=4)
    groups = BlockGroups.make(4, 3)
    idx = [i for r in range(3) for i in owned_parameter_index(chain, groups.segment(r))]
    assert sorted(idx) == list(range(len(list(chain.parameters()))))
    keys = [k for r in range(3) for k in owned_state_keys(chain, groups.segment(r), r)]
    assert sorted(keys) == sorted(chain.state_dict())


def test_merge_builds_a_single_adam_state():
    _, _, chain = _chain(layers=2)
    params = list(chain.parameters())
    groups = BlockGroups.make(2, 2)
    parts, reference = [], {}
    for r in range(2):
        index = owned_parameter_index(chain, groups.segment(r))
        opt = torch.optim.Adam([params[i] for i in index], lr=1e-3)
        for p in (params[i] for i in index):
            p.grad = torch.randn_like(p)
        opt.step()
        for local, g in enumerate(index):
            reference[g] = opt.state_dict()["state"][local]["exp_avg"]
        keys = owned_state_keys(chain, groups.segment(r), r)
        parts.append({"rank": r, "epoch": 0, "config": {}, "history": [], "rng": None,
                      "steps_done": 1, "rank_blocks": [1, 1], "param_index": index,
                      "num_params": len(params), "optimizer": opt.state_dict(),
                      "model": {k: chain.state_dict()[k] for k in keys}})  # fmt: skip
    merged = merge(parts)
    single = torch.optim.Adam(params, lr=1e-3)
    single.load_state_dict(merged["optimizer"])  # the format a single process loads
    for g, exp_avg in reference.items():
        assert torch.equal(single.state[params[g]]["exp_avg"], exp_avg)
    chain.load_state_dict(merged["model"])  # strict: every entry present


TINY = ["--layers", "2", "--d-model", "8", "--seq-len", "4", "--train-size", "16",
        "--test-size", "4", "--batch-size", "8", "--threads", "1", "--no-progress"]  # fmt: skip


def _env(monkeypatch, rank, world, port=None):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port() if port is None else port))


@pytest.mark.parametrize(
    "world, argv, needle",
    [
        (3, [], "3 ranks for 2 blocks: every rank needs at least one block"),
        (2, ["--layers", "3", "--rank-blocks", "1,1,1"], "describes 3 ranks, but the world size"),
        (2, ["--rank-blocks", "1,2"], "covers 3 blocks, but the network has 2"),
        (2, ["--method", "fa"], "--distributed runs --method bll (stages of blocks"),
        (2, ["--method", "bp", "--rank-blocks", "1,1"], "drop --rank-blocks"),
        (2, ["--method", "bp", "--replicas", "1"], "--replicas must be the world size 2"),
        (3, ["--replicas", "2"], "a world of 3 ranks is not K stages x 2 replicas"),
        (4, ["--replicas", "2", "--rank-blocks", "2"], "which with 2 replicas need 2 ranks"),
        (2, ["--replicas", "0"], "--replicas must be at least 1"),
        (2, ["--dist-timeout", "0"], "--dist-timeout must be positive"),
        (2, ["--dist-backend", "nccl"], "--dist-backend nccl needs --device cuda"),
        (2, ["--device", "cuda"], "no CUDA device is available"),
    ],
)
def test_bad_input_fails_before_any_rendezvous(tmp_path, capsys, monkeypatch, world, argv, needle):
    _env(monkeypatch, 0, world)
    t0 = time.monotonic()
    assert run.cli([*TINY, "--out", str(tmp_path / "x"), *argv, "--distributed"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert time.monotonic() - t0 < 5  # nothing waited for other ranks


def test_without_torchrun_environment(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert run.cli([*TINY, "--out", str(tmp_path / "x"), "--distributed"]) == 2
    assert "start it with torchrun --nproc_per_node=K" in capsys.readouterr().err
    _env(monkeypatch, 0, 2, port=0)
    argv = [*TINY, "--out", str(tmp_path / "x"), "--dist-timeout", "2", "--distributed"]
    assert run.cli(argv) == 2
    assert "MASTER_PORT 0 cannot be connected to" in capsys.readouterr().err


@pytest.mark.parametrize("addr", ["127.0.0.1", "no-such-host.invalid"])
def test_unreachable_rendezvous_is_a_clear_error_within_the_timeout(
    tmp_path, capsys, monkeypatch, addr
):
    with socket.socket() as s:  # a port where nobody listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _env(monkeypatch, 1, 2, port)
    monkeypatch.setenv("MASTER_ADDR", addr)
    t0 = time.monotonic()
    code = run.cli([*TINY, "--out", str(tmp_path / "x"), "--dist-timeout", "1.5", "--distributed"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert f"rank 1 cannot reach the rendezvous at {addr}:{port} within 1.5 s" in err
    assert "MASTER_ADDR" in err and "\n" not in err
    assert time.monotonic() - t0 < 10


def _model_inputs(blocks: tuple[list, list], forward: list, grad_bytes: list) -> dict:
    """Cost-model inputs of two block groups: their step seconds at batch 25 and 50,
    forward seconds and gradient bytes; BP 0.12 s / 0.2 s (batch 25 / 50), all-reduce
    1 ms + 1 ms per MB, messages 0.5 ms + 2 ms per MB, 10 kB of message per example."""
    return {
        "block_seconds_by_batch": {"25": blocks[0], "50": blocks[1]},
        "bp_seconds_by_batch": {"25": 0.12, "50": 0.2},
        "forward_seconds": forward,
        "comm": {"bytes": [1e6, 2e6], "allreduce": [0.002, 0.003], "p2p": [0.0025, 0.0045]},
        "sizes": {
            "block_grad_bytes": grad_bytes,
            "all_grad_bytes": sum(grad_bytes),
            "message_bytes_per_example": 1e4,
        },
    }


def test_bench_pipeline_cost_model_matches_a_hand_computation():
    """Two workers, blocks of 0.1 s at batch 50 and 0.06 s at 25, BP 0.2 s / 0.12 s (two
    blocks), all-reduce 1 ms + 1 ms per MB, messages 0.5 ms + 2 ms per MB."""
    import bench_pipeline

    m = _model_inputs(([0.06, 0.06], [0.1, 0.1]), [0.03, 0.03], [4e6, 4e6])
    pred = bench_pipeline.cost_model(m, 2, 50)
    # ring all-reduce over 2 ranks: 2 (R - 1) lat + 2 (R - 1) / R n / bw, with the fit
    # T(n) = 0.001 + 1e-9 n giving lat = 0.0005, 1 / bw = 1e-9
    allreduce_8mb = 0.001 + 8e6 * 1e-9  # the whole network: 2 blocks of 4 MB
    message = 0.0005 + 2e-9 * 1e4 * 50  # p2p fit: 0.0005 + 2e-9 n
    assert pred["2_ranks_pipelined"] == pytest.approx(50 / (0.1 + message))
    assert pred["2_ranks_sync"] == pytest.approx(50 / (0.03 + message + 0.1))
    assert pred["bll_1x2"] == pytest.approx(50 / (2 * 0.06 + allreduce_8mb))
    assert pred["bp_ddp_2"] == pytest.approx(50 / (2 * 0.06 + allreduce_8mb))


def test_bench_pipeline_cost_model_sees_unbalanced_stages():
    """Group 1 costs 0.15 s at batch 50 (0.08 s at 25), group 2 0.05 s (0.03 s): the
    pipeline runs at the slower stage, and the sync step waits for the longest chain of
    forwards and a step; the extrapolation to 4 workers uses the mean group."""
    import bench_pipeline

    m = _model_inputs(([0.08, 0.03], [0.15, 0.05]), [0.06, 0.02], [1e6, 3e6])
    pred = bench_pipeline.cost_model(m, 2, 50)
    message = 0.0005 + 2e-9 * 1e4 * 50
    assert pred["2_ranks_pipelined"] == pytest.approx(50 / (0.15 + message))
    # stage 1 alone (0.15) against stage 1's forward, the message and stage 2 (0.11 + m)
    assert pred["2_ranks_sync"] == pytest.approx(50 / max(0.15, 0.06 + message + 0.05))
    assert pred["bll_1x2"] == pytest.approx(50 / (0.08 + 0.03 + 0.001 + 4e6 * 1e-9))
    slow = bench_pipeline.cost_model({**m, "contention": 1.25}, 2, 50)
    assert slow["2_ranks_pipelined"] == pytest.approx(50 / (1.25 * 0.15 + message))
    assert slow["bp_ddp_2"] == pytest.approx(50 / (1.25 * 2 * 0.06 + 0.001 + 4e6 * 1e-9))
    four = bench_pipeline.cost_model(m, 2, 50, workers=4)
    # 4 groups of the mean cost 0.1 s at batch 50, one per stage, 0.5 ms + 1e-5 s / example
    mean_group = (0.08 + 0.03) / 2 * 2 - (0.15 + 0.05) / 2  # intercept of the mean line
    slope = ((0.15 + 0.05) / 2 - (0.08 + 0.03) / 2) / 25
    assert four["4_ranks_pipelined"] == pytest.approx(50 / (mean_group + slope * 50 + message))


def test_bench_pipeline_refit_rewrites_predictions_from_stored_inputs(tmp_path, monkeypatch):
    """--refit measures nothing: it recomputes the predictions of a stored result file."""
    import bench_pipeline

    stored = json.loads(
        (Path(__file__).resolve().parents[2] / "results/bench_pipeline_resnet18.json").read_text()
    )
    stored["predicted_samples_per_second"] = {n: 1.0 for n in stored["samples_per_second"]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(stored))
    monkeypatch.setattr(sys, "argv", ["bench_pipeline.py", "--refit", str(path)])
    bench_pipeline.main()
    new = json.loads(path.read_text())
    rate, k = new["samples_per_second"], new["config"]["ranks"]
    expected = bench_pipeline.cost_model(stored["model_inputs"], k, new["config"]["batch_size"])
    assert new["predicted_samples_per_second"] == pytest.approx(expected)
    for n, p in expected.items():
        assert new["predicted_over_measured"][n] == pytest.approx(p / rate[n])
    assert "predicted / measured" in path.with_suffix(".md").read_text()
    monkeypatch.setattr(sys, "argv", ["bench_pipeline.py", "--refit", str(tmp_path / "no.json")])
    with pytest.raises(SystemExit) as e:
        bench_pipeline.main()
    assert e.value.code == 2
