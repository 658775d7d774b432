"""Video as committed segments: closed-GOP segments, their remux, the resume warm-up of the VAE decoder, and what a
checkpoint commits of them."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from pipeline.model.backend import load_backend
from pipeline.model.vae import StreamingDecoder, build_tiny_vae
from pipeline.outputs.checkpoint import RolloutCheckpoints
from pipeline.outputs.chunk_writer import ChunkWriter
from pipeline.outputs.redecode import decoder_lookback, warmup_start
from pipeline.outputs.segments import encode_segment, remux_segments
from pipeline.outputs.video import VideoSettings, decode_mp4, encode_mp4
from pipeline.rollout.chunk_stats import ChunkStats
from pipeline.rollout.records import ChunkRecord
from pipeline.store import Store
from pipeline.timing import PhaseTimer

FPS = 16
CHUNK_FRAMES = (9, 12, 12, 12)  # pixel frames per chunk: the first chunk of a Wan video has 1 + 4 * (F - 1)


def _frames(seed: int = 0, height: int = 32, width: int = 48) -> np.ndarray:
    """A moving, textured clip of sum(CHUNK_FRAMES) frames (B-frames and motion search have work to do)."""
    rng = np.random.default_rng(seed)  # 4x4 blocks: yuv420p keeps their colour
    texture = rng.integers(0, 256, (height // 4, width // 2, 3), dtype=np.uint8).repeat(4, axis=0).repeat(4, axis=1)
    return np.stack([np.roll(texture, 2 * t, axis=1)[:, :width] for t in range(sum(CHUNK_FRAMES))])


def _chunks(frames: np.ndarray) -> list[np.ndarray]:
    return np.split(frames, np.cumsum(CHUNK_FRAMES)[:-1])


@pytest.fixture(scope="module")
def clip():
    frames = _frames()
    return frames, [encode_segment(c, FPS, VideoSettings()) for c in _chunks(frames)]


def _packets(data: bytes) -> list[tuple[int, int, bool]]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        return [(p.pts, p.dts, p.is_keyframe) for p in container.demux(stream) if p.size]


def _top_level_boxes(data: bytes) -> list[str]:
    boxes, at = [], 0
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        boxes.append(kind.decode("ascii"))
        at += size if size > 1 else struct.unpack(">Q", data[at + 8:at + 16])[0]
    return boxes


def test_a_segment_is_a_closed_gop_that_decodes_alone(clip):
    frames, segments = clip
    for chunk, segment in zip(_chunks(frames), segments):
        packets = _packets(segment)
        assert packets[0][2], "the first packet of a segment is a keyframe"
        assert packets[0][0] == min(p[0] for p in packets), "the keyframe is the segment's first frame"
        decoded = decode_mp4(segment)
        assert decoded.shape == chunk.shape
        error = np.abs(decoded.astype(int) - chunk).mean(axis=(1, 2, 3))  # ~9: saturated 4x4 blocks through yuv420p
        assert error.max() < np.abs(decoded.astype(int) - np.roll(chunk, 1, axis=0)).mean() / 3  # these frames


def test_the_remux_holds_every_frame_of_the_segments_in_a_faststart_mp4(clip):
    import av

    frames, segments = clip
    final = remux_segments(segments, FPS)
    assert final == remux_segments(list(segments), FPS)  # a function of the segment bytes
    decoded = decode_mp4(final)
    assert decoded.shape == frames.shape
    assert np.array_equal(decoded, np.concatenate([decode_mp4(s) for s in segments]))
    boxes = _top_level_boxes(final)
    assert boxes.index("moov") < boxes.index("mdat")  # faststart: a player starts before the file is in
    with av.open(io.BytesIO(final)) as container:
        stream = container.streams.video[0]
        assert (stream.frames, stream.codec_context.name, stream.width, stream.height) == (len(frames), "h264", 48, 32)
        duration = stream.duration
    with av.open(io.BytesIO(encode_mp4(frames, FPS))) as container:
        assert duration == container.streams.video[0].duration  # what players showed for one whole encode
    packets = _packets(final)
    starts = np.cumsum((0, *CHUNK_FRAMES[:-1]))
    pts = sorted(p[0] for p in packets)
    step = pts[1] - pts[0]
    assert pts == [i * step for i in range(len(frames))]  # one frame per tick, no gap or overlap at a seam
    assert [p[2] for p in sorted(packets)] == [i in starts for i in range(len(frames))]  # an IDR at each seam
    dts = [p[1] for p in packets]
    assert all(a < b for a, b in zip(dts, dts[1:]))


def test_the_remux_refuses_segments_that_cannot_share_a_stream(clip):
    _, segments = clip
    other = encode_segment(_frames(height=16)[:9], FPS, VideoSettings())
    with pytest.raises(ValueError, match="segment 1 has codec parameters"):
        remux_segments([segments[0], other], FPS)
    with pytest.raises(ValueError, match="`segments` is empty"):
        remux_segments([], FPS)


def _decode_from(vae, latents: torch.Tensor, start: int, resume: int, chunk: int) -> torch.Tensor:
    """Frames of latents[resume:] by a fresh decoder warmed up on latents[start:resume] (chunk by chunk)."""
    decoder = StreamingDecoder(vae)
    for i in range(start, resume, chunk):
        decoder.decode_float(latents[:, :, i:i + chunk])
    return torch.cat([decoder.decode_float(latents[:, :, i:i + chunk])
                      for i in range(resume, latents.shape[2], chunk)], dim=2)


def test_a_decoder_warmed_up_over_its_receptive_field_decodes_exactly():
    """The measured fact behind resuming without a full re-decode (bench/decoder_warmup.py scans every warm-up)."""
    vae, chunk = build_tiny_vae(), 3
    lookback = decoder_lookback(vae)
    assert lookback == 30  # tiny VAE: 10 convs at the latent rate, 5 at 2x, 9 at 4x (each looks 2 frames back)
    latents = torch.randn(1, 16, 36, 2, 2, generator=torch.Generator().manual_seed(0))
    resume = 33
    want = _decode_from(vae, latents, 0, resume, chunk)
    assert torch.equal(_decode_from(vae, latents, resume - lookback, resume, chunk), want)
    assert not torch.equal(_decode_from(vae, latents, resume, resume, chunk), want)  # an empty cache is not
    assert not torch.equal(_decode_from(vae, latents, resume - 24, resume, chunk), want)  # nor too short a warm-up


def test_warmup_start_covers_the_chunk_before_the_resume_point():
    assert warmup_start(12, 3, 30) == 1  # chunk 11 starts 30 latent frames after chunk 1
    assert warmup_start(5, 3, 30) == 0 and warmup_start(0, 3, 30) == 0
    assert warmup_start(12, 3, 0) == 11
    with pytest.raises(ValueError, match="chunk_frames"):
        warmup_start(3, 0, 30)


@pytest.fixture(scope="module")
def tiny_backend():
    return load_backend("tiny")


def _feed(writer: ChunkWriter, latents: list[torch.Tensor]) -> list:
    return [writer.feed(x).result() for x in latents]


def test_a_resumed_sink_redecodes_only_the_warmup_and_gives_the_same_bytes(tiny_backend, monkeypatch):
    """Resume at chunk 12 of 14: chunks 1..11 are re-decoded (not 0), and every later segment and pixel proxy, and
    the final mp4, equal the uninterrupted ones; a warm-up shorter than the receptive field would not."""
    chunks, resume = 14, 12
    gen = torch.Generator().manual_seed(1)
    latents = [torch.randn(1, 16, 3, 4, 6, generator=gen) for _ in range(chunks)]

    def writer() -> ChunkWriter:
        return ChunkWriter(tiny_backend, 1, FPS, PhaseTimer(), VideoSettings())

    whole = writer()
    outputs = _feed(whole, latents)
    first_hist = whole.first_hist()
    for output in outputs:
        whole.keep(output)
    resumed = writer()
    assert resumed.warm_up(latents[:resume], 3, first_hist) == resume - 1
    for output in outputs[:resume]:
        resumed.keep(output)
    later = _feed(resumed, latents[resume:])
    for output in later:
        resumed.keep(output)
    assert [o.segments for o in later] == [o.segments for o in outputs[resume:]]
    strip = [{k: v for k, v in p.items() if k != "t_encode_s"} for o in later for p in o.pixels]
    assert strip == [{k: v for k, v in p.items() if k != "t_encode_s"} for o in outputs[resume:] for p in o.pixels]
    assert resumed.mp4(0) == whole.mp4(0)
    for s in (whole, resumed):
        s.close()
    monkeypatch.setattr("pipeline.outputs.chunk_writer.decoder_lookback", lambda vae: 3)
    short = writer()
    short.warm_up(latents[:resume], 3, first_hist)
    assert _feed(short, latents[resume:])[0].segments != outputs[resume].segments
    short.close()


def _record(index: int) -> ChunkRecord:
    stats = ChunkStats(index, 3, float("nan"), float("nan"), float("nan"), float("nan"), "warmup", 1, 0, 0, 0, 0.0,
                       0.0)
    return ChunkRecord(index, torch.full((1, 2, 1, 2, 2), float(index)), [], {}, {}, [stats])


def test_a_segment_without_its_marker_or_with_other_bytes_is_not_committed(tmp_path, clip):
    _, segments = clip
    store = Store(f"file://{tmp_path}")
    writer = RolloutCheckpoints(store, "0" * 16, ["p"])
    for i in range(3):
        writer.save(_record(i), [segments[i]], {"pixels": [{"luma": float(i)}]})
    store.put_bytes("chunk-000003.safetensors", b"half")  # a crash before chunk 3's marker: never committed
    store.put_bytes("segment-000003-0.mp4", segments[3][:100])
    reader = RolloutCheckpoints(store, "0" * 16, ["p"])
    assert [r.index for r in reader.load()] == [0, 1, 2]
    assert [reader.segments(i) for i in range(3)] == [[s] for s in segments[:3]]
    assert reader.outputs(2) == {"pixels": [{"luma": 2.0}]}
    store.put_bytes("segment-000002-0.mp4", segments[2][:-10])  # a segment that is not what chunk 2 committed
    reader = RolloutCheckpoints(store, "0" * 16, ["p"])
    assert [r.index for r in reader.load()] == [0, 1]
    assert not store.exists("chunk-000002.json") and not store.exists("segment-000002-0.mp4")
    with pytest.raises(ValueError, match="one segment per prompt"):
        writer.save(_record(2), [segments[2], segments[2]])
