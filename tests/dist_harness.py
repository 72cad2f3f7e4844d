"""Run ranks of ``experiments/run.py --distributed`` as forked processes (tests only).

Each rank gets the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1, a free MASTER_PORT), its own log file, and optionally a fault
(raise or SIGKILL at a given training step). Forking skips the ~3 s import per process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot  # noqa: F401 - imported once here, not in every forked rank
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # first use imports torch._dynamo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    exitcode: int | None
    seconds: float  # from launch until the process ended
    log: str


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int  # the rank's step index at which it fails
    kind: str = "raise"  # raise | kill | signal (SIGTERM to itself, then go on)


def _rank_main(rank, world, port, argv, log, fault, extra_env, rank_argv):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **extra_env,
    )
    f = open(log, "w", buffering=1)  # noqa: SIM115 - lives until os._exit
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    sys.stdout = sys.stderr = f
    if os.environ.get("BLL_TEST_FLOAT64"):  # tests: float64 parameters for tight comparisons
        torch.set_default_dtype(torch.float64)
    if fault is not None and fault.rank == rank:
        from pyro_bll.distributed.stage import RankStage

        original = RankStage.update

        def faulty(self, loss):
            if self.steps_done == fault.step:
                if fault.kind == "signal":
                    os.kill(os.getpid(), signal.SIGTERM)
                    return original(self, loss)
                if fault.kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault at step {fault.step}")
            original(self, loss)

        RankStage.update = faulty
    import run

    try:
        code = run.cli([*argv, *rank_argv.get(rank, []), "--distributed"])
    except BaseException as e:  # noqa: BLE001
        print(f"uncaught: {type(e).__name__}: {e}", flush=True)
        code = 3
    f.flush()
    os._exit(code)


def launch(argv, world, logdir, *, fault=None, timeout=60.0, env=None, rank_argv=None):
    """Run ``world`` ranks to the end (or ``timeout``); return one RankResult per rank.

    ``rank_argv`` maps a rank to extra command-line options for that rank only.
    """
    ctx = mp.get_context("fork")
    port = free_port()
    rank_argv = {r: [str(a) for a in v] for r, v in (rank_argv or {}).items()}
    Path(logdir).mkdir(parents=True, exist_ok=True)
    logs = [Path(logdir) / f"rank{r}.log" for r in range(world)]
    t0 = time.monotonic()
    argv = [str(a) for a in argv]
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world, port, argv, str(logs[r]), fault, env or {}, rank_argv),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    ended = [None] * world
    while any(e is None for e in ended) and time.monotonic() - t0 < timeout:
        for r, p in enumerate(procs):
            if ended[r] is None and not p.is_alive():
                ended[r] = time.monotonic() - t0
        time.sleep(0.02)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    return [
        RankResult(r, p.exitcode if ended[r] is not None else None,
                   ended[r] if ended[r] is not None else float("inf"), logs[r].read_text())
        for r, p in enumerate(procs)
    ]  # fmt: skip
