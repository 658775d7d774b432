"""Procedural canary clips: a `ClipSpec` -> pixels, deterministic (no RNG at all past the spec).

Objects have soft (anti-aliased) edges; offsets are taken on the torus, so a wrapping object re-enters on the
opposite side. The striped background is static horizontal grey bands, 8 px each (unsaturated,
so colour masks of the object are unaffected by it).
"""

from __future__ import annotations

import torch

from canary.grammar import COLOURS, HALF, SIZE, ClipSpec, trajectory

PLAIN_GREY = 40.0
STRIPE_GREYS = (30.0, 70.0)
STRIPE_PERIOD = 16  # px


def background(kind: str) -> torch.Tensor:
    """``[3, SIZE, SIZE]`` float RGB in [0, 255]."""
    if kind == "plain":
        return torch.full((3, SIZE, SIZE), PLAIN_GREY)
    if kind == "striped":
        yy = torch.arange(SIZE).view(SIZE, 1).expand(SIZE, SIZE)
        band = (yy // (STRIPE_PERIOD // 2)) % 2
        grey = torch.where(band.bool(), STRIPE_GREYS[1], STRIPE_GREYS[0]).float()
        return grey.expand(3, SIZE, SIZE).clone()
    raise ValueError(f"`background` must be 'plain' or 'striped', got {kind!r}")


def _coverage(shape: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Soft coverage in [0, 1] of a shape centred at 0 for offsets ``dx, dy`` (px, any broadcastable shape)."""
    if shape == "circle":
        dist = HALF - torch.sqrt(dx * dx + dy * dy)
    elif shape == "square":
        dist = HALF - torch.maximum(dx.abs(), dy.abs())
    elif shape == "triangle":  # upright, apex at -HALF, base at +HALF
        slope = 0.5  # half-width grows by 1 px per 2 px down: edges |dx| = (dy + HALF) / 2
        norm = (1.0 + slope * slope) ** 0.5
        side = (slope * (dy + HALF) - dx.abs()) / norm
        dist = torch.minimum(torch.minimum(side, HALF - dy), dy + HALF)
    else:
        raise ValueError(f"`shape` must be circle, square or triangle, got {shape!r}")
    return (dist + 0.5).clamp(0.0, 1.0)


def render_clip(spec: ClipSpec, frames: int, start: int = 0) -> torch.Tensor:
    """Frames ``start .. start+frames-1`` of a clip as uint8 ``[frames, SIZE, SIZE, 3]``."""
    return render_scene([spec], frames, [start])


def render_scene(specs: list[ClipSpec], frames: int, starts: list[int] | None = None) -> torch.Tensor:
    """Several objects on the first one's background, later ones in front (uint8 ``[frames, SIZE, SIZE, 3]``);
    the VAE trains on such scenes: more object pixels per clip."""
    starts = starts or [0] * len(specs)
    pixels = background(specs[0].background).unsqueeze(0).expand(frames, 3, SIZE, SIZE)  # [T, 3, H, W]
    grid = torch.arange(SIZE, dtype=torch.float32) + 0.5
    for spec, start in zip(specs, starts):
        centres = trajectory(spec, frames, start).float()  # [T, 2]
        # offsets on the torus: an object near one edge also covers the opposite one
        dx = (grid.view(1, 1, SIZE) - centres[:, 0].view(-1, 1, 1) + SIZE / 2) % SIZE - SIZE / 2
        dy = (grid.view(1, SIZE, 1) - centres[:, 1].view(-1, 1, 1) + SIZE / 2) % SIZE - SIZE / 2
        cover = _coverage(spec.shape, dx, dy).unsqueeze(1)  # [T, 1, H, W]
        colour = torch.tensor(COLOURS[spec.colour], dtype=torch.float32).view(1, 3, 1, 1)
        pixels = pixels + cover * (colour - pixels)
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_model_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., T, H, W, 3]`` -> float ``[..., 3, T, H, W]`` in [-1, 1] (the VAE's input)."""
    x = frames.float() / 127.5 - 1.0
    return x.movedim(-1, -4)
