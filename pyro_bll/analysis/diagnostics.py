"""ArviZ diagnostics of forward/feedback agreement: trained runs -> ``InferenceData``.

One ``InferenceData`` holds any number of runs of the same configuration (seeds); every run
is an ArviZ *chain*. Groups and variables (dims after ``chain``, ``draw``):

    posterior      z (block, example, position, channel)  draws z_k ~ rho_k (the guide)
    prior          z (block, example, position, channel)  draws z_k ~ alpha_k (the model)
    observed_data  y (example[, label_position])          labels of the diagnostic batch
    constant_data  mask (example, label_position)         which labels are observed
                   position_index (block, position)       site index of each kept position
    agreement      kl, mean_msd, mean_cos, proto_msd, proto_cos, local_acc (block)
                   message_within, feedback_within (block)
                   kl_channel (block, channel)             NaN beyond a block's width
                   proto_msd_class, local_acc_class (block, class)

The statistics are defined in ``pyro_bll.core.agreement``; ``message_within`` and
``feedback_within`` (the within-class share of the variance of the effective backward
message and of the feedback potential) in ``pyro_bll.core.message_variation``. In
``posterior``/``prior`` a draw is a Monte Carlo draw; in ``agreement`` draw d is
bootstrap resample d of the batch's examples, paired with draw d of z_k ~ alpha_k for the
local accuracy, so the within-run spread is the sampling error of the batch estimate. To
stay small, ``z`` keeps the first ``examples`` examples, ``positions`` valid sites spread
evenly over the first example's valid sites (flattened index over the axes between batch
and channel, in ``position_index``; one site for an MLP) and the first ``channels``
channels of every block.

Across runs (R-hat, ESS): the per-block scalars and the per-class statistics are
meaningful, since blocks and classes are the same in every run; R-hat near 1 says that the
seeds agree on a statistic within its batch-sampling error. Raw latent coordinates (``z``)
and per-channel statistics are not: channels are not identified across independently
trained networks (any permutation or rescaling of a block's channels, with the matching
change of the next block, is the same network), so compare them within a run only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import torch
from torch import Tensor

from pyro_bll.config import ConfigError
from pyro_bll.core.agreement import (
    SCALARS,
    _expand_labels,
    block_sums,
    bootstrap_weights,
    summarise,
)
from pyro_bll.core.chain import BLLChain
from pyro_bll.core.message_variation import VARIATION, BlockVariation, block_variation
from pyro_bll.families import Params
from pyro_bll.methods import METHODS, build_method
from pyro_bll.run.build import build_from_config
from pyro_bll.run.checkpoints import (
    END_OF_EPOCH,
    check_links,
    checkpoint_key,
    list_checkpoints,
    load_checkpoint,
)
from pyro_bll.run.options import RunConfig
from pyro_bll.seed import seed_everything

# the per-block scalars of the diagnostics: the agreement statistics and the within-class
# variation of the backward messages
BLOCK_SCALARS = (*SCALARS, *VARIATION)

# config keys that may differ between runs compared as chains (they do not change the
# network, the task or the diagnostic batch)
FREE_KEYS = frozenset(
    "seed out threads device resume overwrite epochs lr batch_size train_size test_size "
    "data_dir augment channels_last checkpoint_every max_minutes backward clip_grad".split()
)


@dataclass
class LoadedRun:
    """A run directory rebuilt: its config, task, chain (eval mode) and history."""

    path: Path
    cfg: RunConfig
    task: Any
    chain: BLLChain
    checkpoints: list[Path]
    history: list[dict[str, Any]]
    epoch: int = -1  # 1-based epoch of the loaded weights

    @property
    def name(self) -> str:
        return self.path.name

    def load_epoch(self, checkpoint: Path) -> int:
        """Load the weights of one checkpoint of this run; returns its 1-based epoch."""
        state = _read_checkpoint(checkpoint)
        _check_same_config(self.cfg, state.get("config", {}), checkpoint, self.path)
        check_links(state, self.chain.families, checkpoint)
        try:
            self.chain.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()
            reason = first[1].strip() if len(first) > 1 else first[0]
            raise ConfigError(
                f"{checkpoint}: the weights do not fit the network of "
                f"{self.path / 'config.json'} ({reason}); diagnose it with its own config"
            ) from None
        refresh_backward_copies(self.chain)
        self.epoch = int(state.get("epoch", -1)) + 1
        return self.epoch


def refresh_backward_copies(chain: BLLChain) -> None:
    """Copy the loaded weights into the frozen copies that the look-ahead and the critic
    read (``--beta lookahead`` / ``critic``): the method's modules are built, and their
    copies taken, before a checkpoint's weights are loaded."""
    if chain.lookahead is not None:
        chain.lookahead.refresh(chain)
    if chain.critic is not None:
        chain.critic.maybe_refresh(None)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Weights-only; a damaged or foreign file is refused by name (CheckpointError)."""
    return load_checkpoint(path)


def _model_config(d: dict[str, Any]) -> dict[str, Any]:
    full = RunConfig.from_dict(d).flat()  # either format, resolved
    return {k: v for k, v in full.items() if k not in FREE_KEYS}


def _check_same_config(cfg: RunConfig, other: dict, what: Path, run: Path) -> None:
    a, b = _model_config(cfg.to_dict()), _model_config(other)
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{what} was written by an incompatible configuration ({k} {b[k]!r}, but "
            f"{run / 'config.json'} says {a[k]!r}); diagnose each run with its own checkpoints"
        )


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Rebuild a run from ``config.json`` and load its newest checkpoint.

    Raises ``ConfigError`` (one line) for a directory without ``config.json``,
    ``metrics.json`` or checkpoints, and for a checkpoint of an incompatible configuration.
    """
    path = Path(run_dir)
    for name in ("config.json", "metrics.json"):
        if not (path / name).is_file():
            raise ConfigError(
                f"{path} has no {name}; pass a run directory written by experiments/run.py"
            )
    every = list_checkpoints(path / "checkpoints")
    # epoch ends; a run interrupted in its first epoch has a mid-epoch checkpoint only
    ckpts = [p for p in every if checkpoint_key(p)[1] == END_OF_EPOCH] or every
    if not ckpts:
        raise ConfigError(f"{path} has no checkpoints/epoch_*.pt; train the run first")
    try:
        cfg = RunConfig.from_dict(json.loads((path / "config.json").read_text()))
        history = json.loads((path / "metrics.json").read_text()).get("history", [])
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{path}: unreadable config.json or metrics.json ({e})") from None
    cfg = cfg.replace(device=device, resume=None, overwrite=None)
    _, task, chain = build_from_config(cfg)
    build_method(chain, cfg)  # the method's own modules (FA's backward weights, Pred-Sim's heads)
    run = LoadedRun(path, cfg, task, chain.to(device).eval(), ckpts, history)
    run.load_epoch(ckpts[-1])
    return run


