"""Signal-to-noise ratio of the local-likelihood gradient on one fixed batch.

    python experiments/bench_estimator.py --families bernoulli categorical poisson gaussian

For block 1 of the s2s_reverse transformer (5 layers / 5 blocks, fresh weights, seed 0),
the gradient of E_rho[log q_1(y | z_1)] with respect to block 1's parameters is drawn
``--repeats`` times on the same batch with fresh noise, by three estimators:

* ``joint``: the score function the library used before: one term per example, weighted
  by the whole sequence's log q and multiplying grad log rho of all T x C latents, the
  prompt positions included, with a leave-one-out baseline over the batch;
* ``per_label``: the library's ``--likelihood sample``: one term per labelled position,
  log rho restricted to that position's latents, leave-one-out baseline per position;
* ``bound``: the sampling-free bound (``--likelihood bound``), deterministic.

SNR = ||E g|| / sqrt(E ||g - E g||^2) over the repeats (inf for the bound). Writes
``results/bench_estimator.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from pyro_bll import BlockLocalELBO, make_family, seed_everything
from pyro_bll.core.elbo import _with_score_function
from pyro_bll.run.build import config_for_task
from pyro_bll.tasks import S2SReverseTask

OPTIONS = {"categorical": {"group_size": 4}}


def _joint_surrogate(elbo: BlockLocalELBO, chain, x, y, mask) -> torch.Tensor:
    """The pre-change estimator of block 0's likelihood term (sequence-level score function)."""
    model_trace, guide_trace = elbo._get_trace(chain.model, chain.guide, (x, y, mask), {})
    site, rho = model_trace.nodes["y_0"], guide_trace.nodes["z_0"]
    log_q = site["fn"].log_prob(site["value"])  # [B]: masked, summed over positions
    log_rho = rho["fn"].log_prob(rho["value"])  # [B]: summed over all T x C latents
    return _with_score_function(log_q, log_rho).sum()


def _gradients(estimator: str, chain, x, y, mask, repeats: int) -> torch.Tensor:
    params = list(chain.blocks[0].parameters())
    elbo = BlockLocalELBO(chain.num_blocks)
    chain.likelihood = "bound" if estimator == "bound" else "sample"
    out = []
    for _ in range(repeats):
        if estimator == "joint":
            value = _joint_surrogate(elbo, chain, x, y, mask)
        else:
            value = -elbo.block_losses(chain.model, chain.guide, x, y, mask).terms["likelihood"][0]
        grads = torch.autograd.grad(value, params, allow_unused=True)
        out.append(torch.cat([g.flatten() for g in grads if g is not None]))
    return torch.stack(out)  # [R, P]


def snr(g: torch.Tensor) -> float:
    mean = g.mean(0)
    noise = (g - mean).pow(2).sum(-1).mean().sqrt().item()
    return math.inf if noise == 0 else mean.norm().item() / noise


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--families", nargs="+", default=["bernoulli", "categorical", "poisson",
                                                       "gaussian"])  # fmt: skip
    p.add_argument("--repeats", type=int, default=64, help="gradient draws per estimator")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default="results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for name in args.families:
        seed_everything(0)
        cfg = config_for_task(
            "s2s_reverse", layers=5, batch_size=args.batch_size, train_size=args.batch_size
        )
        task = S2SReverseTask(cfg)
        chain = task.build_chain(make_family(name, **OPTIONS.get(name, {})))
        x, y, mask = next(task.train_batches(0))
        rows[name] = {}
        for est in ("joint", "per_label", "bound"):
            g = _gradients(est, chain, x, y, mask, args.repeats)
            rows[name][est] = snr(g)
            print(f"{name:12s} {est:10s} SNR {rows[name][est]:.3f}", flush=True)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_estimator.json").write_text(
        json.dumps({"args": vars(args), "snr": rows}, indent=2)
    )
    lines = ["| family | joint (before) | per label (after, --likelihood sample) | bound |",
             "|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | {r['joint']:.3f} | {r['per_label']:.3f} | {r['bound']:.3g} |")
    (out / "bench_estimator.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
