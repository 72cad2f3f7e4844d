"""Peak memory and time of one training step: BP, FA, Pred-Sim, BLL joint and per-block.

    python experiments/bench_memory.py --threads 2 --out results/bench_memory
    python experiments/bench_memory.py --configs resnet18_grey28 --repeats 1   # one network

For every network (ResNet-18 / ResNet-50 at full width on 28x28 grey and 32x32 colour
images, batch 128; the 20-layer / 20-block s2s_reverse transformer, batch 50) and every
variant, one step = forward, backward and an Adam update, measured after a warm-up step:

* activations: the peak bytes that autograd holds for backward during the step
  (``pyro_bll.measure.memory.SavedTensorMeter``, checked against hand-counted bytes in
  tests/measure/test_memory.py), and per block (per-block variants: the bytes block k holds when
  its backward starts);
* state: parameters, gradients and Adam's moments (``pyro_bll.measure.memory.state_bytes``);
* time: the median of ``--repeats`` steps without the meter; variants interleaved per
  repeat so that machine noise hits them alike;
* on a GPU also torch.cuda.max_memory_allocated during the step, minus the state.

Variants: ``bp`` and ``fa`` (one backward), ``predsim`` (per-block; image tasks only),
``bll_joint`` (one backward over the summed local losses), ``bll_per_block`` (the
vision default), every BLL variant with the label feedback (``--beta label``: the
look-ahead's sweep holds the whole graph, docs/memory.md), and on ResNets
``bll_per_block_memsplit`` (``--split memory``). Writes
``OUT/bench_memory.json`` and ``OUT/bench_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm import tqdm

from pyro_bll import make_family, seed_everything
from pyro_bll.core.noise import NoiseKey
from pyro_bll.measure.memory import SavedTensorMeter, state_bytes
from pyro_bll.methods import build_method
from pyro_bll.run.build import config_for_task
from pyro_bll.run.step import backward_pass
from pyro_bll.tasks import S2SReverseTask
from pyro_bll.tasks.vision import build_resnet_chain

# name -> (task, arch, image channels, image side); arch None: the transformer
CONFIGS: dict[str, tuple[str, str | None, int, int]] = {
    "resnet18_grey28": ("fashion_mnist", "resnet18", 1, 28),
    "resnet18_colour32": ("cifar10", "resnet18", 3, 32),
    "resnet50_grey28": ("fashion_mnist", "resnet50", 1, 28),
    "resnet50_colour32": ("cifar10", "resnet50", 3, 32),
    "transformer20": ("s2s_reverse", None, 0, 0),
}
# name -> (method, backward, split)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "bp": ("bp", "joint", "even"),
    "fa": ("fa", "joint", "even"),
    "predsim": ("predsim", "per-block", "even"),
    "bll_joint": ("bll", "joint", "even"),
    "bll_per_block": ("bll", "per-block", "even"),
    "bll_per_block_memsplit": ("bll", "per-block", "memory"),
}
MB = 1e6


@dataclass
class Setup:
    """One variant of one network, ready to step."""

    chain: Any
    method: Any
    optimizer: torch.optim.Optimizer
    per_block: bool
    batch: tuple
    steps: int = 0

    def step(self, on_block=None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        x, y, mask = self.batch
        noise = NoiseKey(0, self.steps)
        backward_pass(
            self.method, self.chain, x, y, mask, noise, per_block=self.per_block,
            on_block=on_block,
        )  # fmt: skip
        self.optimizer.step()
        self.steps += 1


def variants_for(config: str) -> list[str]:
    arch = CONFIGS[config][1]
    skip = {"predsim", "bll_per_block_memsplit"} if arch is None else set()
    return [v for v in VARIANTS if v not in skip]


def build(
    config: str, variant: str, batch_size: int, device: torch.device, width: float = 1.0
) -> Setup:
    task, arch, channels, side = CONFIGS[config]
    method, backward, split = VARIANTS[variant]
    seed_everything(0)
    options: dict[str, Any] = dict(method=method, backward=backward, device=str(device))
    if method == "bll":  # the label feedback: the look-ahead's sweep needs the whole graph
        options["beta"] = "label"
    if arch is None:
        cfg = config_for_task(task, **options)
        s2s = S2SReverseTask(cfg)
        chain = s2s.build_chain(make_family(cfg.family))
        batch = next(s2s.train_batches(0))
    else:
        options.update(arch=arch, width=width, batch_size=batch_size, split=split)
        cfg = config_for_task(task, **options)
        chain = build_resnet_chain(arch, channels, 10, make_family(cfg.family), cfg, side)
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(batch_size, channels, side, side, generator=g),
                 torch.randint(0, 10, (batch_size,), generator=g), None)  # fmt: skip
    chain = chain.to(device)
    batch = tuple(None if t is None else t.to(device) for t in batch)
    m = build_method(chain, cfg)
    opt = torch.optim.Adam(chain.parameters(), lr=1e-4)
    return Setup(chain, m, opt, backward == "per-block", batch)


def measure_memory(setup: Setup, device: torch.device) -> dict[str, Any]:
    """One metered step: peak saved activations, per-block bytes, state, CUDA peak."""
    per_block: list[int] = []
    meter = SavedTensorMeter.for_module(setup.chain)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with meter:
        setup.step(on_block=lambda k: per_block.append(meter.current))
    out = {
        "activation_peak_bytes": meter.peak,
        "activation_bytes_per_block": per_block if setup.per_block else None,
        "state_bytes": state_bytes(setup.chain, setup.optimizer),
        "num_blocks": setup.chain.num_blocks,
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak_above_state_bytes"] = torch.cuda.max_memory_allocated(device) - before
    return out


def run_config(config: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    names = variants_for(config) if not args.variants else args.variants
    results: dict[str, dict[str, Any]] = {}
    setups = {}
    quiet = not sys.stderr.isatty()  # no carriage-return lines in a log file
    for name in tqdm(names, desc=f"{config}: memory", leave=False, disable=quiet):
        setup = build(config, name, args.batch_size, device, args.width)
        setup.step()  # warm-up: Adam's moments exist from here on
        results[name] = measure_memory(setup, device)
        setups[name] = setup
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in tqdm(range(args.repeats), desc=f"{config}: time", leave=False, disable=quiet):
        for name in names:  # interleaved
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            setups[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    for name in names:
        results[name]["step_seconds"] = statistics.median(times[name])
    bp = results.get("bp")
    for r in results.values():
        if bp is not None:
            r["activation_vs_bp"] = r["activation_peak_bytes"] / bp["activation_peak_bytes"]
            r["time_vs_bp"] = r["step_seconds"] / bp["step_seconds"]
        if "bll_joint" in results:
            r["time_vs_bll_joint"] = r["step_seconds"] / results["bll_joint"]["step_seconds"]
    return results


def table(results: dict[str, dict[str, dict[str, Any]]], header: str) -> str:
    lines = [header, "",
             "| network | variant | params + grads + Adam MB | peak activations MB | vs BP | "
             "step s | vs BP | vs BLL joint | activations per block MB |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for config, rows in results.items():
        for name, r in rows.items():
            state = sum(r["state_bytes"][k] for k in ("parameters", "gradients", "optimizer"))
            blocks = r["activation_bytes_per_block"]
            shown = " / ".join(f"{b / MB:.1f}" for b in blocks) if blocks else ""
            lines.append(
                f"| {config} | {name} | {state / MB:.1f} | {r['activation_peak_bytes'] / MB:.1f} "
                f"| {r.get('activation_vs_bp', float('nan')):.3f} | {r['step_seconds']:.2f} "
                f"| {r.get('time_vs_bp', float('nan')):.2f} "
                f"| {r.get('time_vs_bll_joint', float('nan')):.2f} | {shown} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                   help="networks to measure (default: all)")  # fmt: skip
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                   help="variants to measure (default: every one that applies)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128, help="ResNet batch size")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant")
    p.add_argument("--width", type=float, default=1.0, help="ResNet width multiplier")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="results/bench_memory", help="output directory")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.repeats <= 0:
        p.error("--batch-size and --repeats must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but no CUDA device is available")
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    device = torch.device(args.device)
    results = {c: run_config(c, args, device) for c in args.configs}
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"threads, torch {torch.__version__}, device {args.device}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"results": results, "config": vars(args), "machine": machine}
    (out / "bench_memory.json").write_text(json.dumps(record, indent=2))
    md = table(results, f"Machine: {machine}. Batch {args.batch_size} (ResNets), 50 (transformer).")
    (out / "bench_memory.md").write_text(md)
    print(md)
    return record


if __name__ == "__main__":
    main()
