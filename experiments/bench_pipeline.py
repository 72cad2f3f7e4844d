"""Throughput of K-process pipelined BLL against single-process BLL and backprop.

    flock /tmp/pyro_bll_cpu.lock python experiments/bench_pipeline.py        # 2-core CPU
    python experiments/bench_pipeline.py --device cuda --ranks 4 --layers 8  # one GPU per rank

Same network (the s2s_reverse transformer, ``--layers`` layers in ``--ranks`` blocks of
equal depth, so every rank owns one block) and the same ``--steps`` batches for every
variant; samples per second = steps x batch size / wall time of the timed steps:

* single-process BLL (``Trainer.step``) with 1 thread and with K threads;
* single-process BP on the same network, 1 and K threads;
* K-process BLL, one thread per rank (``pyro_bll.distributed``: ``RankStage``,
  ``Channel`` and the ``pipelined`` schedule training uses; ``sync`` as a reference
  without overlap), timed between two barriers on all ranks.

Block times: each rank's work per step (its local losses, backward and Adam step, from a
precomputed input message) timed alone in this process with 1 thread. Ideal speed-up
over single-process BLL with 1 thread: K x mean / max of the block times; the report
gives measured / ideal. Every variant runs ``--rounds`` times, interleaved, and the best
round counts (the machine may be shared). Writes ``OUT.json`` and ``OUT.md``.

On CUDA every rank uses GPU ``rank`` with NCCL (``--dist-backend gloo`` lets ranks share
one GPU, staging messages through host memory; that measures overhead, not speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import socket
import statistics
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_bll.build import config_for_task
from pyro_bll.config import RunConfig
from pyro_bll.distributed.schedule import SCHEDULES
from pyro_bll.distributed.stage import RankStage
from pyro_bll.distributed.transport import Channel
from pyro_bll.training import Trainer


def _config(args: argparse.Namespace) -> RunConfig:
    return config_for_task(
        "s2s_reverse",
        layers=args.layers,
        blocks=args.ranks,
        d_model=args.d_model,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        train_size=args.steps * args.batch_size * 2,
        test_size=100,  # unused; small, so that short permutations still leave training data
        device=args.device,
        seed=0,
    )


def _batches(task, steps: int, device: torch.device) -> list:
    """``steps`` full batches, the same on every rank (epochs 0, 1, ... of the task)."""
    out: list = []
    for epoch in range(100):
        for x, y, mask in task.train_batches(epoch):
            if y.shape[0] == task.cfg.batch_size and len(out) < steps:
                out.append((x.to(device), y.to(device), mask.to(device)))
        if len(out) == steps:
            return out
    raise SystemExit("error: too few training sequences; use a longer --seq-len")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, batches, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for x, y, mask in batches:
        step(x, y, mask)
    _sync(device)
    return time.perf_counter() - t0


def single_process(cfg: RunConfig, method: str, threads: int, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` training steps of one process with ``threads`` threads."""
    torch.set_num_threads(threads)
    trainer = Trainer(replace(cfg, method=method))
    batches = _batches(trainer.task, steps, trainer.device)
    _time_steps(trainer.step, batches[:warmup], trainer.device)
    return _time_steps(trainer.step, batches, trainer.device)


def block_times(cfg: RunConfig, ranks: int, steps: int, warmup: int) -> list[float]:
    """Seconds per step of each rank's work alone (1 thread), from precomputed inputs."""
    torch.set_num_threads(1)
    stages = [RankStage(cfg, r, ranks, cfg.device) for r in range(ranks)]
    batches = _batches(stages[0].task, steps, stages[0].device)
    inputs = []
    for x, y, mask in batches:  # the message every stage receives, computed once
        row, inp = [], x
        for st in stages:
            row.append(inp)
            _, _, out = st.compute(inp, y, mask)
            inp = None if out is None else out.detach()
        inputs.append(row)
    times = []
    for r, st in enumerate(stages):

        def step(i, st=st, r=r):
            _, y, mask = batches[i]
            loss, _, _ = st.compute(inputs[i][r], y, mask)
            st.update(loss)

        for i in range(warmup):
            step(i)
        _sync(st.device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        _sync(st.device)
        times.append((time.perf_counter() - t0) / steps)
    return times


def _worker(rank, ranks, port, cfg, steps, warmup, backend, commands, results):
    """One rank: build its stage once, then run a timed epoch per command."""
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    device = f"cuda:{rank}" if cfg.device.startswith("cuda") and backend == "nccl" else cfg.device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    store = dist.TCPStore("127.0.0.1", port, ranks, is_master=rank == 0,
                          timeout=timedelta(seconds=600))  # fmt: skip
    dist.init_process_group(backend, store=store, rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=600))  # fmt: skip
    stage = RankStage(cfg, rank, ranks, device)
    channel = Channel(rank, ranks, stage.device, backend)
    batches = _batches(stage.task, steps, stage.device)
    SCHEDULES["pipelined"](stage, channel, batches[:warmup], 2)
    results.put(("ready", rank))
    while (cmd := commands[rank].get()) != "stop":
        dist.barrier()
        _sync(stage.device)
        t0 = time.perf_counter()
        stats = SCHEDULES[cmd](stage, channel, batches, 2)
        _sync(stage.device)
        dist.barrier()
        results.put((rank, cmd, time.perf_counter() - t0, stats.busy, stats.wait))
    dist.destroy_process_group()


