"""Every latent family on two tasks, and feedback solve vs gradient, several seeds each.

    python experiments/bench_families.py --seeds 0 1 2 --threads 2

Task 1: s2s_reverse, 5 layers / 5 blocks, 5 epochs. Task 2: fashion_mnist_mlp, 3 blocks of
width 256, 3 epochs on the full training set. Same budget for every family. Writes
``results/families.json`` and ``results/families.md`` (test accuracy mean +- std over the
seeds and seconds per epoch), plus the feedback solve-vs-grad comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import run_seeds

from pyro_bll.families import FAMILIES
from pyro_bll.run.build import config_for_task
from pyro_bll.run.options import RunConfig

TASKS = {
    "s2s_reverse": config_for_task(task="s2s_reverse", layers=5, epochs=5),
    "fashion_mnist_mlp": config_for_task(
        task="fashion_mnist_mlp", layers=3, d_model=256, epochs=3, batch_size=100, lr=1e-3
    ),
}


def _cell(r: dict) -> str:
    return (
        f"{100 * r['acc_mean']:.2f} +- {100 * r['acc_std']:.2f} ({r['sec_per_epoch_mean']:.1f} s)"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--epochs", type=int, default=None, help="override every task's epochs")
    p.add_argument("--train-size", type=int, default=None, help="override the training size")
    p.add_argument("--layers", type=int, default=None, help="s2s_reverse: layers = blocks")
    p.add_argument(
        "--no-references",
        action="store_true",
        help="skip the feedback-solve and BP rows (families only)",
    )
    p.add_argument(
        "--likelihood",
        choices=["bound", "sample"],
        default=None,
        help="the local-likelihood estimator of every BLL run (default: each family's own)",
    )
    p.add_argument(
        "--beta",
        default=None,
        help="the backward message of every BLL run (default: each task's own; the "
        "estimator of --likelihood applies to the label kind's prototype likelihood)",
    )
    p.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="score every run on this many held-out training examples instead of the test "
        "set (the tables' accuracy is then the validation accuracy)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--runs-dir", default="runs/bench_families")
    p.add_argument("--results", default="results")
    return p


def _task_config(args: argparse.Namespace, task: str) -> RunConfig:
    """``TASKS[task]`` with the command line's overrides."""
    base = TASKS[task].replace(threads=args.threads, data_dir=args.data_dir)
    if args.epochs:
        base = base.replace(epochs=args.epochs)
    if args.train_size:
        base = base.replace(train_size=args.train_size)
    if args.likelihood:
        base = base.replace(likelihood=args.likelihood)
    if args.beta:
        base = base.replace(beta=args.beta)
    if args.val_size:
        base = base.replace(val_size=args.val_size)
    if args.layers and task == "s2s_reverse":
        base = base.replace(layers=args.layers)
    return base


def _task_results(args: argparse.Namespace, task: str, base: RunConfig) -> dict[str, dict]:
    """Row name -> ``run_seeds`` result on one task: every family, then (unless
    --no-references) the Gaussian with the feedback solve and BP on the same network."""
    results = {}
    for fam in args.families:
        opts = {"group_size": 4} if fam == "categorical" else {}
        # propagate=None: the family's own default (the base was filled for the Gaussian)
        cfg = base.replace(family=fam, family_args=opts, propagate=None)
        results[fam] = run_seeds(cfg, args.seeds, f"{args.runs_dir}/{task}_{fam}")
    if args.no_references:
        return results
    # the solve is the KL's optimum only: the tied prototype likelihood is left out
    cfg = base.replace(family="gaussian", feedback_update="solve", bll_terms=["kl", "pred"])
    results["gaussian + feedback solve (kl, pred)"] = run_seeds(
        cfg, args.seeds, f"{args.runs_dir}/{task}_gaussian_solve"
    )
    cfg = base.replace(family="gaussian", method="bp", likelihood=None, beta=None)
    results["BP on the same network (reference)"] = run_seeds(
        cfg, args.seeds, f"{args.runs_dir}/{task}_bp"
    )
    return results


def _table(results: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown rows: one per family or reference, one column per task."""
    names = list(next(iter(results.values())))
    rows = [
        "| family | " + " | ".join(f"{t} test acc % (s / epoch)" for t in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for name in names:
        rows.append(f"| {name} | " + " | ".join(_cell(results[t][name]) for t in results) + " |")
    return rows


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, dict]] = {}
    for task in args.tasks:
        results[task] = _task_results(args, task, _task_config(args, task))
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2)
    )
    rows = _table(results)
    (out / "families.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
