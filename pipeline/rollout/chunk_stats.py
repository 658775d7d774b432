"""The per-chunk stats: the figures a rollout reads back, the typed `ChunkStats` built from them, and the row.

A row (DESIGN §3) is the sample's `ChunkStats`, then ``t_<phase>_s`` seconds for each of `TIMED_PHASES`, then the
decoded frames' pixel proxies. `STATS_COLUMNS` is the stats table's fixed schema (every column typed, so a table of
warm-up chunks only has no null-typed column); each column's description goes into the Parquet field metadata.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from tokentrim import VERDICT_KINDS, VerdictKind

Verdict = VerdictKind  # one vocabulary: a chunk's verdict is TokenTrim's (`tokentrim.VERDICT_KINDS`)
VERDICTS: tuple[str, ...] = VERDICT_KINDS
TIMED_PHASES: tuple[str, ...] = ("denoise", "trim", "commit", "decode", "checkpoint")


def chunk_verdict(code: float, tokens_pruned: float) -> Verdict:
    """The verdict of an accepted chunk from TokenTrim's code for the candidate it kept (an index into
    `VERDICT_KINDS`, -1 when not judged) and the cache positions pruned while generating it: ``pruned`` when any
    were, else the kept candidate's ``warmup`` or ``accepted`` (an unjudged chunk counts as accepted)."""
    if tokens_pruned:
        return "pruned"
    return "warmup" if code == 0 else "accepted"


@dataclass(frozen=True)
class ChunkFigures:
    """What the rollout reads back from the device for a chunk's stats rows: one float per sample in each field (the
    [B] tensors of `FIGURES`, read in one transfer; integers and codes come back exact)."""

    severity: list[float]
    mu: list[float]
    sigma: list[float]
    threshold: list[float]
    codes: list[float]  # TokenTrim's code of the kept candidate (`chunk_verdict`)
    attempts: list[float]
    tokens_pruned: list[float]
    cache_tokens: list[float]
    latent_dist_prev: list[float]
    latent_dist_first: list[float]

    def stats(self, chunk: int, latent_frames: int, cache_bytes: int) -> list[ChunkStats]:
        """One `ChunkStats` per sample (``cache_bytes``: each sample's share of the KV cache after the commit)."""
        return [ChunkStats(chunk=chunk, latent_frames=latent_frames, severity=self.severity[b], mu=self.mu[b],
                           sigma=self.sigma[b], threshold=self.threshold[b],
                           verdict=chunk_verdict(self.codes[b], self.tokens_pruned[b]),
                           attempts=int(self.attempts[b]), tokens_pruned=int(self.tokens_pruned[b]),
                           cache_tokens=int(self.cache_tokens[b]), cache_bytes=cache_bytes,
                           latent_dist_prev=self.latent_dist_prev[b], latent_dist_first=self.latent_dist_first[b])
                for b in range(len(self.severity))]


FIGURES: tuple[str, ...] = tuple(f.name for f in fields(ChunkFigures))


@dataclass(frozen=True)
class ChunkStats:
    """What the rollout measured for one sample's accepted chunk (``latent_frames``: the chunk's latent frames).

    severity, mu, sigma, threshold: TokenTrim's judgement of the accepted candidate (NaN when not judged).
    verdict: ``warmup`` (only fed the statistics), ``accepted`` or ``pruned`` (regenerated on a pruned cache;
        `chunk_verdict`). attempts: candidates generated; tokens_pruned: cache positions removed while generating it.
    cache_tokens, cache_bytes: the sample's KV cache after the commit.
    latent_dist_prev, latent_dist_first: RMS distance of the frame-averaged latents to the previous / first chunk.
    """

    chunk: int
    latent_frames: int
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
        unknown = sorted(set(d) - set(known) - {"frames"})
        if unknown:
            raise ValueError(f"unknown ChunkStats fields {unknown}")
        floats = {"severity", "mu", "sigma", "threshold", "latent_dist_prev", "latent_dist_first"}
        d = {("latent_frames" if k == "frames" else k): v for k, v in d.items()}  # markers written before the rename
        values: dict[str, Any] = {k: (math.nan if v is None and k in floats else v) for k, v in d.items()}
        return cls(**values)


