"""The rollout config: one frozen object whose JSON hash is recorded with every output (`pipeline.hashing`), with
the timestep schedules and the sink-RoPE choice it names. It imports nothing of the layers that use it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Mode = Literal["self-forcing", "rolling-forcing"]
SinkRope = Literal["absolute", "adjacent"]
MODES: tuple[str, ...] = ("self-forcing", "rolling-forcing")
# Rolling Forcing attends to at most 21 latent frames: the sink (anchor) chunk, the cached clean frames and the
# working frames of the joint window (its causal_model.py). The rolling-forcing default window keeps to that cap.
ROLLING_ATTENTION_FRAMES = 21
MAX_CHUNKS = 2_000  # the one cap on a rollout's chunks: table rows, --num-chunks, --chunks, stored markers
# Fields that change the speed of a rollout but never its output (tested: identical latents either way).
SPEED_FIELDS: tuple[str, ...] = ("early_stop",)
SELF_FORCING_STEPS: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
ROLLING_FORCING_STEPS: tuple[float, ...] = (1000.0, 800.0, 600.0, 400.0, 200.0)


def warp_timesteps(steps: tuple[float, ...], shift: float) -> tuple[float, ...]:
    """Shifted schedule ``t' = 1000 * shift*s / (1 + (shift-1)*s)`` with ``s = t/1000`` (shift 5: 750 -> 937.5)."""
    if shift <= 0:
        raise ValueError(f"`shift` must be > 0, got {shift}")
    out = []
    for t in steps:
        s = t / 1000.0
        out.append(1000.0 * shift * s / (1.0 + (shift - 1.0) * s))
    return tuple(out)


@dataclass(frozen=True)
class RolloutConfig:
    """How one AR rollout runs. Sizes are in latent frames unless named ``*_px``.

    mode: ``self-forcing`` (chunks denoised one after another, ``steps`` each) or ``rolling-forcing`` (a joint
        window of ``len(steps)`` chunks at staggered levels, one chunk finished per window pass).
    num_chunks: chunks to generate; chunk_frames: latent frames per chunk.
    steps: the unwarped timestep list (None: the mode's default), warped with ``shift``.
    window_frames: local attention window over committed non-sink frames (None: attend to all for self-forcing; for
        rolling-forcing the upstream cap, sink + window + working frames <= ``ROLLING_ATTENTION_FRAMES``; a larger
        value attends to more).
    sink_frames: first frames kept forever (None: 0 for self-forcing, one chunk for rolling-forcing).
    sink_rope: ``absolute`` keeps the sink at frames 0..; ``adjacent`` re-rotates it right before the oldest cached
        frame, as Rolling Forcing does (None: adjacent for rolling-forcing, absolute for self-forcing).
    height_px, width_px: output size (None: the model's default); fps: output frame rate.
    early_stop: self-forcing with TokenTrim: read the verdict at ``measure_step`` and skip the remaining steps of a
        candidate every undecided sample rejects (one more host read per attempt that may retry, fewer passes per
        regenerated chunk; on by default, see bench/RESULTS.md; the results are identical, so it is not part of the
        config hash).
    """

    mode: Mode = "self-forcing"
    num_chunks: int = 7
    chunk_frames: int = 3
    steps: tuple[float, ...] | None = None
    shift: float = 5.0
    window_frames: int | None = None
    sink_frames: int | None = None
    sink_rope: SinkRope | None = None
    height_px: int | None = None
    width_px: int | None = None
    fps: int = 16
    early_stop: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {self.mode!r}")
        for name in ("chunk_frames", "fps"):
            check_int(name, getattr(self, name), 1)
        check_chunks(self.num_chunks)
        for name in ("window_frames", "height_px", "width_px"):
            check_int(name, getattr(self, name), 1, optional=True)
        check_int("sink_frames", self.sink_frames, 0, optional=True)
        if self.steps is not None:
            steps = tuple(float(t) for t in self.steps)
            if not steps or any(not 0 < t <= 1000 for t in steps) or list(steps) != sorted(steps, reverse=True):
                raise ValueError(f"`steps` must be a decreasing list of timesteps in (0, 1000], got {self.steps!r}")
            object.__setattr__(self, "steps", steps)
        if self.sink_rope not in (None, "absolute", "adjacent"):
            raise ValueError(f"`sink_rope` must be 'absolute', 'adjacent' or None, got {self.sink_rope!r}")
        if not self.shift > 0:
            raise ValueError(f"`shift` must be > 0, got {self.shift!r}")
        if not isinstance(self.early_stop, bool):
            raise ValueError(f"`early_stop` must be a bool, got {self.early_stop!r}")

    @property
    def timesteps(self) -> tuple[float, ...]:
        """The warped schedule actually sampled."""
        default = SELF_FORCING_STEPS if self.mode == "self-forcing" else ROLLING_FORCING_STEPS
        return warp_timesteps(self.steps or default, self.shift)

    @property
    def attention_window(self) -> int | None:
        """The window the cache keeps: ``window_frames``, or rolling-forcing's upstream cap when it is None."""
        if self.window_frames is not None or self.mode != "rolling-forcing":
            return self.window_frames
        working = len(self.timesteps) * self.chunk_frames  # the joint window's frames
        return max(1, ROLLING_ATTENTION_FRAMES - self.effective_sink_frames - working)

    @property
    def effective_sink_frames(self) -> int:
        """`sink_frames`, or its mode's default when None."""
        if self.sink_frames is not None:
            return self.sink_frames
        return self.chunk_frames if self.mode == "rolling-forcing" else 0

    @property
    def effective_sink_rope(self) -> SinkRope:
        """`sink_rope`, or its mode's default when None."""
        if self.sink_rope is not None:
            return self.sink_rope
        return "adjacent" if self.mode == "rolling-forcing" else "absolute"

    @property
    def num_frames(self) -> int:
        return self.num_chunks * self.chunk_frames

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = list(self.steps) if self.steps is not None else None
        return d

    def hashed_dict(self) -> dict[str, Any]:
        """`to_dict` without the fields that change how fast a rollout runs, not what it renders (`SPEED_FIELDS`):
        what the config hashes are taken over."""
        return {k: v for k, v in self.to_dict().items() if k not in SPEED_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RolloutConfig fields {unknown}")
        return cls(**d)


def check_int(name: str, value: Any, low: int, high: int | None = None, *, optional: bool = False) -> Any:
    """``value`` if it is an integer (not a bool) in ``[low, high]`` (or None, when ``optional``); else ValueError
    naming ``name``, the range and the value. (`tokentrim.config` keeps its own: it imports nothing of pipeline.)"""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be an integer {span}{' or None' if optional else ''}, got {value!r}")
    return value


def check_chunks(value: Any, name: str = "num_chunks") -> int:
    """``value`` if it is a chunk count within `MAX_CHUNKS` (every path that takes one: config, table rows, CLI),
    else ValueError naming ``name``."""
    return check_int(name, value, 1, MAX_CHUNKS)
