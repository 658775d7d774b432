"""What TokenTrim does to what a viewer sees on the canary: per-chunk artefact labels, a pasted foreign object to
inject, a decoder warmed on the clean run, and the statistics the effect harness (`bench.effect`) and the
regression (`jobs.quality`) report.

A regenerated chunk differs from the clean run by construction, so nothing here compares a run with the clean one
pixel by pixel: each chunk is judged by the detector (`canary.detect`), and each figure is set against the
same figure for another random draw (the floor). Frames after an injected fault are decoded by a decoder that saw
the *clean* chunks up to the fault (`warm_decode`): the VAE's causal cache would otherwise carry the faulty chunk's
look into the next frames and count as drift.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from canary.detect import (
    MIN_MASS,
    SHAPE_AREA,
    circular_centroid,
    colour_masks,
    count_blobs,
    trajectory_error,
    wrapped_steps,
)
from canary.grammar import COLOURS, parse_caption
from canary.render import background
from pipeline.model.vae import pixel_frames_for

LABELS = ("vanish", "split", "foreign", "wrong_colour")
FOREIGN_MIN_PX = 40  # px of another grammar colour in a frame: ~10% of an object, above the VAE's edge fringes
# the VAE draws a blue ghost behind moving yellow objects (seen on round trips of ground-truth clips): not the
# generator's, so blue is not foreign next to yellow
VAE_GHOSTS = {"yellow": ("blue",)}
GLITCH_PX = 16  # the pasted square's side: 2x2 latent cells of 8 px (one token at 1x2x2 patches, four at 1x1x1)
GLITCH_CELLS = GLITCH_PX // 8  # latent cells per side


def glitch_tokens(patch: tuple[int, ...], latent_w: int) -> list[int]:
    """Row-major token indices (of a ``(t, h, w)`` patch grid over a latent ``latent_w`` cells wide) that the pasted
    glitch (the top-left `GLITCH_CELLS` x `GLITCH_CELLS` latent cells) covers."""
    _, p_h, p_w = patch
    grid_w = latent_w // p_w
    rows, cols = -(-GLITCH_CELLS // p_h), -(-GLITCH_CELLS // p_w)
    return [i * grid_w + j for i in range(rows) for j in range(cols)]


def chunk_span(chunk: int, chunk_frames: int) -> tuple[int, int]:
    """Pixel frames ``[lo, hi)`` decoded from latent chunk ``chunk`` (the first chunk has 1 + 4 (F - 1) frames)."""
    lo = 0 if chunk == 0 else pixel_frames_for(chunk * chunk_frames)
    return lo, pixel_frames_for((chunk + 1) * chunk_frames)


def foreign_colour(named: str) -> str:
    """The colour of the object pasted into a video of a ``named`` colour: red, or green for red."""
    return "green" if named == "red" else "red"


@dataclass
class ChunkVerdict:
    """The detector's reading of one chunk: artefact labels and quality figures (higher is worse)."""

    labels: dict[str, bool]
    mass_err: float  # |1 - named-colour px / shape area|, mean over frames
    traj_err: float  # px per frame off the named motion (NaN when the object is not found in two frames)
    glitch_px: float  # px per frame of the pasted object's colour in its corner (`GLITCH_PX` + margin)

    @property
    def clean(self) -> bool:
        return not any(self.labels.values())


def judge_chunk(frames: torch.Tensor, prompt: str, previous_frame: torch.Tensor | None = None) -> ChunkVerdict:
    """Labels of uint8 ``frames [T, H, W, 3]`` of one chunk of a video of the grammar ``prompt``. A label holds when
    it holds in at least half the frames: ``vanish`` (named colour under `MIN_MASS` px), ``split`` (two or more
    named-colour blobs), ``foreign`` (another colour over `FOREIGN_MIN_PX`, the VAE's known ghosts excepted),
    ``wrong_colour`` (another colour dominates). ``previous_frame``: the frame before, so the motion crosses the
    boundary."""
    colour, shape, motion, _ = parse_caption(prompt)
    ctx = frames if previous_frame is None else torch.cat([previous_frame[None], frames])
    ctx_masks = colour_masks(ctx)
    masks = {name: m[ctx.shape[0] - frames.shape[0]:] for name, m in ctx_masks.items()}  # this chunk's frames
    mass = {name: m.float().sum(dim=(1, 2)) for name, m in masks.items()}  # [T] each
    named = mass[colour]
    others = [c for c in COLOURS if c != colour and c not in VAE_GHOSTS.get(colour, ())]
    half = frames.shape[0] / 2
    blobs = count_blobs(masks[colour])
    dominant = torch.stack([mass[c] for c in COLOURS]).argmax(dim=0)  # [T]
    wrong = (dominant != list(COLOURS).index(colour)) & (torch.stack([mass[c] for c in COLOURS]).amax(0) >= MIN_MASS)
    labels = {"vanish": float((named < MIN_MASS).sum()) >= half,
              "split": float((blobs >= 2).sum()) >= half,
              "foreign": float((torch.stack([mass[c] for c in others]).amax(0) >= FOREIGN_MIN_PX).sum()) >= half,
              "wrong_colour": float(wrong.sum()) >= half}
    steps = wrapped_steps(circular_centroid(ctx_masks[colour]))  # [T, 2] px per frame (NaN: not found)
    traj = trajectory_error(steps, motion)
    traj = traj[~traj.isnan()]
    corner = GLITCH_PX + 8
    glitch = masks[foreign_colour(colour)][:, :corner, :corner].float().sum(dim=(1, 2))
    return ChunkVerdict(labels, float((1.0 - named / SHAPE_AREA[shape]).abs().mean()),
                        float(traj.mean()) if traj.numel() else float("nan"), float(glitch.mean()))


