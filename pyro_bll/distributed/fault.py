"""Fault handling: a rank that raises, dies or hangs stops every rank, naming the culprit.

Every rank runs a ``FaultMonitor`` thread on its own client of the rendezvous store
(a ``torch.distributed.TCPStore``, hosted by torchrun's agent or, without torchrun, by
rank 0):

* heartbeat: every ``interval`` seconds it increments the counter ``hb/<rank>``;
* failure report: a rank whose training raises writes ``failed = "<rank>\\t<message>"``
  (``report``; the first report wins, later ones keep it). A rank whose communication
  with a neighbour breaks first waits ``grace`` seconds for that neighbour's own report
  and otherwise reports the neighbour (``PeerFailure`` names it);
* watch: the thread polls ``failed`` and the other ranks' heartbeats. When another rank
  has reported, or a rank's counter has not moved for ``timeout`` seconds (a killed or
  frozen process), it prints ``error: rank R failed: ...`` and ends its own process with
  exit code 1, wherever the main thread is blocked. If the store itself is gone, its host
  (the torchrun agent, or rank 0) is gone, and the rank stops naming that host.

A raising rank stops the others within ``interval``; a killed one within ``grace`` (its
neighbours' connections break at once) or at most ``timeout + interval`` (heartbeats);
torchrun additionally tears the whole group down as soon as one worker exits non-zero.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

FAILED = "failed"


class StoreLost(RuntimeError):
    """The rendezvous store cannot be reached: its host process is gone."""


class FaultMonitor:
    """Heartbeat and failure watch of one rank (see module docstring)."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        timeout: float,
        *,
        interval: float = 0.5,
        store_host: str = "rank 0",
    ) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.timeout, self.interval = timeout, interval
        self.store_host = store_host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pyro-bll-fault", daemon=True)
        self._lock = threading.Lock()

    def _call(self, fn):
        with self._lock:
            try:
                return fn()
            except Exception as e:  # DistNetworkError, DistStoreError, timeouts
                raise StoreLost(str(e)) from e

    def host_gone(self) -> str:
        return (
            f"{self.store_host} failed: the rendezvous store it hosts is unreachable (process gone)"
        )

    # ---- reporting (main thread) --------------------------------------------------------
    def report(self, rank: int, message: str) -> str:
        """Record that ``rank`` failed (unless a failure is already recorded); return the
        recorded verdict ``"rank R failed: ..."``."""
        entry = f"{rank}\t{message}"
        try:
            return _verdict(self._call(lambda: self.store.compare_set(FAILED, "", entry)))
        except StoreLost:
            return self.host_gone()

    def first_failure(self, wait: float) -> str | None:
        """The recorded verdict, waiting up to ``wait`` seconds for one to appear."""
        deadline = time.monotonic() + wait
        while True:
            try:
                found = self._call(
                    lambda: self.store.get(FAILED) if self.store.check([FAILED]) else None
                )
            except StoreLost:
                return self.host_gone()
            if found is not None:
                return _verdict(found)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    # ---- the watch thread ---------------------------------------------------------------
    def start(self) -> FaultMonitor:
        self._call(lambda: self.store.add(f"hb/{self.rank}", 1))
        self._thread.start()
        return self

    def silence(self) -> None:
        """Stop watching without waiting (the main thread is ending the process)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _poll(self, others: list[int]) -> tuple[bytes | None, dict[int, int]]:
        def fn():
            self.store.add(f"hb/{self.rank}", 1)
            failed = self.store.get(FAILED) if self.store.check([FAILED]) else None
            return failed, {r: self.store.add(f"hb/{r}", 0) for r in others}

        return self._call(fn)

    def _run(self) -> None:
        others = [r for r in range(self.world_size) if r != self.rank]
        seen = {r: (-1, time.monotonic()) for r in others}
        while not self._stop.wait(self.interval):
            try:
                failed, counts = self._poll(others)
            except StoreLost:
                if self._stop.is_set():
                    return
                self._die(f"error: {self.host_gone()}; rank {self.rank} stops")
            if self._stop.is_set():
                return
            if failed is not None:
                if _parse(failed)[0] != self.rank:
                    self._die(f"error: {_verdict(failed)}; rank {self.rank} stops")
                continue  # our own report: the main thread is exiting
            now = time.monotonic()
            for r, count in counts.items():
                last, since = seen[r]
                if count != last:
                    seen[r] = (count, now)
                elif now - since > self.timeout:
                    verdict = self.report(
                        r, f"no heartbeat for {self.timeout:g} s (process killed or frozen)"
                    )
                    self._die(f"error: {verdict}; rank {self.rank} stops")

    def _die(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def _parse(entry: bytes | str) -> tuple[int, str]:
    text = entry.decode() if isinstance(entry, bytes) else entry
    rank, _, message = text.partition("\t")
    return int(rank), message


def _verdict(entry: bytes | str) -> str:
    rank, message = _parse(entry)
    return f"rank {rank} failed: {message}"


def connect_store(host: str, port: int, timeout: float) -> dist.TCPStore:
    """A client connection to the rendezvous store (one per thread that uses it)."""
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))
