"""Train a network with block-local learning (BLL) or backprop (BP) and write the results.

python experiments/run.py --task s2s_reverse
python experiments/run.py --task s2s_reverse --method bp --layers 20 --out runs/bp20
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

from pyro_bll.config import COMMON_DEFAULTS, LR_SCHEDULES, ConfigError, RunConfig
from pyro_bll.families import FAMILIES
from pyro_bll.guides import FEEDBACKS, MESSAGES
from pyro_bll.likelihoods import PRED_HEADS
from pyro_bll.methods import METHODS
from pyro_bll.models import RESNET_ARCHS
from pyro_bll.tasks import TASKS
from pyro_bll.training import TrainingDiverged, final_line, main


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _names(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (an empty string: no names)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _per_task(key: str, fallback: object = None) -> str:
    """An option's default for every task, for the help text: "s2s_reverse 50, ..."."""
    if fallback is None:
        fallback = COMMON_DEFAULTS.get(key, "-")
    return ", ".join(f"{n} {t.DEFAULTS.get(key, fallback)}" for n, t in TASKS.items())


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=d.task, help=f"task to train on: {', '.join(TASKS)}")
    p.add_argument(
        "--method",
        default=d.method,
        help=f"{', '.join(METHODS)}: bll trains every block on its own local loss "
        "(no backward pass across blocks); bp is end-to-end backprop on the "
        "same network; fa is backprop with fixed random backward weights for every Linear "
        "and Conv2d (feedback alignment); predsim trains every block on Noekland & Eidnes' "
        "local prediction + similarity-matching loss",
    )
    p.add_argument(
        "--family",
        default=d.family,
        help=f"latent distribution family of every block: {', '.join(FAMILIES)} "
        "(gaussian = the paper's fixed variance)",
    )
    p.add_argument(
        "--family-arg",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="family option, e.g. sigma=0.5 (repeatable)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="layers of the transformer or MLP (default: " + _per_task("layers") + ")",
    )
    p.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="number of blocks N; must divide --layers (default: N = L, a local "
        "loss after every layer as in the paper); vision tasks: 1 to the residual units "
        "of --arch (default 4, the paper)",
    )
    p.add_argument(
        "--d-model",
        type=int,
        default=None,
        help="width of the transformer's residual stream or of the MLP's layers (default: "
        + _per_task("d_model")
        + ")",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=d.seq_len,
        help="s2s_reverse: length n of the permutation to reverse",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (default: " + _per_task("epochs") + ")",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=d.train_size,
        help="s2s_reverse: fresh training sequences per epoch (default 10000); "
        "image tasks: train on the first N images (default all)",
    )
    p.add_argument(
        "--val-size",
        type=int,
        default=d.val_size,
        metavar="N",
        help="vision tasks: hold out the last N training images and report their accuracy "
        "(val_accuracy) instead of the test set's, to choose settings without the test set; "
        "--train-size then counts from the remaining images",
    )
    p.add_argument(
        "--test-size",
        type=int,
        default=d.test_size,
        help="test examples (default: s2s_reverse 1000 held-out permutations, "
        "image tasks the full test set)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="fashion_mnist(_mlp): directory with the idx files (Debian package "
        "dataset-fashion-mnist); cifar10: directory holding cifar-10-batches-py/ (tried: "
        "torchvision's download). Default: " + _per_task("data_dir", "-"),
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=argparse.SUPPRESS,
        help="mini-batch size (default: " + _per_task("batch_size") + ")",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=argparse.SUPPRESS,
        help="Adam learning rate (default: " + _per_task("lr") + ")",
    )
    p.add_argument(
        "--lr-schedule",
        default=argparse.SUPPRESS,
        choices=LR_SCHEDULES,
        help="constant, or cosine: the learning rate decays per step to 0 over --epochs "
        "(default: " + _per_task("lr_schedule") + ")",
    )
    p.add_argument(
        "--pred-weight",
        type=float,
        default=argparse.SUPPRESS,
        help="weight lambda of the per-block predictive loss (0 switches it off; default: "
        + _per_task("pred_weight")
        + ")",
    )
    p.add_argument(
        "--pred-head",
        choices=sorted(PRED_HEADS),
        default=d.pred_head,
        help="vision tasks: the per-block predictive head of bll and predsim: linear (the "
        "paper's: ReLU, average pool to <= 2048 features, linear) or conv (a 3x3 conv "
        "C -> 2C with batch norm before that read-out, an auxiliary net with some depth)",
    )
    p.add_argument(
        "--bll-terms",
        type=_names,
        default=d.bll_terms,
        metavar="T1,T2,...",
        help="ablation of --method bll: the terms of the local loss l_k that are optimised, "
        "from kl (KL(rho_k || alpha_k)), likelihood (the local likelihood q_k of blocks "
        "below the last) and pred (the predictive loss); the last block's output "
        "likelihood is always kept (default: kl,likelihood,pred, the full loss; e.g. "
        "'pred' trains every block on its predictive head alone)",
    )
    p.add_argument(
        "--feedback",
        default=d.feedback,
        choices=sorted(FEEDBACKS),
        help="feedback network: linear (the paper: one linear map per block from the one-hot "
        "label) or mlp (a small MLP per block)",
    )
    p.add_argument(
        "--feedback-update",
        default=d.feedback_update,
        choices=["grad", "solve"],
        help="train the feedback weights by gradient steps, or set them on every batch to "
        "the closed-form ridge least-squares optimum (linear feedback, --family gaussian)",
    )
    p.add_argument(
        "--ridge", type=float, default=d.ridge, help="ridge term of --feedback-update solve"
    )
    p.add_argument(
        "--propagate",
        default=d.propagate,
        choices=["mean", "params", "sample"],
        help="what the next block consumes: the mean of z_k (paper), its unconstrained "
        "parameters (e.g. logits; s2s_reverse only) or a draw",
    )
    p.add_argument(
        "--likelihood",
        default=d.likelihood,
        choices=["bound", "sample"],
        help="how BLL estimates the local likelihood term E_rho[log q_k(y | z_k)]: bound "
        "(sampling-free Jensen bound, exact gradients) or sample (at a draw of z_k: pathwise, "
        "or score function for discrete families); default: the family's own (bound for "
        "every family, chosen from measurements: docs/families.md)",
    )
    p.add_argument(
        "--arch",
        default=d.arch,
        choices=sorted(RESNET_ARCHS),
        help="vision tasks: resnet18 (basic units 2,2,2,2) or resnet50 (bottleneck units "
        "3,4,6,3), split into --blocks blocks after residual units (default 4, the paper)",
    )
    p.add_argument(
        "--width",
        type=float,
        default=d.width,
        help="vision tasks: channel multiplier of the stage widths 64,128,256,512 "
        "(e.g. 0.25 for CPU-sized runs; default 1 = the full network)",
    )
    p.add_argument(
        "--message",
        default=argparse.SUPPRESS,
        choices=sorted(MESSAGES),
        help="vision tasks: how the feedback message beta_k meets a block's feature map: "
        "channel (the paper's: one latent per channel with the channel's spatial mean and the "
        "family's own variance, so beta_k weighs as much as alpha_k), "
        "mean (the latent z_k is the law of the spatial mean of the map, "
        "per channel, with variance sigma^2 / (H W), so beta_k barely acts; Gaussian families), "
        "pool (a potential on the "
        "spatial mean of the statistics, beta_k / (H W) at every location) or broadcast "
        "(beta_k at every location); default: " + _per_task("message"),
    )
    p.add_argument(
        "--sim-weight",
        type=float,
        default=d.sim_weight,
        help="--method predsim: share beta of the similarity-matching loss, "
        "(1 - beta) * prediction CE + beta * similarity loss (Noekland & Eidnes: 0.99)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (data, init, noise)")
    p.add_argument(
        "--out", default=d.out, help="run directory for config, metrics.json, checkpoints and plots"
    )
    p.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    p.add_argument(
        "--threads", type=int, default=d.threads, help="torch CPU threads (0 = torch's default)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that already holds checkpoints (they are replaced)",
    )
    _add_distributed_options(p, d)
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="vision: run convolutions and batches in the channels_last memory format "
        "(faster on recent GPUs)",
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="bf16 autocast of forward passes and losses (needs --device cuda)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=d.max_minutes,
        help="time budget of training plus evaluation: stop after the epoch during which "
        "it is used up (metrics.json: elapsed_seconds, budget_exhausted)",
    )
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="vision: no random crop / flip of training batches",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help="after training, write the ArviZ InferenceData of forward/feedback agreement "
        "(first 200 test examples, 100 draws; pyro_bll.diagnostics) to OUT/diagnostics.nc",
    )
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _add_distributed_options(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group(
        "block-parallel training (launch with torchrun --nproc_per_node=K ... --distributed)"
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="one process (rank) per group of blocks, forward messages sent rank to rank "
        "with torch.distributed; every rank trains its own blocks (--method bll)",
    )
    g.add_argument(
        "--schedule",
        default=d.schedule,
        choices=["pipelined", "sync"],
        help="pipelined: ranks work on successive micro-batches at once; sync: lock-step, "
        "one rank after the other (reference); both give the single-process result",
    )
    g.add_argument(
        "--rank-blocks",
        type=_int_list,
        default=None,
        metavar="N0,N1,...",
        help="blocks per rank, in order (default: as even as possible); must add up to --blocks",
    )
    g.add_argument(
        "--dist-backend",
        default=d.dist_backend,
        choices=["auto", "gloo", "nccl"],
        help="auto: gloo on CPU, NCCL with --device cuda (one GPU per rank); gloo with cuda "
        "stages messages through host memory (ranks may share a GPU)",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=d.dist_timeout,
        help="seconds to wait for the rendezvous, a message or a silent rank before the job "
        "stops with an error naming the rank",
    )
    g.add_argument(
        "--pipeline-depth",
        type=int,
        default=d.pipeline_depth,
        help="pipelined schedule: forward messages a rank may have in flight to the next",
    )


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, bool]:
    ns = build_parser().parse_args(argv)
    skip = ("family_arg", "no_progress", "no_augment", "task", "diagnostics")
    fields = {k: v for k, v in vars(ns).items() if k not in skip}
    cfg = RunConfig(
        task=ns.task, **fields, augment=not ns.no_augment, family_args=dict(ns.family_arg)
    )  # options left unset (None) get the task's defaults in validate, as from Python
    return cfg, not ns.no_progress


def cli(argv: list[str] | None = None) -> int:
    try:
        cfg, progress = parse_config(argv)
    except SystemExit as e:  # argparse: --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    if cfg.distributed:  # this process is one rank of a torchrun job
        from pyro_bll.distributed.launch import main as distributed_main

        try:
            code = distributed_main(cfg, progress=progress)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if code or os.environ.get("RANK") != "0" or not build_parser().parse_args(argv).diagnostics:
            return code
        return _diagnostics(cfg)  # rank 0, from the checkpoint it assembled
    try:
        metrics = main(cfg, progress=progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    print(final_line(metrics, cfg.out))
    if build_parser().parse_args(argv).diagnostics:
        return _diagnostics(cfg)
    return 0


def _diagnostics(cfg: RunConfig) -> int:
    from pyro_bll.diagnostics import write_diagnostics

    try:
        print(f"diagnostics: {write_diagnostics(cfg.out, device=cfg.device)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
