"""`FlakyStore`: a `Store` whose calls fail transiently on a seeded, deterministic fraction of attempts."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pipeline.store import Store

T = TypeVar("T")


class InjectedTransientError(ConnectionError):
    """The failure `FlakyStore` injects; a ConnectionError, so `Store` treats it as transient."""


class FlakyStore(Store):
    """A `Store` whose attempts fail with `InjectedTransientError` at rate `failure_rate` (seeded `random.Random`).

    The first `fail_first` attempts fail regardless of the draw (a deterministic schedule for tests).

    `when="before"` fails an attempt before it reaches the backend (nothing happens); `when="after"` lets it
    run and then fails, like a response lost on the way back (the write did land).
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        failure_rate: float,
        seed: int = 0,
        when: Literal["before", "after"] = "before",
        fail_first: int = 0,
        retries: int = 4,
        backoff_s: float = 0.0,
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"`failure_rate` must be in [0, 1], got {failure_rate!r}")
        if when not in ("before", "after"):
            raise ValueError(f"`when` must be 'before' or 'after', got {when!r}")
        super().__init__(url, storage_options, retries=retries, backoff_s=backoff_s)
        self.failure_rate, self.seed, self.when, self.fail_first = failure_rate, seed, when, fail_first
        self.attempts = 0
        self.failures = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _invoke(self, op: str, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            self.attempts += 1
            fail = self._rng.random() < self.failure_rate or self.attempts <= self.fail_first
            self.failures += fail
        if fail and self.when == "before":
            raise InjectedTransientError(f"injected failure before {op} of {key!r}")
        result = fn()
        if fail:
            raise InjectedTransientError(f"injected failure after {op} of {key!r}")
        return result

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()
