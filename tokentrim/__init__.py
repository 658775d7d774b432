"""TokenTrim: find the latent tokens that drifted away from the previous chunk and prune them from the cache.

Pure torch, no I/O and no model knowledge (DESIGN.md §2). Shapes: latents [B, C, F, H, W], summaries [B, N, D],
drift [B, N], per-sample statistics and verdicts [B].
"""

from tokentrim.config import DriftMode, PruneScope, StatsMode, SummaryMode, TrimConfig
from tokentrim.controller import VERDICT_KINDS, Judgement, TrimController, VerdictKind
from tokentrim.stats import RunningStats
from tokentrim.summary import (
    drift_score,
    latent_summary,
    motion_drift,
    num_unstable,
    relative_drift,
    token_drift,
    unstable_set,
)

__all__ = [
    "VERDICT_KINDS",
    "DriftMode",
    "Judgement",
    "PruneScope",
    "RunningStats",
    "StatsMode",
    "SummaryMode",
    "TrimConfig",
    "TrimController",
    "VerdictKind",
    "drift_score",
    "latent_summary",
    "motion_drift",
    "num_unstable",
    "relative_drift",
    "token_drift",
    "unstable_set",
]
