"""--clip-grad: each block's gradient is clipped on its own, against a numpy computation."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_bll import seed_everything
from pyro_bll.families import make_family
from pyro_bll.methods import build_method
from pyro_bll.run.build import config_for_task, validate
from pyro_bll.run.step import backward_pass, clip_block_gradients
from pyro_bll.run.training import Trainer

from utils import assert_close, mlp_chain, toy_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import run  # noqa: E402

S2S = ["--layers", "3", "--d-model", "12", "--seq-len", "4", "--train-size", "48",
       "--test-size", "8", "--batch-size", "8", "--threads", "1"]  # fmt: skip


def _grads(chain, k):
    return [p.grad.detach().numpy().copy() for p in chain.block_parameters(k) if p.grad is not None]


def _chain_with_gradients():
    seed_everything(0)  # the same network and batch on every call
    chain = mlp_chain(make_family("gaussian")).double()
    method = build_method(chain, config_for_task("fashion_mnist_mlp", method="bll"))
    x, y = toy_batch()
    backward_pass(method, chain, x.double(), y, None, None, per_block=False)
    return chain


def test_each_block_is_scaled_to_the_norm_alone():
    chain = _chain_with_gradients()
    before = [_grads(chain, k) for k in range(chain.num_blocks)]
    norms = [np.sqrt(sum((g**2).sum() for g in gs)) for gs in before]
    limit = float(np.median(norms))  # one block above, one below, one at the limit
    clip_block_gradients(chain, limit, range(chain.num_blocks))
    for k, gs in enumerate(before):
        scale = min(1.0, limit / norms[k])
        for got, g in zip(_grads(chain, k), gs, strict=True):
            assert_close(torch.from_numpy(got), torch.from_numpy(g * scale), atol=1e-12, rtol=1e-6)
    after = [np.sqrt(sum((g**2).sum() for g in _grads(chain, k))) for k in range(len(norms))]
    assert max(after) <= limit * (1 + 1e-6)
    assert min(norms) < limit  # the check above covered an unclipped block too


def test_a_block_clips_without_looking_at_another_blocks_gradient():
    a, b = _chain_with_gradients(), _chain_with_gradients()
    for p in b.block_parameters(0):
        p.grad.mul_(1e3)  # block 0 of the second chain has a huge gradient
    for chain in (a, b):
        clip_block_gradients(chain, 1e-3, range(chain.num_blocks))
    for k in range(1, a.num_blocks):
        for ga, gb in zip(_grads(a, k), _grads(b, k), strict=True):
            assert_close(torch.from_numpy(gb), torch.from_numpy(ga), atol=0.0)


def test_zero_leaves_the_gradients_alone():
    chain = _chain_with_gradients()
    before = [_grads(chain, k) for k in range(chain.num_blocks)]
    clip_block_gradients(chain, 0.0, range(chain.num_blocks))
    for k, gs in enumerate(before):
        for got, g in zip(_grads(chain, k), gs, strict=True):
            assert np.array_equal(got, g)


@pytest.mark.parametrize("task", ["s2s_reverse", "fashion_mnist_mlp", "fashion_mnist"])
def test_off_by_default(task):
    assert config_for_task(task).clip_grad == 0.0


def test_the_training_step_clips_before_adam():
    cfg, _ = run.parse_config([*S2S, "--clip-grad", "0.01"])
    trainer = Trainer(validate(cfg))
    chain, seen = trainer.chain, []

    def record(optimizer, args, kwargs):  # runs right before Adam's update
        for k in range(chain.num_blocks):
            g = [p.grad.norm() for p in chain.block_parameters(k) if p.grad is not None]
            seen.append(torch.linalg.vector_norm(torch.stack(g)).item())

    trainer.optimizer.register_step_pre_hook(record)
    x, y, mask = next(iter(trainer.task.train_batches(0)))
    trainer.step(x, y, mask)
    assert len(seen) == chain.num_blocks
    assert max(seen) <= 0.01 * (1 + 1e-5)
