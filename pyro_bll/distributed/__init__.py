"""Block-parallel BLL across processes and devices with torch.distributed.

One process (rank) per contiguous group of blocks (``group``); forward messages flow
rank to rank by point-to-point sends (``transport``) in a synchronous or pipelined
schedule (``schedule``), and with ``--beta lookahead`` the weights of the blocks above
flow back at refresh steps (``lookahead_link``); each rank trains its own blocks on their
local losses with its own optimiser (``stage``, ``runtime``) and writes its own
checkpoints, which ``checkpoint.assemble`` merges into one single-process checkpoint; a
failed rank stops all (``fault``).
``launch.main`` is what ``experiments/run.py --distributed`` calls under torchrun.
"""

from pyro_bll.distributed.group import BlockGroups
from pyro_bll.distributed.rank_checkpoints import assemble, complete_epochs

__all__ = ["BlockGroups", "assemble", "complete_epochs"]
