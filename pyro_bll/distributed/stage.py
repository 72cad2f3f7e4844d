"""One rank's blocks as a pipeline stage: their local losses, their optimiser, their state.

Every rank builds the *full* chain from the run seed (``build_run``, as the
single-process ``Trainer`` does: identical initialisation everywhere) and keeps only the
parameters of its own blocks a..b-1 in its Adam. Per micro-batch ``compute`` evaluates
the block-local losses l_a..l_{b-1} through the Pyro model and guide
(``BLL.loss(..., segment=(a, b))``) from the input message, with the step's noise key, so
every block draws the same z_k as in one process (``pyro_bll.core.noise``), and returns
the message for the next rank; ``update`` takes the rank's own optimiser step. Adam is
elementwise, so per-rank optimisers over disjoint parameter sets step exactly like one
optimiser over all of them. With ``--beta lookahead`` and more than one stage,
``start_step`` exchanges the weights the look-ahead copies read with the other stages
(``lookahead_link``) before the step's input is awaited.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pyro_bll.core.step_cache import StepCache
from pyro_bll.distributed import rank_checkpoints as ckpt
from pyro_bll.distributed.group import Layout, owned_parameter_index, owned_state_keys
from pyro_bll.distributed.lookahead_link import LookaheadLink
from pyro_bll.distributed.transport import Message, collective
from pyro_bll.run.build import build_run
from pyro_bll.run.checkpoints import (
    CheckpointError,
    check_links,
    family_links,
    prune_mid_epoch,
    rng_state,
    set_rng_state,
)
from pyro_bll.run.options import RunConfig
from pyro_bll.run.step import check_finite, clip_block_gradients, differentiate, step_noise
from pyro_bll.run.training import RunHistory, make_lr_schedule


class RankStage:
    """Blocks a..b-1 of the chain on one rank, with an Adam over their parameters only.

    With replicas (``Layout``), this rank is replica ``replica`` of stage ``stage``: it
    trains on its shard of every batch (``shard_weights``: its share n_r / n of each
    batch, queued by the runtime) and averages its gradients with the stage's other
    replicas before every optimiser step (``replica_group``, set once the process group
    exists), so that all replicas take the step of the whole batch.
    """

    def __init__(self, cfg: RunConfig, rank: int, layout: Layout, device: str) -> None:
        self.layout = layout
        self.groups = layout.groups
        self.rank, self.world_size = rank, layout.world_size
        self.stage, self.replica = layout.stage_of(rank), layout.replica_of(rank)
        self.segment = self.groups.segment(self.stage)
        self.replica_group: Any = None  # torch.distributed group of the stage's replicas
        self.shard_weights: deque[float] = deque()  # n_r / n of the batches to come
        self._weight = 1.0
        self.cfg = cfg
        # the full chain, seeded as in one process, on this rank's device
        self.built = build_run(cfg if device == cfg.device else cfg.replace(device=device))
        self.chain, self.task, self.method = self.built.chain, self.built.task, self.built.method
        self.device = self.built.device
        self.results = RunHistory(cfg)  # rank 0 writes metrics.json from it
        params = list(self.chain.parameters())
        self.param_index = (
            list(range(len(params)))  # one stage (bp): the whole network, head included
            if layout.stages == 1
            else owned_parameter_index(self.chain, self.segment)
        )
        # this rank's blocks only: nothing here steps another rank's blocks
        self.optimizer = torch.optim.Adam(
            [params[i] for i in self.param_index], lr=cfg.lr, foreach=True
        )  # as in one process (training.Trainer)
        # one optimiser step per training batch, as in one process: the same lr schedule
        self.scheduler = make_lr_schedule(
            self.optimizer, cfg.lr_schedule, cfg.epochs * self.task.steps_per_epoch()
        )
        self.state_keys = owned_state_keys(self.chain, self.segment, self.stage)
        self.first = self.segment[0] == 0
        self.last = self.segment[1] == self.chain.num_blocks
        self.steps_done = 0
        self.epoch = 0
        lookahead = self.chain.lookahead
        self.lookahead_link = (
            LookaheadLink(self.chain, lookahead, layout, rank)
            if lookahead is not None and layout.stages > 1
            else None
        )

    def start_step(self) -> None:
        """Before the step's input is awaited: the look-ahead's exchange of weights
        (``lookahead_link``; nothing without one or off its refresh steps)."""
        if self.lookahead_link is not None:
            self.lookahead_link.exchange(self.steps_done)

    def flush(self) -> None:
        """Wait for this rank's sends of look-ahead weights (at the end of an epoch)."""
        if self.lookahead_link is not None:
            self.lookahead_link.wait_sends()

    def compute(
        self, inp: Any, y: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], Message | None]:
        """Local losses of the segment (summed) and the message for the next rank."""
        link = self.lookahead_link
        if link is not None and link.exchanged != self.steps_done:
            raise RuntimeError(
                f"step {self.steps_done}: the look-ahead weights were not exchanged; the "
                "schedule calls start_step() before compute()"
            )
        cache = StepCache()
        noise = step_noise(self.cfg.seed, self.steps_done)
        with self.built.autocast():  # --amp, as in the single-process step
            if self.method.local:
                loss, logs = self.method.loss(
                    self.chain, inp, y, mask, noise=noise, segment=self.segment, cache=cache
                )
            else:  # bp: one stage holds the whole network
                loss, logs = self.method.loss(self.chain, inp, y, mask, noise=noise)
        if self.shard_weights:  # this replica's share of the batch: logs add up over replicas
            self._weight = self.shard_weights.popleft()
            logs = {k: v * self._weight for k, v in logs.items()}
        a, b = self.segment
        check_finite(logs["loss"][a:b], self.epoch, kept="", first=a)
        return loss, logs, None if self.last else cache.outgoing

    def update(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        differentiate(loss, [p for g in self.optimizer.param_groups for p in g["params"]])
        if self.replica_group is not None:
            self.average_gradients()
        clip_block_gradients(self.chain, self.cfg.clip_grad, range(*self.segment))
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1

    def average_gradients(self) -> None:
        """sum_r (n_r / n) grad_r over the stage's replicas, in one all-reduce.

        Each replica's loss is the mean over its shard, so this is the gradient of the
        mean over the whole batch, which one process computes. Parameters without a
        gradient (the same ones on every replica) are left out, as Adam skips them."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        wire = "cpu" if dist.get_backend(self.replica_group) == "gloo" else grads[0].device
        flat = torch.cat([g.reshape(-1) for g in grads]).to(wire) * self._weight
        collective(
            "averaging gradients with the stage's replicas",
            lambda: dist.all_reduce(flat, group=self.replica_group),
        )
        flat = flat.to(grads[0].device)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---- checkpoints ----------------------------------------------------------------------
    def own_state(self) -> dict[str, Tensor]:
        sd = self.chain.state_dict()
        return {k: sd[k].detach().cpu() for k in self.state_keys}

    def save(
        self,
        out: Path,
        epoch: int,
        history: list[dict[str, Any]],
        partial: dict[str, Any] | None = None,
    ) -> Path:
        """This rank's checkpoint after ``epoch``; with ``partial`` (the epoch's step and
        log sums so far) a mid-epoch one, plus the method's state."""
        extra = {} if partial is None else {
            "epoch_state": partial, "method_state": self.method.state_dict()
        }  # fmt: skip
        step = None if partial is None else partial["step"]
        path = ckpt.save_atomic(
            {
                "format": ckpt.FORMAT,
                "epoch": epoch,
                "rank": self.stage,  # replica 0 of every stage writes: one file per stage
                "world_size": self.layout.stages,
                "rank_blocks": list(self.groups.sizes),
                "segment": list(self.segment),
                "config": self.cfg.to_dict(),
                "model": self.own_state(),
                "family_links": family_links(self.chain.families),
                "param_index": self.param_index,
                "num_params": len(list(self.chain.parameters())),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "steps_done": self.steps_done,
                "rng": rng_state(),
                "history": history,
                **extra,
            },
            ckpt.rank_checkpoint(out, self.stage, epoch, step),
        )
        # the mid-epoch checkpoints this one supersedes; inside an epoch the one before it is
        # kept, since another rank may not have written this one yet when a crash ends the job
        prune_mid_epoch(path, keep=0 if partial is None else 1)
        return path

    def check_state(self, state: dict[str, Any], path: Path) -> str | None:
        """Why this rank cannot continue from checkpoint ``state`` (read from ``path``), or
        None. The runtime gathers every rank's answer before any rank restores."""
        try:
            check_links(state, self.chain.families, path)
        except CheckpointError as e:
            return str(e)
        saved, own = set(state["model"]), set(self.chain.state_dict())
        if saved - own or set(self.state_keys) - saved:
            return f"{path} does not hold the blocks of rank {self.rank}"
        return None

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from this rank's checkpoint ``state``, accepted by ``check_state``."""
        self.chain.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = state["steps_done"]
        set_rng_state(state["rng"])
