"""Data loaders (no downloads at run time, except CIFAR-10's torchvision fallback)."""

from pyro_bll.data.augment import normalise, random_crop, random_flip
from pyro_bll.data.cifar10 import DEFAULT_CIFAR10, load_cifar10
from pyro_bll.data.device_data import DeviceImageData, channel_stats
from pyro_bll.data.idx import DEFAULT_FASHION_MNIST, DataError, load_fashion_mnist, read_idx

__all__ = [
    "DEFAULT_CIFAR10",
    "DEFAULT_FASHION_MNIST",
    "DataError",
    "DeviceImageData",
    "channel_stats",
    "load_cifar10",
    "load_fashion_mnist",
    "normalise",
    "random_crop",
    "random_flip",
    "read_idx",
]