def judge_video(video: torch.Tensor, prompt: str, num_chunks: int, chunk_frames: int,
                chunks: Sequence[int] | None = None) -> dict[int, ChunkVerdict]:
    """`judge_chunk` for each of ``chunks`` (default all) of a uint8 ``video [T, H, W, 3]``."""
    out = {}
    for c in range(num_chunks) if chunks is None else chunks:
        lo, hi = chunk_span(c, chunk_frames)
        out[c] = judge_chunk(video[lo:hi], prompt, video[lo - 1] if lo > 0 else None)
    return out


def onsets(verdicts: dict[int, ChunkVerdict], label: str | None = None) -> dict[int, bool]:
    """Per chunk c >= 1 with c - 1 judged: an artefact (``label``, or any) starts at c."""
    def has(v: ChunkVerdict) -> bool:
        return not v.clean if label is None else v.labels[label]

    return {c: has(v) and not has(verdicts[c - 1]) for c, v in verdicts.items() if c - 1 in verdicts}


# ---------------------------------------------------------------------------------------------------- injection
@torch.no_grad()
def glitch_latents(backend: object, prompt: str) -> torch.Tensor:
    """Normalised latents ``[16, 2, 2]`` of the top-left token of a frame showing the prompt's background with a
    `GLITCH_PX` square of `foreign_colour` in that corner: what `Glitch` pastes."""
    from canary.render import to_model_pixels

    vae = backend.vae  # type: ignore[attr-defined]
    colour, _, _, bg = parse_caption(prompt)
    frame = background(bg).clone()  # [3, H, W]
    paint = torch.tensor(COLOURS[foreign_colour(colour)], dtype=torch.float32)
    frame[:, :GLITCH_PX, :GLITCH_PX] = paint[:, None, None]
    clip = frame.round().to(torch.uint8).permute(1, 2, 0)[None].expand(9, -1, -1, -1)  # [T, H, W, 3], static
    param = next(vae.parameters())
    x = to_model_pixels(clip)[None].to(device=param.device, dtype=param.dtype)  # [1, 3, T, H, W]
    vae.clear_cache()
    z = vae.encode(x).latent_dist.mean.float()  # [1, 16, F, h, w], the VAE's own scale
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    z = ((z.cpu() - mean) / std)[0, :, 1:].mean(dim=1)  # [16, h, w]: the static frames after the first
    return z[:, :2, :2]


class Glitch:
    """A rollout ``perturb`` hook: pastes ``latents[b]`` ``[B, 16, 2, 2]`` over the top-left token of chunk
    ``chunk``, at every step of the *first attempt only*; a regenerated candidate is clean. It also records the
    first x0 each chunk's attempt 0 shows the hook (in self-forcing the x0 of denoising step 0, the one TokenTrim
    judges at ``measure_step`` 0; in rolling-forcing the finished chunk) in ``first_x0``."""

    def __init__(self, chunk: int | None = None, latents: torch.Tensor | None = None) -> None:
        self.chunk, self.latents = chunk, latents
        self.first_x0: dict[int, torch.Tensor] = {}

    def __call__(self, chunk: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
        if chunk == self.chunk and attempt == 0 and self.latents is not None:
            x0 = x0.clone()
            x0[:, :, :, :2, :2] = self.latents[:, :, None].to(x0)  # [B, C, F, 2, 2]
        if attempt == 0 and chunk not in self.first_x0:
            self.first_x0[chunk] = x0.detach().float().cpu().clone()
        return x0


@torch.no_grad()
def warm_decode(new_decoder: Callable[[], object], warm: Sequence[torch.Tensor], run: Sequence[torch.Tensor]
                ) -> torch.Tensor:
    """uint8 frames ``[B, T, H, W, 3]`` of the latent chunks ``warm`` (the clean run's first chunks) followed by
    ``run`` (a variant's later chunks), decoded by one streaming decoder: the frames of ``run`` carry nothing of the
    variant's earlier chunks."""
    decoder = new_decoder()
    return torch.cat([decoder.decode(x) for x in (*warm, *run)], dim=1)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------- statistics
def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney); NaN when a side is empty."""
    if not positives or not negatives:
        return float("nan")
    pos, neg = torch.tensor(positives, dtype=torch.float64), torch.tensor(negatives, dtype=torch.float64)
    above = (pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean()
    return float(above)


def bootstrap(statistic: Callable[[list[int]], float], units: int, *, draws: int = 1000, seed: int = 0,
              level: float = 0.95) -> tuple[float, float, float]:
    """``(value, low, high)``: ``statistic`` over all ``units`` (prompt indices) and its percentile interval over
    ``draws`` resamples of the units with replacement (NaN draws are left out). Paired figures stay paired: the
    statistic sees the same prompts for every run it compares."""
    g = torch.Generator().manual_seed(seed)
    value = statistic(list(range(units)))
    samples = [statistic(torch.randint(units, (units,), generator=g).tolist()) for _ in range(draws)]
    finite = torch.tensor([s for s in samples if s == s], dtype=torch.float64)
    if finite.numel() == 0:
        return value, float("nan"), float("nan")
    tail = (1.0 - level) / 2
    return value, float(finite.quantile(tail)), float(finite.quantile(1.0 - tail))


def median(values: Sequence[float]) -> float:
    """The median of the finite values (NaN when none)."""
    finite = [v for v in values if v == v]
    return float(statistics.median(finite)) if finite else float("nan")
