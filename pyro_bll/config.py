"""Typed run configuration: data only.

``experiments/run.py`` parses the command line into a ``RunConfig``;
``pyro_bll.run.build.validate`` checks it against the registries and fills the options left
unset (``None``): first from the task's ``DEFAULTS``, then from ``COMMON_DEFAULTS``, the
same from Python and from the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2."""


LR_SCHEDULES = ("constant", "cosine")
# the terms of BLL's local loss l_k that --bll-terms may keep (the output head's
# likelihood of the last block is always kept): KL(rho_k || alpha_k), the local
# likelihood -E[log q_k(y | z_k)] of the blocks below the last, the predictive loss
BLL_TERMS = ("kl", "likelihood", "pred")


# defaults of the options a task may set for itself (``TASKS[name].DEFAULTS``)
COMMON_DEFAULTS: dict[str, Any] = {
    "family": "gaussian",  # the paper's
    "layers": 20,
    "d_model": 32,
    "epochs": 5,
    "batch_size": 50,
    "lr": 2e-3,
    "lr_schedule": "constant",
    "pred_weight": 1.0,
    # per-block gradient-norm clipping: off (measured in docs/results.md)
    "clip_grad": 0.0,
    "message": "pool",
    "propagate": "mean",
    # for bll / predsim (bp and fa: joint): one backward over the summed local losses; on
    # the small transformer and MLP one backward per block is about 14 % slower per step
    # (Python and autograd overhead per call) for 10x less activation memory
    "backward": "joint",
}


