"""Measurement helpers: activation and state bytes of a training step, and block splits
balanced by them."""