def _collect(results, workers, n: int) -> list:
    """``n`` messages from the ranks; stop at once if a rank died."""
    got: list = []
    deadline = time.monotonic() + 900
    while len(got) < n:
        try:
            got.append(results.get(timeout=0.5))
        except queue.Empty:
            dead = [r for r, w in enumerate(workers) if w.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for w in workers:
                    w.kill()
                raise SystemExit(
                    f"error: rank(s) {dead} of the benchmark failed (see above)"
                ) from None
    return got


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ranks", type=int, default=2, help="K: processes = blocks")
    p.add_argument("--layers", type=int, default=4, help="transformer layers (K blocks)")
    p.add_argument("--d-model", type=int, default=128, help="width of the residual stream")
    p.add_argument("--seq-len", type=int, default=10, help="permutation length n (T = 2n)")
    p.add_argument("--batch-size", type=int, default=50, help="micro-batch size")
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (best)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dist-backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="auto: gloo on CPU, NCCL on CUDA")  # fmt: skip
    p.add_argument("--out", default="results/bench_pipeline", help="writes OUT.json, OUT.md")
    args = p.parse_args()
    if args.layers % args.ranks:
        p.error(f"--ranks {args.ranks} must divide --layers {args.layers}")
    cuda = args.device.startswith("cuda")
    backend = ("nccl" if cuda else "gloo") if args.dist_backend == "auto" else args.dist_backend
    if cuda and backend == "nccl" and torch.cuda.device_count() < args.ranks:
        p.error(f"NCCL needs {args.ranks} GPUs, found {torch.cuda.device_count()}; "
                "use --dist-backend gloo to share one")  # fmt: skip
    pyro.enable_validation(False)
    cfg = _config(args)
    k = args.ranks

    # CPU: fork the ranks before this process runs any parallel region (cheap start-up,
    # imports shared); CUDA: spawn, so that no CUDA state is inherited
    if not cuda:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo once
    ctx = mp.get_context("spawn" if cuda else "fork")
    commands = [ctx.Queue() for _ in range(k)]
    results = ctx.Queue()
    port = _free_port()
    workers = [
        ctx.Process(
            target=_worker,
            args=(r, k, port, cfg, args.steps, args.warmup, backend, commands, results),
        )  # fmt: skip
        for r in range(k)
    ]
    for w in workers:
        w.start()
    _collect(results, workers, k)  # no timing while the ranks start up (warm-up)

    seconds: dict[str, list[float]] = {}
    rank_stats: dict[str, list] = {}
    variants = {
        "bll_1_thread": lambda: single_process(cfg, "bll", 1, args.steps, args.warmup),
        f"bll_{k}_threads": lambda: single_process(cfg, "bll", k, args.steps, args.warmup),
        "bp_1_thread": lambda: single_process(cfg, "bp", 1, args.steps, args.warmup),
        f"bp_{k}_threads": lambda: single_process(cfg, "bp", k, args.steps, args.warmup),
    }
    for rnd in range(args.rounds):
        for name, fn in variants.items():
            seconds.setdefault(name, []).append(fn())
        torch.set_num_threads(1)  # idle while the ranks run
        for schedule in ("pipelined", "sync"):
            for q in commands:
                q.put(schedule)
            got = _collect(results, workers, k)
            name = f"{k}_ranks_{schedule}"
            seconds.setdefault(name, []).append(max(g[2] for g in got))
            rank_stats.setdefault(name, []).append(sorted(got))
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
            f"{n} {args.steps * args.batch_size / s[-1]:.0f}/s" for n, s in seconds.items()
        ), flush=True)  # fmt: skip
    for q in commands:
        q.put("stop")
    for w in workers:
        w.join(timeout=60)
    blocks = block_times(cfg, k, args.steps, args.warmup)

    samples = args.steps * args.batch_size
    rate = {n: samples / min(s) for n, s in seconds.items()}
    base = rate["bll_1_thread"]
    ideal = k * statistics.mean(blocks) / max(blocks)
    pipe = rate[f"{k}_ranks_pipelined"]
    best = {n: rank_stats[n][seconds[n].index(min(seconds[n]))] for n in rank_stats}
    result = {
        "samples_per_second": rate,
        "speedup_over_bll_1_thread": {n: r / base for n, r in rate.items()},
        "block_seconds_per_step": blocks,
        "ideal_speedup": ideal,
        "measured_over_ideal": (pipe / base) / ideal,
        "pipelined_over_bll_k_threads": pipe / rate[f"bll_{k}_threads"],
        "rank_busy_fraction": {
            n: [g[3] / g[2] for g in rows] for n, rows in best.items()
        },  # fmt: skip
        "all_rounds_seconds": seconds,
        "config": {**vars(args), "backend": backend, "train_config": cfg.to_dict()},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name(0)}" if cuda else ""),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result, k))
    print(markdown(result, k))


def markdown(r: dict, k: int) -> str:
    c = r["config"]
    lines = [
        f"s2s_reverse transformer, {c['layers']} layers in {k} blocks, d_model {c['d_model']}, "
        f"batch {c['batch_size']} x {2 * c['seq_len']} tokens, {c['steps']} timed steps, "
        f"best of {c['rounds']} rounds; {r['machine']}",
        "",
        "| variant | samples / s | x single-process BLL, 1 thread |",
        "|---|---|---|",
    ]
    for name, rate in r["samples_per_second"].items():
        lines.append(f"| {name} | {rate:.0f} | {r['speedup_over_bll_1_thread'][name]:.2f} |")
    blocks = ", ".join(f"{1e3 * t:.1f}" for t in r["block_seconds_per_step"])
    lines += [
        "",
        f"Block times (ms per step, each rank's work alone, 1 thread): {blocks}; ideal "
        f"speed-up K x mean / max = {r['ideal_speedup']:.2f}; measured / ideal = "
        f"{r['measured_over_ideal']:.2f}; pipelined / single-process BLL with {k} threads = "
        f"{r['pipelined_over_bll_k_threads']:.2f}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
