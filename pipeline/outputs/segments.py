"""Video as committed segments: one closed-GOP H.264 mp4 per accepted chunk and sample, remuxed into the final mp4.

`encode_segment` encodes one chunk's frames with a fresh libx264 encoder (the `VideoSettings` of
`pipeline.outputs.video`: deterministic bytes), so every segment starts with an IDR keyframe and references nothing
outside itself: it decodes alone, and a resumed render never has to encode an earlier chunk again.
`remux_segments` joins segments into one faststart mp4 without re-encoding: it copies each segment's packets with
their pts/dts shifted by the frames before it. The final file decodes to exactly the frames of its segments, and its
bytes are a function of the segment bytes only.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from fractions import Fraction
from typing import Any

from pipeline.outputs.video import VideoSettings, _import_av, as_uint8_frames, encode_mp4

logger = logging.getLogger(__name__)

_MUX_OPTIONS = {"movflags": "+faststart", "fflags": "+bitexact"}


def encode_segment(frames: Any, fps: int, settings: VideoSettings) -> bytes:
    """One chunk's uint8 RGB ``frames`` ``[T, H, W, 3]`` (H, W even) as a closed-GOP H.264 mp4 segment."""
    return encode_mp4(as_uint8_frames(frames), fps, settings=settings)


def remux_segments(segments: list[bytes], fps: int) -> bytes:
    """One faststart mp4 holding the packets of ``segments`` (each made by `encode_segment` with one size and
    settings) one after the other, each shifted by the frames before it; nothing is decoded or re-encoded."""
    if not segments:
        raise ValueError("`segments` is empty; an mp4 needs at least one segment")
    av = _import_av()
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="tokentrim-remux-")
    os.close(fd)
    try:
        with av.open(path, "w", format="mp4", options=dict(_MUX_OPTIONS)) as out:
            stream, frames = None, 0
            for i, data in enumerate(segments):
                with av.open(io.BytesIO(bytes(data)), "r") as seg:
                    if not seg.streams.video:
                        raise ValueError(f"segment {i} ({len(data)} bytes) holds no video stream")
                    src = seg.streams.video[0]
                    params = _stream_params(src)
                    if stream is None:
                        stream, first = out.add_stream_from_template(src), params
                    elif params != first:
                        raise ValueError(f"segment {i} has codec parameters {params[:3]} and another SPS/PPS or time "
                                         f"base than segment 0 {first[:3]}; one video's segments share size and "
                                         "settings")
                    frames += _copy_packets(seg, src, stream, frames, fps)
        with open(path, "rb") as f:
            data = f.read()
    finally:
        os.unlink(path)
    logger.debug("remuxed %d segments (%d frames) into %d bytes", len(segments), frames, len(data))
    return data


def _stream_params(src: Any) -> tuple[Any, ...]:
    """What segments must share to live in one stream: codec, size, SPS/PPS (extradata) and time base."""
    ctx = src.codec_context
    return ctx.name, src.width, src.height, bytes(ctx.extradata or b""), src.time_base


def _copy_packets(seg: Any, src: Any, stream: Any, offset_frames: int, fps: int) -> int:
    """Mux ``src``'s packets into ``stream`` shifted by ``offset_frames``; returns the segment's frame count."""
    step = Fraction(1, fps) / src.time_base  # one frame in the segment's time base
    if step.denominator != 1:
        raise ValueError(f"segment time base {src.time_base} cannot hold frames at {fps} fps exactly")
    shift = offset_frames * int(step)
    count = 0
    for packet in seg.demux(src):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        if packet.pts is None or packet.dts is None:
            raise ValueError(f"a segment packet has no timestamps (pts {packet.pts}, dts {packet.dts})")
        packet.pts += shift
        packet.dts += shift
        packet.stream = stream
        stream.container.mux(packet)
        count += 1
    return count
