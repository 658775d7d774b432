"""Uncaptioned content for the context canary (``canary-ctx``): static coloured marks that only the context shows.

A training clip of the context canary is a grammar clip (`canary.grammar`) plus 0-2 *marks*: static
squares of another grammar colour at a seeded position, each entering at a chunk boundary and staying to the end.
The caption never names them, so a generator can draw a mark's later frames only by carrying it forward from its
KV cache: the content that TokenTrim's failure mode needs (a glitch that enters a committed chunk is carried on).

- A mark's colour is never the named one (the detector reads the named object by its colour).
- A mark never enters in chunk 0 of an *anchored* clip (one that starts at frame 0, as every rollout starts):
  chunk 0 stays what the words fix, so the model's own rollouts start clean.
- The chunk a mark enters in leaves the mark's latent cells out of the loss (`entry_mask`): nothing in the context
  says where it appears; only its persistence is taught.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from canary.grammar import COLOURS, SIZE, _unit
from pipeline.model.vae import pixel_frames_for

MARK_MIN, MARK_MAX = 8, 16  # px, the side of a mark (the effect harness's pasted glitch is 16 px)
MAX_MARKS = 2
LATENT_CELL = 8  # px per latent pixel (the VAE's spatial scale)


@dataclass(frozen=True)
class Mark:
    """A static square of ``colour``, top-left corner ``(x, y)`` px, side ``side`` px, shown from the first frame of
    the clip's latent chunk ``chunk`` on (wrapping on the torus like the objects)."""

    colour: str
    x: int
    y: int
    side: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"`colour` must be one of {tuple(COLOURS)}, got {self.colour!r}")
        if not MARK_MIN <= self.side <= MARK_MAX:
            raise ValueError(f"`side` must be in [{MARK_MIN}, {MARK_MAX}], got {self.side}")
        if not (0 <= self.x < SIZE and 0 <= self.y < SIZE and self.chunk >= 0):
            raise ValueError(f"mark outside the frame: x={self.x}, y={self.y}, chunk={self.chunk}")


def entry_frame(chunk: int, chunk_frames: int) -> int:
    """The first pixel frame decoded from latent chunk ``chunk`` (0 for chunk 0)."""
    return 0 if chunk == 0 else pixel_frames_for(chunk * chunk_frames)


def sample_marks(seed: int, named: str, chunks: int, anchored: bool) -> list[Mark]:
    """0-``MAX_MARKS`` marks for a clip of ``chunks`` chunks whose object is ``named``, a pure function of ``seed``.

    Anchored clips: half have no mark, the others 1-2 entering in chunk 1 .. chunks-1. Free clips: 1-2 marks, each
    present from the start (half of them) or entering in a later chunk. Two marks never share a colour."""
    if anchored and _unit(seed, "marks-none") < 0.5:
        return []
    count = 1 + int(_unit(seed, "marks-count") * MAX_MARKS)
    colours = [c for c in COLOURS if c != named]
    first = int(_unit(seed, "marks-colour") * len(colours))
    marks = []
    for k in range(count):
        colour = colours[(first + k) % len(colours)]
        side = MARK_MIN + int(_unit(seed, f"mark{k}-side") * (MARK_MAX - MARK_MIN + 1))
        x, y = (int(_unit(seed, f"mark{k}-{a}") * SIZE) for a in "xy")
        late = anchored or _unit(seed, f"mark{k}-late") < 0.5
        chunk = 1 + int(_unit(seed, f"mark{k}-chunk") * (chunks - 1)) if late else 0
        marks.append(Mark(colour, x, y, side, chunk))
    return marks


def mark_cover(mark: Mark) -> torch.Tensor:
    """bool ``[SIZE, SIZE]``: the pixels a mark covers (wrapping on the torus)."""
    rows = (torch.arange(mark.y, mark.y + mark.side) % SIZE).view(-1, 1)
    cols = (torch.arange(mark.x, mark.x + mark.side) % SIZE).view(1, -1)
    cover = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    cover[rows, cols] = True
    return cover


def paint_marks(frames: torch.Tensor, marks: list[Mark], chunk_frames: int) -> torch.Tensor:
    """uint8 clip frames ``[T, H, W, 3]`` with ``marks`` painted *under* the object: a pixel is painted where it
    still shows the (grey) background, so the object, drawn in front, keeps its pixels."""
    out = frames.clone()
    x = frames.float()
    grey = (x.amax(dim=-1) - x.amin(dim=-1)) < 8.0  # [T, H, W]: not covered by the (saturated) object
    for mark in marks:
        shown = torch.arange(frames.shape[0]) >= entry_frame(mark.chunk, chunk_frames)  # [T]
        where = grey & mark_cover(mark)[None] & shown[:, None, None]
        out[where] = torch.tensor(COLOURS[mark.colour], dtype=torch.uint8)
    return out


def entry_mask(marks: list[Mark], latent_frames: int, chunk_frames: int) -> torch.Tensor:
    """float ``[1, F, 8, 8]``: 0 on the latent cells (dilated by one) of each mark in the latent frames of the chunk
    it enters in, 1 elsewhere: the loss weight that leaves a mark's unpredictable appearance out."""
    cells = SIZE // LATENT_CELL
    keep = torch.ones(1, latent_frames, cells, cells)
    for mark in marks:
        cover = mark_cover(mark).float().view(1, 1, SIZE, SIZE)
        cell = torch.nn.functional.max_pool2d(cover, LATENT_CELL)  # [1, 1, 8, 8]
        cell = torch.nn.functional.max_pool2d(torch.nn.functional.pad(cell, (1, 1, 1, 1), mode="circular"), 3,
                                              stride=1)[0, 0] > 0
        lo = mark.chunk * chunk_frames
        keep[0, lo:lo + chunk_frames, cell] = 0.0
    return keep
