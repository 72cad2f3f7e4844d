"""Within-class variation of the backward messages (pyro_bll/core/message_variation.py),
against independent computations: a numpy ANOVA, the Gaussian prototype's closed form,
finite differences through the live blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_bll import make_family
from pyro_bll.analysis.diagnostics import forward_messages, refresh_backward_copies
from pyro_bll.core.lookahead import Lookahead
from pyro_bll.core.message_variation import (
    block_variation,
    effective_message,
    feedback_potential,
    within_class_share,
)

from utils import assert_close, mlp_chain, toy_batch


def _anova_share(v: np.ndarray, labels: np.ndarray) -> float:
    """Within-class sum of squares over the total sum of squares, from the definition."""
    within = sum(((v[labels == c] - v[labels == c].mean(0)) ** 2).sum() for c in set(labels))
    return within / ((v - v.mean(0)) ** 2).sum()


def test_the_within_class_share_is_the_anova_decomposition():
    """Hand-made vectors, labels (one class has a single member, one is absent) and
    bootstrap counts: each replicate is the ANOVA of the data with every row repeated
    as often as its count."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(9, 2, 3)) + np.arange(9)[:, None, None] % 3  # [U, 2, 3]
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 4])  # class 3 absent, class 4 alone
    got = within_class_share(torch.from_numpy(v), torch.from_numpy(labels), num_classes=5)
    flat = v.reshape(9, -1)
    assert_close(got, [_anova_share(flat, labels)], atol=1e-13, rtol=1e-12)
    counts = np.stack([rng.multinomial(9, np.full(9, 1 / 9)) for _ in range(4)])  # [R, U]
    counts[0] = [3, 0, 1, 1, 2, 0, 0, 1, 1]  # a class (1) with one repeated member only
    got = within_class_share(
        torch.from_numpy(flat), torch.from_numpy(labels), 5, torch.from_numpy(counts)
    )
    want = [_anova_share(np.repeat(flat, c, 0), np.repeat(labels, c)) for c in counts]
    assert_close(got, want, atol=1e-13, rtol=1e-12)
    same = np.repeat(np.eye(3)[[0, 1, 2]], 3, 0)  # [U, 3]: identical within each class
    got = within_class_share(torch.from_numpy(same), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]), 3)
    assert got.item() == 0.0


def _paper_chain(**kw):
    sigma = 0.7
    chain = mlp_chain(make_family("gaussian", sigma=sigma), register_params=False, **kw)
    chain = chain.double().eval()
    with torch.no_grad():
        for layer in chain.feedback.layers:
            layer.weight.normal_(0, 1.5)
    return chain, sigma


def test_a_label_feedback_is_constant_within_a_class_and_its_message_is_the_prototypes():
    """The label feedback's potential has no within-class variation (to 1e-12, float64);
    its effective message is (b_y - sum_c q_c b_c) / sigma^2 (numpy), which does vary."""
    chain, sigma = _paper_chain()
    x, y = toy_batch(n=48)
    mask = torch.rand(48) > 0.2  # unobserved labels are left out
    for k, alpha in enumerate(forward_messages(chain, x.double())[:-1]):
        var = block_variation(chain, k, alpha, y, mask)
        shares = var.shares()
        assert abs(shares["feedback_within"].item()) < 1e-12
        beta = feedback_potential(chain, k, alpha, y, mask).numpy()[mask.numpy()]  # [U, 2C]
        labels = y.numpy()[mask.numpy()]
        within = sum(((beta[labels == c] - beta[labels == c][0]) ** 2).sum() for c in range(4))
        assert within < 1e-12 and ((beta - beta.mean(0)) ** 2).sum() > 1.0
        # the prototype likelihood's gradient at m(alpha_k), in closed form
        m, b = alpha[0].numpy(), chain.feedback.layers[k].weight.detach().numpy()  # [B, C], [V, C]
        logits = -((m[:, None] - b[None]) ** 2).sum(-1) / (2 * sigma**2)  # [B, V]
        q = np.exp(logits - logits.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        g = (b[y.numpy()] - q @ b) / sigma**2  # [B, C]
        assert_close(effective_message(chain, k, alpha, y, None), g, atol=1e-12, rtol=1e-10)
        assert_close(shares["message_within"], [_anova_share(g[mask.numpy()], labels)], atol=1e-12)
        assert 0 < shares["message_within"].item() < 1


def _log_q_by_hand(chain, k, z, y):
    """log q_k(y | z) ``[B]`` of the depth-1 look-ahead through the live block k + 1 and
    its read-out (block k + 1's predictive head, or the output head)."""
    j = k + 1
    h = chain.families[j].mean(chain.families[j].params(chain.blocks[j](z)))
    head = chain.head if j == chain.num_blocks - 1 else chain.pred_heads[j]
    return head(h).log_softmax(-1).gather(-1, y[:, None])[:, 0]


@pytest.mark.parametrize("read", ["sample", "mean"])
def test_the_lookahead_message_is_the_gradient_of_log_q_at_the_forward_mean(read):
    """g_k against central differences of log q_k(y | z) at m(alpha_k) through the live
    blocks (the copies are fresh); no parameter gradient is touched; the share is > 0."""
    chain, _ = _paper_chain(widths=(5, 5, 5))
    chain.use_lookahead(Lookahead(depth=1, read=read))
    x, y = toy_batch(n=24)
    h = 1e-6
    for k, alpha in enumerate(forward_messages(chain, x.double())[:-1]):
        g = effective_message(chain, k, alpha, y, None)  # [B, C]
        m = alpha[0].detach()
        fd = torch.zeros_like(m)
        with torch.no_grad():
            for i in range(m.shape[1]):  # every example's log q reads only its own z
                e = torch.zeros_like(m)
                e[:, i] = h
                up, down = _log_q_by_hand(chain, k, m + e, y), _log_q_by_hand(chain, k, m - e, y)
                fd[:, i] = (up - down) / (2 * h)
        assert_close(g, fd, atol=1e-7, rtol=1e-6)
        assert g.abs().max() > 1e-3
        assert block_variation(chain, k, alpha, y, None).shares()["message_within"].item() > 0
    assert all(p.grad is None for p in chain.parameters())


def test_loading_weights_refreshes_the_lookahead_copies():
    """A diagnosed run's look-ahead reads the loaded weights, not those it was built with."""
    chain, _ = _paper_chain()
    chain.use_lookahead(Lookahead(depth=1))
    with torch.no_grad():  # what loading a checkpoint does to the live weights
        for p in chain.blocks.parameters():
            p.add_(1.0)
    refresh_backward_copies(chain)
    for live, copy in zip(chain.blocks[1:], chain.lookahead.blocks[1:], strict=True):
        for a, b in zip(live.parameters(), copy.parameters(), strict=True):
            assert torch.equal(a, b)
