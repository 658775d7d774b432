"""The canary grammar: what a clip shows, its caption, and where its object is in every frame.

A clip is one object of a named colour and shape on a plain or striped background, moving one named way:

    caption := "a <colour> <shape> <motion> on a <background> background"
    colour  := red | green | blue | yellow
    shape   := circle | square | triangle
    motion  := moving left | moving right | moving up | moving down | bouncing
    background := plain | striped

``moving <dir>`` is a constant velocity of `SPEED` px per frame that wraps around the frame (an object leaving on
the right re-enters on the left), so a trajectory is defined for any length. ``bouncing`` moves vertically at
`BOUNCE_SPEED` px per frame, reflecting off the top and bottom, starting downwards. Frames are `SIZE` x `SIZE` px at
`FPS`. Every clip starts with its object at the frame centre, moved by a seeded jitter of at most `JITTER` px on
each axis; the same seed gives the same clip.

Why the start is (almost) fixed: the words then determine the whole clip up to the jitter, so a generator that
samples in 4 steps can render it sharply. A start drawn uniformly over the frame would make the first chunk an
average over positions for any few-step sampler that is not distilled (Self Forcing distils with DMD; a 60-minute
CPU budget does not allow it). The generator still learns to continue motion from its context: half of its
training clips start at a random frame of the trajectory (see `canary.train_gen`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

SIZE = 64  # px, square frames
FPS = 16
HALF = 10.0  # px, half the object's extent
SPEED = 1.5  # px per frame for "moving <dir>"
BOUNCE_SPEED = 2.0  # px per frame for "bouncing"
JITTER = 3.0  # px: the start position's seeded offset from the centre, per axis

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "bouncing")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped")
VELOCITY: dict[str, tuple[float, float]] = {  # (dx, dy) px per frame; y grows downwards
    "left": (-SPEED, 0.0), "right": (SPEED, 0.0), "up": (0.0, -SPEED), "down": (0.0, SPEED),
}


@dataclass(frozen=True)
class ClipSpec:
    """One clip of the grammar: the words and the seeded start state."""

    colour: str
    shape: str
    motion: str
    background: str
    x0: float  # px, object centre at frame 0
    y0: float
    bounce_sign: float = 1.0  # initial vertical direction of "bouncing" (+1 down, -1 up)

    def __post_init__(self) -> None:
        for name, allowed in (("colour", tuple(COLOURS)), ("shape", SHAPES), ("motion", MOTIONS),
                              ("background", BACKGROUNDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.motion, self.background)


def caption(colour: str, shape: str, motion: str, background: str = "plain") -> str:
    """The grammar's caption, e.g. ``a red circle moving right on a plain background``."""
    verb = "bouncing" if motion == "bouncing" else f"moving {motion}"
    return f"a {colour} {shape} {verb} on a {background} background"


def grammar_text() -> str:
    """The grammar in one line, for an error message."""
    motions = "|".join(m if m == "bouncing" else f"moving {m}" for m in MOTIONS)
    return (f"a <colour> <shape> <motion> on a <background> background, colour {'|'.join(COLOURS)}, shape "
            f"{'|'.join(SHAPES)}, motion {motions}, background {'|'.join(BACKGROUNDS)}")


def parse_caption(text: str) -> tuple[str, str, str, str]:
    """``(colour, shape, motion, background)`` of a grammar caption; ValueError for anything else."""
    words = text.strip().split()
    if len(words) >= 2 and words[-1] == "background":
        background, words = words[-2], words[:-4]  # drop "on a <bg> background"
    else:
        background = "plain"
    if len(words) == 5 and words[0] == "a" and words[3] == "moving":
        colour, shape, motion = words[1], words[2], words[4]
    elif len(words) == 4 and words[0] == "a" and words[3] == "bouncing":
        colour, shape, motion = words[1], words[2], "bouncing"
    else:
        raise ValueError(f"`caption` is not in the canary grammar: {text!r}")
    spec = ClipSpec(colour, shape, motion, background, 0.0, 0.0)  # validates the words
    return spec.colour, spec.shape, spec.motion, spec.background


def _unit(seed: int, *labels: str) -> float:
    """A uniform number in [0, 1) that is a pure function of ``seed`` and ``labels``."""
    digest = hashlib.sha256(":".join(["canary", str(seed), *labels]).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def _pick(seed: int, label: str, options: tuple[str, ...]) -> str:
    return options[int(_unit(seed, label) * len(options))]


def sample_spec(seed: int, colour: str | None = None, shape: str | None = None, motion: str | None = None,
                background: str | None = None) -> ClipSpec:
    """The clip of ``seed``; any word given is fixed, the others are drawn from the seed."""
    colour = colour or _pick(seed, "colour", tuple(COLOURS))
    shape = shape or _pick(seed, "shape", SHAPES)
    motion = motion or _pick(seed, "motion", MOTIONS)
    background = background or _pick(seed, "background", BACKGROUNDS)
    x0 = SIZE / 2 + JITTER * (2.0 * _unit(seed, "x0") - 1.0)
    y0 = SIZE / 2 + JITTER * (2.0 * _unit(seed, "y0") - 1.0)
    return ClipSpec(colour, shape, motion, background, x0, y0)


def trajectory(spec: ClipSpec, frames: int, start: int = 0) -> torch.Tensor:
    """Object centres ``[frames, 2]`` (x, y in px) of frames ``start .. start+frames-1``."""
    t = torch.arange(start, start + frames, dtype=torch.float64)
    if spec.motion == "bouncing":
        lo, hi = HALF, SIZE - HALF
        span = hi - lo
        # unfold the reflection: position along a path of length 2*span, folded back into [lo, hi]
        s = (spec.y0 - lo + spec.bounce_sign * BOUNCE_SPEED * t) % (2 * span)
        y = lo + torch.where(s <= span, s, 2 * span - s)
        x = torch.full_like(t, spec.x0)
    else:
        dx, dy = VELOCITY[spec.motion]
        x = (spec.x0 + dx * t) % SIZE
        y = (spec.y0 + dy * t) % SIZE
    return torch.stack([x, y], dim=1)


def velocity(motion: str) -> tuple[float, float]:
    """Mean (dx, dy) px per frame of a named motion (bouncing: 0 on average; see `trajectory`)."""
    return VELOCITY.get(motion, (0.0, 0.0))


def grammar_size() -> int:
    return len(COLOURS) * len(SHAPES) * len(MOTIONS) * len(BACKGROUNDS)

