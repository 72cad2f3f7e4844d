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
  without overlap), timed between two barriers on all ranks;
* on the same K processes and the same global batches: BLL with S stages x R replicas for
  every other factorisation K = S x R (``bll_SxR``: each replica a shard of the batch,
  gradients averaged per stage), and BP data parallel over all K (``bp_ddp_K``: the
  whole network on every rank, gradients averaged; the baseline block-parallel BLL must
  beat).

A cost model (``cost_model``) predicts every distributed variant's samples per second
from quantities measured here: each block's step time alone at the batch sizes the
variants use, one-process BP at the shard size, gloo's all-reduce and
point-to-point time (latency + bytes / bandwidth, fitted on two sizes), and the
contention between busy processes (a one-process BP step on all ranks at once against
the same step alone). ``--refit OUT.json`` recomputes a stored file's predictions. It is compared
with the measurements and evaluated for 8 and 32 workers of the same kind (a model, not
a measurement).

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
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_bll.distributed.group import BlockGroups, Layout
from pyro_bll.distributed.replicas import replica_groups, shard_batches
from pyro_bll.distributed.schedule import SCHEDULES, StageStats
from pyro_bll.distributed.stage import RankStage
from pyro_bll.distributed.transport import Channel
from pyro_bll.run.build import config_for_task
from pyro_bll.run.options import RunConfig
from pyro_bll.run.training import Trainer


def _config(args: argparse.Namespace) -> RunConfig:
    # test_size: unused; small, so that short permutations still leave training data
    common = dict(batch_size=args.batch_size, test_size=100, device=args.device, seed=0)
    if args.task == "fashion_mnist":  # the ResNet-18 in 4 blocks; stages group them evenly
        return config_for_task(
            "fashion_mnist", width=args.width, blocks=args.blocks, data_dir=args.data_dir,
            train_size=args.steps * args.batch_size, **common,
        )  # fmt: skip
    return config_for_task(
        "s2s_reverse", layers=args.layers, blocks=args.ranks, d_model=args.d_model,
        seq_len=args.seq_len, train_size=args.steps * args.batch_size * 2, **common,
    )  # fmt: skip


def _batches(task, steps: int, device: torch.device) -> list:
    """``steps`` full batches, the same on every rank (epochs 0, 1, ... of the task)."""
    out: list = []
    for epoch in range(100):
        for x, y, mask in task.train_batches(epoch):
            if y.shape[0] == task.cfg.batch_size and len(out) < steps:
                out.append((x.to(device), y.to(device), None if mask is None else mask.to(device)))
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
    trainer = Trainer(cfg.replace(method=method, backward=None))
    batches = _batches(trainer.task, steps, trainer.device)
    _time_steps(trainer.step, batches[:warmup], trainer.device)
    return _time_steps(trainer.step, batches, trainer.device)


def block_times(
    cfg: RunConfig,
    ranks: int,
    steps: int,
    warmup: int,
    batch: int | None = None,
    forward: list[float] | None = None,
) -> list[float]:
    """Seconds per step of each block's work alone (1 thread), from precomputed inputs,
    on the first ``batch`` examples of every batch (default: all); ``forward`` receives
    the seconds of each block's forward part alone (no gradient, no update)."""
    torch.set_num_threads(1)
    layout = Layout(BlockGroups.make(cfg.num_blocks, ranks), 1)
    stages = [RankStage(ranks_config(cfg), r, layout, cfg.device) for r in range(ranks)]
    batches = _batches(stages[0].task, steps, stages[0].device)
    if batch is not None:
        batches = [_head(b, batch) for b in batches]
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
    if forward is not None:  # the forward part alone (local losses and message, no update)
        for r, st in enumerate(stages):
            t0 = time.perf_counter()
            for i in range(steps):
                with torch.no_grad():
                    st.compute(inputs[i][r], batches[i][1], batches[i][2])
            forward.append((time.perf_counter() - t0) / steps)
    return times


