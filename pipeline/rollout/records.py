"""What a rollout hands out per accepted chunk, and what a checkpoint stores: plain data, no engine.

`pipeline.outputs.checkpoint` reads and writes these types; it needs neither the rollout nor the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.rollout.chunk_stats import ChunkStats, stats_row


@dataclass
class PruneEvent:
    """Positions removed from cached ``frames`` for the samples in ``samples`` while generating ``chunk``."""

    chunk: int
    frames: list[int]
    positions: torch.Tensor  # [B, k] long
    samples: torch.Tensor  # [B] bool


@dataclass
class ChunkRecord:
    """An accepted chunk: what is needed to replay it, and one `ChunkStats` per sample.

    ``timings`` are the seconds per phase of this chunk, filled in by whoever owns the `PhaseTimer` (None: not
    measured in this process, e.g. a chunk read back from a checkpoint).
    """

    index: int
    latents: torch.Tensor  # [B, C, F, h, w] clean
    prunes: list[PruneEvent]
    trim_state: dict[str, torch.Tensor]
    window: dict[int, torch.Tensor] = field(default_factory=dict)  # rolling: in-flight chunk -> noisy latents
    stats: list[ChunkStats] = field(default_factory=list)
    timings: dict[str, float] | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Per-sample stats rows without pixel proxies (see `pipeline.rollout.chunk_stats.stats_row`)."""
        return [stats_row(s, self.timings) for s in self.stats]
