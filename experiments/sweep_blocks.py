"""Test accuracy against the number of blocks (paper Fig. 3C; Fig. 3A with --task cifar10).

    python experiments/sweep_blocks.py --layers 20 --blocks 1 2 4 5 10 20 --seeds 0
    python experiments/sweep_blocks.py --task cifar10 --arch resnet50 --blocks 1 2 4 8 16 \\
        --methods bll predsim --epochs 10 --device cuda --channels-last --amp

s2s_reverse: every N must divide --layers. Image tasks: N from 1 to the residual units of
--arch (8 for ResNet-18, 16 for ResNet-50). Writes ``sweep_blocks.json`` and
``sweep_blocks.png`` (``sweep_blocks_TASK_ARCH.*`` for image tasks) under --results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import run_seeds

from pyro_bll.config import ConfigError
from pyro_bll.run.build import config_for_task
from pyro_bll.run.options import RunConfig
from pyro_bll.run.plots import plot_sweep
from pyro_bll.tasks import TASKS
from pyro_bll.tasks.vision import VisionTask


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", default="s2s_reverse", choices=list(TASKS), help="task to sweep")
    p.add_argument("--layers", type=int, default=20, help="s2s_reverse: transformer layers")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 5, 10, 20])
    p.add_argument("--methods", nargs="+", default=["bll"], help="one curve per method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=None, help="default: the task's")
    p.add_argument("--test-size", type=int, default=None, help="default: the task's")
    p.add_argument("--arch", default="resnet50", help="image tasks: resnet18 | resnet50")
    p.add_argument("--width", type=float, default=1.0, help="image tasks: channel multiplier")
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    p.add_argument("--lr", type=float, default=None, help="default: the task's")
    p.add_argument("--max-minutes", type=float, default=None, help="time budget per run")
    p.add_argument("--data-dir", default=None, help="default: the task's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true", help="channels_last (GPU)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/sweep_blocks")
    p.add_argument("--results", default="results")
    return p


def _configs(args: argparse.Namespace, vision: bool) -> dict[tuple[str, int], RunConfig]:
    """The run configuration of every (method, N blocks); ConfigError for an N the
    network cannot be cut into."""
    given = {k: getattr(args, k) for k in ("batch_size", "lr") if getattr(args, k) is not None}
    # the options of the network's own section: a ResNet's, or a layer stack's
    shape = (
        {"arch": args.arch, "width": args.width, "channels_last": args.channels_last or None}
        if vision
        else {"layers": args.layers}
    )
    bases = {}
    for method in args.methods:
        for n in args.blocks:
            bases[method, n] = config_for_task(
                args.task,
                **given,
                **shape,
                method=method,
                blocks=n,
                epochs=args.epochs,
                train_size=args.train_size,
                test_size=args.test_size,
                max_minutes=args.max_minutes,
                data_dir=args.data_dir,
                device=args.device,
                amp=args.amp,
                threads=args.threads,
            )
    return bases


def _write_results(
    args: argparse.Namespace, by_method: dict[str, list[dict]], tag: str, vision: bool
) -> None:
    """``sweep_blocks{tag}.json`` (the first method's results, and every method's) and the
    accuracy-against-N plot ``sweep_blocks{tag}.png`` under --results."""
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    first = by_method[args.methods[0]]
    (out / f"sweep_blocks{tag}.json").write_text(
        json.dumps(
            {"args": vars(args), "blocks": args.blocks, "results": first, "by_method": by_method},
            indent=2,
        )
    )
    plot_sweep(
        args.blocks,
        {m.upper(): [r["acc_mean"] for r in rs] for m, rs in by_method.items()},
        out / f"sweep_blocks{tag}.png",
        ylabel="test accuracy" if vision else "test token accuracy",
    )


def main() -> int:
    args = _parser().parse_args()
    vision = issubclass(TASKS[args.task], VisionTask)
    try:
        bases = _configs(args, vision)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    tag = f"_{args.task}_{args.arch}" if vision else ""
    by_method = {
        method: [
            run_seeds(bases[method, n], args.seeds, f"{args.runs_dir}{tag}/{method}_N{n}")
            for n in args.blocks
        ]
        for method in args.methods
    }
    _write_results(args, by_method, tag, vision)
    for method, rs in by_method.items():
        for n, r in zip(args.blocks, rs, strict=True):
            print(f"{method} N={n}: test acc {100 * r['acc_mean']:.2f} +- {100 * r['acc_std']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
