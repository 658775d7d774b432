"""Wan's 3D RoPE at absolute latent-frame positions, and the rotation itself.

diffusers' `WanRotaryPosEmbed` holds the tables (``freqs_cos``/``freqs_sin`` ``[max_seq_len, head_dim]``, t/h/w
parts side by side) but always starts at frame 0; these helpers index them at any frames. Rotations compose:
rotating keys already placed at frame f by the table of frame d (h = w = 0) places them at f + d.
"""

from __future__ import annotations

from typing import Any

import torch


def rope_for_frames(rope: Any, frames: torch.Tensor | range, grid_h: int, grid_w: int) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """RoPE tables for tokens of absolute latent ``frames`` (``[F]`` long, or a ``range``) on a ``grid_h x grid_w``
    patch grid.

    ``rope`` is diffusers' `WanRotaryPosEmbed` (its ``freqs_cos``/``freqs_sin`` buffers ``[max_seq_len, head_dim]``
    hold the t/h/w parts side by side). Returns ``(cos, sin)``, each ``[1, F*grid_h*grid_w, 1, head_dim]``, token order
    (f, h, w) as the patch embedding flattens them. A ``range`` is checked on the host and indexed on the tables'
    device, so the call never waits for the device (the rollout's hot path passes ranges).
    """
    limit = rope.max_seq_len
    if isinstance(frames, range):
        if len(frames) == 0 or min(frames) < 0 or max(frames) >= limit:
            raise ValueError(f"latent frame indices must lie in [0, {limit}) (`rope_max_seq_len`), got {frames}")
        frames = torch.arange(frames.start, frames.stop, frames.step, device=rope.freqs_cos.device)
    elif int(frames.max()) >= limit or int(frames.min()) < 0:
        raise ValueError(f"latent frame indices must lie in [0, {limit}) (`rope_max_seq_len`), got {frames.tolist()}")
    if grid_h > limit or grid_w > limit:
        raise ValueError(f"patch grid {grid_h}x{grid_w} exceeds `rope_max_seq_len` {limit}")
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t_part, h_part, w_part = table.split(split, dim=1)
        n_f = frames.numel()
        t_part = t_part[frames.to(table.device)].view(n_f, 1, 1, -1).expand(n_f, grid_h, grid_w, -1)
        h_part = h_part[:grid_h].view(1, grid_h, 1, -1).expand(n_f, grid_h, grid_w, -1)
        w_part = w_part[:grid_w].view(1, 1, grid_w, -1).expand(n_f, grid_h, grid_w, -1)
        # [F, gh, gw, head_dim] -> [1, F*gh*gw, 1, head_dim]
        out.append(torch.cat([t_part, h_part, w_part], dim=-1).reshape(1, n_f * grid_h * grid_w, 1, -1))
    return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x [B, n, heads, head_dim]`` by the angles of ``cos``/``sin``."""
    pairs = x.unflatten(-1, (-1, 2))  # [B, n, heads, head_dim/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack([real * c - imag * s, real * s + imag * c], dim=-1)
    return rotated.flatten(-2).type_as(x)