def bp_time(cfg: RunConfig, steps: int, warmup: int, batch: int) -> float:
    """Seconds per one-process BP step (1 thread) on the first ``batch`` examples."""
    torch.set_num_threads(1)
    trainer = Trainer(cfg.replace(method="bp", backward=None))
    batches = [_head(b, batch) for b in _batches(trainer.task, steps, trainer.device)]
    _time_steps(trainer.step, batches[:warmup], trainer.device)
    return _time_steps(trainer.step, batches, trainer.device) / steps


def _head(batch: tuple, n: int) -> tuple:
    return tuple(None if t is None else t[:n] for t in batch)


def network_sizes(cfg: RunConfig, ranks: int) -> dict[str, list[int] | int]:
    """Gradient bytes of every rank's blocks (one rank per stage) and of the whole chain,
    and the bytes of one example's message from the first rank."""
    layout = Layout(BlockGroups.make(cfg.num_blocks, ranks), 1)
    stage = RankStage(ranks_config(cfg), 0, layout, "cpu")
    chain = stage.chain
    per_rank = [
        4
        * sum(
            p.numel() for k in range(*layout.groups.segment(r)) for p in chain.block_parameters(k)
        )
        for r in range(ranks)
    ]
    x, y, mask = _head(_batches(stage.task, 1, torch.device("cpu"))[0], 1)
    _, _, out = stage.compute(x, y, mask)
    message = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))
    return {"block_grad_bytes": per_rank, "all_grad_bytes": 4 * sum(
        p.numel() for p in chain.parameters()), "message_bytes_per_example": message}  # fmt: skip


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Intercept and slope of the line through two points."""
    slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    return max(ys[0] - slope * xs[0], 0.0), max(slope, 0.0)


@dataclass
class _Costs:
    """The fitted costs ``cost_model`` combines, for P groups of blocks (seconds).

    ``groups[j]``: intercept and slope in the batch of group j's step c_j(b);
    ``grads[j]``: its gradient bytes; ``forwards[j]``: its forward part f_j at the
    predicted batch; ``bp``: intercept and slope of one group's share of a one-process BP
    step c_bp(b); ``latency`` and ``inv_bandwidth``: of one ring all-reduce hop;
    ``p2p``: intercept and slope in bytes of one message; ``message``: the message's bytes
    per example; ``slow``: the contention factor every compute time is multiplied by.
    """

    groups: list[tuple[float, float]]
    grads: list[float]
    forwards: list[float]
    bp: tuple[float, float]
    latency: float
    inv_bandwidth: float
    p2p: tuple[float, float]
    message: float
    slow: float

    def allreduce(self, n_bytes: float, r: int) -> float:
        """a_R(n) = 2 (R - 1) latency + 2 (R - 1) / R n / bandwidth; 0 for R = 1."""
        if r == 1:
            return 0.0
        return 2 * (r - 1) * self.latency + 2 * (r - 1) / r * n_bytes * self.inv_bandwidth

    def group(self, j: int, b: float) -> float:
        """Group j's step at batch b on a busy process: slow c_j(b)."""
        return self.slow * (self.groups[j][0] + self.groups[j][1] * b)

    def send(self, b: float) -> float:
        """p(message(b)): one message of b examples to the next stage."""
        return self.p2p[0] + self.p2p[1] * self.message * b

    def bp_step(self, batch: int, replicas: int) -> float:
        """BP data parallel: slow P c_bp(B / R) + a_R(all grads), with R = P replicas."""
        b = batch / replicas
        p_ = len(self.groups)
        return self.slow * p_ * (self.bp[0] + self.bp[1] * b) + self.allreduce(
            sum(self.grads), replicas
        )

    def bll_step(self, batch: int, stages: int, replicas: int, schedule: str) -> float:
        """BLL S x R: stage s owns P / S consecutive groups G_s, each at B / R examples;
        the pipelined step takes the slowest stage and one message, the sync step the
        longest chain of forwards and messages before a stage and that stage's step."""
        b = batch / replicas
        per = len(self.groups) // stages
        owned = [range(s * per, (s + 1) * per) for s in range(stages)]
        stage = [sum(self.group(j, b) for j in g)
                 + self.allreduce(sum(self.grads[j] for j in g), replicas)
                 for g in owned]  # fmt: skip
        send = self.send(b) if stages > 1 else 0.0
        if schedule == "sync":
            return max(
                self.slow * sum(self.forwards[:s]) + s * send + stage[s] for s in range(stages)
            )
        return max(stage) + send


