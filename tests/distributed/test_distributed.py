"""Block-parallel training across processes (gloo on 127.0.0.1): equivalence with one
process, resume, checkpoint assembly, learning, fault handling and the torchrun launch.

Ranks are forked processes with torchrun's environment (``dist_harness``); one test runs
the real ``torchrun``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import assemble_checkpoint  # noqa: E402
import bench_pipeline  # noqa: E402
import run  # noqa: E402
from dist_harness import Fault, launch  # noqa: E402

from pyro_bll.run.options import RunConfig  # noqa: E402
from pyro_bll.run.training import Trainer  # noqa: E402

from utils import assert_close  # noqa: E402

END = Path("checkpoints") / "epoch_001.pt"  # the end of a two-epoch run
# one site per block: a rank computes its own blocks, so a single process that stacked
# blocks 0 and 1 together (pyro_bll.core.stacked) would sum their gradients in another
# order, equal to rounding but not bit for bit, and a float32 run drifts apart from that
TINY = ["--layers", "3", "--d-model", "8", "--seq-len", "5", "--train-size", "48",
        "--test-size", "8", "--batch-size", "8", "--threads", "1", "--no-progress",
        "--no-stack-blocks"]  # fmt: skip


def _ok(results):
    for r in results:
        assert r.exitcode == 0, f"rank {r.rank} exit {r.exitcode}:\n{r.log[-3000:]}"


def _same_checkpoints(a: Path, b: Path, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Model, Adam state, step count and per-block losses agree to float tolerance."""
    sa = torch.load(a, weights_only=False)
    sb = torch.load(b, weights_only=False)
    assert sa["model"].keys() == sb["model"].keys()
    for k, v in sa["model"].items():
        assert_close(sb["model"][k], v, atol=atol, rtol=rtol, msg=k)
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert_close(ob[i][name], oa[i][name], atol=min(atol, 1e-7), rtol=rtol)
    assert sa["steps_done"] == sb["steps_done"] > 0
    for ha, hb in zip(sa["history"], sb["history"], strict=True):
        assert hb["block_losses"] == pytest.approx(ha["block_losses"], rel=max(rtol, 1e-12))
        assert hb["test_accuracy"] == ha["test_accuracy"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process reference: two epochs, checkpoints after each."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert run.cli([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_sync_three_ranks_equal_the_single_process_run(tmp_path, single):
    out = tmp_path / "sync3"
    _ok(launch([*TINY, "--epochs", "2", "--out", out, "--schedule", "sync"], 3, tmp_path))
    assert sorted(p.name for p in out.glob("rank_*")) == ["rank_0", "rank_1", "rank_2"]
    # rank 0 assembled the last epoch itself; the first one is assembled here
    _same_checkpoints(single / END, out / END)
    metrics = json.loads((out / "metrics.json").read_text())
    ref = json.loads((single / "metrics.json").read_text())
    assert metrics["test_accuracy"] == ref["test_accuracy"]
    assert len(metrics["history"]) == 2 and len(metrics["history"][0]["rank_busy_seconds"]) == 3

    # the assembled checkpoint of epoch 1 continues in ONE process to the same end
    assert assemble_checkpoint.cli([str(out), "--epoch", "1"]) == 0
    first = out / "checkpoints" / "epoch_000.pt"
    solo = tmp_path / "solo"
    (solo / "checkpoints").mkdir(parents=True)
    shutil.copy(first, solo / "checkpoints" / first.name)
    assert run.cli([*TINY, "--epochs", "2", "--out", str(solo), "--resume"]) == 0
    _same_checkpoints(single / END, solo / "checkpoints" / "epoch_001.pt")


def test_sync_two_ranks_with_resume_equal_the_single_process_run(tmp_path, single):
    out = tmp_path / "sync2"
    args = [*TINY, "--out", out, "--schedule", "sync"]
    _ok(launch([*args, "--epochs", "1"], 2, tmp_path))
    results = launch([*args, "--epochs", "2"], 2, tmp_path)  # never replaced silently
    assert [r.exitcode for r in results] == [2, 2]
    assert "already holds a run (rank checkpoints); pass --resume" in results[0].log
    # a resume needs an epoch that every rank completed: hide rank 1's, and it refuses
    hidden = out / "rank_1" / "epoch_000.pt"
    hidden.rename(hidden.with_suffix(".bak"))
    results = launch([*args, "--epochs", "2", "--resume"], 2, tmp_path)
    assert [r.exitcode for r in results] == [2, 2]
    assert "no epoch has a checkpoint from all 2 stages" in results[0].log
    hidden.with_suffix(".bak").rename(hidden)
    # one rank's checkpoint of another family link version: every rank refuses, and the
    # file stays as it was
    original = hidden.read_bytes()
    state = torch.load(hidden, weights_only=True)
    torch.save({**state, "family_links": {"gaussian": 7}}, hidden)
    relinked = hidden.read_bytes()
    results = launch([*args, "--epochs", "2", "--resume"], 2, tmp_path)
    assert [r.exitcode for r in results] == [2, 2]
    assert "epoch_000.pt was trained with gaussian link version 7" in results[0].log
    assert hidden.read_bytes() == relinked
    hidden.write_bytes(original)
    # a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) resumes without --resume
    restart = {"TORCHELASTIC_RESTART_COUNT": "1"}
    _ok(launch([*args, "--epochs", "2"], 2, tmp_path, env=restart))  # blocks 2 + 1
    _same_checkpoints(single / END, out / END)


def test_pipelined_discrete_sampled_messages_equal_the_single_process_run(tmp_path):
    """Bernoulli latents (score-function gradients) and sampled messages: the noise of
    every block is the same on its rank as in one process, and the schedule only
    changes timing. Per-block gradient clipping (small enough to act on every step) is
    block-local, so each rank clips its own blocks as one process does."""
    args = [*TINY, "--epochs", "1", "--family", "bernoulli", "--propagate", "sample",
            "--clip-grad", "0.05"]  # fmt: skip
    assert run.cli([*args, "--out", str(tmp_path / "one")]) == 0
    _ok(launch([*args, "--out", tmp_path / "pipe", "--rank-blocks", "1,2"], 2, tmp_path))
    _same_checkpoints(
        tmp_path / "one" / "checkpoints" / "epoch_000.pt",
        tmp_path / "pipe" / "checkpoints" / "epoch_000.pt",
    )


def test_pipelined_schedule_trains_a_tiny_transformer(tmp_path):
    args = ["--layers", "2", "--d-model", "16", "--seq-len", "5", "--train-size", "6000",
            "--test-size", "20", "--batch-size", "20", "--lr", "1e-2", "--epochs", "1",
            "--threads", "1", "--no-progress", "--out", tmp_path / "run",
            "--diagnostics"]  # fmt: skip
    results = launch(args, 2, tmp_path)
    _ok(results)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.9, results[0].log
    # rank 0 diagnoses the checkpoint it assembled, like a single-process run
    assert (tmp_path / "run" / "diagnostics.nc").stat().st_size > 0


@pytest.mark.parametrize("kind, failing", [("raise", 1), ("kill", 1), ("kill", 0)])
def test_a_failed_rank_stops_every_rank_and_is_named(tmp_path, kind, failing):
    """Rank ``failing`` raises or is SIGKILLed at step 3 (rank 0 also hosts the store);
    every other rank exits non-zero within the timeout, naming it."""
    timeout = 5
    args = [*TINY, "--epochs", "2", "--out", tmp_path / "run", "--dist-timeout", timeout]
    results = launch(args, 3, tmp_path, fault=Fault(failing, 3, kind), timeout=60)
    dead = results[failing]
    assert dead.exitcode == (1 if kind == "raise" else -9)
    for r in results:
        if r.rank == failing:
            continue
        assert r.exitcode == 1, r.log
        assert r.seconds - dead.seconds < timeout + 2, (r.seconds, dead.seconds)
        verdict = [ln for ln in r.log.splitlines() if ln.startswith("error: ")]
        assert len(verdict) == 1, r.log
        assert verdict[0].startswith(f"error: rank {failing} failed:"), verdict
        assert verdict[0].endswith(f"rank {r.rank} stops")
        if kind == "raise":
            assert "RuntimeError: injected fault at step 3" in verdict[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # no assembled end state


@pytest.mark.parametrize(
    "schedule, signalled, beta",
    [("pipelined", 0, []), ("sync", 1, []), ("pipelined", 1, ["--beta", "lookahead"])],
)
def test_a_signal_to_one_rank_checkpoints_every_rank_and_resume_is_exact(
    tmp_path, schedule, signalled, beta
):
    """SIGTERM reaches one rank at its step 2 of an 11-step epoch: every rank finishes the
    same step, writes its mid-epoch checkpoint and exits 143; the resumed job ends as one
    uninterrupted process does (with the look-ahead too: no weights are left in flight)."""
    args = [*TINY, "--train-size", "96", "--epochs", "1", *beta]
    straight = tmp_path / "single"
    assert run.cli([*args, "--out", str(straight)]) == 0
    out = tmp_path / "run"
    args += ["--out", out, "--schedule", schedule]
    results = launch(args, 2, tmp_path, fault=Fault(signalled, 2, "signal"), timeout=60)
    assert [r.exitcode for r in results] == [143, 143], results[signalled].log
    line = [ln for ln in results[0].log.splitlines() if ln.startswith("interrupted by")]
    assert len(line) == 1 and "SIGTERM at step" in line[0] and "of epoch 1" in line[0], line
    assert "resume with: torchrun" in line[0] and line[0].endswith("--resume")
    mids = [sorted(p.name for p in (out / f"rank_{r}").glob("*_step_*.pt")) for r in (0, 1)]
    assert mids[0] == mids[1] and len(mids[0]) == 1, mids  # the same step on both ranks
    assert "Traceback" not in results[0].log + results[1].log
    _ok(launch([*args, "--resume"], 2, tmp_path))
    end = Path("checkpoints") / "epoch_000.pt"
    _same_checkpoints(straight / end, out / end)


@pytest.fixture
def float64():
    """float64 parameters in this process and (BLL_TEST_FLOAT64) in the forked ranks."""
    torch.set_default_dtype(torch.float64)
    yield {"BLL_TEST_FLOAT64": "1"}
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(
    "layout, family, method",
    [
        ("1x2", "gaussian", "bll"),
        ("2x2", "gaussian", "bll"),
        ("2x2", "bernoulli", "bll"),
        ("1x2", "gaussian", "bp"),
    ],
)
def test_stages_times_replicas_equal_one_process(tmp_path, float64, layout, family, method):
    """K stages x R replicas (each replica a shard of every batch, gradients averaged per
    stage) end with the parameters of one process on the same global batches (float64);
    --method bp --distributed is data parallel over all ranks. The 2x2 runs stop after
    one epoch and resume for the second."""
    stages, replicas = map(int, layout.split("x"))
    args = [*TINY, "--family", family, "--method", method]
    if method != "bll":
        args.remove("--no-stack-blocks")  # a BLL option
    if method == "bll":  # a loss free of the draws (a replica draws for its shard only)
        args += ["--likelihood", "bound"]
    single = tmp_path / "single"
    assert run.cli([*args, "--epochs", "2", "--out", str(single)]) == 0
    out = tmp_path / "run"
    dist_args = [*args, "--out", out, "--replicas", replicas]
    world = stages * replicas
    if stages == 2:
        first = launch([*dist_args, "--epochs", "1"], world, tmp_path, env=float64)
        _ok(first)
        assert "2 stage(s) x 2 replicas; stage 0: blocks 0-1; stage 1: block 2" in first[0].log
        _ok(launch([*dist_args, "--epochs", "2", "--resume"], world, tmp_path, env=float64))
        assert sorted(p.name for p in out.glob("rank_*")) == ["rank_0", "rank_1"]  # per stage
    else:
        _ok(launch([*dist_args, "--epochs", "2"], world, tmp_path, env=float64))
    _same_checkpoints(single / END, out / END, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize(
    "world, rank_blocks, depth, refresh, schedule, reads",
    [
        # rank 0 (block 0) reads blocks 1, 2 and the output head from rank 1
        (2, "1,2", 0, 1, "pipelined", {0: ["blocks.1", "blocks.2", "head"]}),
        # block 0 reads block 1 and its predictive head, both on rank 1
        (2, "1,2", 1, 1, "pipelined", {0: ["blocks.1", "pred_heads.1"]}),
        # blocks 0 and 1 both read block 2 and the head: they cross once; every 3 steps
        (2, "2,1", 0, 3, "sync", {0: ["blocks.2", "head"]}),
        # three stages, every 2 steps: rank 0 reads from ranks 1 and 2, rank 1 from rank 2
        (3, None, 0, 2, "pipelined", {0: ["blocks.1", "blocks.2", "head"],
                                      1: ["blocks.2", "head"]}),
    ],
)  # fmt: skip
def test_lookahead_weights_cross_ranks_as_in_one_process(
    tmp_path, world, rank_blocks, depth, refresh, schedule, reads
):
    """--beta lookahead: the ranks above send the weights the look-ahead copies read at
    every refresh step, and the run ends with the parameters, Adam state and per-block
    losses of one process (same seed, same batches: the copies hold the weights of the
    same step). metrics.json reports the bytes each rank received per refresh, which
    equal the parameters and buffers of the modules it reads from other ranks."""
    beta = ["--beta", "lookahead", "--lookahead-depth", depth, "--lookahead-refresh", refresh]
    args = [*TINY, "--epochs", "2", *beta]
    single = tmp_path / "single"
    assert run.cli([*map(str, args), "--out", str(single)]) == 0
    out = tmp_path / "run"
    layout = [] if rank_blocks is None else ["--rank-blocks", rank_blocks]
    results = launch([*args, "--out", out, "--schedule", schedule, *layout], world, tmp_path)
    _ok(results)
    _same_checkpoints(single / END, out / END)
    # the bytes: the modules each rank reads from others, counted on the one-process chain
    state = torch.load(single / END, weights_only=False)["model"]
    expected = [
        sum(v.numel() * v.element_size() for k, v in state.items()
            if any(k.startswith(m + ".") for m in reads.get(r, [])))
        for r in range(world)
    ]  # fmt: skip
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[-1]["rank_lookahead_bytes_per_refresh"] == expected
    steps = 2 * 6  # two epochs of 48 / 8 batches
    assert history[-1]["lookahead_refreshes"] == -(-steps // refresh)
    assert f"receives {expected[0]} bytes per refresh" in results[0].log


def test_task_default_lookahead_runs_distributed_end_to_end(tmp_path):
    """fashion_mnist_mlp's default is --beta lookahead (depth 0, read at the mean): the
    distributed launch keeps it (config.json) and ends as one process does."""
    from vision_files import tiny_fashion_mnist

    data = tiny_fashion_mnist(tmp_path / "data", n_train=32)
    args = ["--task", "fashion_mnist_mlp", "--data-dir", data, "--layers", "3",
            "--d-model", "16", "--batch-size", "8", "--epochs", "2", "--threads", "1",
            "--no-progress"]  # fmt: skip
    single = tmp_path / "single"
    assert run.cli([*map(str, args), "--out", str(single)]) == 0
    out = tmp_path / "run"
    results = launch([*args, "--out", out], 2, tmp_path)
    _ok(results)
    config = json.loads((out / "config.json").read_text())
    assert config["bll"]["beta"] == "lookahead" and config["bll"]["lookahead_depth"] == 0
    assert "look-ahead: stage 0 receives" in results[0].log
    _same_checkpoints(single / END, out / END)


def test_checkpoint_every_lets_a_crashed_job_resume_mid_epoch(tmp_path):
    """--checkpoint-every 2 on 2 ranks; rank 1 raises at its step 4 of an 11-step epoch;
    the relaunch resumes from the newest step every rank saved and ends as one process."""
    args = [*TINY, "--train-size", "96", "--epochs", "1", "--checkpoint-every", "2"]
    straight = tmp_path / "single"
    assert run.cli([*args, "--out", str(straight)]) == 0
    out = tmp_path / "run"
    args += ["--out", out, "--schedule", "sync"]
    crashed = launch(args, 2, tmp_path, fault=Fault(1, 4, "raise"), timeout=60)
    assert [r.exitcode for r in crashed] == [1, 1]
    keys = [sorted(p.name for p in (out / f"rank_{r}").glob("*_step_*.pt")) for r in (0, 1)]
    assert keys[0] and keys[1] and set(keys[0]) & set(keys[1]), keys
    _ok(launch([*args, "--resume"], 2, tmp_path))
    end = Path("checkpoints") / "epoch_000.pt"
    _same_checkpoints(straight / end, out / end)


def test_ranks_that_read_different_data_refuse_to_train(tmp_path):
    results = launch([*TINY, "--epochs", "1", "--out", tmp_path / "run"], 2, tmp_path,
                     rank_argv={1: ["--seed", "1"]})  # fmt: skip
    assert [r.exitcode for r in results] == [2, 2]
    assert "the ranks read different training batches in epoch 1" in results[0].log


def test_torchrun_launch_and_assembled_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            "torchrun",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "experiments" / "run.py"),
            *TINY,
            "--epochs",
            "1",
            "--out",
            str(out),
            "--distributed",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final test_accuracy" in proc.stdout
    assert (out / "rank_0" / "epoch_000.pt").exists() and (out / "rank_1" / "epoch_000.pt").exists()
    trainer = Trainer(RunConfig.from_dict(json.loads((out / "config.json").read_text())))
    trainer.load(out / "checkpoints" / "epoch_000.pt")  # a normal single-process checkpoint
    assert trainer.steps_done > 0 and len(trainer.history) == 1


def test_two_torchrun_agents_on_loopback_match_one_process(tmp_path):
    """Multi-node rendezvous: two torchrun agents (--nnodes=2, c10d on 127.0.0.1), one rank
    each, finish and end with the single-process parameters."""
    from dist_harness import free_port

    single = tmp_path / "single"
    assert run.cli([*TINY, "--epochs", "1", "--out", str(single)]) == 0
    out = tmp_path / "run"
    port = free_port()
    cmd = ["torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=pyro-bll-test",
           str(ROOT / "experiments" / "run.py"), *TINY, "--epochs", "1", "--out", str(out),
           "--distributed"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env) for _ in range(2)]  # fmt: skip
    logs = [a.communicate(timeout=240) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [err[-2000:] for _, err in logs]
    assert any("final test_accuracy" in o for o, _ in logs)
    end = Path("checkpoints") / "epoch_000.pt"
    _same_checkpoints(single / end, out / end)


def test_assemble_cli_bad_input(tmp_path, capsys):
    assert assemble_checkpoint.cli([str(tmp_path)]) == 2
    assert "holds no rank_*/ directories" in capsys.readouterr().err


def test_bench_pipeline_runs_the_resnet(tmp_path, monkeypatch):
    from vision_files import tiny_fashion_mnist

    data = tiny_fashion_mnist(tmp_path / "data", n_train=32)
    out = tmp_path / "bench"
    argv = ["bench_pipeline.py", "--task", "fashion_mnist", "--width", "0.05", "--data-dir",
            str(data), "--batch-size", "8", "--steps", "2", "--warmup", "1", "--rounds", "1",
            "--out", str(out)]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    try:
        bench_pipeline.main()
    finally:
        torch.set_num_threads(1)
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"bll_1x2", "bp_ddp_2", "2_ranks_pipelined"} <= set(result["samples_per_second"])
    assert result["best_bll_over_bp_ddp"] > 0
    assert "ResNet-18 at width 0.05 in 4 blocks" in out.with_suffix(".md").read_text()


def test_bench_pipeline_reports_every_variant(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    monkeypatch.setattr("sys.argv", ["bench_pipeline.py", "--layers", "2", "--d-model", "8",
                        "--seq-len", "5", "--batch-size", "8", "--steps", "3", "--warmup", "1",
                        "--rounds", "1", "--out", str(out)])  # fmt: skip
    try:
        bench_pipeline.main()
    finally:
        torch.set_num_threads(1)
    result = json.loads(out.with_suffix(".json").read_text())
    assert set(result["samples_per_second"]) == {
        "bll_1_thread", "bll_2_threads", "bp_1_thread", "bp_2_threads",
        "2_ranks_pipelined", "2_ranks_sync", "bll_1x2", "bp_ddp_2",
    }  # fmt: skip
    assert all(v > 0 for v in result["samples_per_second"].values())
    assert len(result["block_seconds_per_step"]) == 2 and 1 <= result["ideal_speedup"] <= 2
    assert set(result["predicted_samples_per_second"]) == {
        "2_ranks_pipelined", "2_ranks_sync", "bll_1x2", "bp_ddp_2"}  # fmt: skip
    assert all(v > 0 for v in result["predicted_over_measured"].values())
    assert set(result["model_extrapolation"]) == {"8", "32"}
    assert "bll_8x4" in result["model_extrapolation"]["32"]
    assert result["model_inputs"]["contention"] > 0  # measured with both ranks busy
    text = out.with_suffix(".md").read_text()
    assert "measured / ideal" in text and "Cost model" in text and "Contention" in text
