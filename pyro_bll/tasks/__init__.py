"""Tasks: data, network and evaluation, chosen by name with ``--task``."""

from .fashion_mnist_mlp import FashionMNISTMLPTask
from .s2s_reverse import S2SReverseTask

TASKS = {"s2s_reverse": S2SReverseTask, "fashion_mnist_mlp": FashionMNISTMLPTask}

__all__ = ["TASKS", "FashionMNISTMLPTask", "S2SReverseTask"]
