"""The one error the forward networks raise for arguments that do not fit them.

Models take plain arguments and know nothing of command-line flags; ``option`` names the
argument at fault, and the layer that reads the configuration (``pyro_bll.tasks``)
turns it into a one-line message naming the flag (``--blocks``, ``--width``, ...).
"""

from __future__ import annotations


class ModelError(ValueError):
    """An argument that does not fit the network: ``option`` and what is wrong with it."""

    def __init__(self, option: str, detail: str) -> None:
        super().__init__(f"{option} {detail}")
        self.option, self.detail = option, detail

    def as_flag_message(self) -> str:
        """The same message with the option written as its command-line flag."""
        return f"--{self.option.replace('_', '-')} {self.detail}"
