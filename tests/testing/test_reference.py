"""The Pyro block-local ELBO equals the plain-torch loss on the s2s_reverse transformer."""

import pytest

from pyro_bll import BlockLocalELBO, seed_everything
from pyro_bll.run.options import RunConfig
from pyro_bll.tasks import S2SReverseTask
from pyro_bll.testing.reference import plain_block_losses

from utils import assert_close


@pytest.mark.parametrize("likelihood", ["bound", "sample"])
def test_pyro_and_plain_losses_agree(family, likelihood):
    cfg = RunConfig(layers=3, d_model=6, seq_len=4, train_size=8, batch_size=8, test_size=4)
    task = S2SReverseTask(cfg)
    chain = task.build_chain(family).double()
    chain.likelihood = likelihood
    x, y, mask = next(task.train_batches(0))
    seed_everything(5)
    pyro_losses = BlockLocalELBO(3).block_losses(chain.model, chain.guide, x, y, mask)
    seed_everything(5)
    plain = plain_block_losses(chain, x, y, mask)
    assert_close(pyro_losses.per_block, plain, atol=1e-9, rtol=1e-9)