def _group_fits(m: dict, k: int, batch: int, p_: int) -> tuple[list, list, list]:
    """Per group j of ``p_``: the line c_j(b) through the measured batch sizes, gradient
    bytes and forward seconds f_j at ``batch``; for ``p_`` != ``k`` every group is the
    mean of the ``k`` measured ones."""
    blk = m["block_seconds_by_batch"]
    sizes = sorted(int(b) for b in blk)
    fits = [_fit(sizes, [blk[str(b)][j] for b in sizes]) for j in range(k)]
    mean_fit = _fit(sizes, [statistics.mean(blk[str(b)]) for b in sizes])
    grad_bytes = m["sizes"]["block_grad_bytes"]
    fwd_scale = batch / max(sizes)  # forwards were measured at the largest batch
    if p_ == k:  # the measured groups, each with its own cost
        return fits, list(grad_bytes), [f * fwd_scale for f in m["forward_seconds"]]
    fwds = [statistics.mean(m["forward_seconds"]) * fwd_scale] * p_
    return [mean_fit] * p_, [statistics.mean(grad_bytes)] * p_, fwds


def _fitted_costs(m: dict, k: int, batch: int, p_: int) -> _Costs:
    """``_Costs`` of ``p_`` groups from the measurements ``m`` of ``k`` ranks: the ring
    all-reduce fit T(n) = 2 (k - 1) latency + 2 (k - 1) / k n / bandwidth gives latency
    and 1 / bandwidth; one-process BP is shared evenly by the k groups."""
    groups, grads, fwds = _group_fits(m, k, batch, p_)
    bp_sizes = sorted(int(b) for b in m["bp_seconds_by_batch"])
    bp = _fit(bp_sizes, [m["bp_seconds_by_batch"][str(b)] / k for b in bp_sizes])
    comm = m["comm"]
    ar0, ar1 = _fit(comm["bytes"], comm["allreduce"])
    return _Costs(
        groups=groups,
        grads=grads,
        forwards=fwds,
        bp=bp,
        latency=ar0 / (2 * (k - 1)) if k > 1 else 0.0,
        inv_bandwidth=ar1 * k / (2 * (k - 1)) if k > 1 else 0.0,
        p2p=_fit(comm["bytes"], comm["p2p"]),
        message=m["sizes"]["message_bytes_per_example"],
        slow=m.get("contention", 1.0),  # compute on busy processes / alone (1: not measured)
    )


def cost_model(m: dict, k: int, batch: int, workers: int | None = None) -> dict[str, float]:
    """Predicted samples per second of every variant (``variant_specs``) for ``workers``
    processes (default k, the measured setting).

    The network is cut into P = ``workers`` groups of blocks. At P = k these are the k
    measured groups, each with its own cost; for other P (extrapolation) every group
    costs what the measured ones cost on average. With c_j(b) group j's step at batch b
    (fitted linear in b from the measured batch sizes), f_j its forward part alone,
    a_R(n) the ring all-reduce of n bytes over R ranks (2 (R - 1) latency + 2 (R - 1) / R
    n / bandwidth, fitted on the measured k-rank all-reduce), p(n) one message of n bytes,
    and stage s of an S x R layout holding P / S consecutive groups G_s (every compute
    time is multiplied by the measured ``contention``: the slow-down of a one-process BP
    step when all k processes run one at once, as they do in every variant):

        BLL S x R, pipelined:  max over stages s of [sum_{j in G_s} c_j(B / R)
                               + a_R(grads(G_s))] + p(message(B / R))   (p = 0 if S = 1)
        BLL K x 1, sync:       max over stages s of [sum_{j < s} (f_j(B) + p(message(B)))
                               + c_s(B)]: a stage sends before its backward, so stage s
                               starts once the forwards before it are done, and the
                               step ends when the slowest of these chains does
        BP data parallel:      P c_bp(B / P) + a_P(all grads), c_bp per group
    """
    p_ = workers or k
    costs = _fitted_costs(m, k, batch, p_)
    out = {}
    for name, (method, stages, replicas, schedule) in variant_specs(p_).items():
        if method == "bp":
            out[name] = batch / costs.bp_step(batch, replicas)
        else:
            out[name] = batch / costs.bll_step(batch, stages, replicas, schedule)
    return out


