"""Launch glue: ``experiments/run.py --distributed`` under torchrun.

    torchrun --nproc_per_node=K experiments/run.py --task s2s_reverse --layers 4 --distributed
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=JOB experiments/run.py ... --distributed          (on every node)

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT for every worker; ``main`` reads them, checks the options and the block
grouping against the world size, builds this rank's blocks (all before any network
traffic, so bad input fails at once with exit code 2), joins the rendezvous store with
``--dist-timeout`` as deadline, starts the fault monitor and trains.

Backends: ``--dist-backend auto`` is gloo on CPU and NCCL with ``--device cuda`` (rank
on GPU ``LOCAL_RANK``); gloo with CUDA stages messages through host memory, which lets
several ranks share one GPU. CPU ranks get ``max(1, cores // LOCAL_WORLD_SIZE)`` threads
unless ``--threads`` says otherwise.

Exit codes: 0 success; 2 bad input (one ``error:`` line, rank 0 prints it); 1 when a rank
failed: the failed rank prints its error, every other rank prints ``error: rank R failed:
...`` and stops (``fault``); 130 / 143 when SIGINT / SIGTERM reached any rank: every
rank finished the same step and wrote a mid-epoch checkpoint (``stop``), and rank 0 says
how to resume.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from pyro_bll.config import ConfigError
from pyro_bll.distributed.fault import FaultMonitor, connect_store
from pyro_bll.distributed.group import Layout
from pyro_bll.distributed.runtime import RankTrainer
from pyro_bll.distributed.transport import PeerFailure, brief
from pyro_bll.run.interrupt import TrainingInterrupted
from pyro_bll.run.options import RunConfig
from pyro_bll.run.training import TrainingDiverged, final_line

GRACE = 2.0  # seconds a rank waits for a failed neighbour's own report
HEARTBEAT_TIMEOUT = 30.0  # at most this long without a heartbeat means a rank is gone


@dataclass(frozen=True)
class DistEnv:
    """What torchrun (or any env:// launcher) tells a worker."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    restart_count: int
    agent_store: bool  # torchrun's agent hosts the store: every worker is a client

    @classmethod
    def from_environ(cls) -> DistEnv:
        env = os.environ
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ConfigError(
                f"--distributed needs the launcher's {', '.join(missing)}: start it with "
                "torchrun --nproc_per_node=K experiments/run.py ... --distributed"
            )
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            port = int(env["MASTER_PORT"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
            restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
        except ValueError as e:
            raise ConfigError(f"bad torch.distributed environment variable: {e}") from None
        if not 0 <= rank < world:
            raise ConfigError(f"RANK {rank} is outside WORLD_SIZE {world}")
        if not 0 < port < 65536:
            raise ConfigError(
                f"MASTER_PORT {port} cannot be connected to; give torchrun a fixed "
                "--master-port (or --standalone, or --rdzv-endpoint HOST:PORT)"
            )
        return cls(
            rank,
            world,
            local_rank,
            local_world,
            env["MASTER_ADDR"],
            port,
            restarts,
            env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
        )


def select_device(cfg: RunConfig, env: DistEnv) -> tuple[str, str]:
    """(device, backend) of this rank."""
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but no CUDA device is available")
        count = torch.cuda.device_count()
        backend = "nccl" if cfg.dist_backend == "auto" else cfg.dist_backend
        if backend == "nccl" and env.local_world_size > count:
            raise ConfigError(
                f"{env.local_world_size} ranks on this node but {count} GPU(s): NCCL needs one "
                "GPU per rank; start fewer ranks or pass --dist-backend gloo to share GPUs"
            )
        index = env.local_rank % count
        torch.cuda.set_device(index)
        return f"cuda:{index}", backend
    if cfg.dist_backend == "nccl":
        raise ConfigError("--dist-backend nccl needs --device cuda; use gloo on CPU")
    return "cpu", "gloo"


def rendezvous(env: DistEnv, backend: str, timeout: float) -> None:
    """Join the process group; ConfigError naming the endpoint if it cannot be reached."""
    where = f"{env.master_addr}:{env.master_port}"
    hint = (
        "check MASTER_ADDR/MASTER_PORT (torchrun: --master-addr/--master-port or "
        "--rdzv-endpoint), that every node can reach it, and that all ranks were started"
    )
    try:
        store = dist.TCPStore(
            env.master_addr,
            env.master_port,
            env.world_size,
            is_master=env.rank == 0 and not env.agent_store,
            timeout=timedelta(seconds=timeout),
            wait_for_workers=False,
        )
    except (RuntimeError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise ConfigError(
            f"rank {env.rank} cannot reach the rendezvous at {where} within {timeout:g} s "
            f"({reason}); {hint}"
        ) from None
    try:
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"pyro_bll/pg/{env.restart_count}", store),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout),
        )
    except (RuntimeError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise ConfigError(
            f"rank {env.rank}: not all {env.world_size} ranks joined the rendezvous at {where} "
            f"within {timeout:g} s ({reason}); {hint}"
        ) from None


def _default_threads(cfg: RunConfig, env: DistEnv) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif not cfg.device.startswith("cuda"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))


def _build_rank(cfg: RunConfig, env: DistEnv) -> tuple[RankTrainer, str] | None:
    """This rank's trainer and backend, built before any network traffic; None on a rank
    other than 0 when the input is bad (rank 0 raises the same ConfigError, once)."""
    try:
        Layout.make(cfg, env.world_size)  # K stages x R replicas, or a one-line error
        device, backend = select_device(cfg, env)
        _default_threads(cfg, env)
        return RankTrainer(cfg, env.rank, env.world_size, device, backend), backend
    except ConfigError:
        if env.rank == 0:
            raise  # the same error on every rank: rank 0 says it once
        return None


def _start_monitor(cfg: RunConfig, env: DistEnv) -> FaultMonitor:
    """The heartbeat and failure-verdict monitor of this rank, started."""
    monitor = FaultMonitor(
        dist.PrefixStore(  # a torchrun restart must not see the last attempt's verdict
            f"pyro_bll/fault/{env.restart_count}",
            connect_store(env.master_addr, env.master_port, cfg.dist_timeout),
        ),
        env.rank,
        env.world_size,
        min(cfg.dist_timeout, HEARTBEAT_TIMEOUT),
        store_host="the torchrun agent" if env.agent_store else "rank 0",
    )
    monitor.start()
    return monitor


def _stop_store(cfg: RunConfig, env: DistEnv) -> dist.Store:
    """Where a signal on one rank reaches the others (``pyro_bll.distributed.stop``)."""
    return dist.PrefixStore(
        f"pyro_bll/stop/{env.restart_count}",
        connect_store(env.master_addr, env.master_port, cfg.dist_timeout),
    )


def main(cfg: RunConfig, progress: bool = True, resume_hint: str = "") -> int:
    """Train this rank; return the exit code (bad input before training raises ConfigError
    on rank 0; a failure during training ends the process via ``os._exit``; a signal on
    any rank stops every rank with a checkpoint and exit code 128 + signal, rank 0 printing
    one line that ends with ``resume_hint``)."""
    env = DistEnv.from_environ()
    built = _build_rank(cfg, env)
    if built is None:
        return 2
    trainer, backend = built
    rendezvous(env, backend, cfg.dist_timeout)
    hosts_store = env.rank == 0 and not env.agent_store
    monitor = _start_monitor(cfg, env)
    # the store's host lingers after a failure so that the others can read the verdict
    linger = 3 * monitor.interval if hosts_store else 0.0
    me = env.rank
    stop_store = _stop_store(cfg, env)
    try:
        metrics = trainer.fit(
            Path(cfg.out),
            progress=progress and me == 0,
            auto_resume=env.restart_count > 0,
            store=stop_store,
        )
    except TrainingInterrupted as e:  # every rank stopped at the same step, checkpointed
        if me == 0:
            print(f"{e}; {resume_hint or 'relaunch with --resume'}", file=sys.stderr, flush=True)
        _shutdown(monitor, linger)
        return e.exit_code
    except ConfigError as e:  # decided alike on every rank (gathered views)
        if me == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        _shutdown(monitor, linger)
        return 2
    except PeerFailure as e:
        _stop_after_peer_failure(e, me, monitor, linger)
    except BaseException as e:  # noqa: BLE001 - any failure of this rank stops the job
        _stop_after_own_failure(e, me, monitor, linger)
    _shutdown(monitor, linger)
    if me == 0 and metrics is not None:
        print(final_line(metrics, cfg.out), flush=True)
    return 0


def _stop_after_peer_failure(
    e: PeerFailure, me: int, monitor: FaultMonitor, linger: float
) -> NoReturn:
    """A neighbour (or a collective) broke: prefer the failed rank's own report; a
    collective names no peer, then the heartbeats tell who is gone. Ends the process."""
    wait = GRACE if e.peer is not None else monitor.timeout + 2 * monitor.interval
    verdict = monitor.first_failure(wait)
    if verdict is None:
        culprit = me if e.peer is None else e.peer
        verdict = monitor.report(culprit, f"lost (seen by rank {me}: {e})")
    _stop(f"error: {verdict}; rank {me} stops", linger, monitor)


def _stop_after_own_failure(
    e: BaseException, me: int, monitor: FaultMonitor, linger: float
) -> NoReturn:
    """This rank failed: report it to the others and print it (with the traceback of the
    exception being handled, except for a diverged training). Ends the process."""
    monitor.report(me, f"{type(e).__name__}: {e}")
    detail = "" if isinstance(e, TrainingDiverged) else traceback.format_exc()
    _stop(f"{detail}error: rank {me} failed: {type(e).__name__}: {e}", linger, monitor)


def _shutdown(monitor: FaultMonitor, linger: float) -> None:
    """Leave together: nobody stops its monitor (or the store) while others still train."""
    try:
        dist.barrier()
        monitor.stop()
        dist.barrier()
        dist.destroy_process_group()
    except (RuntimeError, OSError) as e:
        verdict = monitor.first_failure(GRACE) or f"the final barrier failed: {brief(e)}"
        _stop(f"error: {verdict}", linger, monitor)


def _stop(message: str, linger: float, monitor: FaultMonitor) -> NoReturn:
    """Print the verdict and end this process now (exit code 1), wherever others are."""
    monitor.silence()  # the verdict is printed once, here
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    time.sleep(linger)
    os._exit(1)
