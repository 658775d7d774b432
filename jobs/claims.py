"""Who renders a prompt: create-only claims with leases, attempt counting, done markers.

Under the job's output, per prompt id:
  ``claims/<id>/<n>.json``   attempt n's claim, created create-only (two workers cannot both create n)
  ``claims/<id>/<n>.lease``  its lease, renewed after every chunk (expires ``lease_s`` after the last renewal)
  ``done/<id>.json``         written last, after the video and stats: the prompt is finished

A worker may take attempt n+1 only when attempt n's lease has expired (its worker died or gave up); a prompt
that has used ``max_attempts`` claims is poison and is not tried again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import CorruptStateError
from pipeline.store import KeyNotFound, Store

logger = logging.getLogger(__name__)


@dataclass
class Claim:
    """An attempt this worker holds on a prompt."""

    prompt_id: str
    attempt: int
    token: str


def owner_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Claims:
    """Claims and done markers of one job output."""

    def __init__(self, store: Store, *, lease_s: float, max_attempts: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.lease_s, self.max_attempts, self.clock = store, lease_s, max_attempts, clock

    def done(self, prompt_id: str) -> dict | None:
        """The done marker of a prompt, or None."""
        try:
            return self.store.get_json(f"done/{prompt_id}.json")
        except KeyNotFound:
            return None

    def mark_done(self, prompt_id: str, summary: dict) -> None:
        self.store.put_json(f"done/{prompt_id}.json", summary)

    def attempts(self, prompt_id: str) -> list[int]:
        keys = self.store.list(f"claims/{prompt_id}/")
        return sorted(int(k.rsplit("/", 1)[1][:-5]) for k in keys if k.endswith(".json"))

    def acquire(self, prompt_id: str) -> Claim | str:
        """A new claim, or why not: ``"busy"`` (a live claim exists) or ``"poison"`` (attempts used up)."""
        attempts = self.attempts(prompt_id)
        if attempts and self._alive(prompt_id, attempts[-1]):
            return "busy"
        n = attempts[-1] + 1 if attempts else 0
        if n >= self.max_attempts:
            return "poison"
        token = owner_token()
        now = self.clock()
        body = json.dumps({"owner": token, "attempt": n, "claimed_at": now}).encode()
        self._renew(prompt_id, n, token)  # the lease first: a claim is never seen without one
        if not self.store.create_only(f"claims/{prompt_id}/{n}.json", body):
            return "busy"
        logger.info("claimed %s (attempt %d)", prompt_id, n)
        return Claim(prompt_id, n, token)

    def renew(self, claim: Claim) -> None:
        self._renew(claim.prompt_id, claim.attempt, claim.token)

    def release(self, claim: Claim) -> None:
        """Give the lease up at once (the attempt still counts)."""
        self.store.put_json(f"claims/{claim.prompt_id}/{claim.attempt}.lease",
                            {"owner": claim.token, "expires_at": 0.0})

    def _renew(self, prompt_id: str, attempt: int, token: str) -> None:
        self.store.put_json(f"claims/{prompt_id}/{attempt}.lease",
                            {"owner": token, "expires_at": self.clock() + self.lease_s})

    def lease_expiry(self, prompt_id: str) -> float:
        """When the newest claim's lease runs out (0.0 when there is none)."""
        attempts = self.attempts(prompt_id)
        return self._expiry(prompt_id, attempts[-1]) if attempts else 0.0

    def _alive(self, prompt_id: str, attempt: int) -> bool:
        return self._expiry(prompt_id, attempt) > self.clock()

    def _expiry(self, prompt_id: str, attempt: int) -> float:
        try:
            lease = self.store.get_json(f"claims/{prompt_id}/{attempt}.lease")
        except (KeyNotFound, CorruptStateError):
            return 0.0
        return float(lease.get("expires_at", 0.0))
