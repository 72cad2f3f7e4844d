"""Agreement between the forward message alpha_k and the feedback message beta_k, per block.

Pure torch; ``pyro_bll.analysis.diagnostics`` turns these numbers into ArviZ
``InferenceData`` and the training step logs the cheap ones every epoch (``step_statistics``).

Shapes. Block k's forward message alpha_k parametrises a latent ``[B, *S, C]``: ``S`` are
the axes between batch and channel ("sites": none for an MLP ``[B, C]``, positions for the
transformer ``[B, T, C]``, space for a ResNet ``[B, H, W, C]``); channels are always last
(a categorical family's channel is a group of ``group_size`` values). Labels are ``[B, *L]``
with ``L`` a prefix of ``S`` (``[B]`` per example, ``[B, T]`` per position) and an optional
mask of the same shape. A site is *valid* when its label is observed (mask true);
s2s_reverse's prompt half is not valid (its feedback is zero, so rho = alpha there).

Definitions, with rho_k = F(eta(alpha_k) + beta_k) (``chain.guide``), m(.) the family's
mean, and the class prototype pi_c = F(beta_c): the family member whose density is
proportional to h(z) exp(<beta_c, T(z)>) for the class potential beta_c that the prototype
likelihood uses (``chain.class_potentials``). The prototype likelihood is exactly
q_k(y = c | z) = softmax_c log pi_c(z), a "closest prototype" classifier; for the paper's
Gaussian, m(pi_c) is the feedback output b_c.

* ``kl``: KL(rho_k || alpha_k) summed over channels at a site, averaged over valid sites
  (``kl_channel``: per channel). For an MLP this is the per-example KL of the loss; for the
  transformer the loss sums it over the labelled positions. Zero iff beta_k = 0.
* ``mean_msd``, ``mean_cos``: mean over channels of (m(rho_k) - m(alpha_k))^2, and the
  cosine of the two channel vectors, at every site, averaged over valid sites.
* ``proto_msd``, ``proto_cos``: the same between m(alpha_k) and the label's prototype
  mean m(pi_y) (``proto_msd_class``: per true class). Zero / one iff the forward mean is
  the prototype. With a pooling spatial message (``--message pool``) the prototype
  likelihood reads the spatial mean of the statistics, so m(alpha_k) is averaged over
  space first; with ``broadcast`` every location is compared; with ``mean`` the latent is
  the spatial mean (``BLLChain.latent_params``), so every statistic of the block is one
  site per example. For families with positive
  means (Bernoulli, categorical, Poisson, Gamma, Beta) cosines are positive by construction.
* ``feedback_weight``: how far the feedback moves rho_k's mean from alpha_k's towards the
  label's prototype, <m(rho) - m(alpha), m(pi_y) - m(alpha)> / ||m(pi_y) - m(alpha)||^2,
  averaged over the sites compared with the prototype. For Gaussians of precisions
  P_alpha and P_beta it is P_beta / (P_alpha + P_beta): 1/2 for the paper's channel-wise
  latent (``--message channel``), 1 / (H W + 1) for the spatial-mean latent (``mean``),
  0 for an untrained feedback network.
* ``local_acc``: accuracy of block k's local likelihood q_k(y | z_k) at draws
  z_k ~ alpha_k (the forward message alone, as at test time; at draws from rho_k the label
  would leak in through beta_k), per valid label; the last block uses the output head
  (at m(alpha_N), or at the draw with ``head_input="sample"``) (``local_acc_class``: per
  true class).

A block without a latent (the last one when the head reads m(alpha_N), ``has_latent``)
has no rho_k: every statistic but ``local_acc`` is NaN there (``null`` in ``metrics.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution

from pyro_bll.core.chain import BLLChain, _prototype
from pyro_bll.core.noise import block_noise
from pyro_bll.core.step_cache import StepCache
from pyro_bll.families import Params

# block index offset of the logged statistics' noise streams (training draws use 0..N-1)
STATISTICS_STREAM = 1 << 20

SCALARS = ("kl", "mean_msd", "mean_cos", "proto_msd", "proto_cos", "feedback_weight", "local_acc")
LOGGED = (
    "mean_cos",
    "proto_cos",
    "feedback_weight",
    "local_acc",
)  # logged during training (StepAgreement)


# statistics of the latent z_k and its posterior rho_k: NaN for a block without a latent
# (the last one when the head reads m(alpha_N), docs/math.md §2); only local_acc and
# local_acc_class, the head's accuracy there, are defined for every block
LATENT_STATISTICS = ("kl", "mean_msd", "mean_cos", "proto_msd", "proto_cos",
                     "feedback_weight", "proto_msd_class")  # fmt: skip


@dataclass
class BlockSums:
    """One block's statistics summed per example over its valid sites (bootstrap-ready).

    Dividing a weighted sum over examples by the same weighted sum of the counts gives the
    averages of the module docstring for any example weights (1 = the batch, multinomial
    counts = a bootstrap resample).
    """

    sites: Tensor  # [B] valid latent sites (or pooled maps) per example
    labels: Tensor  # [B] valid labels per example
    kl: Tensor  # [B, C] KL per channel
    mean_msd: Tensor  # [B]
    mean_cos: Tensor  # [B]
    proto_sites: Tensor  # [B] sites compared with the prototype
    proto_msd: Tensor  # [B]
    proto_cos: Tensor  # [B]
    feedback_weight: Tensor  # [B]
    correct: Tensor  # [B, D] correct local-likelihood predictions, one column per draw
    class_sites: Tensor | None = None  # [B, V] prototype sites per true class
    proto_msd_class: Tensor | None = None  # [B, V]
    class_labels: Tensor | None = None  # [B, V] valid labels per true class
    correct_class: Tensor | None = None  # [B, V, D]


def _expand_labels(t: Tensor, shape: torch.Size) -> Tensor:
    """A label-shaped ``[B, *L]`` tensor broadcast over the sites ``[B, *L, *rest]``."""
    if tuple(shape[: t.dim()]) != tuple(t.shape):
        raise ValueError(f"labels {tuple(t.shape)} do not index the latent sites {tuple(shape)}")
    return t.reshape(t.shape + (1,) * (len(shape) - t.dim())).expand(shape)


def _per_example(t: Tensor, keep: int = 0) -> Tensor:
    """Sum over every axis but the batch axis and the last ``keep`` axes."""
    return t.reshape(t.shape[0], -1, *t.shape[t.dim() - keep :]).sum(1)


def _label_logits(fn: Distribution) -> Tensor:
    return fn.logits if hasattr(fn, "logits") else fn.probs.log()


def prototype_means(chain: BLLChain, k: int) -> Tensor:
    """m(pi_c) for every class c, ``[V, C]``: the means of the normalised class potentials."""
    fam = chain.families[k]
    return fam.mean(fam.from_natural(fam.class_natural(chain.class_potentials(k))))


def _feedback_weight(m_a: Tensor, m_r: Tensor, proto: Tensor) -> Tensor:
    """<m_r - m_a, proto - m_a> / ||proto - m_a||^2 over the last axis (``feedback_weight``)."""
    d_p = proto - m_a
    return ((m_r - m_a) * d_p).sum(-1) / d_p.pow(2).sum(-1).clamp(min=1e-12)


def local_logits(chain: BLLChain, k: int, alpha: Params, z: Tensor) -> Tensor:
    """Logits of q_k(y | z_k) ``[B, *L, V]`` at a draw z ``[B, *S, C]`` (head for the last)."""
    if k < chain.num_blocks - 1:
        lik = chain.local_likelihoods[k] if chain.local_likelihoods is not None else _prototype
        return _label_logits(lik(chain, k, z, StepCache(alpha={k: alpha})))
    fam = chain.families[k]
    h = fam.features(z).to(alpha[0].dtype) if chain.head_input == "sample" else fam.mean(alpha)
    logits = _label_logits(chain.head.distribution(h))
    return logits if chain.head_input == "sample" else logits.expand(z.shape[0], *logits.shape[1:])


def _spatial_axes(chain: BLLChain) -> tuple[int, ...] | None:
    """Axes averaged before the prototype comparison (pooling spatial messages only)."""
    message = getattr(chain, "spatial_message", None)
    if message is None or getattr(message, "name", "") != "pool":
        return None
    return tuple(range(1, 1 + message.spatial_dims))


@dataclass
class _PrototypeTerms:
    """m(alpha_k) against the label's prototype mean m(pi_y), per site compared with the
    prototype: ``[B, *S]``, or ``[B]`` for a pooling spatial message with per-example
    labels (the spatial means are compared)."""

    valid: Tensor  # which sites are valid (the fraction of valid sites when pooled)
    labels: Tensor  # the label of each site (0 where not valid)
    msd: Tensor  # mean over channels of (m(alpha) - m(pi_y))^2
    cos: Tensor  # cosine of m(alpha) and m(pi_y)
    feedback_weight: Tensor  # <m(rho) - m(alpha), m(pi_y) - m(alpha)> / ||m(pi_y) - m(alpha)||^2


def _prototype_terms(
    chain: BLLChain, m_a: Tensor, m_r: Tensor, valid: Tensor, y_safe: Tensor, protos: Tensor
) -> _PrototypeTerms:
    """``proto_msd``, ``proto_cos`` and ``feedback_weight`` at every site from the means
    m(alpha_k), m(rho_k) ``[B, *S, C']``, the valid sites ``[B, *S]``, the labels
    ``[B, *L]`` (valid ones) and the prototype means ``protos`` ``[V, C']``."""
    pooled = _spatial_axes(chain)
    m_ap, m_rp, p_valid = m_a, m_r, valid
    if pooled is not None and y_safe.dim() == 1:
        m_ap, m_rp, p_valid = m_a.mean(pooled), m_r.mean(pooled), valid.mean(pooled)
    y_sites = _expand_labels(y_safe, m_ap.shape[:-1])
    fb_weight = _feedback_weight(m_ap, m_rp, protos[y_sites])
    diff_p = m_ap - protos[y_sites]
    return _PrototypeTerms(
        valid=p_valid,
        labels=y_sites,
        msd=diff_p.pow(2).mean(-1),
        cos=F.cosine_similarity(m_ap, protos[y_sites], dim=-1, eps=1e-12),
        feedback_weight=fb_weight,
    )


def _local_hits(
    chain: BLLChain,
    k: int,
    alpha: Params,
    site: Params,
    y: Tensor,
    labels_valid: Tensor,
    lab: Tensor,
    *,
    draws: int,
    chunk: int,
    per_class: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """Correct predictions of q_k(y | z_k) at ``draws`` draws z_k ~ alpha_k (``site``, the
    law of z_k), ``chunk`` at a time folded into the batch axis: per chunk of n draws,
    the valid labels hit per example ``[B, n]`` and, with ``per_class``, per true class
    ``[B, V, n]`` (``lab``: the one-hot valid labels ``[B, *L, V]``)."""
    b = y.shape[0]
    correct, correct_class = [], []
    dist_a = chain.families[k].distribution(site)
    for start in range(0, draws, chunk):
        n = min(chunk, draws - start)
        z = dist_a.sample((n,))  # [n, B, *S, C], folded into the batch axis below
        alpha_n = tuple(p.repeat(n, *([1] * (p.dim() - 1))) for p in alpha)
        logits = local_logits(chain, k, alpha_n, z.reshape(n * b, *z.shape[2:]))
        hit = ((logits.argmax(-1).reshape(n, *y.shape) == y) & labels_valid).to(lab.dtype)
        correct.append(_per_example(hit.movedim(0, -1), keep=1))  # [B, n]
        if per_class:  # [B, V, n]
            correct_class.append(
                _per_example(lab.unsqueeze(-1) * hit.movedim(0, -1).unsqueeze(-2), keep=2)
            )
    return correct, correct_class


def _add_class_sums(
    sums: BlockSums, proto: _PrototypeTerms, lab: Tensor, correct_class: list[Tensor]
) -> None:
    """Fill the per-true-class fields of ``sums`` (``[B, V]``, ``[B, V, D]``)."""
    num_classes = lab.shape[-1]
    onehot = F.one_hot(proto.labels, num_classes).to(lab.dtype) * proto.valid.unsqueeze(-1)
    sums.class_sites = _per_example(onehot, keep=1)
    sums.proto_msd_class = _per_example(onehot * proto.msd.unsqueeze(-1), keep=1)
    sums.class_labels = _per_example(lab, keep=1)
    sums.correct_class = torch.cat(correct_class, dim=-1)


def _blank_latent_statistics(sums: BlockSums) -> None:
    """NaN for every statistic of ``LATENT_STATISTICS`` (a block without z_k and rho_k)."""
    for name in LATENT_STATISTICS:
        value = getattr(sums, name)
        if value is not None:
            setattr(sums, name, torch.full_like(value, float("nan")))


def block_sums(
    chain: BLLChain,
    k: int,
    alpha: Params,
    y: Tensor,
    mask: Tensor | None,
    draws: int = 1,
    per_class: bool = False,
    chunk: int = 16,
) -> BlockSums:
    """Every statistic of block k on a batch, summed per example (see the module docstring).

    ``alpha`` is block k's forward message on the batch; ``draws`` z_k ~ alpha_k are taken
    for the local-likelihood accuracy (``chunk`` at a time, folded into the batch axis).
    """
    fam = chain.families[k]
    labels_valid = torch.ones_like(y, dtype=torch.bool) if mask is None else mask.bool()
    site = chain.latent_params(k, alpha)  # the law of z_k (alpha, or its spatial mean)
    rho = fam.posterior(site, chain.feedback_message(k, y, mask, site))
    kl = fam.kl(rho, site)  # [B, *S, C]
    valid = _expand_labels(labels_valid, kl.shape[:-1]).to(kl.dtype)  # [B, *S]
    m_a, m_r = fam.mean(site), fam.mean(rho)  # [B, *S, C']

    protos = prototype_means(chain, k).to(m_a.dtype)  # [V, C']
    y_safe = torch.where(labels_valid, y, torch.zeros_like(y))
    proto = _prototype_terms(chain, m_a, m_r, valid, y_safe, protos)
    lab = F.one_hot(y_safe, protos.shape[0]).to(kl.dtype) * labels_valid.unsqueeze(-1)  # [B,*L,V]
    correct, correct_class = _local_hits(
        chain, k, alpha, site, y, labels_valid, lab, draws=draws, chunk=chunk, per_class=per_class
    )
    sums = BlockSums(
        sites=_per_example(valid),
        labels=_per_example(labels_valid.to(kl.dtype)),
        kl=_per_example(kl * valid.unsqueeze(-1), keep=1),
        mean_msd=_per_example((m_r - m_a).pow(2).mean(-1) * valid),
        mean_cos=_per_example(F.cosine_similarity(m_r, m_a, dim=-1, eps=1e-12) * valid),
        proto_sites=_per_example(proto.valid),
        proto_msd=_per_example(proto.msd * proto.valid),
        proto_cos=_per_example(proto.cos * proto.valid),
        feedback_weight=_per_example(proto.feedback_weight * proto.valid),
        correct=torch.cat(correct, dim=1) if correct else kl.new_zeros(y.shape[0], 0),
    )
    if per_class:
        _add_class_sums(sums, proto, lab, correct_class)
    if not chain.has_latent(k):  # no z_k, no rho_k: only the head's accuracy is defined
        _blank_latent_statistics(sums)
    return sums


def summarise(sums: BlockSums, weights: Tensor | None = None) -> dict[str, Tensor]:
    """The averages of the module docstring under example weights ``[R, B]``.

    ``weights=None`` weighs every example once (``R = 1``, local accuracy averaged over
    the draws). With ``R`` equal to the number of draws, replicate r uses draw r (a
    bootstrap resample paired with one Monte Carlo draw). Returns ``[R]`` per scalar,
    ``[R, C]`` for ``kl_channel`` and ``[R, V]`` for the per-class statistics (NaN where a
    replicate holds no example of the class).
    """
    w = sums.sites.new_ones(1, sums.sites.shape[0]) if weights is None else weights.to(sums.kl)
    paired = weights is not None and w.shape[0] == sums.correct.shape[1]
    sites, psites, labels = w @ sums.sites, w @ sums.proto_sites, w @ sums.labels
    if paired:
        correct = (w * sums.correct.T).sum(-1)
    else:
        correct = w @ sums.correct.mean(-1)
    out = {
        "kl": (w @ sums.kl.sum(-1)) / sites,
        "mean_msd": (w @ sums.mean_msd) / sites,
        "mean_cos": (w @ sums.mean_cos) / sites,
        "proto_msd": (w @ sums.proto_msd) / psites,
        "proto_cos": (w @ sums.proto_cos) / psites,
        "feedback_weight": (w @ sums.feedback_weight) / psites,
        "local_acc": correct / labels,
        "kl_channel": (w @ sums.kl) / sites.unsqueeze(-1),
    }
    if sums.correct_class is not None:
        out["proto_msd_class"] = (w @ sums.proto_msd_class) / (w @ sums.class_sites)
        if paired:
            hits = torch.einsum("rb,bvr->rv", w, sums.correct_class)
        else:
            hits = w @ sums.correct_class.mean(-1)
        out["local_acc_class"] = hits / (w @ sums.class_labels)
    return out


def bootstrap_weights(batch: int, replicates: int, generator: torch.Generator) -> Tensor:
    """``[R, B]`` multinomial counts: R bootstrap resamples of the batch's examples."""
    idx = torch.randint(0, batch, (replicates, batch), generator=generator)
    return torch.zeros(replicates, batch).scatter_add_(1, idx, torch.ones(replicates, batch))


def _masked_mean(v: Tensor, w: Tensor | None) -> Tensor:
    return v.mean() if w is None else (v * w).sum() / w.sum()


def _quick(chain: BLLChain, k: int, alpha: Params, y: Tensor, mask: Tensor | None) -> Tensor:
    """``LOGGED`` of block k on the batch with one draw: ``block_sums`` + ``summarise``
    with ``draws=1``, without the per-example sums (same values, far fewer operations)."""
    fam = chain.families[k]
    site = chain.latent_params(k, alpha)  # the law of z_k (alpha, or its spatial mean)
    m_a = fam.mean(site)
    m_r = fam.mean(fam.posterior(site, chain.feedback_message(k, y, mask, site)))
    w = None if mask is None else _expand_labels(mask, m_a.shape[:-1]).to(m_a.dtype)
    m_ap, m_rp, w_p, pooled = m_a, m_r, w, _spatial_axes(chain)
    if pooled is not None and y.dim() == 1:
        m_ap, m_rp = m_a.mean(pooled), m_r.mean(pooled)
    y_safe = y if mask is None else torch.where(mask.bool(), y, torch.zeros_like(y))
    protos = prototype_means(chain, k).to(m_a.dtype)[_expand_labels(y_safe, m_ap.shape[:-1])]
    z = fam.distribution(site).sample((1,))[0]
    hit = (local_logits(chain, k, alpha, z).argmax(-1) == y).to(m_a.dtype)
    latent = [
        _masked_mean(F.cosine_similarity(m_r, m_a, dim=-1, eps=1e-12), w),
        _masked_mean(F.cosine_similarity(m_ap, protos, dim=-1, eps=1e-12), w_p),
        _masked_mean(_feedback_weight(m_ap, m_rp, protos), w_p),
    ]
    if not chain.has_latent(k):  # no rho_k to compare: NaN (null in the logged history)
        latent = [torch.full_like(v, float("nan")) for v in latent]
    return torch.stack([*latent, _masked_mean(hit, None if mask is None else mask.to(m_a.dtype))])


@torch.no_grad()
def step_statistics(
    chain: BLLChain, cache: StepCache, y: Tensor, mask: Tensor | None
) -> dict[str, Tensor]:
    """The cheap statistics ``LOGGED``, ``[N]`` each, from a step's cached alpha_k.

    One draw per block for the local accuracy, taken under a forked RNG so that logging
    leaves the training's random stream (and hence its results) unchanged; with the
    step's noise key it comes from a stream of its own per block, so that the logged
    value does not depend on which blocks were computed with it (one backward per block,
    a rank's segment). Blocks whose
    alpha_k is not in the cache (a segment of the block-parallel runtime) log zeros, as
    their losses do.
    """
    device = y.device
    rows = torch.zeros(len(LOGGED), chain.num_blocks, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for k in range(chain.num_blocks):
            if k in cache.alpha:  # the draw: a stream of its own per (seed, step, block)
                with block_noise(cache.noise, STATISTICS_STREAM + k, device):
                    rows[:, k] = _quick(chain, k, cache.alpha[k], y, mask)
    return {f"agreement_{name}": row for name, row in zip(LOGGED, rows, strict=True)}


class StepAgreement:
    """``step_statistics`` on the first and every ``every``-th step of an epoch, held between.

    The training step logs the held values on every step, so an epoch's mean is the mean
    over the computed steps (each weighted by the steps it stands for). Computing them on
    every step of the 20-block transformer costs about a third of the step on a 2-core CPU
    (many tiny tensor operations per block); every 10th step costs about 1-2 %.
    ``reset`` (called by the trainer at the start of every epoch) makes a resumed run log
    exactly what an uninterrupted one does.
    """

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.reset()

    def reset(self) -> None:
        self.calls, self.last = 0, None

    def __call__(self, chain, cache, y, mask) -> dict[str, Tensor]:
        if self.last is None or self.calls % self.every == 0:
            self.last = step_statistics(chain, cache, y, mask)
        self.calls += 1
        return self.last
