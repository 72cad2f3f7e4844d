"""Feedback networks N_B: they see only the label and send a potential to every block."""

from .linear import LinearFeedback

FEEDBACKS = {"linear": LinearFeedback}

__all__ = ["FEEDBACKS", "LinearFeedback"]
