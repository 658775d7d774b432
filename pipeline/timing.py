"""Per-phase timing as a hook object, so the rollout loop has no profiling branches.

On CUDA each phase records a pair of events and `collect` synchronises once per chunk; on a CPU it reads the clock.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates seconds per named phase until `collect` hands them out and starts afresh."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._totals: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            began = time.perf_counter()
            yield
            self._totals[name] += time.perf_counter() - began

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last call (one device synchronisation on CUDA)."""
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                self._totals[name] += start.elapsed_time(end) / 1000.0
            self._events.clear()
        totals, self._totals = dict(self._totals), defaultdict(float)
        return totals
