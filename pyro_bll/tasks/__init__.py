"""Tasks: data, network and evaluation, chosen by name with ``--task``."""

from pyro_bll.tasks.fashion_mnist_mlp import FashionMNISTMLPTask
from pyro_bll.tasks.s2s_reverse import S2SReverseTask
from pyro_bll.tasks.vision import CIFAR10Task, FashionMNISTTask

TASKS = {
    "s2s_reverse": S2SReverseTask,
    "fashion_mnist_mlp": FashionMNISTMLPTask,
    "fashion_mnist": FashionMNISTTask,
    "cifar10": CIFAR10Task,
}

__all__ = ["TASKS", "CIFAR10Task", "FashionMNISTMLPTask", "FashionMNISTTask", "S2SReverseTask"]
