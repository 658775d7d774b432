"""What the regression measures from the rendered videos themselves (the drift metrics come from the stats tables):

- canary-aware metrics (`--model canary` only; `pipeline.canary.detect`): ``canary_miss`` (1 when the detector does
  not find the named colour moving the named way), ``traj_err`` (px per frame off the named motion),
  ``mass_err`` (|1 - named-colour pixels / shape area|) and ``background_err`` (mean |pixel - true background|
  away from objects, 0-255);
- ``probe_leak``: how far a known corruption (`pipeline.rollout.probe`) spreads into the chunks after the one it
  hit: the mean |pixel difference| (0-255) between the probe variant's video and the clean TokenTrim video over
  the frames of chunks ``probe.chunk + 1 ..``. TokenTrim keeps it small by pruning the corrupted tokens from the
  cache; an engine that still attends pruned tokens lets it spread.

Every metric is "higher is worse"; `jobs.regress.compare` judges them against the baseline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.model.vae import pixel_frames_for
from pipeline.store import Store

CANARY_METRICS = ("canary_miss", "traj_err", "mass_err", "background_err")
LOST_TRAJ_ERR = 4.0  # px per frame: a video where the named colour is never found (faster than any motion)


def video_frames(out: Store, key: str) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` frames of the mp4 at ``key``."""
    from pipeline.outputs.video import decode_mp4

    return decode_mp4(out.get_bytes(key))


def canary_measures(frames: np.ndarray, prompt: str) -> dict[str, float]:
    """The canary-aware metrics of one video of a grammar ``prompt``."""
    import torch

    from pipeline.canary.detect import canary_metrics, detect
    from pipeline.canary.grammar import parse_caption

    colour, shape, motion, background = parse_caption(prompt)
    video = torch.from_numpy(np.ascontiguousarray(frames))
    found = detect(video, colour)
    m = canary_metrics(video, colour, shape, motion, background)
    traj = m["traj_err"][~m["traj_err"].isnan()]
    return {"canary_miss": float((found.colour, found.motion) != (colour, motion)),
            "traj_err": float(traj.mean()) if traj.numel() else LOST_TRAJ_ERR,
            "mass_err": float((1.0 - m["mass_ratio"]).abs().mean()),
            "background_err": float(m["background_err"].mean())}


def probe_leak(probed: np.ndarray, clean: np.ndarray, after_chunk: int, chunk_frames: int) -> float:
    """Mean |pixel difference| (0-255) over the frames of the chunks after ``after_chunk``."""
    start = pixel_frames_for((after_chunk + 1) * chunk_frames)
    if probed.shape != clean.shape or start >= probed.shape[0]:
        raise ValueError(f"cannot compare videos of shapes {probed.shape} and {clean.shape} after frame {start}")
    return float(np.abs(probed[start:].astype(np.float32) - clean[start:].astype(np.float32)).mean())


def mean_measures(per_video: list[dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    """Mean of each measure over the videos (0 when none)."""
    return {n: sum(v[n] for v in per_video) / len(per_video) if per_video else 0.0 for n in names}


def ok_ids(results: list[dict[str, Any]]) -> list[str]:
    """The prompts of a job report that have a video (rendered now or before)."""
    return [r["prompt_id"] for r in results if r["status"] in ("ok", "skipped")]


def failed_rows(results: list[dict[str, Any]]) -> list[str]:
    """``"<prompt_id>: <status> <error>"`` for every row of a job report that should have rendered and did not."""
    return [f"{r['prompt_id']}: {r['status']} {r['error'] or ''}".strip() for r in results
            if r["status"] not in ("ok", "skipped", "excluded")]
