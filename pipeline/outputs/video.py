"""H.264 mp4 encoding and decoding with PyAV: uint8 RGB frames ``[T, H, W, 3]`` <-> yuv420p H.264 with
``+faststart``, written through a temp file (mp4 cannot stream to a non-seekable sink) and returned as bytes.

The non-obvious thing: the bytes are deterministic only with `VideoSettings.simd="avx2"` (the default) and one encoder
thread; libx264's AVX-512 paths are not reproducible run to run (bench/RESULTS.md, `tests/test_video.py`).
"""

from __future__ import annotations

import io
import logging
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Literal, get_args

import numpy as np

logger = logging.getLogger(__name__)


def _import_av() -> Any:
    try:
        import av
    except ImportError as e:
        raise ImportError("pipeline.outputs.video needs PyAV: pip install 'av>=14' (a core dependency of tokentrim)"
                          ) from e
    return av


Simd = Literal["avx2", "none", "auto"]
# How a render's mp4 is made, part of every output and job hash: 2 = one closed-GOP segment per chunk, remuxed
# (`pipeline.outputs.segments`); 1 (unnamed in old hashes) = one encode of all frames.
VIDEO_FORMAT = 2
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class VideoSettings:
    """H.264 (libx264, yuv420p, one encoder thread) settings; recorded in every output's config hash.

    ``crf``: constant rate factor (0 lossless .. 51); ``preset``: x264 speed preset. ``simd``: ``avx2`` caps x264's
    x86 SIMD at AVX2 (reproducible bytes, see the module docstring); ``none`` turns its assembly off (reproducible,
    about 3x slower, other bytes); ``auto`` lets x264 pick (AVX-512 where present: not reproducible there).
    """

    crf: int = 18
    preset: str = "medium"
    simd: Simd = "avx2"

    def __post_init__(self) -> None:
        if isinstance(self.crf, bool) or not isinstance(self.crf, int) or not 0 <= self.crf <= 51:
            raise ValueError(f"`crf` must be an int in [0, 51], got {self.crf!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {PRESETS}, got {self.preset!r}")
        if self.simd not in get_args(Simd):
            raise ValueError(f"`simd` must be one of {get_args(Simd)}, got {self.simd!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"codec": "libx264", "pix_fmt": "yuv420p", "threads": 1, "format": VIDEO_FORMAT, **asdict(self)}

    def codec_options(self) -> dict[str, str]:
        """The libx264 options of these settings on this machine."""
        options = {"crf": str(self.crf), "preset": self.preset}
        asm = x264_asm(self.simd)
        if asm is not None:
            options["x264-params"] = f"asm={asm}"
        return options


def x264_asm(simd: Simd, machine: str | None = None, cpu_flags: frozenset[str] | None = None) -> str | None:
    """x264's ``asm`` value for ``simd`` on this CPU (or the given ``machine`` and ``cpu_flags``); None: x264's own.

    ``avx2`` never names an instruction set the CPU lacks: AVX2 where present, else SSE4 (same bytes), else the C
    code. Outside x86-64 there is no AVX-512 and x264 detects the CPU itself.
    """
    if simd == "none":
        return "0"
    machine = (machine or platform.machine()).lower()
    if simd == "auto" or machine not in ("x86_64", "amd64"):
        return None
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if {"avx", "avx2", "sse4_2"} <= flags:
        return "AVX2"
    if {"sse4_1", "sse4_2"} <= flags:
        return "SSE4"
    return "0"


def _cpu_flags() -> frozenset[str]:
    """The CPU flags Linux reports (empty where /proc/cpuinfo cannot be read: then the C code is used)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError as e:
        logger.debug("cannot read /proc/cpuinfo (%r): x264 runs without assembly", e)
    return frozenset()


def even_size(height: int, width: int) -> tuple[int, int]:
    """`(height, width)` rounded down to even numbers, as yuv420p needs; each must be at least 2."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 2:
            raise ValueError(f"`{name}` must be an int >= 2, got {value!r}")
    return int(height) - int(height) % 2, int(width) - int(width) % 2


def as_uint8_frames(frames: Any, name: str = "frames") -> np.ndarray:
    """`frames` (numpy or torch, uint8 `[T, H, W, 3]`) as a C-contiguous numpy array; errors name `name`."""
    if type(frames).__module__.split(".")[0] == "torch":
        frames = frames.detach().cpu().numpy()  # torch is not imported here: duck-typed tensor
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"`{name}` must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise TypeError(f"`{name}` must have dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"`{name}` must have shape [T, H, W, 3] with T, H, W >= 1, got {list(frames.shape)}")
    return np.ascontiguousarray(frames)


