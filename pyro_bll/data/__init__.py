"""Data loaders for packaged data sets (no downloads at run time)."""

from .idx import DataError, load_fashion_mnist, read_idx

__all__ = ["DataError", "load_fashion_mnist", "read_idx"]
