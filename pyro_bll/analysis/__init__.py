"""Diagnostics of trained runs: forward/feedback agreement as ArviZ ``InferenceData``, and
their plots (``experiments/diagnose.py``, ``pyro-bll diagnose``)."""