class Mp4Encoder:
    """Streams uint8 RGB frames [T, H, W, 3] into an H.264 mp4 (yuv420p, +faststart) in a temp file; `finish()`
    returns the bytes.

    Use as a context manager, or call `close()` to abandon an unfinished file (its temp file is removed).
    """

    def __init__(self, width: int, height: int, fps: int = 16, *, settings: VideoSettings | None = None) -> None:
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, (int, np.integer)) or value < 2 or value % 2:
                raise ValueError(f"`{name}` must be an even int >= 2 for yuv420p (see even_size), got {value!r}")
        if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
            raise ValueError(f"`fps` must be an int >= 1, got {fps!r}")
        settings = VideoSettings() if settings is None else settings
        if not isinstance(settings, VideoSettings):
            raise TypeError(f"`settings` must be a VideoSettings, got {type(settings).__name__}")
        self.settings = settings
        av = _import_av()
        self.width, self.height, self.fps = int(width), int(height), fps
        self.frames_written = 0
        self._finished = False
        fd, self._path = tempfile.mkstemp(suffix=".mp4", prefix="tokentrim-")
        os.close(fd)
        try:
            # bitexact: no library version strings or creation times in the file
            self._container: Any = av.open(
                self._path, "w", format="mp4", options={"movflags": "+faststart", "fflags": "+bitexact"}
            )
            stream = self._container.add_stream("libx264", rate=Fraction(fps, 1))
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.codec_context.time_base = Fraction(1, fps)
            stream.codec_context.thread_count = 1  # one x264 thread: no frame-thread scheduling in the bytes
            stream.codec_context.options = settings.codec_options()
            self._stream = stream
        except Exception:
            self.close()
            raise

    def write(self, frames: Any) -> None:
        """Encode uint8 RGB `frames` `[T, H, W, 3]` (numpy or torch) of this encoder's size."""
        if self._container is None:
            raise RuntimeError("Mp4Encoder.write called after finish() or close()")
        frames = as_uint8_frames(frames)
        if frames.shape[1:3] != (self.height, self.width):
            raise ValueError(
                f"`frames` must be [T, {self.height}, {self.width}, 3] for this encoder, got {list(frames.shape)}"
            )
        av = _import_av()
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = self.frames_written
            video_frame.time_base = Fraction(1, self.fps)
            self._container.mux(self._stream.encode(video_frame))
            self.frames_written += 1

    def finish(self) -> bytes:
        """Flush the encoder, close the file and return its bytes; the temp file is removed.

        Raises RuntimeError when called twice or after `close()`, and ValueError when no frame was written
        (the encoder then stays open: write frames, or `close()` it).
        """
        if self._finished:
            raise RuntimeError("Mp4Encoder.finish called twice")
        if self._container is None:
            raise RuntimeError("Mp4Encoder.finish called after close()")
        if self.frames_written == 0:
            raise ValueError("Mp4Encoder.finish: no frames were written; an mp4 needs at least one")
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
            self._container = None
            with open(self._path, "rb") as f:
                data = f.read()
        finally:
            self.close()
        self._finished = True
        logger.debug("encoded %d frames %dx%d into %d bytes", self.frames_written, self.width, self.height, len(data))
        return data

    def close(self) -> None:
        """Abandon the file (if not finished) and remove the temp file; safe to call more than once."""
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()
            except Exception as e:  # the temp file is deleted below either way; the close error is not the story
                logger.debug("closing an abandoned mp4 failed: %r", e)
        if os.path.exists(self._path):
            os.unlink(self._path)

    def __enter__(self) -> Mp4Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_mp4(frames: Any, fps: int = 16, **kw: Any) -> bytes:
    """Encode uint8 RGB `frames` `[T, H, W, 3]` (H and W even) to H.264 mp4 bytes; `kw` go to `Mp4Encoder`."""
    frames = as_uint8_frames(frames)
    with Mp4Encoder(frames.shape[2], frames.shape[1], fps, **kw) as encoder:
        encoder.write(frames)
        return encoder.finish()


def decode_mp4(data: bytes) -> np.ndarray:
    """Decode the first video stream of mp4 `data` to uint8 RGB frames `[T, H, W, 3]`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"`data` must be bytes, got {type(data).__name__}")
    av = _import_av()
    with av.open(io.BytesIO(bytes(data)), "r") as container:
        if not container.streams.video:
            raise ValueError(f"`data` ({len(data)} bytes) holds no video stream")
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"`data` ({len(data)} bytes) holds a video stream with no frames")
    return np.stack(frames)
