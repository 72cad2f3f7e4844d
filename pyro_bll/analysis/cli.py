"""ArviZ diagnostics of forward/feedback agreement for trained runs (seeds = ArviZ chains).

    python experiments/diagnose.py runs/s2s_a runs/s2s_b runs/s2s_c --out diagnostics
    pyro-bll diagnose runs/s2s_a

Loads every checkpoint of every run (same configuration, any seeds), computes the
agreement statistics of ``pyro_bll.core.agreement`` on the task's first --batch test examples,
and writes to --out:

    diagnostics.nc            InferenceData of the last epochs (pyro_bll.analysis.diagnostics)
    summary.csv, summary.md   az.summary of the per-block and per-class statistics
                              (R-hat / ESS across runs); summary.md: one row per block
    curves.json               the per-block statistics of every checkpoint (epoch curves)
    densities.png             rho_k vs alpha_k densities of one coordinate per block (run 0)
    forest_kl.png             forest plot of KL(rho_k || alpha_k) per block and run
    agreement_by_block.png    statistics against block depth, one line per epoch
    agreement_epochs.png      statistics against epoch, one line per block
    runs_side_by_side.png     final statistics per block, one line per run
    training_agreement.png    agreement logged during training (if metrics.json has it)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pyro_bll.analysis.diagnostics import (
    BLOCK_SCALARS,
    check_comparable,
    collect,
    diagnostic_batch,
    load_run,
    point_statistics,
    require_trained_feedback,
    to_inference_data,
)
from pyro_bll.config import ConfigError
from pyro_bll.core.agreement import LATENT_STATISTICS, SCALARS
from pyro_bll.core.message_variation import VARIATION


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (experiments/run.py)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="directory for tables, plots and netCDF (default: RUN_DIR/diagnostics for one "
        "run; for several, a diagnostics/ folder beside them in their common parent)",
    )
    p.add_argument("--batch", type=int, default=200, help="test examples in the diagnostic batch")
    p.add_argument(
        "--draws",
        type=int,
        default=100,
        help="Monte Carlo draws of rho_k and alpha_k, and bootstrap resamples of the batch",
    )
    p.add_argument(
        "--epoch-draws",
        type=int,
        default=4,
        help="draws of z_k ~ alpha_k for the local accuracy on every earlier checkpoint",
    )
    p.add_argument(
        "--last-only", action="store_true", help="skip the earlier checkpoints (no epoch curves)"
    )
    p.add_argument("--examples", type=int, default=2, help="examples kept in the z draws")
    p.add_argument("--positions", type=int, default=2, help="sites kept per example in z")
    p.add_argument("--channels", type=int, default=4, help="channels kept per block in z")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and resamples")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


def _markdown(summary, names: list[str], n_blocks: int) -> str:
    """One row per block: mean +- sd of each scalar (over runs and draws), worst R-hat/ESS."""
    head = ["block", *BLOCK_SCALARS, "max R-hat", "min ESS bulk"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in range(n_blocks):
        rows = summary.reindex([f"{s}[{k}]" for s in BLOCK_SCALARS])  # missing: the block has no
        cells = [  # latent, and only the head's accuracy is defined
            "n/a" if m != m else f"{m:.3g} +- {s:.2g}"
            for m, s in zip(rows["mean"], rows["sd"], strict=True)
        ]
        lines.append(
            f"| {k} | " + " | ".join(cells) + f" | {rows['r_hat'].max():.2f} | "
            f"{rows['ess_bulk'].min():.0f} |"
        )
    return (
        f"Runs (ArviZ chains): {', '.join(names)}. Statistics: pyro_bll/core/agreement.py "
        "and pyro_bll/core/message_variation.py (message_within, feedback_within); "
        "mean +- sd over runs and bootstrap draws; n/a: a block without a latent (the "
        "last, when the head reads m(alpha_N)).\n\n" + "\n".join(lines) + "\n"
    )


def default_out(runs: list[str]) -> Path:
    """Beside the runs: ``RUN/diagnostics`` for one run, else ``PARENT/diagnostics`` in the
    runs' common parent directory (never the current directory by accident)."""
    paths = [Path(r).resolve() for r in runs]
    if len(paths) == 1:
        return paths[0] / "diagnostics"
    return Path(os.path.commonpath(paths)) / "diagnostics"


def _check_positive(args: argparse.Namespace) -> None:
    """ConfigError unless every count option (--batch, --draws, ...) is positive."""
    for name in ("batch", "draws", "epoch_draws", "examples", "positions", "channels"):
        if getattr(args, name) <= 0:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
            )


