"""Helpers shared by the experiment scripts: run one config, summarise several seeds."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from pyro_bll.run.options import RunConfig
from pyro_bll.run.training import main


def machine() -> str:
    """The machine line of a benchmark's record: architecture, torch threads and version."""
    import platform

    import torch

    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_results(stem: str | Path, record: dict[str, Any], table: str) -> None:
    """A benchmark's outputs: ``<stem>.json`` (the record) and ``<stem>.md`` (its table,
    also printed)."""
    out = Path(stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)


def finished_metrics(cfg: RunConfig) -> dict[str, Any] | None:
    """The metrics of a finished run of exactly ``cfg`` in ``cfg.out``, if there is one."""
    path = Path(cfg.out) / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    stored = RunConfig.from_dict(m["config"]).replace(overwrite=cfg.overwrite or None)
    same = stored.to_dict() == cfg.to_dict()  # resolved values, either format
    done = m["epochs_done"] == cfg.epochs or m.get("budget_exhausted", False)
    return m if same and done else None


def run_seeds(base: RunConfig, seeds: list[int], out_prefix: str) -> dict[str, Any]:
    """Train ``base`` once per seed; return per-seed metrics with mean and std.

    A seed whose run directory already holds a finished run of the same configuration is
    read back instead of trained again, so an interrupted benchmark can be restarted.
    """
    runs = []
    for seed in seeds:
        cfg = base.replace(seed=seed, out=f"{out_prefix}_seed{seed}", overwrite=True)
        m = finished_metrics(cfg) or main(cfg, progress=False)
        if "test_accuracy" not in m:  # scored on the validation split (--val-size)
            m = {**m, "test_accuracy": m["val_accuracy"]}
        runs.append(
            {
                "seed": seed,
                "test_accuracy": m["test_accuracy"],
                "test_sequence_accuracy": m.get("test_sequence_accuracy", float("nan")),
                "seconds_per_epoch": m["seconds_per_epoch"],
                "out": cfg.out,
            }
        )
        print(
            f"  {out_prefix} seed {seed}: acc {m['test_accuracy']:.4f} "
            f"seq {m.get('test_sequence_accuracy', float('nan')):.4f} "
            f"{m['seconds_per_epoch']:.1f}s/epoch",
            flush=True,
        )

    def stats(key: str) -> tuple[float, float]:
        vals = [r[key] for r in runs if not math.isnan(r[key])]
        if not vals:
            return math.nan, math.nan
        return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0

    acc, seq, sec = (
        stats("test_accuracy"),
        stats("test_sequence_accuracy"),
        stats("seconds_per_epoch"),
    )
    return {
        "runs": runs,
        "acc_mean": acc[0],
        "acc_std": acc[1],
        "seq_mean": seq[0],
        "seq_std": seq[1],
        "sec_per_epoch_mean": sec[0],
    }
