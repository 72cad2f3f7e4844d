"""Time one training step: Pyro BLL vs the plain-torch block-local loss vs backprop.

    python experiments/bench_step.py --layers 20 --threads 2 --out results/bench_step.json

Each step is forward, backward and an Adam update on the same s2s_reverse transformer and
batch. The three variants are interleaved (round-robin) so that machine noise hits all
alike; the median of ``--repeats`` steps is reported, with the ratios
Pyro BLL / plain BLL and Pyro BLL / BP.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pyro
import torch

from pyro_bll import make_family, seed_everything
from pyro_bll.methods import BLL, Backprop
from pyro_bll.run.build import config_for_task
from pyro_bll.tasks import S2SReverseTask
from pyro_bll.testing.reference import plain_block_losses


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=20, help="transformer layers = blocks")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--pred-weight", type=float, default=1.0, help="predictive-loss weight")
    p.add_argument("--repeats", type=int, default=60, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench_step.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    seed_everything(0)
    cfg = config_for_task(
        "s2s_reverse",
        layers=args.layers,
        d_model=args.d_model,
        batch_size=args.batch_size,
        pred_weight=args.pred_weight,
    )
    task = S2SReverseTask(cfg)
    chain = task.build_chain(make_family("gaussian"))
    x, y, mask = next(task.train_batches(0))
    opt = torch.optim.Adam(chain.parameters(), lr=1e-4)
    bll, bp = BLL(chain, cfg), Backprop(chain, cfg)

    def run(loss_fn):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def pyro_bll():
        chain.detach = True
        run(lambda: bll.loss(chain, x, y, mask)[0])

    def plain_bll():
        chain.detach = True
        run(lambda: plain_block_losses(chain, x, y, mask).sum() / y.shape[0])

    def backprop():
        chain.detach = False
        run(lambda: bp.loss(chain, x, y, mask)[0])

    variants = {"pyro_bll": pyro_bll, "plain_bll": plain_bll, "bp": backprop}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {
        "median_ms": med,
        "ratio_pyro_over_plain": med["pyro_bll"] / med["plain_bll"],
        "ratio_bll_over_bp": med["pyro_bll"] / med["bp"],
        "config": vars(args),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
