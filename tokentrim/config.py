"""TokenTrim configuration: one frozen, validated dataclass holding every knob of the method (DESIGN.md §2).

Its `to_dict` is what the outputs' hashes are taken over (`pipeline.hashing`), so it keeps its keys stable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

StatsMode = Literal["welford", "ema"]
PruneScope = Literal["last", "window"]
SummaryMode = Literal["patch", "mean"]
DriftMode = Literal["same", "motion", "relative"]

STATS_MODES: tuple[str, ...] = get_args(StatsMode)
PRUNE_SCOPES: tuple[str, ...] = get_args(PruneScope)
SUMMARY_MODES: tuple[str, ...] = get_args(SummaryMode)
DRIFT_MODES: tuple[str, ...] = get_args(DriftMode)
# fields added after the paper's rule: left out of `to_dict` at their defaults, so that every config made before
# they existed keeps its hash (and a default config still means exactly the paper's rule)
_OMITTED_AT_DEFAULT = ("drift", "drift_radius")


def _check_real(name: str, value: Any) -> float:
    """Return `value` as a finite float; bool is not a number here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, minimum: int) -> int:
    """Return `value` if it is an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be one of {choices}, got {value!r} of type {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def _check_patch_size(value: Any) -> tuple[int, int, int]:
    """Normalise a list/tuple of three positive ints to a tuple."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"`patch_size` must be a tuple of 3 ints (t, h, w), got {value!r}")
    if len(value) != 3:
        raise ValueError(f"`patch_size` must have 3 entries (t, h, w), got {value!r}")
    for entry in value:
        if isinstance(entry, bool) or not isinstance(entry, int):
            raise TypeError(f"`patch_size` entries must be ints, got {value!r}")
        if entry < 1:
            raise ValueError(f"`patch_size` entries must be >= 1, got {value!r}")
    return (value[0], value[1], value[2])


@dataclass(frozen=True)
class TrimConfig:
    """Settings of TokenTrim (DESIGN.md §2).

    Args:
        p: fraction of the N tokens in the unstable set, in (0, 1]; the set has ceil(p * N) tokens.
        lam: lambda >= 0; a chunk is rejected when its severity exceeds mu + lam * sigma.
        warmup: >= 1; a sample's first `warmup` accepted chunks only feed the statistics. Whatever `warmup`
            says, no chunk is judged before the statistics hold two severities (a sample std needs two).
        max_retries: >= 0 regenerations per chunk; the candidate of attempt `max_retries` is accepted.
        stats: running statistics of accepted severities, "welford" (exact mean / sample std, ddof=1) or "ema"
            (exponentially weighted mean / std with the same small-sample correction).
        ema_decay: decay in (0, 1) of the EMA statistics (used only when `stats == "ema"`).
        sigma_floor: >= 0; sigma is at least `sigma_floor * mu`, so a run of near-identical severities does not
            make the threshold collapse onto mu.
        summary: "patch" (default) keeps the flattened patch per token (C * p_t * p_h * p_w values), "mean" the
            patch mean (C values), which cannot see a change that averages out inside a patch.
        measure_step: >= 0, the denoising step whose x0 prediction is summarised.
        prune_scope: "last" prunes the previous chunk's cached frames, "window" every non-sink cached frame.
        protect_sink: never prune sink frames.
        patch_size: (t, h, w) transformer patch grid; one pooled token is one KV-cache position.
        drift: per-token drift score. "same" (default, the paper's): distance to the previous summary at the same
            position. "motion": the smallest distance to the previous summary within ``drift_radius`` tokens on the
            patch grid (a token that moved is not drift; needs the grid shape). "relative": the same-position
            distance minus its median over the chunk's tokens, floored at 0 (a change of the whole chunk is not
            drift).
        drift_radius: >= 0, tokens each way searched by drift "motion" (0 is "same").
    """

    p: float = 0.1
    lam: float = 3.0
    warmup: int = 3
    max_retries: int = 1
    stats: StatsMode = "welford"
    ema_decay: float = 0.9
    sigma_floor: float = 0.05
    summary: SummaryMode = "patch"
    measure_step: int = 0
    prune_scope: PruneScope = "last"
    protect_sink: bool = True
    patch_size: tuple[int, int, int] = (1, 2, 2)
    drift: DriftMode = "same"
    drift_radius: int = 1

    def __post_init__(self) -> None:
        p = _check_real("p", self.p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"`p` must be in (0, 1], got {self.p!r}")
        lam = _check_real("lam", self.lam)
        if lam < 0.0:
            raise ValueError(f"`lam` must be >= 0, got {self.lam!r}")
        ema_decay = _check_real("ema_decay", self.ema_decay)
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in (0, 1), got {self.ema_decay!r}")
        sigma_floor = _check_real("sigma_floor", self.sigma_floor)
        if sigma_floor < 0.0:
            raise ValueError(f"`sigma_floor` must be >= 0, got {self.sigma_floor!r}")
        _check_int("warmup", self.warmup, 1)
        _check_int("max_retries", self.max_retries, 0)
        _check_int("measure_step", self.measure_step, 0)
        _check_choice("stats", self.stats, STATS_MODES)
        _check_choice("prune_scope", self.prune_scope, PRUNE_SCOPES)
        _check_choice("summary", self.summary, SUMMARY_MODES)
        _check_choice("drift", self.drift, DRIFT_MODES)
        _check_int("drift_radius", self.drift_radius, 0)
        if not isinstance(self.protect_sink, bool):
            raise TypeError(f"`protect_sink` must be a bool, got {self.protect_sink!r}")
        # Normalise ints given for float fields so that equal configs hash equally.
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "lam", lam)
        object.__setattr__(self, "ema_decay", ema_decay)
        object.__setattr__(self, "sigma_floor", sigma_floor)
        object.__setattr__(self, "patch_size", _check_patch_size(self.patch_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict of every field (`patch_size` as a list); `drift` and `drift_radius` only where they
        differ from their defaults (configs of the paper's rule hash as they did before these fields existed)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in _OMITTED_AT_DEFAULT or getattr(self, f.name) != f.default}
        out["patch_size"] = list(self.patch_size)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrimConfig:
        """Inverse of `to_dict`; missing keys take their defaults, unknown keys raise ValueError."""
        if not isinstance(d, dict):
            raise TypeError(f"`d` must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrimConfig keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**d)
