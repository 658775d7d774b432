"""Model-free drift proxies per chunk of decoded uint8 RGB frames ``[T, H, W, 3]``: luma, saturation, clipped,
steadiness (VBench's temporal-flickering score, higher = steadier) and the colour-histogram distance to the first chunk
(the stats table's column descriptions give each definition).

`PixelTracker` keeps what crosses chunk boundaries (the last frame, the first chunk's histogram); a resumed render
rebuilds it by decoding the last committed chunks again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.outputs.video import as_uint8_frames

logger = logging.getLogger(__name__)

HIST_BINS = 16  # per channel; 256 / 16 = 16 intensity levels per bin
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # Rec.601
_CLIP_LOW, _CLIP_HIGH = 2, 253


@dataclass
class PixelStats:
    """Drift proxies of one chunk; see the module docstring for definitions and ranges."""

    luma: float
    saturation: float
    clipped: float
    steadiness: float
    hist_dist_first: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def colour_histogram(frames: np.ndarray) -> np.ndarray:
    """Per-channel histogram of uint8 RGB `frames` `[T, H, W, 3]`: float64 `[3, HIST_BINS]`, each row sums to 1."""
    pixels = frames.reshape(-1, 3)  # [T*H*W, 3]
    bins = (pixels >> 4).astype(np.intp) + np.arange(3) * HIST_BINS  # channel c uses bins [16c, 16c + 16)
    counts = np.bincount(bins.ravel(), minlength=3 * HIST_BINS).reshape(3, HIST_BINS)
    return counts / pixels.shape[0]


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two `[3, HIST_BINS]` histograms, averaged over channels, in [0, 1]."""
    return float(0.5 * np.abs(a - b).sum(axis=1).mean())


def _luma_saturation_clipped(frames: np.ndarray) -> tuple[float, float, float]:
    pixels = frames.reshape(-1, 3)  # [N, 3]
    channel_means = pixels.sum(axis=0, dtype=np.int64) / pixels.shape[0]  # [3]; luma is linear in them
    luma = float(channel_means @ _LUMA_WEIGHTS)
    high = pixels.max(axis=1)  # [N]
    low = pixels.min(axis=1)  # [N]
    sat = (high - low).astype(np.float32) / np.maximum(high, 1).astype(np.float32)  # 0 where high == 0 == low
    clipped = float(((low <= _CLIP_LOW) | (high >= _CLIP_HIGH)).mean())
    return luma, float(sat.sum(dtype=np.float64) / sat.shape[0]), clipped


def _flicker(frames: np.ndarray, previous: np.ndarray | None) -> float:
    """VBench temporal flickering over consecutive pairs of `frames`, led by `previous` when given."""
    if previous is not None:
        frames = np.concatenate([previous[None], frames])  # [T+1, H, W, 3]
    if frames.shape[0] < 2:
        return 1.0
    diffs = np.abs(np.diff(frames.astype(np.int16), axis=0))  # [T-1, H, W, 3]
    per_pair = diffs.reshape(diffs.shape[0], -1).mean(axis=1)  # [T-1]
    return float(((255.0 - per_pair) / 255.0).mean())


class PixelTracker:
    """Keeps what is needed across chunks (last frame, first chunk's colour histogram) to compute per-chunk
    proxies."""

    def __init__(self) -> None:
        self.last_frame: np.ndarray | None = None  # uint8 [H, W, 3]
        self.first_hist: np.ndarray | None = None  # float64 [3, HIST_BINS]

    def update(self, frames: Any) -> PixelStats:
        """Proxies of the next chunk of uint8 RGB `frames` `[T, H, W, 3]`, then remember what the next one needs."""
        frames = as_uint8_frames(frames)
        if self.last_frame is not None and self.last_frame.shape != frames.shape[1:]:
            raise ValueError(
                f"`frames` must be [T, {', '.join(map(str, self.last_frame.shape))}] like the previous chunk, "
                f"got {list(frames.shape)}"
            )
        luma, saturation, clipped = _luma_saturation_clipped(frames)
        steadiness = _flicker(frames, self.last_frame)
        hist = colour_histogram(frames)
        if self.first_hist is None:
            self.first_hist = hist
        stats = PixelStats(
            luma=luma,
            saturation=saturation,
            clipped=clipped,
            steadiness=steadiness,
            hist_dist_first=histogram_distance(hist, self.first_hist),
        )
        self.last_frame = frames[-1].copy()
        return stats
