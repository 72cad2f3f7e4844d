"""The training loop of one rank of block-parallel BLL: epochs, evaluation, checkpoints.

Every rank holds its blocks as a ``RankStage`` (``stage``) and reads the same batches in
the same order from the task's seeded generator (checked once per epoch by comparing a
hash of the first batch across ranks); ``schedule`` orders the work of an epoch.

At the end of an epoch the ranks send their blocks' state and per-block loss sums to
rank 0, which evaluates the assembled network with the task's ``evaluate`` and writes
``metrics.json`` and ``learning_curve.png`` as a single-process run does; every rank
writes its own checkpoint (``checkpoint``). All decisions that could fail on only some
ranks (output directories, resume point, data check) are all-gathered first, so every
rank raises the same ``ConfigError``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pyro
import torch.distributed as dist

from pyro_bll.config import ConfigError
from pyro_bll.distributed import rank_checkpoints as ckpt
from pyro_bll.distributed.group import Layout
from pyro_bll.distributed.replicas import replica_groups, shard_batches
from pyro_bll.distributed.schedule import SCHEDULES, StageStats, device_batches
from pyro_bll.distributed.stage import RankStage
from pyro_bll.distributed.stop import StopCoordinator
from pyro_bll.distributed.transport import Channel, collective
from pyro_bll.run.checkpoints import (
    END_OF_EPOCH,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
)
from pyro_bll.run.interrupt import StopSignals, TrainingInterrupted
from pyro_bll.run.options import RunConfig
from pyro_bll.run.progress import Progress
from pyro_bll.run.step import epoch_record


def _agree(local_error: str | None) -> None:
    """All-gather each rank's verdict; raise the same ConfigError on every rank if any."""
    errors: list[str | None] = [None] * dist.get_world_size()
    collective("checking the checkpoints", lambda: dist.all_gather_object(errors, local_error))
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise ConfigError(first)


