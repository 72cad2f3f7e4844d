"""Sequence reversal (the paper's transformer task).

A random permutation p of 0..n-1 is followed by a separator token S = n; the model must
generate p reversed. Training is teacher-forced next-token prediction on

    seq = [p_1 .. p_n, S, p_n .. p_1]          length 2n + 1
    x   = seq[:-1],  y = seq[1:]               ``[B, 2n]`` each
    mask = positions t >= n (the reversed half)  ``[B, 2n]``

Testing decodes greedily from [p, S] on held-out permutations (never seen in training)
and reports token accuracy and whole-sequence accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pyro_bll.config import Section, option, positive
from pyro_bll.core.chain import BLLChain
from pyro_bll.core.likelihoods import CategoricalHead
from pyro_bll.families import Family
from pyro_bll.tasks.base import LayerStackOptions, check_diagnostic_size

if TYPE_CHECKING:
    from pyro_bll.run.options import RunConfig

TEST_SEED = 2_305_149_74  # the held-out set is the same for every run


def random_permutations(n: int, count: int, generator: torch.Generator) -> Tensor:
    """``[count, n]`` independent uniform permutations."""
    return torch.rand(count, n, generator=generator).argsort(dim=-1)


def make_sequences(perms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x, y, mask ``[B, 2n]`` from permutations ``[B, n]``."""
    b, n = perms.shape
    sep = torch.full((b, 1), n, dtype=perms.dtype)
    seq = torch.cat([perms, sep, perms.flip(-1)], dim=1)  # [B, 2n + 1]
    mask = torch.arange(2 * n) >= n
    return seq[:, :-1], seq[:, 1:], mask.expand(b, -1)


@dataclass(frozen=True)
class SequenceOptions(Section):
    """The sequences of ``--task s2s_reverse``."""

    name = "sequence"
    title = "sequence reversal (s2s_reverse)"
    applies_to = "--task s2s_reverse"

    seq_len: int = option(10, "length n of the permutation to reverse", check=positive)


class S2SReverseTask:
    """Data, network and evaluation for ``--task s2s_reverse``."""

    SECTIONS = (LayerStackOptions, SequenceOptions)
    DEFAULTS: dict = {}  # the options' own defaults are this task's (the paper's)
    event_dim = 2  # latents are [B, T, D]
    params_propagation = True  # blocks can read alpha's unconstrained parameters

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Nothing beyond the sections' own checks (blocks divide layers)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.n = cfg.seq_len
        self.train_size = cfg.train_size or 10_000
        self.test_size = cfg.test_size or 1_000
        self.vocab = self.n + 1
        g = torch.Generator().manual_seed(TEST_SEED + self.n)
        self.test_perms = random_permutations(self.n, self.test_size, g)
        self._test_keys = {tuple(p) for p in self.test_perms.tolist()}

    # ---- network -----------------------------------------------------------------------
    def build_chain(self, family: Family) -> BLLChain:
        from pyro_bll.models import transformer_blocks
        from pyro_bll.tasks.assembly import assemble_chain

        cfg = self.cfg
        d = cfg.d_model
        blocks = transformer_blocks(
            self.vocab,
            2 * self.n,
            d,
            cfg.layers,
            cfg.num_blocks,
            family,
            params_input=cfg.propagate == "params",
        )
        return assemble_chain(
            cfg,
            family,
            blocks,
            [d] * len(blocks),
            self.vocab,
            lambda: CategoricalHead(d, self.vocab),
            lambda k: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, self.vocab)),
            event_dim=self.event_dim,
        )

    # ---- data --------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return -(-self.train_size // self.cfg.batch_size)

    def train_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Fresh permutations each epoch, from a generator seeded by (seed, epoch)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        perms = random_permutations(self.n, self.train_size, g)
        keep = torch.tensor([tuple(p) not in self._test_keys for p in perms.tolist()])
        perms = perms[keep]
        for i in range(0, len(perms), self.cfg.batch_size):
            yield make_sequences(perms[i : i + self.cfg.batch_size])

    def diagnostic_batch(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced x, y, mask ``[n, 2 seq_len]`` of the first n held-out permutations."""
        n = check_diagnostic_size(n, len(self.test_perms))
        return make_sequences(self.test_perms[:n])

    # ---- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, chain: BLLChain, device: torch.device) -> dict[str, float]:
        """Greedy autoregressive decoding on the held-out permutations."""
        was_training = chain.training
        chain.eval()
        correct_tokens, correct_seqs = 0, 0
        for i in range(0, len(self.test_perms), 500):
            perms = self.test_perms[i : i + 500].to(device)
            b = perms.shape[0]
            seq = torch.cat([perms, torch.full((b, 1), self.n, device=device)], dim=1)
            for _ in range(self.n):
                nxt = chain.predict_logits(seq)[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
            hit = seq[:, self.n + 1 :] == perms.flip(-1)  # [b, n]
            correct_tokens += hit.sum().item()
            correct_seqs += hit.all(-1).sum().item()
        chain.train(was_training)
        total = len(self.test_perms)
        return {
            "test_accuracy": correct_tokens / (total * self.n),
            "test_sequence_accuracy": correct_seqs / total,
        }