def stats_row(stats: ChunkStats, timings: dict[str, float] | None,
              pixels: dict[str, float] | None = None) -> dict[str, Any]:
    """The row of one sample and chunk. ``timings``: seconds per phase (a phase that did not run counts 0; None:
    not measured in this process, every ``t_<phase>_s`` is None); ``pixels``: the decoded frames' proxies."""
    row: dict[str, Any] = asdict(stats)
    for phase in TIMED_PHASES:
        row[f"t_{phase}_s"] = None if timings is None else timings.get(phase, 0.0)
    row.update(pixels or {})
    return row


# The stats table, one row per sample and chunk: name, Arrow type, description.
STATS_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("prompt_id", "string", "the prompt's id"),
    ("seed", "int64", "the rollout's seed"),
    ("render_hash", "string", "hash of what was rendered (model spec, dtype, rollout, TokenTrim, video settings, "
                              "probe); checkpoints carry the same"),
    ("chunk", "int64", "0-based chunk index"),
    ("latent_frames", "int64", "latent frames in the chunk (Wan VAE: 4 pixel frames per latent frame after the "
                               "first)"),
    ("severity", "float64", "TokenTrim severity of the accepted candidate: mean drift of the top-p tokens (null: "
                            "not judged, warm-up or no TokenTrim)"),
    ("mu", "float64", "running mean of accepted severities before this chunk (null: not judged)"),
    ("sigma", "float64", "running std of accepted severities before this chunk (null: not judged)"),
    ("threshold", "float64", "prune threshold mu + lam * max(sigma, sigma_floor * mu) (null: not judged)"),
    ("verdict", "string", "warmup (only fed the statistics), accepted, or pruned (regenerated on a pruned cache)"),
    ("attempts", "int64", "candidates generated for the chunk (1 + regenerations)"),
    ("tokens_pruned", "int64", "KV-cache token positions removed while generating the chunk"),
    ("cache_tokens", "int64", "tokens in the sample's KV cache after the commit"),
    ("cache_bytes", "int64", "bytes of the sample's KV cache after the commit"),
    ("latent_dist_prev", "float64", "RMS distance of the frame-averaged latents to the previous chunk's"),
    ("latent_dist_first", "float64", "RMS distance of the frame-averaged latents to the first chunk's"),
    *((f"t_{phase}_s", "float64", f"seconds spent in the {phase} phase for this chunk (null: restored from a "
                                  "checkpoint, not timed in this process)") for phase in TIMED_PHASES),
    ("pixel_frames", "int64", "decoded RGB frames in the chunk (null: restored from a checkpoint written before "
                              "this column existed)"),
    ("luma", "float64", "mean Rec.601 luma of the chunk's frames, 0-255"),
    ("saturation", "float64", "mean HSV saturation, [0, 1]"),
    ("clipped", "float64", "fraction of pixels with a channel <= 2 or >= 253, [0, 1]"),
    ("steadiness", "float64", "VBench's temporal-flickering score (255 - mean |frame_t - frame_t-1|) / 255 over the "
                              "chunk's consecutive frames (with the previous chunk's last), [0, 1]: higher = "
                              "steadier, 1 = static"),
    ("hist_dist_first", "float64", "colour-histogram total-variation distance to the first chunk, [0, 1]"),
    ("t_encode_s", "float64", "seconds spent encoding the chunk's video segments and pixel proxies (null: restored "
                              "from a checkpoint)"),
)
STATS_FIELDS: tuple[str, ...] = tuple(name for name, _, _ in STATS_COLUMNS)


def described_schema(columns: tuple[tuple[str, str, str], ...]) -> Any:
    """A `pyarrow.Schema` from (name, pyarrow type name, description) triples: each field's ``description`` in its
    metadata. The stats and the results tables are both built this way."""
    import pyarrow as pa

    return pa.schema([pa.field(name, getattr(pa, kind)(), metadata={"description": text})
                      for name, kind, text in columns])


def stats_schema() -> Any:
    """The stats table's `pyarrow.Schema`: fixed types, each field's ``description`` in its metadata."""
    return described_schema(STATS_COLUMNS)
