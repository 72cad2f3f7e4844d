"""Test references: the block-local loss written again in plain torch, to cross-check the
Pyro program and to time Pyro's overhead."""
