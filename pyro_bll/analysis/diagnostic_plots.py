"""Headless plots of forward/feedback agreement (``experiments/diagnose.py``).

Blocks are numbered from 0, as the Pyro sites z_0 .. z_{N-1} and the ArviZ ``block`` dim.
``curves`` below map run name -> epoch -> statistic -> one value per block
(``pyro_bll.analysis.diagnostics.point_statistics`` on each checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Curves = dict[str, dict[int, dict[str, list[float | None]]]]  # None: no latent there

LABELS = {
    "kl": "KL(rho || alpha) per site",
    "mean_msd": "mean sq. diff. m(rho) - m(alpha)",
    "mean_cos": "cos(m(rho), m(alpha))",
    "proto_msd": "mean sq. dist. m(alpha) - prototype",
    "proto_cos": "cos(m(alpha), prototype of y)",
    "local_acc": "accuracy of q_k(y | z ~ alpha_k)",
}
SHOWN = ("kl", "proto_cos", "local_acc")


def _save(fig, path: Path, dpi: int = 90) -> None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_densities(idata: az.InferenceData, path: Path, run: int = 0, **coords: int) -> None:
    """rho_k (posterior) against alpha_k (prior) densities of one latent coordinate per block.

    One run only (``run``): channels are not identified across runs, so pooling them would
    mix unrelated coordinates. ``coords`` picks example / position / channel (default 0).
    """
    sel = {"chain": [run], **{d: coords.get(d, 0) for d in ("example", "position", "channel")}}
    rho, alpha = idata.posterior.isel(sel), idata.prior.isel(sel)
    # blocks without a latent (all-NaN draws) get no panel
    blocks = [k for k in range(rho.sizes["block"]) if np.isfinite(alpha.z.isel(block=k)).any()]
    n = len(blocks)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        k = blocks[i]
        az.plot_density(
            [rho.isel(block=[k]), alpha.isel(block=[k])],
            data_labels=["rho (guide)", "alpha (forward)"],
            var_names=["z"],
            shade=0.25,
            hdi_prob=0.999,
            point_estimate=None,
            ax=np.array([ax]),
            colors=["C0", "C1"],
            textsize=7,
        )
        ax.set_title(f"block {k}", fontsize=8)
        if ax.get_legend() is not None and i:
            ax.get_legend().remove()
    fig.suptitle(
        f"z_k ~ rho_k vs alpha_k, run {run}, "
        + ", ".join(f"{d} {sel[d]}" for d in ("example", "position", "channel")),
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, path)


def plot_kl_forest(idata: az.InferenceData, path: Path, var: str = "kl") -> None:
    """ArviZ forest plot of a per-block statistic, one interval per run, with R-hat."""
    data = idata.agreement[[var]]
    finite = np.isfinite(data[var]).all([d for d in data[var].dims if d != "block"])
    data = data.sel(block=data.block.values[finite.values])  # a block without a latent: none
    n = data.sizes["block"]
    axes = az.plot_forest(
        data,
        var_names=[var],
        combined=False,
        r_hat=data.sizes["chain"] > 1,
        figsize=(7, 1.2 + 0.28 * n * max(1, data.sizes["chain"] / 2)),
        textsize=8,
    )
    axes[0].set_title(f"{LABELS.get(var, var)}: 94% HDI per run (bootstrap)", fontsize=9)
    if len(axes) > 1:
        # ArviZ draws R-hat only for combined chains, so one marker per block is drawn
        # here, at the block's row (tick labels "kl[0]", "[1]", ...; just "kl" for a
        # single block); its axis is fixed to 0.9..2.1, widened to show larger values too
        with np.errstate(divide="ignore", invalid="ignore"):
            rhat = az.rhat(data)[var]
        for tick, label in zip(axes[0].get_yticks(), axes[0].get_yticklabels(), strict=True):
            text = label.get_text()
            block = int(text.rsplit("[", 1)[1].rstrip("]")) if "[" in text else data.block[0]
            axes[1].plot(float(rhat.sel(block=block)), tick, "o", color="C0", mec="k")
        top = float(np.nanmax(rhat.values, initial=2.0))
        axes[1].set_xlim(0.9, max(2.1, 1.05 * top))
    fig = axes[0].figure
    fig.tight_layout()
    _save(fig, path)


def _by_epoch(curves: Curves, stat: str) -> tuple[list[int], np.ndarray]:
    """``[R, E, N]`` values of ``stat`` for the epochs that every run has (None, a block
    without a latent, as NaN: not drawn)."""
    epochs = sorted(set.intersection(*(set(c) for c in curves.values())))
    values = [[c[e][stat] for e in epochs] for c in curves.values()]
    return epochs, np.array(values, dtype=float)


def plot_by_block(curves: Curves, path: Path, stats: Sequence[str] = SHOWN) -> None:
    """Each statistic against block depth, one line per epoch (mean over runs, band: range)."""
    fig, axes = plt.subplots(1, len(stats), figsize=(4.2 * len(stats), 3.4), squeeze=False)
    for ax, stat in zip(axes[0], stats, strict=True):
        epochs, v = _by_epoch(curves, stat)
        blocks = np.arange(v.shape[-1])
        cmap = plt.get_cmap("viridis")
        for i, e in enumerate(epochs):
            c = cmap(i / max(1, len(epochs) - 1))
            ax.plot(blocks, v[:, i].mean(0), "o-", ms=3, color=c, label=f"epoch {e}")
            if v.shape[0] > 1:
                ax.fill_between(blocks, v[:, i].min(0), v[:, i].max(0), color=c, alpha=0.2)
        ax.set(xlabel="block", title=LABELS.get(stat, stat))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{len(curves)} run(s): mean over runs, band = min..max", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_epochs(curves: Curves, path: Path, stats: Sequence[str] = SHOWN) -> None:
    """Each statistic against epoch, one line per block (colour = depth), runs averaged."""
    fig, axes = plt.subplots(1, len(stats), figsize=(4.2 * len(stats), 3.4), squeeze=False)
    for ax, stat in zip(axes[0], stats, strict=True):
        epochs, v = _by_epoch(curves, stat)
        n = v.shape[-1]
        for k in range(n):
            color = plt.get_cmap("plasma")(k / max(1, n - 1))
            ax.plot(epochs, v[:, :, k].mean(0), "o-", ms=2, lw=1, color=color)
        ax.set(xlabel="epoch", title=LABELS.get(stat, stat))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    sm = plt.cm.ScalarMappable(cmap="plasma", norm=plt.Normalize(0, max(1, n - 1)))
    fig.colorbar(sm, ax=axes[0, -1], label="block")
    fig.suptitle(f"checkpoints on the diagnostic batch, mean over {len(curves)} run(s)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_runs(idata: az.InferenceData, names: Sequence[str], path: Path) -> None:
    """The final per-block statistics of every run side by side (mean and sd over draws)."""
    stats = [s for s in ("kl", "mean_cos", "proto_cos", "local_acc") if s in idata.agreement]
    fig, axes = plt.subplots(1, len(stats), figsize=(3.6 * len(stats), 3.2), squeeze=False)
    for ax, stat in zip(axes[0], stats, strict=True):
        da = idata.agreement[stat]
        mean, sd = da.mean("draw").values, da.std("draw").values  # [R, N]
        blocks = np.arange(mean.shape[1])
        for r, name in enumerate(names):
            ax.errorbar(
                blocks + 0.15 * (r - (len(names) - 1) / 2),
                mean[r],
                yerr=sd[r],
                fmt="o-",
                ms=3,
                lw=1,
                capsize=1.5,
                label=name,
            )
        ax.set(xlabel="block", title=LABELS[stat])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_training(histories: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Agreement logged during training (metrics.json ``block_agreement``) against epoch.

    Returns False (and draws nothing) when no run logged it (runs older than the logging).
    """
    have = {n: h for n, h in histories.items() if h and "block_agreement" in h[0]}
    if not have:
        return False
    stats = list(next(iter(have.values()))[0]["block_agreement"])
    fig, axes = plt.subplots(
        len(have), len(stats), figsize=(3.8 * len(stats), 2.8 * len(have)), squeeze=False
    )
    for row, (name, hist) in zip(axes, have.items(), strict=True):
        epochs = [h["epoch"] for h in hist]
        for ax, stat in zip(row, stats, strict=True):
            # [E, N]; null (a block without a latent) becomes NaN, which is not drawn
            v = np.array([h["block_agreement"][stat] for h in hist], dtype=float)
            for k in range(v.shape[1]):
                ax.plot(
                    epochs, v[:, k], lw=1, color=plt.get_cmap("plasma")(k / max(1, v.shape[1] - 1))
                )
            ax.set(xlabel="epoch", title=f"{name}: {LABELS.get(stat, stat)}")
            ax.title.set_fontsize(8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("training-time means over each epoch's batches (colour = block depth)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True
