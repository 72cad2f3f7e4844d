"""The paper's Table 1: BP, FA, Pred-Sim and BLL on ResNets, several seeds per cell.

    python experiments/reproduce_table1.py --tasks fashion_mnist --archs resnet18 \\
        --width 0.25 --epochs 3 --seeds 0 1 2 --threads 2

Every (task, arch, method) is trained once per seed with the same data, network, budget
and evaluation (``experiments/run.py`` options; the task's defaults for batch size,
learning rate and the 4 blocks of the paper unless given). The test set is only evaluated:
each cell reports the final epoch's test accuracy, "best / mean +- std" over the seeds,
with the paper's number (best of 5 runs) beside it. ``--max-minutes`` gives every run the
same time budget (it stops after the epoch that uses it up). Writes ``table1.md``,
``table1.json`` and ``table1_curves.png`` (test accuracy against epoch, one panel per
task and arch) under ``--results``; finished runs under ``--runs-dir`` are read back, not
retrained, so an interrupted reproduction can be restarted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import run_seeds  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pyro_bll.config import ConfigError  # noqa: E402
from pyro_bll.core.likelihoods import PRED_HEADS  # noqa: E402
from pyro_bll.run.build import config_for_task
from pyro_bll.run.options import RunConfig  # noqa: E402

METHODS = {"bp": "BP", "fa": "FA", "predsim": "Pred-Sim", "bll": "BLL"}
TASK_NAMES = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
ARCH_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}
# Kappel et al., Table 1: test accuracy %, best of 5 runs, 4 blocks
PAPER = {
    ("fashion_mnist", "resnet18"): {"bp": 92.7, "fa": 87.9, "predsim": 93.9, "bll": 94.2},
    ("fashion_mnist", "resnet50"): {"bp": 93.4, "fa": 83.1, "predsim": 94.3, "bll": 94.3},
    ("cifar10", "resnet50"): {"bp": 94.0, "fa": 70.3, "predsim": 92.4, "bll": 92.6},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", nargs="+", default=["fashion_mnist"], choices=list(TASK_NAMES))
    p.add_argument("--archs", nargs="+", default=["resnet18"], choices=list(ARCH_NAMES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed")
    p.add_argument("--epochs", type=int, default=5, help="training epochs per run")
    p.add_argument("--width", type=float, default=1.0, help="ResNet channel multiplier")
    p.add_argument("--blocks", type=int, default=4, help="blocks per network (paper: 4)")
    p.add_argument("--train-size", type=int, default=None, help="first N training images")
    p.add_argument("--test-size", type=int, default=None, help="first N test images")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's (128)")
    p.add_argument("--lr", type=float, default=None, help="Adam lr; default: the task's")
    p.add_argument(
        "--pred-weight",
        type=float,
        default=None,
        help="bll: weight of the per-block predictive loss (default: the task's, 1)",
    )
    p.add_argument(
        "--pred-head",
        choices=sorted(PRED_HEADS),
        default=None,
        help="bll, predsim: per-block predictive head (default: linear, the paper's)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="time budget per run (training + evaluation); stops after the epoch using it up",
    )
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--fashion-dir", default=None, help="Fashion-MNIST idx files (default: "
                   "/usr/share/datasets/fashion-mnist)")  # fmt: skip
    p.add_argument("--cifar-dir", default=None, help="directory holding cifar-10-batches-py")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--runs-dir", default="runs/table1", help="one run directory per cell/seed")
    p.add_argument("--results", default="results", help="where table1.{md,json,png} go")
    return p


def configs(args: argparse.Namespace) -> dict[tuple[str, str, str], RunConfig]:
    """One validated base config per (task, arch, method); ConfigError on bad input."""
    data_dirs = {"fashion_mnist": args.fashion_dir, "cifar10": args.cifar_dir}
    given = {
        k: getattr(args, k)
        for k in ("batch_size", "lr", "pred_weight", "pred_head")
        if getattr(args, k) is not None
    }
    out = {}
    for task in args.tasks:
        for arch in args.archs:
            for method in args.methods:
                cfg = config_for_task(
                    task,
                    **given,
                    method=method,
                    arch=arch,
                    width=args.width,
                    blocks=args.blocks,
                    epochs=args.epochs,
                    train_size=args.train_size,
                    test_size=args.test_size,
                    max_minutes=args.max_minutes,
                    augment=not args.no_augment,
                    data_dir=data_dirs[task],
                    device=args.device,
                    channels_last=args.channels_last or None,
                    amp=args.amp,
                    threads=args.threads,
                )
                out[task, arch, method] = cfg
    return out


def cell(result: dict[str, Any]) -> str:
    accs = [100 * r["test_accuracy"] for r in result["runs"]]
    return f"{max(accs):.2f} / {100 * result['acc_mean']:.2f} +- {100 * result['acc_std']:.2f}"


def table(results: dict[tuple[str, str, str], dict], args: argparse.Namespace) -> str:
    methods = [m for m in METHODS if m in args.methods]
    rows = _rows(results)
    head = "| task | " + " | ".join(METHODS[m] for m in methods) + " |"
    lines = [
        "Test accuracy % after the last epoch: best / mean +- std over seeds "
        f"{' '.join(map(str, args.seeds))}; (paper: best of 5 runs).",
        "",
        head,
        "|---" * (len(methods) + 1) + "|",
    ]
    for task, arch in rows:
        paper = PAPER.get((task, arch), {})
        cells = [
            cell(results[task, arch, m]) + (f" (paper {paper[m]})" if m in paper else "")
            for m in methods
        ]
        lines.append(f"| {TASK_NAMES[task]}, {ARCH_NAMES[arch]} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per training epoch (mean over seeds) and epochs done:", "", head]
    lines.append("|---" * (len(methods) + 1) + "|")
    for task, arch in rows:
        cells = []
        for m in methods:
            r = results[task, arch, m]
            done = sorted({x["epochs_done"] for x in r["runs"]})
            cells.append(f"{r['sec_per_epoch_mean']:.1f} s, {'/'.join(map(str, done))} ep")
        lines.append(f"| {TASK_NAMES[task]}, {ARCH_NAMES[arch]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _rows(results: dict[tuple[str, str, str], dict]) -> list[tuple[str, str]]:
    """(task, arch) pairs in the order they were run."""
    return list(dict.fromkeys((t, a) for t, a, _ in results))


def plot_curves(results: dict[tuple[str, str, str], dict], path: Path) -> None:
    """Test accuracy against epoch: one panel per (task, arch), one line per method x seed."""
    rows = _rows(results)
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, (task, arch) in zip(axes[0], rows, strict=True):
        for i, method in enumerate(m for m in METHODS if (task, arch, m) in results):
            for j, run in enumerate(results[task, arch, method]["runs"]):
                hist = json.loads((Path(run["out"]) / "metrics.json").read_text())["history"]
                ax.plot(
                    [h["epoch"] for h in hist],
                    [100 * h["test_accuracy"] for h in hist],
                    "o-",
                    color=f"C{i}",
                    alpha=1.0 if j == 0 else 0.4,
                    label=METHODS[method] if j == 0 else None,
                )
        ax.set(xlabel="epoch", ylabel="test accuracy %", title=f"{task} {arch}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfgs = configs(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results: dict[tuple[str, str, str], dict] = {}
    for (task, arch, method), cfg in cfgs.items():
        prefix = f"{args.runs_dir}/{task}_{arch}_w{args.width:g}_{method}"
        try:
            results[task, arch, method] = run_seeds(cfg, args.seeds, prefix)
        except ConfigError as e:  # e.g. missing data: one line, finished cells stay on disk
            print(f"error: {e}", file=sys.stderr)
            return 2
        for run, seed in zip(results[task, arch, method]["runs"], args.seeds, strict=True):
            m = json.loads((Path(run["out"]) / "metrics.json").read_text())
            run["epochs_done"], run["budget_exhausted"] = m["epochs_done"], m["budget_exhausted"]
            run["seed"] = seed
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    md = table(results, args)
    (out / "table1.md").write_text(md)
    (out / "table1.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "paper": {f"{t}/{a}": v for (t, a), v in PAPER.items()},
                "results": {f"{t}/{a}/{m}": r for (t, a, m), r in results.items()},
            },
            indent=2,
        )
    )
    plot_curves(results, out / "table1_curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
