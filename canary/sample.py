"""Render canary prompts through the real rollout, and write PNG frame grids and SVG curves (no plotting deps).

`render` runs `pipeline.rollout.Rollout` (causal backend, KV cache, self-forcing or rolling-forcing, optional
TokenTrim) and decodes with the streaming VAE decoder: the same path ``tokentrim render --model canary`` takes.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import torch

from pipeline.config import RolloutConfig
from pipeline.model.backend import WanBackend


@torch.no_grad()
def render(backend: WanBackend, prompts: list[str], seeds: list[int], *, mode: str = "self-forcing",
           num_chunks: int = 6, trim: Any = None, config: RolloutConfig | None = None,
           ) -> tuple[torch.Tensor, list[list[dict[str, Any]]]]:
    """uint8 frames ``[B, T, 64, 64, 3]`` and the per-chunk stats rows (one list per chunk, B rows each)."""
    from pipeline.rollout.loop import Rollout

    config = config or RolloutConfig(mode=mode, num_chunks=num_chunks)  # type: ignore[arg-type]
    rollout = Rollout(backend, config, prompts, seeds, trim=trim)
    decoder = backend.new_decoder()
    frames, rows = [], []
    for record in rollout:
        frames.append(decoder.decode(record.latents))
        rows.append(record.rows)
    return torch.cat(frames, dim=1), rows


def frame_grid(videos: torch.Tensor, every: int = 4, max_frames: int = 16) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` -> one image ``[B*H, n*W, 3]``: a row per video, every ``every``-th frame."""
    picked = videos[:, ::every][:, :max_frames]  # [B, n, H, W, 3]
    b, n, h, w, c = picked.shape
    return picked.permute(0, 2, 1, 3, 4).reshape(b * h, n * w, c)


def write_png(path: str, image: torch.Tensor) -> None:
    """uint8 ``[H, W, 3]`` -> an 8-bit RGB PNG (deterministic bytes)."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"`image` must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape[:2]
    raw = b"".join(b"\x00" + bytes(image[y].contiguous().view(-1).tolist()) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as fh:
        fh.write(png)


def write_svg_curves(path: str, curves: dict[str, list[float]], title: str, log_y: bool = False,
                     x_label: str = "step") -> None:
    """A small line chart of named curves (x = index) as SVG."""
    import math

    palette = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    width, height, pad = 640, 360, 48

    def tf(v: float) -> float:
        return math.log10(max(v, 1e-12)) if log_y else v

    values = [tf(v) for c in curves.values() for v in c if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    longest = max((len(c) for c in curves.values()), default=1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{pad}" y="20" font-size="14">{title}</text>',
             f'<text x="{width // 2}" y="{height - 8}" font-size="11">{x_label}</text>',
             f'<text x="4" y="{pad - 6}" font-size="11">{"log10 " if log_y else ""}{hi:.3g}</text>',
             f'<text x="4" y="{height - pad + 4}" font-size="11">{lo:.3g}</text>']
    for k, (name, curve) in enumerate(curves.items()):
        pts = []
        for i, v in enumerate(curve):
            if not math.isfinite(v):
                continue
            x = pad + (width - 2 * pad) * i / max(longest - 1, 1)
            y = height - pad - (height - 2 * pad) * (tf(v) - lo) / (hi - lo)
            pts.append(f"{x:.1f},{y:.1f}")
        colour = palette[k % len(palette)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(pts)}"/>')
        parts.append(f'<text x="{width - 190}" y="{30 + 14 * k}" font-size="11" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))