def _opt(
    default: Any = None,
    help: str = "",  # noqa: A002 (argparse's name)
    *,
    factory: Any = None,
    **meta: Any,
) -> Any:
    """A config field with its command-line metadata: ``help`` (``{choices}`` is replaced
    by the registry's names), ``choices``, ``registry`` (the names come from that
    registry; ``validated_later``: checked by ``pyro_bll.run.build.validate`` rather than by
    the parser), ``metavar`` and ``flag`` (when the flag is not ``--field-name``).
    ``experiments/run.py`` generates its parser from these."""
    meta = {"help": help, **meta}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Everything a run needs; ``None`` means "the task's default" (``COMMON_DEFAULTS``).

    ``pyro_bll.run.build.validate`` checks it before any work starts."""

    task: str = _opt(
        "s2s_reverse",
        "task to train on: {choices}",
        registry="tasks",
        validated_later=True,
    )
    method: str = _opt(
        "bll",
        "{choices}: bll trains every block on its own local loss (no backward pass "
        "across blocks); bp is end-to-end backprop on the same network; fa is "
        "backprop with fixed random backward weights for every Linear and Conv2d "
        "(feedback alignment); predsim trains every block on Noekland & Eidnes' local"
        " prediction + similarity-matching loss",
        registry="methods",
        validated_later=True,
    )
    family: str | None = _opt(
        None,
        "latent distribution family of every block: {choices} (default: gaussian, the "
        "paper's fixed variance; fashion_mnist_mlp: gaussian_gated, chosen on its "
        "validation split)",
        registry="families",
        validated_later=True,
    )
    family_args: dict[str, Any] = _opt(
        None,
        "family option, e.g. sigma=0.5 (repeatable)",
        factory=dict,
        metavar="KEY=VALUE",
        flag="--family-arg",
    )
    layers: int | None = _opt(
        None,
        "layers of the transformer or MLP",
    )
    blocks: int | None = _opt(
        None,
        "number of blocks N; must divide --layers (default: N = L, a local loss after"
        " every layer as in the paper); vision tasks: 1 to the residual units of "
        "--arch (default 4, the paper)",
    )
    d_model: int | None = _opt(
        None,
        "width of the transformer's residual stream or of the MLP's layers",
    )
    seq_len: int = _opt(
        10,
        "s2s_reverse: length n of the permutation to reverse",
    )
    epochs: int | None = _opt(
        None,
        "training epochs",
    )
    train_size: int | None = _opt(
        None,
        "s2s_reverse: fresh training sequences per epoch (default 10000); image "
        "tasks: train on the first N images (default all)",
    )
    test_size: int | None = _opt(
        None,
        "test examples (default: s2s_reverse 1000 held-out permutations, image tasks "
        "the full test set)",
    )
    val_size: int | None = _opt(
        None,
        "image tasks (fashion_mnist_mlp and the vision tasks): hold out the last N "
        "training images and report their accuracy "
        "(val_accuracy) instead of the test set's, to choose settings without the "
        "test set; --train-size then counts from the remaining images",
        metavar="N",
    )
    data_dir: str | None = _opt(
        None,
        "fashion_mnist(_mlp): directory with the idx files (Debian package "
        "dataset-fashion-mnist); cifar10: directory holding cifar-10-batches-py/ "
        "(tried: torchvision's download)",
    )
    batch_size: int | None = _opt(
        None,
        "mini-batch size",
    )
    lr: float | None = _opt(
        None,
        "Adam learning rate",
    )
    lr_schedule: str | None = _opt(
        None,
        "constant, or cosine: the learning rate decays per step to 0 over --epochs",
        choices=("constant", "cosine"),
    )
    pred_weight: float | None = _opt(
        None,
        "weight lambda of the per-block predictive loss (0 switches it off)",
    )
    clip_grad: float | None = _opt(
        None,
        "largest L2 norm of each block's gradient before the Adam step, clipped block "
        "by block over the parameters the block owns (its layers, feedback part and "
        "heads), so it stays block-local; 0 (the default) switches it off. E.g. 1.0 "
        "stops the late blow-up of one 20-block Gamma run (docs/results.md)",
    )
    pred_head: str = _opt(
        "linear",
        "vision tasks: the per-block predictive head of bll and predsim: linear (the "
        "paper's: ReLU, average pool to <= 2048 features, linear) or conv (a 3x3 conv"
        " C -> 2C with batch norm before that read-out, an auxiliary net with some "
        "depth)",
        registry="pred_heads",
    )
    bll_terms: list[str] = _opt(
        None,
        "ablation of --method bll: the terms of the local loss l_k that are "
        "optimised, from kl (KL(rho_k || alpha_k)), likelihood (the local likelihood "
        "q_k of blocks below the last) and pred (the predictive loss); the last "
        "block's output likelihood is always kept (default: kl,likelihood,pred, the "
        "full loss; e.g. 'pred' trains every block on its predictive head alone)",
        factory=lambda: list(BLL_TERMS),
        metavar="T1,T2,...",
    )
    feedback: str = _opt(
        "linear",
        "feedback network: linear (the paper: one linear map per block from the "
        "one-hot label) or mlp (a small MLP per block)",
        registry="feedbacks",
    )
    feedback_update: str = _opt(
        "grad",
        "train the feedback weights by gradient steps, or set them on every batch to "
        "the closed-form ridge least-squares optimum (linear feedback, --family "
        "gaussian)",
        choices=("grad", "solve"),
    )
    ridge: float = _opt(
        1.0,
        "ridge term of --feedback-update solve",
    )
    propagate: str | None = _opt(
        None,
        "what the next block consumes: the mean of z_k (the paper), its unconstrained "
        "parameters (e.g. logits; s2s_reverse only) or a draw (default: on s2s_reverse "
        "the family's default_propagate, params for the families with bounded or "
        "positive means and mean for the Gaussians; mean on the other tasks)",
        choices=("mean", "params", "sample"),
    )
    likelihood: str | None = _opt(
        None,
        "how BLL estimates the local likelihood term E_rho[log q_k(y | z_k)]: bound "
        "(sampling-free Jensen bound, exact gradients) or sample (at a draw of z_k: "
        "pathwise, or score function for discrete families); default: the family's "
        "own (bound for every family, chosen from measurements: docs/families.md)",
        choices=("bound", "sample"),
    )
    arch: str = _opt(
        "resnet18",
        "vision tasks: resnet18 (basic units 2,2,2,2) or resnet50 (bottleneck units "
        "3,4,6,3), split into --blocks blocks after residual units (default 4, the "
        "paper)",
        registry="archs",
    )
    split: str = _opt(
        "even",
        "vision tasks: residual units per block: even (as even as possible), memory "
        "(balance the blocks' activation memory of a training step, measured per unit "
        "on one image; block 1 otherwise holds most of it), or N1,N2,... explicitly",
        metavar="even|memory|N1,N2,...",
    )
    width: float = _opt(
        1.0,
        "vision tasks: channel multiplier of the stage widths 64,128,256,512 (e.g. "
        "0.25 for CPU-sized runs; default 1 = the full network)",
    )
    message: str | None = _opt(
        None,
        "vision tasks: how the feedback message beta_k meets a block's feature map: "
        "channel (the paper's: one latent per channel with the channel's spatial mean"
        " and the family's own variance, so beta_k weighs as much as alpha_k), mean "
        "(the latent z_k is the law of the spatial mean of the map, per channel, with"
        " variance sigma^2 / (H W), so beta_k barely acts; Gaussian families), grid "
        "(channel on every cell of an s x s grid tiling the map: a class template "
        "per block), pool "
        "(a potential on the spatial mean of the statistics, beta_k / (H W) at every "
        "location) or broadcast (beta_k at every location)",
        registry="messages",
    )
    sim_weight: float = _opt(
        0.99,
        "--method predsim: share beta of the similarity-matching loss, (1 - beta) * "
        "prediction CE + beta * similarity loss (Noekland & Eidnes: 0.99)",
    )
    seed: int = _opt(
        0,
        "random seed (data, init, noise)",
    )
    out: str = _opt(
        "runs/s2s_reverse",
        "run directory for config, metrics.json, checkpoints and plots",
    )
    device: str = _opt(
        "cpu",
        "cpu or cuda[:N]",
    )
    channels_last: bool = _opt(
        False,
        "vision: run convolutions and batches in the channels_last memory format "
        "(faster on recent GPUs)",
    )
    amp: bool = _opt(
        False,
        "bf16 autocast of forward passes and losses (needs --device cuda)",
    )
    max_minutes: float | None = _opt(
        None,
        "time budget of training plus evaluation: stop after the epoch during which "
        "it is used up (metrics.json: elapsed_seconds, budget_exhausted)",
    )
    backward: str | None = _opt(
        None,
        "per-block: backpropagate each block's local loss and free its graph before the "
        "next block runs (activation memory of one block at a time); joint: one backward "
        "over the summed local losses. Same gradients either way; per-block needs bll or "
        "predsim (bp and fa: joint)",
        choices=("per-block", "joint"),
    )
    checkpoint_every: int | None = _opt(
        None,
        "also write a checkpoint every N training steps inside an epoch (for long "
        "epochs); --resume continues from it mid-epoch",
        metavar="N",
    )
    augment: bool = _opt(
        True,
        "vision: no random crop / flip of training batches",
        flag="--no-augment",
    )
    threads: int = _opt(
        0,
        "torch CPU threads (0 = torch's default)",
    )
    resume: bool = _opt(
        False,
        "continue from the newest checkpoint in --out",
    )
    overwrite: bool = _opt(
        False,
        "start afresh in an --out that already holds checkpoints (they are replaced)",
    )
    # block-parallel training across processes (pyro_bll.distributed, launched by torchrun)
    distributed: bool = _opt(
        False,
        "one process (rank) per group of blocks, forward messages sent rank to rank "
        "with torch.distributed; every rank trains its own blocks (--method bll); "
        "--method bp: data parallel over all ranks (gradients averaged, as DDP)",
    )
    replicas: int | None = _opt(
        None,
        "data-parallel replicas R of every stage (group of blocks): the world is K stages "
        "x R replicas, every replica trains on its shard of each batch and the replicas "
        "of a stage average their gradients (default: world size / number of "
        "--rank-blocks, else 1; --method bp: the world size)",
        metavar="R",
    )
    schedule: str = _opt(
        "pipelined",
        "pipelined: ranks work on successive micro-batches at once; sync: lock-step, "
        "one rank after the other (reference); both give the single-process result",
        choices=("pipelined", "sync"),
    )
    rank_blocks: list[int] | None = _opt(
        None,
        "blocks per stage, in order (default: as even as possible); must add up to "
        "--blocks; one number per stage (a stage has --replicas ranks)",
        metavar="N0,N1,...",
    )
    dist_backend: str = _opt(
        "auto",
        "auto: gloo on CPU, NCCL with --device cuda (one GPU per rank); gloo with "
        "cuda stages messages through host memory (ranks may share a GPU)",
        choices=("auto", "gloo", "nccl"),
    )
    dist_timeout: float = _opt(
        300.0,
        "seconds to wait for the rendezvous, a message or a silent rank before the "
        "job stops with an error naming the rank",
    )
    pipeline_depth: int = _opt(
        2,
        "pipelined schedule: forward messages a rank may have in flight to the next",
    )

    @property
    def num_blocks(self) -> int:
        return self.layers if self.blocks is None else self.blocks

    def fill_defaults(self, task_defaults: dict[str, Any]) -> RunConfig:
        """Set every option left unset (``None``) from ``task_defaults`` (the task's
        ``DEFAULTS``), then from ``COMMON_DEFAULTS``. Idempotent; returns ``self``."""
        for source in (task_defaults, COMMON_DEFAULTS):
            for key, value in source.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
