"""Cost of one training step: BP, BLL through Pyro and the plain-torch BLL, with the parts.

    python experiments/bench_step.py --threads 2 --out results/bench_step

For every configuration of ``--configs`` (the 20- and 5-block s2s_reverse transformer,
the Fashion-MNIST MLP and the narrow ResNet-18 at K = 4 and 8, each with its task's
default BLL) one step is forward, one joint backward into the parameters and an Adam
update on a fixed batch, as the training step does them. Six variants run interleaved
(round-robin, so that machine noise hits all alike) and the median of ``--repeats`` steps
is reported:

* ``bp``: backprop on the same network (the BP run of the same seed);
* ``pyro``: BLL through ``BlockLocalELBO`` on the chain's Pyro program, timed in its
  parts: the forward (tracing and losses), the backward and the optimiser;
* ``pyro_per_site``: the same with one Pyro site per block (``--no-stack-blocks``: no
  group of blocks computed together, ``pyro_bll.core.stacked``);
* ``plain``: the same block-local loss written in torch (``pyro_bll.testing.reference``);
* ``blocks``: the forward blocks alone (every block's forward message, with graph);
* ``plain_forward``: the plain loss's forward alone.

The parts of the Pyro step, as shares of it: the forward blocks (``blocks``), the
per-block terms (``plain_forward - blocks``), Pyro's tracing (the Pyro forward minus
``plain_forward``), the backward and the optimiser. Writes ``<out>.json`` and
``<out>.md``; docs/results.md shows the table (``results_tables.py``). ``--compile`` times
every variant with its chain compiled (``--warmup`` steps pay the compilation).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import pyro
import torch
from common import machine, write_results
from results_tables import render_bench_step

from pyro_bll.core.step_cache import StepCache
from pyro_bll.run.build import build_run
from pyro_bll.run.options import RunConfig
from pyro_bll.run.step import differentiate
from pyro_bll.testing.reference import plain_block_losses

# name -> the options of one configuration (the task's defaults otherwise)
CONFIGS: dict[str, dict] = {
    "s2s_20": {"task": "s2s_reverse", "layers": 20, "d_model": 32, "batch_size": 50},
    "s2s_5": {"task": "s2s_reverse", "layers": 5, "d_model": 32, "batch_size": 50},
    "mlp": {"task": "fashion_mnist_mlp", "batch_size": 100},
    "resnet_k4": {"task": "fashion_mnist", "width": 0.125, "blocks": 4, "batch_size": 128},
    "resnet_k8": {"task": "fashion_mnist", "width": 0.125, "blocks": 8, "batch_size": 128},
}
PARTS = ("blocks", "terms", "tracing", "backward", "optimiser")


def _build(options: dict, args, **extra):
    options = {**options, **extra, "threads": args.threads, "backward": "joint"}
    options["compile"] = args.compile
    if options["task"] != "s2s_reverse":  # one batch of data is all a step reads
        options.update(train_size=options["batch_size"], test_size=options["batch_size"])
        if args.data_dir:
            options["data_dir"] = args.data_dir
    run = build_run(RunConfig(**options))
    x, y, mask = next(iter(run.task.train_batches(0)))
    opt = torch.optim.Adam(run.chain.parameters(), lr=1e-4, foreach=True)  # as training does
    return run, (x, y, mask), opt


def _blocks_forward(chain, x) -> None:
    chain.forward_messages(x, range(chain.num_blocks), StepCache())


def variants(options: dict, args) -> tuple[dict[str, Callable[[], dict]], str]:
    """Name -> one timed call (returning its parts in seconds), and the BLL's message."""
    bll, (x, y, mask), opt = _build(options, args)
    bp, _, bp_opt = _build(options, args, method="bp")
    chain = bll.chain

    def step(loss_fn, optimiser) -> dict:
        params = [p for g in optimiser.param_groups for p in g["params"]]
        t0 = time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        differentiate(loss, params)  # as the training step does
        t2 = time.perf_counter()
        optimiser.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimiser": t3 - t2, "step": t3 - t0}

    def timed(fn) -> dict:
        t0 = time.perf_counter()
        fn()
        return {"step": time.perf_counter() - t0}

    def plain_loss():
        return plain_block_losses(chain, x, y, mask).sum() / y.shape[0]

    def per_site_loss():
        chain.stack = False
        try:
            return bll.method.loss(chain, x, y, mask)[0]
        finally:
            chain.stack = True

    calls = {
        "bp": lambda: step(lambda: bp.method.loss(bp.chain, x, y, mask)[0], bp_opt),
        "pyro": lambda: step(lambda: bll.method.loss(chain, x, y, mask)[0], opt),
        "pyro_per_site": lambda: step(per_site_loss, opt),
        "plain": lambda: step(plain_loss, opt),
        "blocks": lambda: timed(lambda: _blocks_forward(chain, x)),
        "plain_forward": lambda: timed(plain_loss),
    }
    return calls, bll.cfg.bll.beta


def measure(name: str, args) -> dict:
    calls, beta = variants(CONFIGS[name], args)
    samples: dict[str, list[dict]] = {k: [] for k in calls}
    for i in range(args.warmup + args.repeats):
        for k, fn in calls.items():
            out = fn()
            if i >= args.warmup:
                samples[k].append(out)

    def med(k: str, part: str = "step") -> float:
        return 1e3 * statistics.median(s[part] for s in samples[k])

    pyro_ms, blocks_ms, plain_fwd = med("pyro"), med("blocks"), med("plain_forward")
    parts = {
        "blocks": blocks_ms,
        "terms": plain_fwd - blocks_ms,
        "tracing": med("pyro", "forward") - plain_fwd,
        "backward": med("pyro", "backward"),
        "optimiser": med("pyro", "optimiser"),
    }
    return {
        "config": name,
        "beta": beta,
        "compile": args.compile,
        "median_ms": {
            "bp": med("bp"),
            "pyro": pyro_ms,
            "pyro_per_site": med("pyro_per_site"),
            "plain": med("plain"),
        },
        "ratio_bll_over_bp": pyro_ms / med("bp"),
        "ratio_pyro_over_plain": pyro_ms / med("plain"),
        "parts_ms": parts,
        "shares": {k: v / pyro_ms for k, v in parts.items()},
        "bp_parts_ms": {p: med("bp", p) for p in ("forward", "backward", "optimiser")},
    }


def markdown(rows: list[dict], args) -> str:
    """The table as docs/results.md shows it (``results_tables``), titled."""
    title = (
        f"Median of {args.repeats} interleaved steps per variant, {args.threads} thread(s) "
        f"(python experiments/bench_step.py --threads {args.threads})."
    )
    return "\n".join([title, "", *render_bench_step([("", {"rows": rows})], {})]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="configurations to time (default: all)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="compile every chain's modules (run.py --compile) in all variants; "
                   "the warm-up steps pay the compilation")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: Debian's)")
    p.add_argument("--out", default="results/bench_step", help="output path stem")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        print("error: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    rows = []
    for name in args.configs:
        rows.append(measure(name, args))
        r = rows[-1]
        print(f"[{name}] BLL/BP {r['ratio_bll_over_bp']:.2f}  Pyro/plain "
              f"{r['ratio_pyro_over_plain']:.2f}", flush=True)  # fmt: skip
    record = {"config": vars(args), "machine": machine(), "rows": rows}
    write_results(args.out, record, markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