def factorisations(k: int) -> list[tuple[int, int]]:
    """(stages, replicas) with stages x replicas = k, most stages first."""
    return [(k // r, r) for r in range(1, k + 1) if k % r == 0]


def variant_specs(k: int) -> dict[str, tuple[str, int, int, str]]:
    """name -> (method, stages, replicas, schedule) of the K-process variants."""
    specs = {f"{k}_ranks_pipelined": ("bll", k, 1, "pipelined"),
             f"{k}_ranks_sync": ("bll", k, 1, "sync")}  # fmt: skip
    for stages, replicas in factorisations(k):
        if replicas > 1:
            specs[f"bll_{stages}x{replicas}"] = ("bll", stages, replicas, "pipelined")
    specs[f"bp_ddp_{k}"] = ("bp", 1, k, "sync")
    return specs


def ranks_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the label feedback (``--beta label``): the K-process variants and
    the block timings of the cost model train BLL with it, since the model has no term
    for the look-ahead's weight traffic between ranks (``lookahead_link``)."""
    return cfg.replace(beta="label")


def _variant_config(cfg: RunConfig, method: str, stages: int, replicas: int) -> RunConfig:
    """The network of ``cfg`` (K blocks) as ``stages`` stages of even block counts."""
    blocks = cfg.num_blocks
    sizes = [blocks // stages + (i < blocks % stages) for i in range(stages)]
    base = ranks_config(cfg) if method == "bll" else cfg
    return base.replace(distributed=True, method=method, replicas=replicas, backward=None,
                        rank_blocks=None if method == "bp" else sizes)  # fmt: skip


def _comm_times(rank: int, k: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of a gloo all-reduce over all k ranks and of a send from rank 0 to rank 1,
    for two sizes (the model fits latency + bytes / bandwidth)."""
    out: dict[str, list[float]] = {"bytes": [], "allreduce": [], "p2p": []}
    for numel in (1 << 10, 1 << 20):
        buf = torch.zeros(numel)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(buf)
        out["allreduce"].append((time.perf_counter() - t0) / 10)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(10):
            if rank == 0:
                dist.send(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
        dist.barrier()
        out["p2p"].append((time.perf_counter() - t0) / 10)
        out["bytes"].append(4 * numel)
    return out


# the worker command that measures how much k busy processes slow each other down
CONTENTION = "contention"


def _worker(rank, ranks, port, cfg, steps, warmup, backend, commands, results):
    """One rank: build every variant's stage once, then run a timed epoch per command."""
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    device = f"cuda:{rank}" if cfg.device.startswith("cuda") and backend == "nccl" else cfg.device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    store = dist.TCPStore("127.0.0.1", port, ranks, is_master=rank == 0,
                          timeout=timedelta(seconds=600))  # fmt: skip
    dist.init_process_group(backend, store=store, rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=600))  # fmt: skip
    setups = {}
    for name, (method, stages, replicas, schedule) in variant_specs(ranks).items():
        vcfg = _variant_config(cfg, method, stages, replicas)
        layout = Layout.make(vcfg, ranks)
        stage = RankStage(vcfg, rank, layout, device)
        replica_groups(layout, stage)
        channel = Channel(rank, ranks, stage.device, backend, stages=layout.stages)
        setups[name] = (stage, channel, schedule)
    batches = _batches(setups[f"{ranks}_ranks_pipelined"][0].task, steps, torch.device(device))

    def run(name: str, part: list) -> StageStats:
        stage, channel, schedule = setups[name]
        stream = shard_batches(part, stage) if stage.layout.replicas > 1 else part
        return SCHEDULES[schedule](stage, channel, stream, 2)

    for name in setups:
        run(name, batches[:warmup])
    comm = _comm_times(rank, ranks, torch.device(device))
    results.put(("ready", rank, comm))
    while (cmd := commands[rank].get()) != "stop":
        if cmd == CONTENTION:  # one-process BP steps on every rank at once, no messages
            dist.barrier()
            seconds = bp_time(cfg.replace(device=device), steps, warmup, cfg.batch_size)
            dist.barrier()
            results.put((rank, cmd, seconds, 0.0, 0.0))
            continue
        dist.barrier()
        _sync(torch.device(device))
        t0 = time.perf_counter()
        stats = run(cmd, batches)
        _sync(torch.device(device))
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ranks", type=int, default=2, help="K: processes (s2s: = blocks)")
    p.add_argument("--task", choices=["s2s_reverse", "fashion_mnist"], default="s2s_reverse",
                   help="the transformer, or ResNet-18 on Fashion-MNIST")  # fmt: skip
    p.add_argument("--width", type=float, default=0.125, help="fashion_mnist: ResNet width")
    p.add_argument("--blocks", type=int, default=4, help="fashion_mnist: ResNet blocks")
    p.add_argument("--data-dir", default=None, help="fashion_mnist: idx files (default: "
                   "the Debian package's directory)")  # fmt: skip
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
    p.add_argument("--refit", metavar="JSON", default=None,
                   help="measure nothing: recompute the cost model's predictions from the "
                   "inputs and rates stored in JSON (an earlier OUT.json) and rewrite it "
                   "and its .md")  # fmt: skip
    return p


def _checked_backend(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The process-group backend of ``args``, after checking that K ranks can run them
    (exits through ``p.error`` if not)."""
    if args.task == "s2s_reverse" and args.layers % args.ranks:
        p.error(f"--ranks {args.ranks} must divide --layers {args.layers}")
    if args.task == "fashion_mnist" and args.blocks % args.ranks:
        p.error(f"--ranks {args.ranks} must divide --blocks {args.blocks}")
    cuda = args.device.startswith("cuda")
    backend = ("nccl" if cuda else "gloo") if args.dist_backend == "auto" else args.dist_backend
    if cuda and backend == "nccl" and torch.cuda.device_count() < args.ranks:
        p.error(f"NCCL needs {args.ranks} GPUs, found {torch.cuda.device_count()}; "
                "use --dist-backend gloo to share one")  # fmt: skip
    return backend


class _Ranks:
    """The K worker processes (``_worker``), one command queue each and one result queue."""

    def __init__(self, cfg: RunConfig, args: argparse.Namespace, backend: str) -> None:
        """Start the ranks and wait until all are warm; ``comm`` holds rank 0's
        communication times (``_comm_times``)."""
        cuda = args.device.startswith("cuda")
        k = args.ranks
        # CPU: fork the ranks before this process runs any parallel region (cheap start-up,
        # imports shared); CUDA: spawn, so that no CUDA state is inherited
        if not cuda:
            torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo once
        ctx = mp.get_context("spawn" if cuda else "fork")
        self.commands = [ctx.Queue() for _ in range(k)]
        self.results = ctx.Queue()
        port = _free_port()
        job = (k, port, cfg, args.steps, args.warmup, backend, self.commands, self.results)
        self.workers = [ctx.Process(target=_worker, args=(r, *job)) for r in range(k)]
        for w in self.workers:
            w.start()
        ready = self.collect()  # no timing while the ranks start up (warm-up)
        self.comm = next(g[2] for g in ready if g[1] == 0)

    def run(self, cmd: str) -> list:
        """Send ``cmd`` to every rank; the K answers."""
        for q in self.commands:
            q.put(cmd)
        return self.collect()

    def collect(self) -> list:
        """One answer from every rank (``_collect``)."""
        return _collect(self.results, self.workers, len(self.workers))

    def stop(self) -> None:
        for q in self.commands:
            q.put("stop")
        for w in self.workers:
            w.join(timeout=60)


def _timed_rounds(
    cfg: RunConfig, args: argparse.Namespace, ranks: _Ranks
) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Seconds of every variant per round (single-process ones here, the K-process ones
    the slowest rank's), and each K-process variant's per-rank answers per round."""
    k = args.ranks
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
        for name in variant_specs(k):
            got = ranks.run(name)
            seconds.setdefault(name, []).append(max(g[2] for g in got))
            rank_stats.setdefault(name, []).append(sorted(got))
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
            f"{n} {args.steps * args.batch_size / s[-1]:.0f}/s" for n, s in seconds.items()
        ), flush=True)  # fmt: skip
    return seconds, rank_stats


def _model_inputs(cfg: RunConfig, args: argparse.Namespace, comm: dict, contended: float) -> dict:
    """What ``cost_model`` reads, measured in this process with 1 thread: block and BP
    step times at every shard size, forward times, ``comm`` and the network's sizes, and
    the contention (``contended`` BP seconds on K busy ranks / the same step alone)."""
    k = args.ranks
    forward: list[float] = []
    blocks = block_times(cfg, k, args.steps, args.warmup, forward=forward)
    shard_sizes = sorted({args.batch_size // r for _, r in factorisations(k)} | {args.batch_size})
    if len(shard_sizes) == 1:  # one rank: a second size for the per-example fit
        shard_sizes = [max(1, args.batch_size // 2), args.batch_size]
    measured = {
        "block_seconds_by_batch": {
            str(b): blocks
            if b == args.batch_size
            else block_times(cfg, k, args.steps, args.warmup, b)
            for b in shard_sizes
        },  # fmt: skip
        "bp_seconds_by_batch": {
            str(b): bp_time(cfg, args.steps, args.warmup, b) for b in shard_sizes
        },
        "forward_seconds": forward,
        "comm": comm,
        "sizes": network_sizes(cfg, k),
    }
    # compute on k busy processes against one process alone (shared caches and memory
    # bandwidth of the cores; with one GPU per rank it should come out near 1)
    alone = measured["bp_seconds_by_batch"].get(str(args.batch_size)) or bp_time(
        cfg, args.steps, args.warmup, args.batch_size
    )
    measured["contention"] = contended / alone
    return measured


def _best_bll_over_bp_ddp(rate: dict[str, float], k: int) -> float:
    """The fastest K-process BLL variant's samples per second over BP data parallel's."""
    return (
        max(
            r
            for n, r in rate.items()
            if n.startswith(("bll_", f"{k}_ranks_pipelined"))
            and n != "bll_1_thread"
            and not n.startswith(f"bll_{k}_threads")
        )
        / rate[f"bp_ddp_{k}"]
    )


def _result(
    args: argparse.Namespace,
    cfg: RunConfig,
    backend: str,
    measured: dict,
    seconds: dict[str, list[float]],
    rank_stats: dict[str, list],
) -> dict:
    """The contents of OUT.json: rates of the best rounds, speed-ups, the cost model's
    predictions and its inputs, and the settings."""
    k = args.ranks
    blocks = measured["block_seconds_by_batch"][str(args.batch_size)]  # at the full batch
    samples = args.steps * args.batch_size
    rate = {n: samples / min(s) for n, s in seconds.items()}
    base = rate["bll_1_thread"]
    ideal = k * statistics.mean(blocks) / max(blocks)
    pipe = rate[f"{k}_ranks_pipelined"]
    best = {n: rank_stats[n][seconds[n].index(min(seconds[n]))] for n in rank_stats}
    predicted = cost_model(measured, k, args.batch_size)
    return {
        "model_inputs": measured,
        "predicted_samples_per_second": predicted,
        "predicted_over_measured": {n: predicted[n] / rate[n] for n in predicted},
        "model_extrapolation": {
            str(p_): cost_model(measured, k, args.batch_size, workers=p_) for p_ in (8, 32)
        },
        "best_bll_over_bp_ddp": _best_bll_over_bp_ddp(rate, k),
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
        "machine": _machine(args.device.startswith("cuda")),
    }


def _machine(cuda: bool) -> str:
    """Processor, cores, torch version and (on CUDA) the GPU, for the report."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name(0)}" if cuda else "")
    )


def main() -> None:
    p = _parser()
    args = p.parse_args()
    if args.refit is not None:
        refit(Path(args.refit))
        return
    backend = _checked_backend(p, args)
    pyro.enable_validation(False)
    cfg = _config(args)
    ranks = _Ranks(cfg, args, backend)
    seconds, rank_stats = _timed_rounds(cfg, args, ranks)
    # the same BP step on every rank at once (cores shared)
    contended = statistics.mean(g[2] for g in ranks.run(CONTENTION))
    ranks.stop()
    measured = _model_inputs(cfg, args, ranks.comm, contended)
    result = _result(args, cfg, backend, measured, seconds, rank_stats)
    k = args.ranks
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result, k))
    print(markdown(result, k))


def refit(path: Path) -> None:
    """Recompute the model's predictions in an earlier result file (same measurements)."""
    problem = None
    if not path.is_file():
        problem = "does not exist; pass an OUT.json of this script"
    else:
        try:
            r = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            r, problem = {}, f"is not JSON ({e}); pass an OUT.json of this script"
        if problem is None and "model_inputs" not in r:
            problem = "holds no model_inputs (written before the cost model); rerun the benchmark"
    if problem is not None:
        print(f"--refit: {path} {problem}", file=sys.stderr)
        raise SystemExit(2)
    k, batch = r["config"]["ranks"], r["config"]["batch_size"]
    predicted = cost_model(r["model_inputs"], k, batch)
    rate = r["samples_per_second"]
    r["predicted_samples_per_second"] = predicted
    r["predicted_over_measured"] = {n: predicted[n] / rate[n] for n in predicted}
    r["model_extrapolation"] = {
        str(p_): cost_model(r["model_inputs"], k, batch, workers=p_) for p_ in (8, 32)
    }
    path.write_text(json.dumps(r, indent=2))
    path.with_suffix(".md").write_text(markdown(r, k))
    print(markdown(r, k))


def markdown(r: dict, k: int) -> str:
    c = r["config"]
    network = (
        f"ResNet-18 at width {c['width']} in {c['blocks']} blocks on Fashion-MNIST, batch "
        f"{c['batch_size']} images"
        if c.get("task") == "fashion_mnist"
        else f"s2s_reverse transformer, {c['layers']} layers in {k} blocks, d_model "
        f"{c['d_model']}, batch {c['batch_size']} x {2 * c['seq_len']} tokens"
    )
    lines = [
        f"{network}, {k} processes, {c['steps']} timed steps, best of {c['rounds']} rounds; "
        f"{r['machine']}",
        "",
        "| variant | samples / s | x single-process BLL, 1 thread |",
        "|---|---|---|",
    ]
    for name, rate in r["samples_per_second"].items():
        lines.append(f"| {name} | {rate:.0f} | {r['speedup_over_bll_1_thread'][name]:.2f} |")
    lines += [
        "",
        "Cost model (predicted samples / s, and predicted / measured):",
        "",
        "| variant | measured | predicted | predicted / measured |",
        "|---|---|---|---|",
    ]
    for name, pred in r["predicted_samples_per_second"].items():
        lines.append(f"| {name} | {r['samples_per_second'][name]:.0f} | {pred:.0f} | "
                     f"{r['predicted_over_measured'][name]:.2f} |")  # fmt: skip
    lines += ["", "Model for P workers like these, a network of P such blocks (not measured):",
              "", "| P | " + " | ".join(["best BLL S x R", "samples / s", "BP data parallel",
              "BLL / BP"]) + " |", "|---|---|---|---|---|"]  # fmt: skip
    for p_, preds in r["model_extrapolation"].items():
        bp = preds[f"bp_ddp_{p_}"]
        name, best = max(((n, v) for n, v in preds.items() if not n.startswith("bp_")),
                         key=lambda t: t[1])  # fmt: skip
        lines.append(f"| {p_} | {name} | {best:.0f} | {bp:.0f} | {best / bp:.2f} |")
    blocks = ", ".join(f"{1e3 * t:.1f}" for t in r["block_seconds_per_step"])
    lines += [
        "",
        f"Block times (ms per step, each rank's work alone, 1 thread): {blocks}; ideal "
        f"speed-up K x mean / max = {r['ideal_speedup']:.2f}; measured / ideal = "
        f"{r['measured_over_ideal']:.2f}; pipelined / single-process BLL with {k} threads = "
        f"{r['pipelined_over_bll_k_threads']:.2f}.",
        "",
    ]
    if "contention" in r["model_inputs"]:
        lines[-1:-1] = [
            "",
            f"Contention: a one-process BP step takes {r['model_inputs']['contention']:.2f}x "
            f"as long while all {k} processes run one as alone (the model scales compute by it).",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