def agreement_refusal(method: str) -> str:
    """Why the agreement statistics mean nothing for a method without trained feedback."""
    return (
        f"--method {method} trains no feedback network, so the forward/feedback agreement "
        "statistics (rho_k, KL, prototypes, local accuracy) would describe an untrained "
        "one; they are defined for --method bll"
    )


def require_trained_feedback(runs: list[LoadedRun]) -> None:
    """ConfigError (one line) unless every run trained its feedback network (BLL)."""
    for run in runs:
        if not METHODS[run.cfg.method].trains_feedback:
            raise ConfigError(f"{run.path}: {agreement_refusal(run.cfg.method)}")


def check_comparable(runs: list[LoadedRun]) -> None:
    """ConfigError unless all runs share network, task and method (seeds may differ)."""
    first = runs[0]
    for run in runs[1:]:
        _check_same_config(first.cfg, run.cfg.to_dict(), run.path / "config.json", first.path)


def diagnostic_batch(task: Any, n: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The task's first n test examples; ConfigError for n <= 0 or an empty batch."""
    if n <= 0:
        raise ConfigError(f"--batch must be positive, got {n}")
    x, y, mask = task.diagnostic_batch(n)
    if y.shape[0] == 0 or (mask is not None and not mask.any()):
        raise ConfigError("the diagnostic batch is empty (no labelled example); use a test set")
    return x, y, mask


@torch.no_grad()
def forward_messages(chain: BLLChain, x: Tensor) -> list[Params]:
    """alpha_k for every block, propagated as in ``BLLChain.predict_logits``."""
    out, inp = [], x
    for k in range(chain.num_blocks):
        alpha = chain.families[k].params(chain.blocks[k](inp))
        out.append(alpha)
        inp = alpha if chain.propagate == "params" else chain.families[k].mean(alpha)
    return out


@dataclass
class RunDiagnostics:
    """One run's draws and statistics as numpy arrays (draw axis first)."""

    z_rho: np.ndarray | None  # [D, N, E, P, K]; None: no trained feedback network
    z_alpha: np.ndarray  # [D, N, E, P, K]
    position_index: np.ndarray  # [N, P]
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # [D, N, ...]


@dataclass
class _Kept:
    """What ``z`` keeps: ``draws`` draws of the first ``examples`` examples, at the
    flattened sites ``positions[k]`` of block k ([P] each) and its first ``channels``
    values per site."""

    draws: int
    examples: int
    positions: list[Tensor]
    channels: int


def _values_per_site(chain: BLLChain, laws: list[Params]) -> list[int]:
    """Values of one draw of z_k per site, for every block: channels C, groups
    (categorical) or groups x K (Dirichlet): the distribution's last batch dim times its
    event size."""
    widths = []
    for k, law in enumerate(laws):
        d = chain.families[k].distribution(law)
        widths.append(d.batch_shape[-1] * math.prod(d.event_shape))
    return widths


def _valid_sites(chain: BLLChain, laws: list[Params], labels_valid: Tensor) -> list[Tensor]:
    """Per block, which sites of example 0 (flattened over the axes between batch and
    channel, [S_k]) carry a valid label; all of them if example 0 has none."""
    sites = [
        a[0].shape[1 : a[0].dim() - 1 - chain.families[k].stat_dims] for k, a in enumerate(laws)
    ]
    valid0 = [_expand_labels(labels_valid[:1], (1, *s))[0].flatten() for s in sites]
    return [v if v.any() else torch.ones_like(v) for v in valid0]  # example 0 unlabelled


def _spread(valid: Tensor, n: int) -> Tensor:
    """``n`` indices of the true entries of ``valid`` spread evenly: of the m true
    entries, those at (i + 1/2) m / n for i < n."""
    idx = valid.nonzero().flatten()
    return idx[((torch.arange(n) + 0.5) * idx.numel() / n).long()]


def _kept(
    chain: BLLChain,
    laws: list[Params],
    labels_valid: Tensor,
    *,
    draws: int,
    examples: int,
    positions: int,
    channels: int,
) -> _Kept:
    """At most ``positions`` valid sites of example 0 and ``channels`` values per site,
    as many for every block (the fewest any block has)."""
    k_keep = min(channels, *_values_per_site(chain, laws))
    valid0 = _valid_sites(chain, laws, labels_valid)
    p_keep = min(positions, *(int(v.sum()) for v in valid0))
    return _Kept(draws, examples, [_spread(v, p_keep) for v in valid0], k_keep)


def _block_draws(
    chain: BLLChain,
    k: int,
    law: Params,
    y: Tensor,
    mask: Tensor | None,
    keep: _Kept,
    feedback: bool,
) -> tuple[Tensor | None, Tensor]:
    """Block k's kept draws of z_k ~ rho_k (None without ``feedback``) and of
    z_k ~ alpha_k (``law``): [D, E, P, C] each, float; NaN for a block without a latent."""
    e, idx = keep.examples, keep.positions[k]
    if not chain.has_latent(k):  # no site z_k: no draws, NaN in both groups
        blank = torch.full((keep.draws, e, idx.numel(), keep.channels), math.nan)
        return (blank if feedback else None), blank
    fam = chain.families[k]
    a_e = tuple(t[:e] for t in law)
    m_e = None if mask is None else mask[:e]

    def kept_sample(params: Params) -> Tensor:
        z = fam.distribution(params).sample((keep.draws,))  # [D, E, *S, C(, K)]
        z = z.flatten(-1 - fam.event_dims) if fam.event_dims else z  # [D, E, *S, C]
        return z.reshape(keep.draws, e, -1, z.shape[-1])[:, :, idx, : keep.channels].float()

    rho = None
    if feedback:
        rho = kept_sample(fam.posterior(a_e, chain.feedback_message(k, y[:e], m_e, a_e)))
    return rho, kept_sample(a_e)


def _bootstrapped_statistics(
    sums: list, variation: list[BlockVariation], weights: Tensor
) -> dict[str, np.ndarray]:
    """``summarise`` of every block's sums and the message variation's ``shares`` under the
    bootstrap ``weights``: [D, N, ...] per statistic; ``kl_channel`` NaN-padded to the
    widest block."""
    width = [s.kl.shape[-1] for s in sums]
    stats: dict[str, list[np.ndarray]] = {}
    for s, var in zip(sums, variation, strict=True):
        for name, v in {**summarise(s, weights), **var.shares(weights)}.items():
            v = v.float()
            if name == "kl_channel":  # pad to the widest block
                v = torch.nn.functional.pad(v, (0, max(width) - v.shape[-1]), value=np.nan)
            stats.setdefault(name, []).append(v.numpy())
    return {name: np.stack(v, 1) for name, v in stats.items()}


@torch.no_grad()
def collect(
    chain: BLLChain,
    x: Tensor,
    y: Tensor,
    mask: Tensor | None,
    *,
    draws: int = 100,
    examples: int = 2,
    positions: int = 2,
    channels: int = 4,
    seed: int = 0,
    alphas: list[Params] | None = None,
    feedback: bool = True,
) -> RunDiagnostics:
    """Draws from rho_k and alpha_k and the bootstrapped statistics of every block.

    ``feedback=False`` (a method that trains no feedback network): draws from alpha_k only;
    rho_k and every agreement statistic would describe an untrained network.
    """
    if draws <= 0:
        raise ConfigError(f"--draws must be positive, got {draws}")
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    alphas = forward_messages(chain, x) if alphas is None else alphas
    weights = bootstrap_weights(y.shape[0], draws, g)
    labels_valid = torch.ones_like(y, dtype=torch.bool) if mask is None else mask.bool()
    sums, variation = [], []
    if feedback:
        sums = [
            block_sums(chain, k, a, y, mask, draws, per_class=True) for k, a in enumerate(alphas)
        ]
        variation = [block_variation(chain, k, a, y, mask) for k, a in enumerate(alphas)]
    laws = [chain.latent_params(k, a) for k, a in enumerate(alphas)]  # the laws of z_k
    keep = _kept(
        chain, laws, labels_valid, draws=draws, examples=min(examples, y.shape[0]),
        positions=positions, channels=channels,
    )  # fmt: skip
    z_rho, z_alpha = [], []
    for k, law in enumerate(laws):
        rho, alpha = _block_draws(chain, k, law, y, mask, keep, feedback)
        z_alpha.append(alpha)
        if feedback:
            z_rho.append(rho)
    return RunDiagnostics(
        z_rho=torch.stack(z_rho, 1).numpy() if feedback else None,
        z_alpha=torch.stack(z_alpha, 1).numpy(),
        position_index=torch.stack(keep.positions).numpy(),
        stats=_bootstrapped_statistics(sums, variation, weights),
    )


@torch.no_grad()
def point_statistics(
    chain: BLLChain, x: Tensor, y: Tensor, mask: Tensor | None, draws: int = 4, seed: int = 0
) -> dict[str, list[float | None]]:
    """Whole-batch values of the per-block scalars ``BLOCK_SCALARS`` (no bootstrap), ``[N]``
    each; None where a statistic is undefined (a block without a latent), so the curves are
    JSON."""
    seed_everything(seed)
    out: dict[str, list[float | None]] = {name: [] for name in BLOCK_SCALARS}
    for k, alpha in enumerate(forward_messages(chain, x)):
        stats = summarise(block_sums(chain, k, alpha, y, mask, draws))
        stats |= block_variation(chain, k, alpha, y, mask).shares()
        for name in BLOCK_SCALARS:
            value = stats[name].item()
            out[name].append(None if value != value else value)
    return out


def to_inference_data(
    runs: list[RunDiagnostics],
    y: Tensor,
    mask: Tensor | None,
    attrs: dict[str, Any] | None = None,
) -> az.InferenceData:
    """The groups of the module docstring; ``attrs`` are stored JSON-encoded on each group.

    Runs without a trained feedback network (``z_rho`` None) give ``prior``,
    ``observed_data`` and ``constant_data`` only: no ``posterior``, no ``agreement``.
    """
    with_feedback = runs[0].z_rho is not None
    z_dims = ["block", "example", "position", "channel"]
    label_dims = ["example", "label_position"][: y.dim()]
    dims: dict[str, list[str]] = {
        "z": z_dims,
        "y": label_dims,
        "mask": label_dims,
        "position_index": ["block", "position"],
    }
    constant = {"position_index": runs[0].position_index}
    if mask is not None:
        constant["mask"] = mask.cpu().numpy()
    idata = az.from_dict(
        posterior={"z": np.stack([r.z_rho for r in runs])} if with_feedback else None,
        prior={"z": np.stack([r.z_alpha for r in runs])},
        observed_data={"y": y.cpu().numpy()},
        constant_data=constant,
        dims=dims,
    )
    stat_dims = {name: ["block"] for name in BLOCK_SCALARS}
    stat_dims |= {
        "kl_channel": ["block", "channel"],
        "proto_msd_class": ["block", "class"],
        "local_acc_class": ["block", "class"],
    }
    if with_feedback:
        stats = {name: np.stack([r.stats[name] for r in runs]) for name in stat_dims}
        idata.add_groups({"agreement": az.dict_to_dataset(stats, dims=stat_dims)})
    encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (attrs or {}).items()}
    for group in idata.groups():
        idata[group].attrs.update(encoded)
    return idata


def write_diagnostics(
    run_dir: str | Path, batch: int = 200, draws: int = 100, device: str = "cpu", seed: int = 0
) -> Path:
    """``run_dir/diagnostics.nc``: the InferenceData of one run's newest checkpoint.

    For a method that trains no feedback network (BP, FA, Pred-Sim) it holds the forward
    draws z_k ~ alpha_k only (``to_inference_data``); its ``omitted`` attribute says why.
    """
    run = load_run(run_dir, device=device)
    x, y, mask = diagnostic_batch(run.task, batch)
    feedback = METHODS[run.cfg.method].trains_feedback
    omitted = {} if feedback else {"omitted": agreement_refusal(run.cfg.method)}
    idata = to_inference_data(
        [collect(run.chain, x, y, mask, draws=draws, seed=seed, feedback=feedback)],
        y,
        mask,
        {
            "runs": [run.name],
            "epochs": [run.epoch],
            "config": run.cfg.to_dict(),
            "batch": int(y.shape[0]),
            "statistics": "pyro_bll/core/agreement.py",
            **omitted,
        },
    )
    path = run.path / "diagnostics.nc"
    idata.to_netcdf(str(path))
    return path
