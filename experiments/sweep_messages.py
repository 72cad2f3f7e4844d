"""Backward messages against the number of blocks: the paper's Fig. 3A on data here.

    python experiments/sweep_messages.py --blocks 4 8 --seeds 0 1 2 \
        --runs-dir runs/messages --results results

Trains the narrow ResNet-18 on Fashion-MNIST with every method of ``--methods`` (BP, local
cross-entropy alone, BLL with the label feedback, BLL with each backward message) for
every K of ``--blocks`` and seed of ``--seeds``, one run at a time through
``experiments/run.py``; a run whose ``metrics.json`` already holds its last epoch is
reused, so an interrupted sweep continues where it stopped. Writes
``<results>/sweep_messages.json`` (every run's validation accuracy and seconds),
``sweep_messages.md`` (mean +- std over seeds per method and K) and
``sweep_messages.png`` (validation accuracy against K, one line per method, the spread
over seeds as error bars); ``--name`` changes the stem, one per protocol.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_tables import render_sweep_messages

RUN = Path(__file__).resolve().parent / "run.py"


# the look-ahead at the plug-in read m(alpha_k), to depth L (0: the top)
def _lookahead(depth: int) -> list[str]:
    return ["--beta", "lookahead", "--lookahead-input", "mean", "--lookahead-depth", str(depth)]


# method name -> options of experiments/run.py (on top of the protocol's)
METHODS: dict[str, list[str]] = {
    "bp": ["--method", "bp"],
    "predsim": ["--method", "predsim"],
    "local_ce": ["--bll-terms", "pred"],
    "label": ["--beta", "label"],
    "lookahead": _lookahead(0),
    "lookahead_1": _lookahead(1),
    "lookahead_2": _lookahead(2),
    "lookahead_sample": ["--beta", "lookahead", "--lookahead-depth", "0"],
    "critic": ["--beta", "critic"],
    # the look-ahead with lighter predictive heads (the task's default weight is 4)
    "lookahead_pred1": [*_lookahead(0), "--pred-weight", "1"],
    "lookahead_pred0": [*_lookahead(0), "--pred-weight", "0"],
    "lookahead_nokl": [*_lookahead(0), "--bll-terms", "likelihood,pred"],
    "target": ["--beta", "target", "--target-delay", "1"],
    "target_4": ["--beta", "target", "--target-delay", "4"],
}


def _finished(out: Path, epochs: int) -> dict | None:
    path = out / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("epochs_done") == epochs else None


def run_one(args, method: str, k: int, seed: int) -> dict:
    out = Path(args.runs_dir) / f"k{k}_s{seed}_{method}"
    metrics = _finished(out, args.epochs)
    seconds = None
    if metrics is None:
        cmd = [sys.executable, str(RUN), "--task", "fashion_mnist", "--width", str(args.width),
               "--blocks", str(k), "--epochs", str(args.epochs), "--train-size",
               str(args.train_size), "--val-size", str(args.val_size), "--seed", str(seed),
               "--threads", str(args.threads), "--no-progress", "--overwrite", "--out", str(out),
               *(["--data-dir", args.data_dir] if args.data_dir else []),
               *METHODS[method]]  # fmt: skip
        print(f"[{method} K={k} seed={seed}] {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{method} K={k} seed={seed} failed: {proc.stderr.strip()[-500:]}")
        metrics = _finished(out, args.epochs)
    return {
        "method": method,
        "blocks": k,
        "seed": seed,
        "val_accuracy": metrics["val_accuracy"],
        "seconds_per_epoch": metrics.get("seconds_per_epoch"),
        "wall_seconds": seconds,
        "run": str(out),
    }


def summarise(rows: list[dict], methods: list[str], blocks: list[int]) -> dict:
    table: dict[str, dict[str, dict]] = {}
    for m in methods:
        for k in blocks:
            accs = [r["val_accuracy"] for r in rows if r["method"] == m and r["blocks"] == k]
            if accs:
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                table.setdefault(m, {})[str(k)] = {
                    "mean": statistics.mean(accs), "std": sd, "n": len(accs)
                }  # fmt: skip
    return table


def markdown(table: dict, blocks: list[int], args) -> str:
    """The summary as docs/results.md shows it (``results_tables``), titled."""
    title = (
        f"Validation accuracy %, Fashion-MNIST, ResNet-18 at width {args.width}, {args.epochs} "
        f"epochs on {args.train_size} images, {args.val_size} held out; mean +- std over "
        "seeds (n runs) (python experiments/sweep_messages.py)."
    )
    record = {"config": {"blocks": blocks}, "summary": table}
    return "\n".join([title, "", *render_sweep_messages([("", record)], {})]) + "\n"


def plot(table: dict, blocks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, cells in table.items():
        ks = [k for k in blocks if str(k) in cells]
        ax.errorbar(ks, [100 * cells[str(k)]["mean"] for k in ks],
                    yerr=[100 * cells[str(k)]["std"] for k in ks], marker="o", capsize=3,
                    label=m)  # fmt: skip
    ax.set_xlabel("blocks K")
    ax.set_ylabel("validation accuracy %")
    ax.set_xticks(blocks)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8], help="values of K")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["bp", "local_ce", "label", "lookahead"],
                   choices=sorted(METHODS), help="methods to compare")  # fmt: skip
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=10000)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: Debian's)")
    p.add_argument("--runs-dir", default="runs/messages", help="one directory per run")
    p.add_argument("--results", default="results", help="where the tables and plot go")
    p.add_argument("--name", default="sweep_messages",
                   help="file stem of the tables and plot (one per protocol)")  # fmt: skip
    args = p.parse_args(argv)
    if any(k < 2 for k in args.blocks):
        print("error: every --blocks value must be at least 2 (a message needs a block above)",
              file=sys.stderr)  # fmt: skip
        return 2
    rows = []
    for k in args.blocks:
        for seed in args.seeds:
            for m in args.methods:
                rows.append(run_one(args, m, k, seed))
    table = summarise(rows, args.methods, args.blocks)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    record = {"config": vars(args), "machine": f"{platform.machine()} CPU", "runs": rows,
              "summary": table}  # fmt: skip
    (results / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (results / f"{args.name}.md").write_text(markdown(table, args.blocks, args))
    plot(table, args.blocks, results / f"{args.name}.png")
    print(markdown(table, args.blocks, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
