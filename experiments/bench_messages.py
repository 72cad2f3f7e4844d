"""Cost of each backward message beside accuracy: step time, activation memory, bytes moved.

    python experiments/bench_messages.py --blocks 8 --threads 2 --out results/bench_messages

One training step (the method's loss, backward, Adam) of the narrow ResNet-18 on a fixed
batch of Fashion-MNIST-sized images, for BP and for BLL with every ``--beta`` kind
(label, look-ahead one block and to the top, the latter by its sweep and by its copies,
critic, delayed targets with d = 1), interleaved round-robin so that
machine noise hits all alike; the median of ``--repeats`` steps is reported with its
ratio to the label-feedback BLL step. Activation memory is the peak of the bytes autograd
saves during one step (``SavedTensorMeter``); bytes per refresh are what a refresh of the
copies moves between blocks, bytes held what the delayed targets stash to wait for their
use. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pyro
import torch
from common import machine, write_results
from results_tables import render_bench_messages

from pyro_bll.core.noise import NoiseKey
from pyro_bll.measure.memory import SavedTensorMeter
from pyro_bll.run.build import build_run
from pyro_bll.run.options import RunConfig
from pyro_bll.run.step import backward_pass


def variants(blocks: int) -> dict[str, dict]:
    """Name -> options of one variant."""
    return {
        "bp": {"method": "bp"},
        "label": {"beta": "label"},
        "lookahead_1": {"beta": "lookahead", "lookahead_depth": 1},
        # the default message (to the top, plug-in read): by the sweep, and by the copies
        "lookahead_top": {"beta": "lookahead", "lookahead_depth": 0},
        "lookahead_top_copies": {"beta": "lookahead", "lookahead_depth": 0, "sweep": False},
        "critic": {"beta": "critic"},
        "target": {"beta": "target", "target_delay": 1},
    }


def _bytes_per_refresh(chain) -> int:
    if chain.lookahead is not None:
        return chain.lookahead.bytes_per_refresh(chain)
    if chain.critic is not None:
        return chain.critic.bytes_per_refresh()
    return 0


def _bytes_held(method) -> int:
    """What the delayed targets hold to wait for their use (0 for the other kinds)."""
    targets = getattr(method, "targets", None)
    return 0 if targets is None else targets.bytes_held()


def build(name: str, options: dict, args) -> dict:
    options = dict(options)
    sweep = options.pop("sweep", True)  # False: the look-ahead through its copies only
    cfg = RunConfig(
        task="fashion_mnist", width=args.width, blocks=args.blocks, batch_size=args.batch_size,
        threads=args.threads, data_dir=args.data_dir, train_size=args.batch_size,
        test_size=args.batch_size, **options,
    )  # fmt: skip
    run = build_run(cfg)
    if run.chain.lookahead is not None:
        run.chain.lookahead.sweep = sweep
    x, y, mask = next(iter(run.task.train_batches(0)))
    opt = torch.optim.Adam(run.chain.parameters(), lr=1e-3)
    return {"name": name, "run": run, "opt": opt, "batch": (x, y, mask), "step": 0}


def step(v: dict, meter: SavedTensorMeter | None = None) -> None:
    run, (x, y, mask) = v["run"], v["batch"]
    v["opt"].zero_grad(set_to_none=True)
    per_block = run.cfg.training.backward == "per-block"
    noise = NoiseKey(0, v["step"])
    if meter is None:
        backward_pass(run.method, run.chain, x, y, mask, noise, per_block=per_block)
    else:
        with meter:
            backward_pass(run.method, run.chain, x, y, mask, noise, per_block=per_block)
    v["opt"].step()
    v["step"] += 1


def measure(args) -> list[dict]:
    built = [build(n, o, args) for n, o in variants(args.blocks).items()]
    times: dict[str, list[float]] = {v["name"]: [] for v in built}
    for i in range(args.warmup + args.repeats):
        for v in built:
            t0 = time.perf_counter()
            step(v)
            if i >= args.warmup:
                times[v["name"]].append(time.perf_counter() - t0)
    rows = []
    for v in built:
        meter = SavedTensorMeter.for_module(v["run"].chain)
        step(v, meter)
        rows.append(
            {
                "variant": v["name"],
                "median_ms": 1e3 * statistics.median(times[v["name"]]),
                "activation_peak_bytes": meter.peak,
                "bytes_per_refresh": _bytes_per_refresh(v["run"].chain),
                "bytes_held": _bytes_held(v["run"].method),
            }
        )
    label = next(r for r in rows if r["variant"] == "label")
    for r in rows:
        r["time_over_label"] = r["median_ms"] / label["median_ms"]
        r["memory_over_label"] = r["activation_peak_bytes"] / max(label["activation_peak_bytes"], 1)
    return rows


def markdown(rows: list[dict], args) -> str:
    """The table of ``rows`` as docs/results.md shows it (``results_tables``), titled."""
    title = (
        f"Narrow ResNet-18 (width {args.width}, K = {args.blocks}, batch {args.batch_size}), "
        f"median of {args.repeats} interleaved steps "
        f"(python experiments/bench_messages.py --blocks {args.blocks})."
    )
    return "\n".join([title, "", *render_bench_messages([("", {"rows": rows})], {})]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=8, help="K, blocks of the ResNet")
    p.add_argument("--width", type=float, default=0.125, help="channel multiplier")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: Debian's)")
    p.add_argument("--out", default="results/bench_messages", help="output path stem")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.blocks < 2:
        print("error: --repeats must be >= 1 and --blocks >= 2", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    rows = measure(args)
    record = {"config": vars(args), "machine": machine(), "rows": rows}
    write_results(args.out, record, markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
