"""Progress of an epoch: a live bar on a terminal, plain lines in a log file or pipe.

tqdm redraws its bar with a carriage return on every update; written to a file, every
redraw stays, so a log would hold one bar per step. ``Progress`` uses tqdm only when the
stream is a terminal. Otherwise it prints one plain line (no carriage return) whenever
another ``every_fraction`` of the epoch is done or ``every_seconds`` have passed since the
last line, whichever comes first.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm


class Progress:
    """Iterate ``iterable`` while showing progress; ``set_postfix`` adds values to it."""

    def __init__(
        self,
        iterable: Iterable[Any],
        total: int | None,
        desc: str,
        *,
        enabled: bool = True,
        initial: int = 0,
        stream: TextIO | None = None,
        every_seconds: float = 10.0,
        every_fraction: float = 0.1,
    ) -> None:
        self.iterable, self.total, self.desc = iterable, total, desc
        self.enabled, self.initial = enabled, initial
        self.stream = sys.stderr if stream is None else stream
        self.every_seconds, self.every_fraction = every_seconds, every_fraction
        self.postfix: dict[str, str] = {}
        self._bar: tqdm | None = None

    def live(self) -> bool:
        """Whether the stream is a terminal (a redrawn bar) rather than a file or pipe."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def set_postfix(self, **values: Any) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def __iter__(self) -> Iterator[Any]:
        if not self.enabled:
            yield from self.iterable
            return
        if self.live():
            self._bar = tqdm(
                self.iterable, total=self.total, desc=self.desc, initial=self.initial,
                leave=False, dynamic_ncols=True, file=self.stream,
            )  # fmt: skip
            try:
                yield from self._bar
            finally:
                self._bar.close()
                self._bar = None
            return
        yield from self._plain()

    def _plain(self) -> Iterator[Any]:
        start = last_time = time.perf_counter()
        done = last_done = self.initial
        for item in self.iterable:
            yield item
            done += 1
            now = time.perf_counter()
            fraction = (done - last_done) / self.total if self.total else 0.0
            finished = self.total is not None and done >= self.total
            if not finished and (
                fraction >= self.every_fraction or now - last_time >= self.every_seconds
            ):
                self._line(done, now - start)
                last_time, last_done = now, done

    def _line(self, done: int, seconds: float) -> None:
        count = f"{done}/{self.total} ({done / self.total:.0%})" if self.total else f"{done}"
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: step {count} {seconds:.1f}s{extra}", file=self.stream, flush=True)
