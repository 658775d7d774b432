"""Compare two renders the way the resume promise is made, and say where they first differ.

A render is read back as its committed latents (from the checkpoints: where a difference begins in the model), its
stats rows (timings left out), its decoded frames and its mp4 bytes (what the user diffs). `assert_same_render`
checks them in that order, so a failure names the first chunk whose latents differ, or the first frame that
decodes differently, before it reports that the files differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.outputs.checkpoint import RolloutCheckpoints
from pipeline.outputs.video import decode_mp4
from pipeline.store import Store


@dataclass
class Rendered:
    video: bytes
    stats: list[dict[str, Any]]
    latents: list[torch.Tensor] | None  # one [B, C, F, h, w] per committed chunk; None: rendered without state


def read_render(out: Store, video_key: str, stats_key: str, state: Store | None = None, digest: str | None = None,
                prompt_ids: list[str] | None = None) -> Rendered:
    """The outputs under ``out`` and, with ``state``, the latents of every committed chunk (verified against their
    markers; ``digest`` and ``prompt_ids`` default to those of the first marker)."""
    stats = [{k: v for k, v in row.items() if not k.startswith("t_")} for row in out.get_table(stats_key).to_pylist()]
    latents = None
    if state is not None:
        first = state.get_json("chunk-000000.json")
        digest = first["config_hash"] if digest is None else digest
        prompt_ids = first["prompt_ids"] if prompt_ids is None else prompt_ids
        latents = [r.latents for r in RolloutCheckpoints(state, digest, prompt_ids).load()]
    return Rendered(out.get_bytes(video_key), stats, latents)


def assert_same_render(got: Rendered, want: Rendered) -> None:
    """``got`` equals ``want`` exactly: latents chunk by chunk (when both have them), stats, frames, bytes."""
    if got.latents is not None and want.latents is not None:
        assert len(got.latents) == len(want.latents), f"{len(got.latents)} committed chunks, want {len(want.latents)}"
        for i, (a, b) in enumerate(zip(got.latents, want.latents)):
            if not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else f"shape {a.shape}"
                raise AssertionError(f"latents differ from chunk {i} on (max |diff| {diff}, want {b.shape})")
    for i, (a, b) in enumerate(zip(got.stats, want.stats)):
        assert a == b, f"stats row of chunk {i} differs:\n got  {a}\n want {b}"
    assert len(got.stats) == len(want.stats), f"{len(got.stats)} stats rows, want {len(want.stats)}"
    frames, expected = decode_mp4(got.video), decode_mp4(want.video)
    assert frames.shape == expected.shape, f"decoded video {frames.shape}, want {expected.shape}"
    differ = np.flatnonzero((frames != expected).reshape(len(frames), -1).any(axis=1))
    assert differ.size == 0, f"decoded frames differ from frame {differ[0]} on ({differ.size} frames differ)"
    assert got.video == want.video, f"same decoded frames, different mp4 bytes ({len(got.video)} vs {len(want.video)})"