def _batch_hash(batch: tuple | None) -> str:
    if batch is None:
        return "empty"
    h = hashlib.sha1()
    for t in batch:
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RankTrainer:
    """The training loop of one rank (``fit``); rank 0 also evaluates and writes metrics."""

    def __init__(
        self, cfg: RunConfig, rank: int, world_size: int, device: str, backend: str
    ) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.layout = Layout.make(cfg, world_size)
        self.stage = RankStage(cfg, rank, self.layout, device)
        self.channel = Channel(
            rank, world_size, self.stage.device, backend, stages=self.layout.stages
        )
        # replica 0 of every stage writes that stage's checkpoints (rank_<stage>/); every
        # replica reads them (one filesystem, or copies of the rank_<stage>/ directories)
        self.writes = self.stage.replica == 0
        self.schedule = SCHEDULES[cfg.schedule]
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.partial: dict[str, Any] | None = None  # a mid-epoch checkpoint's epoch_state
        self.coordinator = StopCoordinator(None, rank)  # fit() gives it the store

    # ---- setup (collective) -------------------------------------------------------------
    def prepare(self, out: Path, auto_resume: bool = False) -> None:
        """Create the rank's directory and decide where training starts, on all ranks alike.

        ``auto_resume`` (a torchrun restart) resumes from the last complete epoch if there
        is one, as ``--resume`` does.
        """
        # every decision below is taken from the same gathered views on every rank
        views = self._gather_views(out)
        start = self._resume_point(out, views, auto_resume)
        if start is not None:
            self._resume(out, *start)
        elif self.cfg.overwrite and self.writes:
            for p in list_checkpoints(ckpt.rank_dir(out, self.stage.stage)):  # stale ones
                p.unlink()  # would confuse a later resume

    def _local_view(self, out: Path) -> tuple[str | None, list, str | None]:
        """This rank's view of ``out``: why its directory cannot be written (None: it
        can), the (epoch, step) keys of its stage's checkpoints (mid-epoch ones included)
        and, on rank 0, the newest single-process checkpoint's name if no rank has any."""
        cfg, rank, stage = self.cfg, self.rank, self.stage.stage
        error, keys, other = None, [], None
        try:
            if self.writes:
                ckpt.rank_dir(out, stage).mkdir(parents=True, exist_ok=True)
                probe = ckpt.rank_dir(out, stage) / ".write_test"
                probe.write_text("")
                probe.unlink()
            keys = ckpt.rank_keys(out, stage)  # (epoch, step): mid-epoch ones included
            if rank == 0:
                single = sorted((out / "checkpoints").glob("epoch_*.pt"))
                other = single[-1].name if single and not keys else None
        except OSError as e:
            error = f"--out {cfg.out!r} cannot be written on rank {rank} ({e.strerror})"
        return error, keys, other

    def _gather_views(self, out: Path) -> list[Any]:
        """Every rank's ``_local_view``, the same list on all ranks; the first rank's error
        is raised as a ConfigError on every rank."""
        views: list[Any] = [None] * self.world_size
        mine = self._local_view(out)
        collective("listing the checkpoints", lambda: dist.all_gather_object(views, mine))
        first_error = next((v[0] for v in views if v[0] is not None), None)
        if first_error is not None:
            raise ConfigError(first_error)
        return views

    def _resume_point(
        self, out: Path, views: list[Any], auto_resume: bool
    ) -> tuple[int, int] | None:
        """The (epoch, step) to resume from, the newest that every stage's writer has, with
        --resume or ``auto_resume``; None: start afresh. ConfigError for --resume without
        such a checkpoint, and for a run already in ``out`` without --resume or
        --overwrite."""
        cfg = self.cfg
        writers = [self.layout.rank_of(s, 0) for s in range(self.layout.stages)]
        per_rank = [{tuple(k) for k in views[r][1]} for r in writers]
        complete = sorted(set.intersection(*per_rank))
        existing = any(per_rank) or views[0][2] is not None
        resume = cfg.resume or (auto_resume and bool(complete))
        if resume and not complete:
            raise ConfigError(
                f"--resume: no epoch has a checkpoint from all {self.layout.stages} stages in "
                f"{out}/rank_*/; run without --resume first"
            )
        if existing and not (resume or cfg.overwrite):
            found = views[0][2] or "rank checkpoints"
            raise ConfigError(
                f"--out {cfg.out!r} already holds a run ({found}); pass --resume to continue "
                "it, --overwrite to start it again, or choose another --out"
            )
        return complete[-1] if resume else None

    def _resume(self, out: Path, epoch: int, step: int) -> None:
        """Restore the stage, the history and a mid-epoch state from this rank's checkpoint
        of (epoch, step), once every rank found its own usable (``_agree``)."""
        stage = self.stage.stage
        path = ckpt.rank_checkpoint(out, stage, epoch, None if step == END_OF_EPOCH else step)
        state, mismatch = self._read_resume_state(out, path)
        _agree(mismatch)  # one rank's refusal is every rank's (no rank left waiting)
        self.stage.restore(state)
        self.history = state["history"]
        self.partial = state.get("epoch_state")
        self.start_epoch = epoch if self.partial is not None else epoch + 1

    def _read_resume_state(self, out: Path, path: Path) -> tuple[dict[str, Any], str | None]:
        """The checkpoint ``path``, read once (checked here, restored by the stage once every
        rank agrees), and why it cannot be resumed from (None: it can)."""
        mismatch, state = None, {"rank_blocks": list(self.stage.groups.sizes)}
        try:
            state = load_checkpoint(path, self.stage.device)
        except CheckpointError as e:
            mismatch = f"--resume: {e}"
        if mismatch is None and state["rank_blocks"] != list(self.stage.groups.sizes):
            mismatch = (
                f"the checkpoints in {out}/rank_*/ were written with blocks per rank "
                f"{','.join(map(str, state['rank_blocks']))}, this launch has "
                f"{','.join(map(str, self.stage.groups.sizes))}; resume with the same "
                "grouping, or assemble them (experiments/assemble_checkpoint.py) and "
                "resume in one process"
            )
        if mismatch is None:
            mismatch = self.stage.check_state(state, path)
        return state, mismatch

    # ---- the loop -----------------------------------------------------------------------
    def fit(
        self,
        out: Path,
        progress: bool = True,
        auto_resume: bool = False,
        store: dist.Store | None = None,
        handle_signals: bool = True,
    ) -> dict | None:
        """Train all epochs; rank 0 returns the final metrics, the other ranks None.

        SIGINT / SIGTERM on any rank (``store``: the rendezvous store the ranks agree
        through, ``pyro_bll.distributed.stop``) makes every rank finish the same step,
        write a mid-epoch checkpoint and raise ``TrainingInterrupted``.
        """
        out = Path(out)
        self.coordinator.store = store
        replica_groups(self.layout, self.stage)
        with StopSignals(handle_signals) as local:
            self.coordinator.local = local
            return self._fit(out, progress, auto_resume)

    def _fit(self, out: Path, progress: bool, auto_resume: bool) -> dict | None:
        self.prepare(out, auto_resume)
        if self.rank == 0:
            (out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
            print(f"{self.cfg.schedule} schedule, {self.layout}", flush=True)
        if self.stage.lookahead_link is not None:  # every rank logs its own traffic
            print(f"rank {self.rank}: {self.stage.lookahead_link.describe()}", flush=True)
        self.stage.results.history = self.history  # rank 0's: metrics and --max-minutes
        pyro.enable_validation(False)  # shape checks cost time in the hot loop
        trained = None
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                if not self._epoch(out, epoch, progress):
                    break  # --max-minutes: the last epoch used the budget up
                trained = epoch
                if epoch + 1 < self.cfg.epochs and self._stop_requested():
                    raise TrainingInterrupted(
                        self.coordinator.signum,
                        ckpt.rank_checkpoint(out, self.stage.stage, epoch),
                        f"after epoch {epoch + 1}",
                    )
        finally:
            pyro.enable_validation(True)
        if self.rank != 0:
            return None
        if trained is not None and trained in ckpt.complete_epochs(out):
            ckpt.assemble(out, trained)  # all ranks' files are on this filesystem
        return self.stage.results.metrics()

    def _check_same_data(self, epoch: int, first: tuple | None) -> bool:
        """All ranks read the same batches (hash of the first); rank 0 decides whether the
        time budget allows another epoch. Returns whether to train this epoch."""
        views: list[Any] = [None] * self.world_size
        mine = (_batch_hash(None if first is None else first[1:]),
                self.rank == 0 and self.stage.results.budget_exhausted())  # fmt: skip
        collective("checking the data with", lambda: dist.all_gather_object(views, mine))
        hashes = [v[0] for v in views]
        if len(set(hashes)) > 1:  # the same gathered list on every rank: all raise
            raise ConfigError(
                f"the ranks read different training batches in epoch {epoch + 1} (label "
                f"hashes {hashes}); every rank needs the same --seed, task options and data"
            )
        return not views[0][1]

    def _stop_requested(self) -> bool:
        """Whether any rank was asked to stop (all ranks learn it together)."""
        views: list[Any] = [None] * self.world_size
        mine = self.coordinator.requested()
        collective("sharing stop requests", lambda: dist.all_gather_object(views, mine))
        signum = next((v for v in views if v is not None), None)
        self.coordinator.signum = signum
        return signum is not None

    def _epoch(self, out: Path, epoch: int, progress: bool) -> bool:
        """Train (the rest of) one epoch (False: the time budget is used up, nothing done).

        Resumes inside the epoch from ``self.partial``; raises ``TrainingInterrupted``
        after writing a mid-epoch checkpoint when the ranks agreed to stop."""
        stage, cfg = self.stage, self.cfg
        stage.epoch = epoch
        stage.chain.train()
        batches = iter(stage.task.train_batches(epoch))
        first = next(batches, None)
        if not self._check_same_data(epoch, first):
            return False
        partial, self.partial = self.partial, None
        stats = StageStats()
        if partial is None:
            stage.method.start_epoch()
            partial = {"step": 0, "seconds": 0.0}
        else:  # the method's state came with the checkpoint
            stats.sums = {k: v.to(stage.device) for k, v in partial["sums"].items()}
            stats.count, stats.busy, stats.wait = partial["step"], partial["busy"], partial["wait"]
        stream = itertools.chain([first] if first is not None else [], batches)
        stream = itertools.islice(stream, partial["step"], None)  # the steps already done
        stream = self.coordinator.stream(stream, epoch, partial["step"])
        if self.layout.replicas > 1:
            stream = shard_batches(stream, stage)
        stream = device_batches(stream, stage.device, needs_x=stage.first)
        stream = Progress(
            stream,
            total=stage.task.steps_per_epoch(),
            initial=partial["step"],
            desc=f"epoch {epoch + 1}/{cfg.epochs} [{cfg.method}, {cfg.schedule}, rank 0]",
            enabled=progress and self.rank == 0,
        )
        t0 = time.perf_counter() - partial["seconds"]

        def save_mid(s: StageStats) -> Path:
            sums = {k: v.detach().cpu() for k, v in s.sums.items()}
            state = {"step": s.count, "sums": sums, "seconds": time.perf_counter() - t0,
                     "busy": s.busy, "wait": s.wait}  # fmt: skip
            if not self.writes:  # replica 0 of the stage writes it
                return ckpt.rank_checkpoint(out, stage.stage, epoch, s.count)
            return stage.save(out, epoch, self.history if self.rank == 0 else [], state)

        def every_n(s: StageStats) -> None:  # --checkpoint-every N
            if s.count % cfg.checkpoint_every == 0:
                save_mid(s)

        on_step = every_n if cfg.checkpoint_every else None
        stats = self.schedule(stage, self.channel, stream, cfg.pipeline_depth, stats, on_step)
        stage.flush()  # the look-ahead weights sent: every one was received at its step
        if self.coordinator.cut:  # the ranks agreed to stop inside the epoch
            raise TrainingInterrupted(
                self.coordinator.signum,
                save_mid(stats),
                f"at step {stats.count}/{stage.task.steps_per_epoch()} of epoch {epoch + 1}",
            )
        seconds = time.perf_counter() - t0
        self._end_epoch(out, epoch, stats, seconds)
        return True

    def _end_epoch(self, out: Path, epoch: int, stats: StageStats, seconds: float) -> None:
        stage = self.stage
        payload = {
            "state": stage.own_state() if self.writes else {},  # replicas hold the same
            "sums": {k: v.detach().cpu() for k, v in stats.sums.items()},
            "count": stats.count,
            "seconds": seconds,
            "busy": stats.busy,
            "wait": stats.wait,
        }
        link = stage.lookahead_link
        if link is not None:  # what this rank received: bytes per refresh, refreshes
            payload["lookahead"] = (link.received_bytes, link.refreshes)
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        collective(
            "gathering the blocks on rank 0", lambda: dist.gather_object(payload, gathered, dst=0)
        )
        if self.rank == 0:
            self._evaluate_and_log(out, epoch, gathered)
        if self.writes:
            stage.save(out, epoch, self.history if self.rank == 0 else [])

    def _evaluate_and_log(self, out: Path, epoch: int, parts: list[dict[str, Any]]) -> None:
        stage = self.stage
        merged = stage.chain.state_dict()
        for p in parts:
            merged.update(p["state"])
        stage.chain.load_state_dict(merged)  # rank 0 never trains the other ranks' blocks
        t0 = time.perf_counter()
        with stage.built.autocast():
            metrics = stage.task.evaluate(stage.chain, stage.device)
        eval_seconds = time.perf_counter() - t0
        sums = {k: sum(p["sums"][k] for p in parts) for k in parts[0]["sums"]}
        train_seconds = max(p["seconds"] for p in parts)
        traffic = {}
        if "lookahead" in parts[0]:  # the look-ahead's backward traffic (lookahead_link)
            traffic = {
                "rank_lookahead_bytes_per_refresh": [p["lookahead"][0] for p in parts],
                "lookahead_refreshes": parts[0]["lookahead"][1],  # so far, the same on all
            }
        record = epoch_record(
            epoch, sums, parts[0]["count"], metrics,
            train_seconds=train_seconds, eval_seconds=eval_seconds,
            rank_busy_seconds=[p["busy"] for p in parts],
            rank_wait_seconds=[p["wait"] for p in parts], **traffic,
        )  # fmt: skip
        self.history.append(record)
        stage.results.write_results(out)
        losses = " ".join(f"{v:.3f}" for v in record["block_losses"])
        shown = "  ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
        busy = " ".join(f"{p['busy'] / max(train_seconds, 1e-9):.0%}" for p in parts)
        print(
            f"epoch {epoch + 1}/{self.cfg.epochs}  {train_seconds:.1f}s  ranks busy [{busy}]  "
            f"block losses [{losses}]  {shown}",
            flush=True,
        )
