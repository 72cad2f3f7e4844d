"""Reproduce the paper's s2s_reverse numbers: BLL and BP, 20 and 5 blocks, several seeds.

    python experiments/reproduce_s2s.py --seeds 0 1 2 --threads 2

Writes ``results/s2s_reverse.json`` and ``results/s2s_reverse.md`` (mean +- std of the
final test token and sequence accuracy, CPU seconds per training epoch) and an overlay of
the learning curves (``results/s2s_reverse_curves.png``, paper Fig. 3B).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import run_seeds

from pyro_bll.run.build import config_for_task
from pyro_bll.run.plots import plot_runs


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--layers", type=int, nargs="+", default=[20, 5])
    p.add_argument("--methods", nargs="+", default=["bll", "bp"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=10_000, help="sequences per epoch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs-dir", default="runs/reproduce_s2s")
    p.add_argument("--results", default="results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results, curves = {}, {}
    for layers in args.layers:
        for method in args.methods:
            name = f"{method}_L{layers}_N{layers}"
            base = config_for_task(
                "s2s_reverse",
                method=method,
                layers=layers,
                epochs=args.epochs,
                threads=args.threads,
                device=args.device,
            )
            results[name] = run_seeds(base, args.seeds, f"{args.runs_dir}/{name}")
            first = Path(results[name]["runs"][0]["out"]) / "metrics.json"
            curves[f"{method.upper()} {layers} blocks"] = json.loads(first.read_text())["history"]
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "s2s_reverse.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2)
    )
    rows = ["| run | test token acc % | test sequence acc % | s / epoch |", "|---|---|---|---|"]
    for name, r in results.items():
        rows.append(
            f"| {name} | {100 * r['acc_mean']:.2f} +- {100 * r['acc_std']:.2f} | "
            f"{100 * r['seq_mean']:.2f} +- {100 * r['seq_std']:.2f} | "
            f"{r['sec_per_epoch_mean']:.1f} |"
        )
    (out / "s2s_reverse.md").write_text("\n".join(rows) + "\n")
    plot_runs(curves, out / "s2s_reverse_curves.png")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
