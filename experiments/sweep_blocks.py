"""Test accuracy against the number of blocks (paper Fig. 3C).

    python experiments/sweep_blocks.py --layers 20 --blocks 1 2 4 5 10 20 --seeds 0

Every N must divide --layers. Writes ``results/sweep_blocks.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import run_seeds

from pyro_bll.config import RunConfig
from pyro_bll.plots import plot_sweep


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 5, 10, 20])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/sweep_blocks")
    p.add_argument("--results", default="results")
    args = p.parse_args()
    bad = [n for n in args.blocks if n <= 0 or args.layers % n]
    if bad:
        print(f"error: --blocks {bad} must divide --layers {args.layers}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    acc = []
    for n in args.blocks:
        base = RunConfig(
            layers=args.layers,
            blocks=n,
            epochs=args.epochs,
            train_size=args.train_size,
            threads=args.threads,
        )
        acc.append(run_seeds(base, args.seeds, f"{args.runs_dir}/N{n}"))
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_blocks.json").write_text(
        json.dumps({"args": vars(args), "blocks": args.blocks, "results": acc}, indent=2)
    )
    plot_sweep(args.blocks, {"BLL": [r["acc_mean"] for r in acc]}, out / "sweep_blocks.png")
    for n, r in zip(args.blocks, acc, strict=True):
        print(f"N={n}: test acc {100 * r['acc_mean']:.2f} +- {100 * r['acc_std']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