def _chain_names(runs: list) -> list[str]:
    """The runs' names, prefixed ``i:`` by position when two runs share a name."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


def _statistics(
    args: argparse.Namespace, runs: list, names: list[str], x, y, mask
) -> tuple[dict[str, dict[int, dict[str, list[float | None]]]], list]:
    """Per run: the point statistics of every checkpoint (``curves[name][epoch]``; only
    the last with --last-only), and the Monte Carlo draws of the last one (``collect``,
    seed ``args.seed + i`` for run i)."""
    curves: dict[str, dict[int, dict[str, list[float | None]]]] = {n: {} for n in names}
    results = []
    bar = tqdm(
        total=sum(len(r.checkpoints) if not args.last_only else 1 for r in runs),
        desc="checkpoints",
        leave=False,
        disable=not sys.stderr.isatty(),  # no carriage-return lines in a log file
    )
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        for ckpt in run.checkpoints[-1:] if args.last_only else run.checkpoints:
            epoch = run.load_epoch(ckpt)
            curves[name][epoch] = point_statistics(
                run.chain, x, y, mask, args.epoch_draws, args.seed
            )
            bar.update()
        opts = dict(examples=args.examples, positions=args.positions, channels=args.channels)
        results.append(collect(run.chain, x, y, mask, draws=args.draws, seed=args.seed + i, **opts))
    bar.close()
    return curves, results


def _run_attrs(runs: list, names: list[str], y) -> dict:
    """The InferenceData's attributes: which runs, epochs, configuration and batch size."""
    return {
        "runs": names,
        "run_dirs": [str(r.path) for r in runs],
        "epochs": [r.epoch for r in runs],
        "config": runs[0].cfg.to_dict(),
        "batch": int(y.shape[0]),
        "statistics": "pyro_bll/core/agreement.py",
    }


def _summary(idata, y, mask) -> pd.DataFrame:
    """``az.summary`` (R-hat, ESS across runs) of the latent statistics of the blocks that
    have a latent, the local accuracy of every block, and the per-class statistics of the
    classes among the batch's valid labels."""
    import arviz as az

    # per-class rows only for the classes that occur among the valid labels of the batch
    labels = y if mask is None else y[mask.bool()]
    present = sorted(set(labels.flatten().tolist()))
    # a block without a latent (the last) has NaN latent statistics: they are left out
    agreement, kl = idata.agreement, idata.agreement["kl"]
    latent = [b for b in kl.block.values.tolist() if np.isfinite(kl.sel(block=b)).all()]
    parts = [
        agreement[[s for s in SCALARS if s in LATENT_STATISTICS]].sel(block=latent),
        agreement[list(VARIATION)].sel(block=latent),
        agreement[["local_acc"]],
        agreement[["local_acc_class"]].sel({"class": present}),
        agreement[["proto_msd_class"]].sel({"class": present, "block": latent}),
    ]
    with np.errstate(divide="ignore", invalid="ignore"):  # R-hat of constant statistics
        return pd.concat([az.summary(part, round_to="none") for part in parts])


def _plot_all(plots, idata, curves: dict, runs: list, names: list[str], out: Path) -> bool:
    """Every figure of the module docstring into ``out`` (``plots``: the module
    ``diagnostic_plots``); whether metrics.json had training-time agreement to plot."""
    plots.plot_densities(idata, out / "densities.png")
    plots.plot_kl_forest(idata, out / "forest_kl.png")
    plots.plot_by_block(curves, out / "agreement_by_block.png")
    plots.plot_epochs(curves, out / "agreement_epochs.png")
    plots.plot_runs(idata, names, out / "runs_side_by_side.png")
    return plots.plot_training(
        {n: r.history for n, r in zip(names, runs, strict=True)}, out / "training_agreement.png"
    )


def diagnose(args: argparse.Namespace) -> dict:
    from pyro_bll.analysis import diagnostic_plots as plots  # before the clock starts

    t0 = time.perf_counter()
    _check_positive(args)
    runs = [load_run(d) for d in args.runs]
    require_trained_feedback(runs)
    check_comparable(runs)
    names = _chain_names(runs)
    x, y, mask = diagnostic_batch(runs[0].task, args.batch)
    out = default_out(args.runs) if args.out is None else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    curves, results = _statistics(args, runs, names, x, y, mask)
    idata = to_inference_data(results, y, mask, _run_attrs(runs, names, y))
    idata.to_netcdf(str(out / "diagnostics.nc"))
    t_stats = time.perf_counter() - t0

    summary = _summary(idata, y, mask)
    summary.to_csv(out / "summary.csv")
    n_blocks = idata.agreement.sizes["block"]
    (out / "summary.md").write_text(_markdown(summary, names, n_blocks))
    (out / "curves.json").write_text(json.dumps(curves, indent=1))

    trained = _plot_all(plots, idata, curves, runs, names, out)
    total = time.perf_counter() - t0
    print(
        f"{len(runs)} run(s), {n_blocks} blocks, batch {y.shape[0]}, {args.draws} draws: "
        f"statistics {t_stats:.1f}s, total {total:.1f}s; results in {out}"
        + ("" if trained else " (no training-time agreement in metrics.json: not plotted)")
    )
    return {"seconds": total, "seconds_statistics": t_stats, "out": str(out)}


def cli(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    torch.set_num_threads(args.threads)
    try:
        diagnose(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
