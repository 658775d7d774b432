"""Sample canary prompts through the real rollout, and write PNG frame grids and SVG curves.

`sample_videos` runs `pipeline.rollout.Rollout` (causal backend, KV cache, self-forcing or rolling-forcing, optional
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
def sample_videos(backend: WanBackend, prompts: list[str], seeds: list[int], *, mode: str = "self-forcing",
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
    """A line chart of named curves (x = index) as an SVG file, drawn with matplotlib (no pyplot, no GUI backend)."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot(range(len(curve)), curve, label=name, linewidth=1.5)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=x_label)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "tokentrim"}):
        fig.savefig(path, format="svg", metadata={"Date": None})
