"""Batches of canary clips for training and evaluation, every one a pure function of its seed.

Training seeds and held-out seeds never meet: training draws seeds below `HELD_OUT_BASE`, evaluation uses
``HELD_OUT_BASE + k``.
"""

from __future__ import annotations

import hashlib

import torch

from canary.grammar import ClipSpec, sample_spec
from canary.marks import Mark, paint_marks
from canary.render import render_clip, to_model_pixels

HELD_OUT_BASE = 1 << 40


def clip_seed(seed: int, index: int) -> int:
    """The seed of training clip ``index`` of a run seeded ``seed`` (below `HELD_OUT_BASE`)."""
    digest = hashlib.sha256(f"canary-clip:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % HELD_OUT_BASE


def held_out_specs(count: int) -> list[ClipSpec]:
    return [sample_spec(HELD_OUT_BASE + k) for k in range(count)]


def pixel_batch(specs: list[ClipSpec], frames: int, starts: list[int] | None = None,
                marks: list[list[Mark]] | None = None, chunk_frames: int = 3) -> torch.Tensor:
    """Float pixels ``[B, 3, frames, 64, 64]`` in [-1, 1] of ``specs`` from frame ``starts[b]`` (default 0), with
    ``marks[b]`` painted under the object (`canary.marks`; chunks of ``chunk_frames`` latent frames)."""
    starts = starts or [0] * len(specs)
    marks = marks or [[] for _ in specs]
    return torch.stack([to_model_pixels(paint_marks(render_clip(s, frames, start), m, chunk_frames))
                        for s, start, m in zip(specs, starts, marks)])
