"""Per-rank checkpoints, and their assembly into one single-process checkpoint.

Each rank writes ``RUN/rank_<R>/epoch_<NNN>.pt`` after every epoch: the state-dict
entries of its own blocks, its optimiser (Adam over its own parameters only), its step
count and RNG states, and which blocks it owns; rank 0 adds the metrics history. An
epoch is *complete* when every rank of the run has written it; a restarted job resumes
from the last complete epoch.

``assemble`` merges the ranks of one epoch into ``RUN/checkpoints/epoch_<NNN>.pt`` in the
format ``pyro_bll.run.training.Trainer`` writes and loads: the full model state, one Adam
state over ``list(chain.parameters())`` (Adam is elementwise, so the union of the
per-rank states is exactly the state a single optimiser over all parameters would have),
the history, rank 0's RNG state and the step count. A single-process run resumes from
it (``--resume``) and the diagnostics load it like any other checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pyro_bll.config import ConfigError
from pyro_bll.run.checkpoints import (
    END_OF_EPOCH,
    checkpoint_key,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    save_atomic,
)

FORMAT = "pyro_bll.rank_checkpoint/1"


def rank_dir(out: Path, rank: int) -> Path:
    return Path(out) / f"rank_{rank}"


def rank_checkpoint(out: Path, rank: int, epoch: int, step: int | None = None) -> Path:
    """``rank_<R>/`` + ``pyro_bll.run.checkpoints.checkpoint_name``."""
    return rank_dir(out, rank) / checkpoint_name(epoch, step)


def rank_epochs(out: Path, rank: int) -> list[int]:
    """Epochs (0-based) for which rank ``rank`` has an end-of-epoch checkpoint in ``out``."""
    return [epoch for epoch, step in rank_keys(out, rank) if step == END_OF_EPOCH]


def rank_keys(out: Path, rank: int) -> list[tuple[int, int]]:
    """(epoch, step) of every checkpoint of rank ``rank``, mid-epoch ones included
    (``pyro_bll.run.checkpoints.checkpoint_key``: step END_OF_EPOCH for a finished epoch)."""
    return [checkpoint_key(p) for p in list_checkpoints(rank_dir(out, rank))]


def _rank_dirs(run_dir: Path) -> dict[int, Path]:
    dirs = {}
    for p in Path(run_dir).glob("rank_*"):
        m = re.fullmatch(r"rank_(\d+)", p.name)
        if m and p.is_dir():
            dirs[int(m.group(1))] = p
    return dirs


def complete_epochs(run_dir: Path) -> list[int]:
    """Epochs written by every rank whose directory is in ``run_dir`` (one filesystem)."""
    ranks = _rank_dirs(run_dir)
    if not ranks:
        return []
    sets = [set(rank_epochs(run_dir, r)) for r in ranks]
    return sorted(set.intersection(*sets))


def assemble(run_dir: Path, epoch: int | None = None) -> Path:
    """Write ``run_dir/checkpoints/epoch_NNN.pt`` from the per-rank checkpoints of ``epoch``
    (0-based; default the last complete epoch) and return its path."""
    run_dir = Path(run_dir)
    ranks = _rank_dirs(run_dir)
    if not ranks:
        raise ConfigError(f"{run_dir} holds no rank_*/ directories of a distributed run")
    done = complete_epochs(run_dir)
    if epoch is None:
        if not done:
            raise ConfigError(f"no epoch in {run_dir} has a checkpoint from every rank")
        epoch = done[-1]
    parts = {}
    for r in sorted(ranks):
        path = rank_checkpoint(run_dir, r, epoch)
        if not path.exists():
            raise ConfigError(f"{path} is missing: epoch {epoch + 1} is not complete")
        parts[r] = load_checkpoint(path)  # CheckpointError names a damaged file
    world = parts[0]["world_size"] if 0 in parts else None
    if world is None or sorted(parts) != list(range(world)):
        raise ConfigError(
            f"{run_dir} has checkpoints of ranks {sorted(parts)}, but rank 0 records a world "
            f"size of {world}; copy every rank's rank_<R>/ directory into {run_dir}"
        )
    sizes = parts[0]["rank_blocks"]
    if any(p["rank_blocks"] != sizes or p.get("format") != FORMAT for p in parts.values()):
        raise ConfigError(f"the rank checkpoints of epoch {epoch + 1} in {run_dir} disagree")
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    path = run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt"
    return save_atomic(merge(list(parts.values())), path)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One single-process checkpoint from the per-rank checkpoints of one epoch."""
    parts = sorted(parts, key=lambda p: p["rank"])
    model: dict[str, torch.Tensor] = {}
    state: dict[int, Any] = {}
    for p in parts:
        model.update(p["model"])
        opt = p["optimizer"]
        local = opt["param_groups"][0]["params"]  # Adam over the rank's parameters, in order
        for i, g in zip(local, p["param_index"], strict=True):
            if i in opt["state"]:
                state[g] = opt["state"][i]
    head = parts[0]
    group = {k: v for k, v in head["optimizer"]["param_groups"][0].items() if k != "params"}
    group["params"] = list(range(head["num_params"]))
    merged = {
        "epoch": head["epoch"],
        "config": head["config"],  # the run's own (distributed) configuration
        "model": model,
        "optimizer": {"state": state, "param_groups": [group]},
        "history": head["history"],
        "rng": head["rng"],
        "steps_done": head["steps_done"],
        "assembled_from": {"world_size": len(parts), "rank_blocks": head["rank_blocks"]},
    }
    if "family_links" in head:
        merged["family_links"] = head["family_links"]
    if "scheduler" in head:  # one lr schedule, stepped identically on every rank
        merged["scheduler"] = head["scheduler"]
    return merged
