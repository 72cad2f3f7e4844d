"""Headless plots: one run's learning curve, several runs overlaid, accuracy vs blocks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _accuracy(h: dict[str, Any]) -> float:
    """An epoch's accuracy on the evaluated split: test, or validation with --val-size."""
    return h["test_accuracy"] if "test_accuracy" in h else h["val_accuracy"]


def plot_learning_curve(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Test accuracy and each block's mean local loss against epoch."""
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [_accuracy(h) for h in history], "o-", label="token")
    if "test_sequence_accuracy" in history[0]:
        ax1.plot(epochs, [h["test_sequence_accuracy"] for h in history], "s--", label="sequence")
    split = "test" if "test_accuracy" in history[0] else "validation"
    ax1.set(xlabel="epoch", ylabel=f"{split} accuracy", ylim=(0, 1.02), title=title)
    ax1.legend(loc="lower right")
    n_blocks = len(history[0]["block_losses"])
    for k in range(n_blocks):
        ax2.plot(epochs, [h["block_losses"][k] for h in history], label=f"block {k}")
    ax2.set(xlabel="epoch", ylabel="local loss per example", yscale="symlog")
    if n_blocks <= 10:
        ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_runs(runs: dict[str, Sequence[dict[str, Any]]], path: Path) -> None:
    """Overlay test accuracy against epoch for several runs (paper Fig. 3B)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, history in runs.items():
        ax.plot([h["epoch"] for h in history], [_accuracy(h) for h in history], "o-", label=label)
    ax.set(xlabel="epoch", ylabel="test token accuracy", ylim=(0, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(
    blocks: Sequence[int],
    acc: dict[str, Sequence[float]],
    path: Path,
    ylabel: str = "test token accuracy",
) -> None:
    """Test accuracy against the number of blocks (paper Fig. 3A / 3C)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in acc.items():
        ax.plot(blocks, values, "o-", label=label)
    ax.set(xlabel="number of blocks", ylabel=ylabel, xscale="log")
    ax.set_xticks(list(blocks), [str(b) for b in blocks])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
