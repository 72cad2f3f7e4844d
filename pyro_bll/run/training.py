"""The training loop: one step owns backward() and the optimiser; epochs write results.

Per epoch the run directory receives a checkpoint (``checkpoints/epoch_NNN.pt``: model,
optimiser, RNG states, history), an updated ``metrics.json`` and ``learning_curve.png``.
Inside an epoch, a signal (SIGINT, SIGTERM) or ``--checkpoint-every N`` writes
``checkpoints/epoch_NNN_step_SSSSSS.pt``, which adds the epoch's progress (``EpochState``)
and the method's state. ``resume`` restores the newest readable checkpoint, RNG states
included, and skips the batches already done in its epoch (the batch order is seeded by
run seed and epoch), so that a resumed run ends with the same metrics and parameters as
an uninterrupted one. Files: ``pyro_bll.run.checkpoints`` (weights-only loads).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from pyro_bll.config import ConfigError
from pyro_bll.core.chain import BLLChain
from pyro_bll.run.build import build_run
from pyro_bll.run.checkpoints import (
    check_links,
    checkpoint_path,
    family_links,
    list_checkpoints,
    load_checkpoint,
    newest_readable,
    prune_mid_epoch,
    rng_state,
    save_atomic,
    set_rng_state,
)
from pyro_bll.run.interrupt import StopSignals, TrainingInterrupted
from pyro_bll.run.options import RunConfig
from pyro_bll.run.progress import Progress
from pyro_bll.run.step import (
    LR_SCHEDULES,
    EpochState,
    TrainingDiverged,
    backward_pass,
    check_finite,
    clip_block_gradients,
    epoch_record,
    step_noise,
)


def make_lr_schedule(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: ``constant`` 1, or ``cosine``
    0.5 * (1 + cos(pi * t / total_steps)), which decays from 1 to 0 over the run."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LR_SCHEDULES[kind](total_steps))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint file in ``out/checkpoints`` by (epoch, step), readable or not."""
    ckpts = list_checkpoints(Path(out) / "checkpoints")
    return ckpts[-1] if ckpts else None


def prepare_out_dir(cfg: RunConfig) -> Path:
    """Create ``cfg.out`` (or fail with a ConfigError) and check ``--resume`` is possible."""
    out = Path(cfg.out)
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"--out {cfg.out!r} cannot be written ({e.strerror}); choose a writable directory"
        ) from None
    existing = latest_checkpoint(out)
    if existing is not None and not (cfg.resume or cfg.overwrite):
        raise ConfigError(
            f"--out {cfg.out!r} already holds a run ({existing.name}); pass --resume to "
            "continue it, --overwrite to start it again, or choose another --out"
        )
    if cfg.resume and existing is None:
        raise ConfigError(
            f"--resume: no checkpoint in {out / 'checkpoints'}; run without --resume first"
        )
    return out


