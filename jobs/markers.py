"""What a claim, a lease and a done marker may hold, checked strictly before anything read back is trusted.

`Store.get_json` already refuses NaN, Infinity and repeated keys; these checks add types and ranges (a lease's
``expires_at`` at most its claim's ``lease_s`` (plus `CLOCK_SKEW_S`) after this machine's now, chunk counts within
`pipeline.config.MAX_CHUNKS`). Anything else raises `CorruptStateError` naming the key and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pipeline.config import MAX_CHUNKS
from pipeline.errors import CorruptStateError

# held: rendering; done: committed its done marker; failed: counts towards poison; yielded: given back because the
# prompt was finished elsewhere; lost: stopped because the lease ran out or a newer attempt exists (the holder was
# alive but cut off). A held lease that ran out means its holder died.
LEASE_STATES = ("held", "done", "failed", "yielded", "lost")
MAX_LEASE_S = 86400.0  # `JobSpec.lease_s`'s upper bound
CLOCK_SKEW_S = 30.0  # how far another worker's clock may run ahead of ours before its lease is called corrupt
MAX_ATTEMPT = 1_000_000


def _int(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 4096


def _optional_float(v: Any) -> bool:
    return v is None or _finite(v)


# what each field of a done marker may hold; every field but `row_hash` may be absent (older markers)
DONE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "row_hash": _text, "attempt": _int(0, MAX_ATTEMPT), "seed": _int(0, 2**63 - 1),
    "num_chunks": _int(1, MAX_CHUNKS), "chunks": _int(0, MAX_CHUNKS), "resumed_from": _int(0, MAX_CHUNKS),
    "pruned_chunks": _int(0, MAX_CHUNKS), "tokens_pruned": _int(0, 2**63 - 1), "video": _text, "stats": _text,
    "render_hash": _text, "owner": _text, "mean_severity": _optional_float, "latent_dist_first": _optional_float,
    "hist_dist_first": _optional_float, "steadiness": _optional_float, "seconds": _optional_float,
    "config_hash": _text, "flicker": _optional_float,  # the names of markers written before the columns were renamed
}


def _corrupt(key: str, what: str) -> CorruptStateError:
    return CorruptStateError(f"{key} {what}; delete it to let the prompt go on")


def check_done(marker: Any, key: str) -> dict[str, Any]:
    """A done marker as read back (``key`` names it in errors)."""
    if not isinstance(marker, dict):
        raise _corrupt(key, f"is not a JSON object: {type(marker).__name__}")
    if "row_hash" not in marker:
        raise _corrupt(key, "has no `row_hash`")
    for name, check in DONE_CHECKS.items():
        if name in marker and not check(marker[name]):
            raise _corrupt(key, f"has `{name}` {marker[name]!r}, out of type or range")
    return marker


def check_claim(claim: Any, key: str, attempt: int) -> dict[str, Any]:
    """Attempt ``attempt``'s claim: owner, attempt, ``claimed_at`` and ``lease_s``."""
    if not isinstance(claim, dict):
        raise _corrupt(key, f"is not a JSON object: {type(claim).__name__}")
    checks = {"owner": _text, "attempt": lambda v: v == attempt and _int(0, MAX_ATTEMPT)(v),
              "claimed_at": lambda v: _finite(v) and v >= 0,
              "lease_s": lambda v: _finite(v) and 0 < v <= MAX_LEASE_S}
    for name, check in checks.items():
        if not check(claim.get(name)):
            raise _corrupt(key, f"has `{name}` {claim.get(name)!r}, out of type or range")
    return claim


def check_lease(lease: Any, key: str, claim: dict[str, Any], now: float) -> dict[str, Any]:
    """A lease as read back, against its claim (same owner) and this machine's clock: ``expires_at`` no later than
    ``now + lease_s + CLOCK_SKEW_S`` (a lease further ahead would hold the prompt longer than any holder may)."""
    if not isinstance(lease, dict):
        raise _corrupt(key, f"is not a JSON object: {type(lease).__name__}")
    if lease.get("owner") != claim["owner"]:
        raise _corrupt(key, f"has owner {lease.get('owner')!r}, not its claim's {claim['owner']!r}")
    if lease.get("state") not in LEASE_STATES:
        raise _corrupt(key, f"has `state` {lease.get('state')!r}, not one of {LEASE_STATES}")
    expires: Any = lease.get("expires_at")
    if not _finite(expires) or expires < 0:
        raise _corrupt(key, f"has `expires_at` {expires!r}, not a finite time")
    limit = now + float(claim["lease_s"]) + CLOCK_SKEW_S
    if expires > limit:
        raise _corrupt(key, f"expires at {expires!r}, more than its lease ({claim['lease_s']} s) plus "
                            f"{CLOCK_SKEW_S:g} s after now ({now:.3f}): a clock far ahead or a forged lease")
    return lease
