"""SIGINT / SIGTERM during training: finish the step, write a checkpoint, stop cleanly.

``StopSignals`` is a context manager around a training loop. The first SIGINT (Ctrl-C) or
SIGTERM (a scheduler's pre-emption) only records the request; the loop checks
``requested`` after every step, writes a mid-epoch checkpoint and raises
``TrainingInterrupted``, which the command line turns into one line and exit code
128 + signal (130 for SIGINT, 143 for SIGTERM). A second signal stops at once, without a
new checkpoint (the ones already written stay); one arriving within
``DUPLICATE_SECONDS`` of the first counts as the same request. Outside the main thread (where Python
cannot install handlers) the context does nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# a second signal this soon after the first is taken as the same request: a launcher
# (timeout, torchrun) and the terminal may both deliver one Ctrl-C
DUPLICATE_SECONDS = 2.0


class TrainingInterrupted(Exception):
    """Training stopped on a signal; ``checkpoint`` is where it can resume from."""

    def __init__(self, signum: int, checkpoint: Path | None, where: str) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        saved = f"checkpoint {checkpoint}" if checkpoint else "no new checkpoint written"
        super().__init__(f"interrupted by {name} {where}; {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Record the first SIGINT / SIGTERM in ``requested``; a second one raises at once."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.requested is not None:
            if now - self._first < DUPLICATE_SECONDS:
                return  # the same request delivered twice (a launcher forwarding it)
            raise TrainingInterrupted(signum, None, "a second time")
        self.requested, self._first = signum, now
        print(
            f"{signal.Signals(signum).name} received: finishing this step, then writing a "
            "checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
