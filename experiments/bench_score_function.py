"""Score-function gradients of BlockLocalELBO against TraceEnum_ELBO's exact gradient.

    python experiments/bench_score_function.py --draws 2000 --out results/bench_score_function

A Bernoulli latent z in a plate of 6, observed through x ~ N(2z, 0.7), with a second,
reparameterised latent u in the same block whose sampled cost does not depend on z. For
each estimator (dependency tracking "graph" or whole-block costs "block", with and
without the leave-one-out baseline) it draws single-particle gradients of the guide's
logits and reports, per estimator: the largest |mean - exact| in standard errors (bias
check) and the summed per-draw variance (what a training step sees). Writes
``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from common import write_results
from pyro.infer import TraceEnum_ELBO, config_enumerate
from results_tables import render_score_function

from pyro_bll import BlockLocalELBO

K = 6
OBS = torch.tensor([0.1, 1.9, 2.2, -0.4, 0.3, 2.5], dtype=torch.float64)


def model():
    with pyro.plate("data", K, dim=-1):
        z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.4, dtype=torch.float64)))
        pyro.sample("x", dist.Normal(2.0 * z, 0.7), obs=OBS)
    with pyro.plate("other", K, dim=-1):
        pyro.sample("u", dist.Normal(torch.zeros(K, dtype=torch.float64), 1.0))


def guide():
    logits = pyro.param("logits", torch.linspace(-1.0, 1.0, K, dtype=torch.float64))
    with pyro.plate("data", K, dim=-1):
        pyro.sample("z", dist.Bernoulli(logits=logits))
    with pyro.plate("other", K, dim=-1):
        pyro.sample("u", dist.Normal(torch.full((K,), 0.5, dtype=torch.float64), 2.0))


def _grad(elbo, fn_model, fn_guide) -> torch.Tensor:
    loss = elbo.differentiable_loss(fn_model, fn_guide)
    return torch.autograd.grad(loss, pyro.param("logits").unconstrained())[0]


def measure(draws: int) -> list[dict]:
    pyro.clear_param_store()
    exact = _grad(TraceEnum_ELBO(max_plate_nesting=1), model, config_enumerate(guide))
    rows = []
    for dependencies in ("graph", "block"):
        for baseline in (True, False):
            elbo = BlockLocalELBO(
                1, dependencies=dependencies, baseline=baseline, analytic_kl=False
            )
            pyro.set_rng_seed(0)
            t0 = time.perf_counter()
            grads = torch.stack([_grad(elbo, model, guide) for _ in range(draws)])
            seconds = time.perf_counter() - t0
            se = grads.std(0) / draws**0.5
            rows.append(
                {
                    "dependencies": dependencies,
                    "baseline": baseline,
                    "max_bias_in_se": float(((grads.mean(0) - exact).abs() / se).max()),
                    "variance": float(grads.var(0).sum()),
                    "ms_per_draw": 1000 * seconds / draws,
                }
            )
    return rows


def markdown(rows: list[dict], draws: int) -> str:
    """The table of ``rows`` as docs/own_model.md shows it (``results_tables``), titled."""
    title = (
        f"Score-function gradients, {draws} single-particle draws each "
        "(python experiments/bench_score_function.py)."
    )
    return "\n".join([title, "", *render_score_function([("", {"rows": rows})], {})]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=2000, help="gradient draws per estimator")
    p.add_argument("--out", default="results/bench_score_function", help="output path stem")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.draws < 2:
        print("error: --draws must be at least 2", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = measure(args.draws)
    record = {"draws": args.draws, "machine": platform.machine(), "rows": rows}
    write_results(args.out, record, markdown(rows, args.draws))
    return 0


if __name__ == "__main__":
    sys.exit(main())
