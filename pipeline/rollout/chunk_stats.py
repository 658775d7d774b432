"""The per-chunk stats row: one typed record per sample and chunk, and the one function that builds the row.

A row (DESIGN §3) is the sample's `ChunkStats`, then ``t_<phase>`` seconds for each of `TIMED_PHASES`, then the
pixel proxies of the decoded frames (with ``t_encode``) when there are any. `stats_row` is the only place a row is
assembled; `Rollout` fills the `ChunkStats`, `render` adds timings and pixel proxies through it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Verdict = Literal["warmup", "accepted", "pruned"]
VERDICTS: tuple[str, ...] = ("warmup", "accepted", "pruned")
TIMED_PHASES: tuple[str, ...] = ("denoise", "trim", "commit", "decode", "checkpoint")


@dataclass(frozen=True)
class ChunkStats:
    """What the rollout measured for one sample's accepted chunk.

    severity, mu, sigma, threshold: TokenTrim's judgement of the accepted candidate (NaN when not judged).
    verdict: ``warmup`` (only fed the statistics), ``accepted`` or ``pruned`` (at least one regeneration on a
        pruned cache). attempts: candidates generated; tokens_pruned: cache positions removed while generating it.
    cache_tokens, cache_bytes: the sample's KV cache after the commit.
    latent_dist_prev, latent_dist_first: RMS distance of the frame-averaged latents to the previous / first chunk.
    """

    chunk: int
    frames: int
    severity: float
    mu: float
    sigma: float
    threshold: float
    verdict: Verdict
    attempts: int
    tokens_pruned: int
    cache_tokens: int
    cache_bytes: int
    latent_dist_prev: float
    latent_dist_first: float

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"`verdict` must be one of {VERDICTS}, got {self.verdict!r}")

    def to_json(self) -> dict[str, Any]:
        """Strict-JSON values: NaN becomes None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkStats:
        """Inverse of `to_json` (None becomes NaN in the float fields)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown ChunkStats fields {unknown}")
        floats = {"severity", "mu", "sigma", "threshold", "latent_dist_prev", "latent_dist_first"}
        values: dict[str, Any] = {k: (math.nan if v is None and k in floats else v) for k, v in d.items()}
        return cls(**values)


def stats_row(stats: ChunkStats, timings: dict[str, float] | None,
              pixels: dict[str, float] | None = None) -> dict[str, Any]:
    """The row of one sample and chunk. ``timings``: seconds per phase (a phase that did not run counts 0; None:
    not measured in this process, every ``t_<phase>`` is None); ``pixels``: the decoded frames' proxies."""
    row: dict[str, Any] = asdict(stats)
    for phase in TIMED_PHASES:
        row[f"t_{phase}"] = None if timings is None else timings.get(phase, 0.0)
    row.update(pixels or {})
    return row