class RunHistory:
    """A run's epoch records and the results written from them (``metrics.json`` and the
    learning curve): the single-process ``Trainer``'s and rank 0's of a block-parallel run."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []

    def elapsed_seconds(self) -> float:
        """Training plus evaluation time of all epochs so far (resumed ones included)."""
        return sum(h["train_seconds"] + h.get("eval_seconds", 0.0) for h in self.history)

    def budget_exhausted(self) -> bool:
        return self.cfg.max_minutes is not None and (
            self.elapsed_seconds() >= 60 * self.cfg.max_minutes
        )

    def metrics(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {"test_accuracy": math.nan}
        return {
            **{k: v for k, v in last.items() if k.startswith(("test_", "val_"))},
            "epochs_done": len(self.history),
            "elapsed_seconds": self.elapsed_seconds(),
            "budget_exhausted": self.budget_exhausted(),  # --max-minutes ended the run
            "seconds_per_epoch": (
                float(np.mean([h["train_seconds"] for h in self.history]))
                if self.history
                else math.nan
            ),
            "config": self.cfg.to_dict(),
            "history": self.history,
        }

    def write_results(self, out: Path) -> None:
        (out / "metrics.json").write_text(json.dumps(self.metrics(), indent=2))
        from pyro_bll.run.plots import plot_learning_curve

        plot_learning_curve(
            self.history,
            out / "learning_curve.png",
            title=f"{self.cfg.task} {self.cfg.method} ({self.cfg.num_blocks} blocks)",
        )


class Trainer(RunHistory):
    """Trains the run ``build_run`` makes of a config, with one Adam over all of it."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.built = build_run(cfg)  # family, task, chain and method, as on every rank
        self.family, self.task, self.method = self.built.family, self.built.task, self.built.method
        self.chain: BLLChain = self.built.chain
        self.device = self.built.device
        # foreach: one kernel per update over all tensors (bit-identical, half the time on a CPU)
        self.optimizer = torch.optim.Adam(self.chain.parameters(), lr=cfg.lr, foreach=True)
        self.scheduler = make_lr_schedule(
            self.optimizer, cfg.lr_schedule, cfg.epochs * self.task.steps_per_epoch()
        )
        self.start_epoch = 0
        self.partial: EpochState | None = None  # a mid-epoch checkpoint's progress
        self.steps_done = 0  # optimiser steps so far; names each step's noise (noise.py)

    @property
    def amp(self) -> bool:
        """bf16 autocast of forward passes and losses (``--amp``; tests switch it on CPU)."""
        return self.built.amp

    @amp.setter
    def amp(self, value: bool) -> None:
        self.built.amp = value

    def autocast(self) -> torch.autocast:
        """bf16 autocast on the run's device with ``--amp``; a no-op context otherwise."""
        return self.built.autocast()

    # ---- one step ----------------------------------------------------------------------
    def step(self, x, y, mask) -> dict[str, torch.Tensor]:
        """One optimiser step; returns per-block values ``[N]`` (``loss`` and its terms).

        ``--backward per-block``: block k's local loss is backpropagated, and its graph
        freed, before block k + 1 runs (``Method.local_losses``), so only one block's
        activations are alive at a time; ``joint``: one backward over the summed loss.
        Both give the same gradients (the blocks' inputs are detached either way).
        """
        noise = step_noise(self.cfg.seed, self.steps_done)
        self.optimizer.zero_grad(set_to_none=True)
        logs = backward_pass(
            self.method, self.chain, x, y, mask, noise,
            per_block=self.cfg.backward == "per-block", autocast=self.autocast,
        )  # fmt: skip
        clip_block_gradients(self.chain, self.cfg.clip_grad, range(self.chain.num_blocks))
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1
        return logs

    # ---- checkpoints -------------------------------------------------------------------
    def save(self, out: Path, epoch: int, partial: EpochState | None = None) -> Path:
        """``epoch_NNN.pt`` after an epoch; with ``partial``, ``epoch_NNN_step_SSSSSS.pt``
        inside it (its EpochState: an exact mid-epoch resume). Both hold the method's state."""
        state: dict[str, Any] = {
            "epoch": epoch,
            "config": self.cfg.to_dict(),
            "model": self.chain.state_dict(),
            "family_links": family_links(self.chain.families),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "rng": rng_state(),
            "steps_done": self.steps_done,
            # what the method holds between steps (BLL's agreement statistics, and the
            # targets in flight of --beta target, which cross epochs)
            "method_state": self.method.state_dict(),
        }
        if partial is not None:
            state["epoch_state"] = partial.to_dict()
        step = None if partial is None else partial.step
        path = save_atomic(state, checkpoint_path(out, epoch, step))
        prune_mid_epoch(path)  # the mid-epoch ones this one supersedes
        return path

    def load(self, path: Path, state: dict[str, Any] | None = None) -> None:
        """Restore a checkpoint (already loaded weights-only as ``state``, or from
        ``path``); a mid-epoch one resumes inside its epoch."""
        if state is None:
            state = load_checkpoint(path, self.device)
        check_links(state, self.chain.families, path)
        self.chain.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = state["history"]
        self.steps_done = state.get("steps_done", 0)
        self.method.load_state_dict(state.get("method_state", {}))  # start_epoch may reset it
        if "epoch_state" in state:
            self.start_epoch = state["epoch"]
            self.partial = EpochState.from_dict(state["epoch"], state["epoch_state"], self.device)
        else:
            self.start_epoch = state["epoch"] + 1
            self.partial = None
        set_rng_state(state["rng"])

    def resume(self, out: Path) -> Path:
        """Load the newest readable checkpoint of ``out``; unreadable newer ones are named
        on stderr and kept. ``CheckpointError`` if none is readable."""
        found = newest_readable(Path(out) / "checkpoints", self.device)
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {Path(out) / 'checkpoints'}")
        for path, reason in found.skipped:  # kept, but out of the way of later resumes
            kept = path.rename(path.with_name(path.name + ".unreadable"))
            print(
                f"warning: {reason}; kept as {kept.name}, resuming from {found.path.name}",
                file=sys.stderr,
                flush=True,
            )
        self.load(found.path, found.state)
        return found.path

    # ---- the loop ----------------------------------------------------------------------
    def fit(self, out: Path, progress: bool = True, handle_signals: bool = True) -> dict[str, Any]:
        """Train the remaining epochs. On SIGINT / SIGTERM (``handle_signals``): finish the
        step, write a mid-epoch checkpoint and raise ``TrainingInterrupted``."""
        cfg = self.cfg
        if cfg.resume:
            self.resume(out)
        else:  # --overwrite: the old run's checkpoints go only once the new run is set up,
            # so that a later --resume cannot pick up one of them
            for stale in list_checkpoints(out / "checkpoints"):
                stale.unlink()
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        pyro.enable_validation(False)  # shape checks cost time in the hot loop
        try:
            with StopSignals(handle_signals) as stop:
                for epoch in range(self.start_epoch, cfg.epochs):
                    if self.budget_exhausted():  # --max-minutes: the last epoch used it up
                        break
                    path = self._epoch(out, epoch, progress, stop)
                    if stop.requested is not None:  # arrived during evaluation or saving
                        raise TrainingInterrupted(stop.requested, path, f"after epoch {epoch + 1}")
        finally:
            pyro.enable_validation(True)
        return self.metrics()

    def _epoch(self, out: Path, epoch: int, progress: bool, stop: StopSignals) -> Path:
        """Train (the rest of) one epoch, evaluate, checkpoint; returns the checkpoint."""
        cfg = self.cfg
        self.chain.train()
        state = self.partial if self.partial and self.partial.epoch == epoch else None
        self.partial = None
        if state is None:
            state = EpochState(epoch)
            self.method.start_epoch()  # a mid-epoch resume restored the method's state
        steps = self.task.steps_per_epoch()
        # the epoch's seeded batch order; the steps done before a resume are skipped
        batches = itertools.islice(self.task.train_batches(epoch), state.step, None)
        bar = Progress(
            batches,
            total=steps,
            initial=state.step,
            desc=f"epoch {epoch + 1}/{cfg.epochs} [{cfg.method}]",
            enabled=progress,
        )
        t0 = time.perf_counter() - state.seconds
        for x, y, mask in bar:
            mask = None if mask is None else mask.to(self.device)
            logs = self.step(x.to(self.device), y.to(self.device), mask)
            per_block = logs["loss"]
            check_finite(per_block, epoch, kept=f" in {out}")
            state.add(logs)
            bar.set_postfix(loss=f"{per_block.sum().item():.3f}")
            every = cfg.checkpoint_every
            if stop.requested is not None or (every and state.step % every == 0):
                state.seconds = time.perf_counter() - t0
                path = self.save(out, epoch, state)
                if stop.requested is not None:
                    raise TrainingInterrupted(
                        stop.requested, path, f"at step {state.step}/{steps} of epoch {epoch + 1}"
                    )
        train_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        with self.autocast():
            metrics = self.task.evaluate(self.chain, self.device)
        eval_time = time.perf_counter() - t1
        record = epoch_record(
            epoch, state.totals, state.step, metrics,
            train_seconds=train_time, eval_seconds=eval_time,
        )  # fmt: skip
        self.history.append(record)
        path = self.save(out, epoch)
        self.write_results(out)
        losses = " ".join(f"{v:.3f}" for v in record["block_losses"])
        shown = "  ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
        print(
            f"epoch {epoch + 1}/{cfg.epochs}  {train_time:.1f}s  block losses [{losses}]  {shown}",
            flush=True,
        )
        return path


def main(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Train and return the final metrics (also written to ``cfg.out``)."""
    trainer = Trainer(cfg)  # data, family and network first: a refused run creates nothing
    out = prepare_out_dir(cfg)
    return trainer.fit(out, progress=progress)


def final_line(metrics: dict[str, Any], out: str) -> str:
    """The last line of a run: its final test (or validation) figures and where they are."""
    shown = ", ".join(
        f"{k} {v:.4f}"
        for k, v in metrics.items()
        if k.startswith(("test_", "val_")) and not math.isnan(v)
    )
    return f"final {shown}; results in {out}"


__all__ = ["RunHistory", "Trainer", "TrainingDiverged", "final_line", "main", "make_lr_schedule"]
