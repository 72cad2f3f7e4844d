"""Replicas of a stage: their shards of every batch and the process groups they average in.

With K stages x R replicas (``group.Layout``) every rank reads the same global batches;
replica r of a stage keeps shard r of each (``shard_batches``) and, after its backward
pass, averages its gradients with the stage's other replicas on a process group of their
own (``replica_groups``; the all-reduce is ``RankStage.average_gradients``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from pyro_bll.distributed.group import Layout
from pyro_bll.distributed.schedule import Batch
from pyro_bll.distributed.stage import RankStage
from pyro_bll.distributed.transport import collective


def shard_batches(batches: Iterable[Batch], stage: RankStage) -> Iterator[Batch]:
    """The stage replica's shard of every batch (``torch.tensor_split``: sizes differ by
    at most one); its share n_r / n is queued for the stage's gradient average."""
    r, n_rep = stage.replica, stage.layout.replicas
    for x, y, mask in batches:
        n = y.shape[0]
        index = torch.tensor_split(torch.arange(n), n_rep)[r]
        stage.shard_weights.append(len(index) / n)
        yield x[index], y[index], None if mask is None else mask[index]


def replica_groups(layout: Layout, stage: RankStage) -> None:
    """Create every stage's replica group (collective: all ranks, in the same order) and
    give this rank's to its stage; nothing to do without replicas."""
    if layout.replicas == 1:
        return
    for s in range(layout.stages):
        ranks = layout.stage_ranks(s)
        group = collective("creating the replica groups", lambda r=ranks: dist.new_group(r))
        if s == stage.stage:
            stage.replica_group = group
