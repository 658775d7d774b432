"""A colour-mask centroid detector for canary videos, and the canary-aware quality measures built on it.

Pixels are classed by the nearest grammar colour when they are saturated (max - min channel > `MIN_SATURATION`)
and close to that colour; the background greys never are. Per frame: the mass (pixel count) of the named colour
and its centroid, a circular mean on the torus so a wrapping object keeps one centre. The motion is read from the
frame-to-frame displacements (also on the torus).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from canary.grammar import BOUNCE_SPEED, COLOURS, HALF, SIZE, velocity
from canary.render import background

MIN_SATURATION = 60.0
MAX_COLOUR_DIST = 110.0
MIN_MASS = 8  # px: below this a frame has no object of the colour
SHAPE_AREA = {"circle": math.pi * HALF**2, "square": (2 * HALF) ** 2, "triangle": 2 * HALF * HALF}


def colour_masks(frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 ``[T, H, W, 3]`` -> ``{colour: bool [T, H, W]}`` (each pixel in at most one mask)."""
    x = frames.float()
    sat = x.amax(dim=-1) - x.amin(dim=-1)
    refs = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [K, 3]
    dist = (x.unsqueeze(-2) - refs).norm(dim=-1)  # [T, H, W, K]
    best, idx = dist.min(dim=-1)
    ok = (sat > MIN_SATURATION) & (best < MAX_COLOUR_DIST)
    return {name: ok & (idx == k) for k, name in enumerate(COLOURS)}


def circular_centroid(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[T, H, W]`` -> ``[T, 2]`` (x, y) circular-mean centres in px (NaN where the mask is empty)."""
    angle = (torch.arange(SIZE, dtype=torch.float32) + 0.5) * (2 * math.pi / SIZE)
    m = mask.float()
    out = []
    for axis_sum, dim in ((m.sum(dim=1), 1), (m.sum(dim=2), 1)):  # x: sum over rows; y: sum over columns
        s = (axis_sum * torch.sin(angle)).sum(dim=dim)
        c = (axis_sum * torch.cos(angle)).sum(dim=dim)
        out.append((torch.atan2(s, c) % (2 * math.pi)) * SIZE / (2 * math.pi) - 0.5)
    centres = torch.stack(out, dim=1)
    empty = m.sum(dim=(1, 2)) < MIN_MASS
    return centres.masked_fill(empty[:, None], float("nan"))


def wrapped_steps(centres: torch.Tensor) -> torch.Tensor:
    """``[T, 2]`` centres -> ``[T-1, 2]`` displacements wrapped into [-SIZE/2, SIZE/2)."""
    d = centres[1:] - centres[:-1]
    return (d + SIZE / 2) % SIZE - SIZE / 2


@dataclass
class Detection:
    colour: str | None  # the dominant colour (largest mean mass), None if no colour anywhere
    motion: str  # left | right | up | down | bouncing | static | none
    velocity: tuple[float, float]  # mean (dx, dy) px per frame of the named colour
    mass: torch.Tensor  # [T] pixels of the named colour per frame
    centres: torch.Tensor  # [T, 2]


def classify_motion(steps: torch.Tensor) -> str:
    """A motion name from displacements ``[N, 2]`` (NaN rows ignored)."""
    steps = steps[~steps.isnan().any(dim=1)]
    if steps.shape[0] < 3:
        return "none"
    dx, dy = steps.mean(dim=0).tolist()
    down = float((steps[:, 1] > 0.5).float().mean())
    up = float((steps[:, 1] < -0.5).float().mean())
    if min(up, down) >= 0.15 and abs(dx) < 0.5:
        return "bouncing"
    if max(abs(dx), abs(dy)) < 0.4:
        return "static"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def detect(frames: torch.Tensor, colour: str) -> Detection:
    """Detect the object of the named ``colour`` in uint8 frames ``[T, H, W, 3]``."""
    if colour not in COLOURS:
        raise ValueError(f"`colour` must be one of {tuple(COLOURS)}, got {colour!r}")
    masks = colour_masks(frames)
    mean_mass = {name: float(m.float().sum(dim=(1, 2)).mean()) for name, m in masks.items()}
    dominant = max(mean_mass, key=lambda k: mean_mass[k])
    mask = masks[colour]
    centres = circular_centroid(mask)
    steps = wrapped_steps(centres)
    valid = steps[~steps.isnan().any(dim=1)]
    vel = tuple(valid.mean(dim=0).tolist()) if valid.shape[0] else (float("nan"), float("nan"))
    return Detection(dominant if mean_mass[dominant] >= MIN_MASS else None, classify_motion(steps),
                     (float(vel[0]), float(vel[1])), mask.float().sum(dim=(1, 2)), centres)


def count_blobs(mask: torch.Tensor, min_size: int = MIN_MASS) -> torch.Tensor:
    """Connected components (8-neighbour, on the torus) of at least ``min_size`` px per frame of ``[T, H, W]``."""
    t = mask.shape[0]
    labels = torch.arange(1, SIZE * SIZE + 1, dtype=torch.float32).view(1, 1, SIZE, SIZE).repeat(t, 1, 1, 1)
    m = mask.float().unsqueeze(1)
    labels = labels * m
    for _ in range(2 * SIZE):
        grown = F.max_pool2d(F.pad(labels, (1, 1, 1, 1), mode="circular"), 3, stride=1) * m
        if torch.equal(grown, labels):
            break
        labels = grown
    counts = []
    for f in range(t):
        ids, sizes = labels[f].unique(return_counts=True)
        counts.append(int(((ids > 0) & (sizes >= min_size)).sum()))
    return torch.tensor(counts)


def trajectory_error(steps: torch.Tensor, motion: str) -> torch.Tensor:
    """|displacement - the named motion's velocity| px per frame of ``steps [N, 2]`` (for bouncing: |dx| + ||dy| -
    speed|); NaN where a step is."""
    if motion == "bouncing":
        return steps[:, 0].abs() + (steps[:, 1].abs() - BOUNCE_SPEED).abs()
    vx, vy = velocity(motion)
    return (steps - torch.tensor([vx, vy])).norm(dim=1)


def canary_metrics(frames: torch.Tensor, colour: str, shape: str, motion: str, bg: str) -> dict[str, torch.Tensor]:
    """Per-frame canary-aware measures of uint8 ``[T, H, W, 3]`` for a caption's words:

    - ``mass_ratio``: pixels of the named colour / the shape's area (1 = the object kept its colour mass);
    - ``background_err``: mean |pixel - true background| (0-255) away from the object (dilated colour masks);
    - ``objects``: saturated blobs of any colour (1 is right);
    - ``traj_err``: |displacement - the named motion's velocity| px per frame (for bouncing: |dx| + ||dy| - speed|).
    """
    masks = colour_masks(frames)
    det = detect(frames, colour)
    any_colour = torch.stack(list(masks.values())).any(dim=0)  # [T, H, W]
    near = F.max_pool2d(any_colour.float().unsqueeze(1), 5, stride=1, padding=2).squeeze(1) > 0
    truth = background(bg).permute(1, 2, 0)  # [H, W, 3]
    err = (frames.float() - truth).abs().mean(dim=-1)  # [T, H, W]
    far = (~near).float()
    bg_err = (err * far).sum(dim=(1, 2)) / far.sum(dim=(1, 2)).clamp_min(1.0)
    traj = trajectory_error(wrapped_steps(det.centres), motion)
    return {"mass_ratio": det.mass / SHAPE_AREA[shape], "background_err": bg_err,
            "objects": count_blobs(any_colour).float(), "traj_err": traj}
