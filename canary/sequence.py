"""Training sequences for the generator: clean context + noisy chunks in one masked full-sequence forward.

One sequence holds the clip's ``n`` chunks twice: first clean (timestep 0), then noisy, both halves at the same
RoPE frame positions ``0 .. F-1``. Who sees whom reproduces what the cached rollout computes:

- clean chunk i sees clean chunks ``<= i`` (the commit pass of chunk i over the committed cache);
- self-forcing (teacher forcing): noisy chunk i, at a level of the warped self-forcing schedule, sees clean chunks
  ``< i`` and itself (a denoising pass over the cache);
- rolling-forcing: one window pass ``p`` of the rolling schedule: the chunks ``j`` in the window are at level
  ``steps[p - j]``, see the clean chunks before the window and every chunk of the window (one joint pass); noisy
  chunks outside the window are trained the self-forcing way.

The loss is the flow ``noise - x0`` on the noisy half (flow matching, as `pipeline.rollout.sampler` samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import RolloutConfig


@dataclass
class Sequence:
    """A batch of masked training sequences over ``2F`` latent frames."""

    latents: torch.Tensor  # [B, C, 2F, h, w]: clean | noisy
    frame_levels: torch.Tensor  # [B, 2F] timesteps in [0, 1000]
    visible: torch.Tensor  # [B, 2F, 2F] bool: frame i may attend to frame j
    target: torch.Tensor  # [B, C, F, h, w] flow of the noisy half
    positions: torch.Tensor  # [2F] RoPE frame index of each frame


def schedules() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The warped timesteps the sampler uses in self-forcing and rolling-forcing modes."""
    return (RolloutConfig(mode="self-forcing").timesteps, RolloutConfig(mode="rolling-forcing").timesteps)


def build_sequence(x0: torch.Tensor, chunk_frames: int, generator: torch.Generator, rolling_fraction: float = 0.5,
                   context_noise: float = 0.0) -> Sequence:
    """Draw noise, levels and a per-sample scheme for clean latents ``x0 [B, C, F, h, w]`` (``F = n*chunk_frames``)."""
    batch, _, frames = x0.shape[:3]
    if frames % chunk_frames:
        raise ValueError(f"latent frames {frames} must be a multiple of `chunk_frames` {chunk_frames}")
    n = frames // chunk_frames
    sf, rf = schedules()
    levels = torch.zeros(batch, n)
    visible_chunks = torch.zeros(batch, 2 * n, 2 * n, dtype=torch.bool)
    chunk = torch.arange(n)
    clean_block = chunk[None, :] <= chunk[:, None]  # [i, j]: clean i sees clean j
    for b in range(batch):
        sf_pick = torch.randint(len(sf), (n,), generator=generator)
        levels[b] = torch.tensor(sf)[sf_pick]
        visible_chunks[b, :n, :n] = clean_block
        for i in range(n):  # self-forcing: clean < i, itself
            visible_chunks[b, n + i, :i] = True
            visible_chunks[b, n + i, n + i] = True
        if float(torch.rand((), generator=generator)) < rolling_fraction:
            depth = len(rf)
            p = int(torch.randint(n + depth - 1, (), generator=generator))
            window = [j for j in range(max(0, p - depth + 1), min(p, n - 1) + 1)]
            start = window[0]
            for j in window:
                levels[b, j] = rf[p - j]
                visible_chunks[b, n + j, :] = False
                visible_chunks[b, n + j, :start] = True
                visible_chunks[b, n + j, n + start:n + window[-1] + 1] = True
    noise = torch.randn(x0.shape, generator=generator)
    sigma = (levels / 1000.0).repeat_interleave(chunk_frames, dim=1)[:, None, :, None, None]  # [B, 1, F, 1, 1]
    noisy = (1.0 - sigma) * x0 + sigma * noise
    clean = x0
    if context_noise > 0:
        scale = torch.rand(batch, 1, 1, 1, 1, generator=generator) * context_noise
        clean = x0 + scale * torch.randn(x0.shape, generator=generator)
    frame_levels = torch.cat([torch.zeros(batch, frames), levels.repeat_interleave(chunk_frames, dim=1)], dim=1)
    visible = visible_chunks.repeat_interleave(chunk_frames, dim=1).repeat_interleave(chunk_frames, dim=2)
    positions = torch.cat([torch.arange(frames), torch.arange(frames)])
    return Sequence(torch.cat([clean, noisy], dim=2), frame_levels, visible, noise - x0, positions)
