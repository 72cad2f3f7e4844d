"""Feedback networks N_B: they see only the label and send a potential to every block.

Each takes ``(num_classes, sizes, init_std)`` (raw feedback width per block, initial
output scale) and provides
``forward(y, k)``, ``class_outputs(k)`` (the output for every label, ``[V, size_k]``) and
``block_module(k)`` (the parameters owned by block k). ``MESSAGES`` (``spatial.py``) says
how such a per-example message meets a feature map: on a channel or grid summary, pooled
or broadcast over space.
"""

from pyro_bll.guides.linear import LinearFeedback
from pyro_bll.guides.mlp import MLPFeedback
from pyro_bll.guides.spatial import (
    MESSAGES,
    BroadcastMessage,
    ChannelMessage,
    GridMessage,
    MeanMessage,
    PoolMessage,
    SpatialMessage,
    grid_side,
)

FEEDBACKS = {"linear": LinearFeedback, "mlp": MLPFeedback}

__all__ = [
    "FEEDBACKS",
    "MESSAGES",
    "BroadcastMessage",
    "LinearFeedback",
    "ChannelMessage",
    "GridMessage",
    "MeanMessage",
    "MLPFeedback",
    "PoolMessage",
    "SpatialMessage",
    "grid_side",
]
