"""Tasks: data, network and evaluation, chosen by name with ``--task``."""

from .s2s_reverse import S2SReverseTask

TASKS = {"s2s_reverse": S2SReverseTask}

__all__ = ["TASKS", "S2SReverseTask"]
