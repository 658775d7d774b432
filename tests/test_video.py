"""H.264 mp4 encoding: it plays, it is faithful, it starts fast, and it is deterministic."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch

from pipeline.video import Mp4Encoder, decode_mp4, encode_mp4, even_size

T, H, W = 10, 32, 48


def gradient_with_moving_square(t: int = T, h: int = H, w: int = W) -> np.ndarray:
    """uint8 [t, h, w, 3]: a smooth colour gradient with a bright square moving right by 4 px per frame.

    The square stays on even pixels: yuv420p halves chroma resolution, so odd-aligned edges would bleed colour
    and measure the subsampling rather than the codec.
    """
    ys, xs = np.mgrid[0:h, 0:w]
    frames = np.empty((t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        frames[i, ..., 0] = 40 + 150 * xs / (w - 1)
        frames[i, ..., 1] = 40 + 150 * ys / (h - 1)
        frames[i, ..., 2] = 120
        x0 = (2 + 4 * i) % max(w - 10, 1)
        frames[i, 8:18, x0 : x0 + 10] = (230, 220, 60)
    return frames


def top_level_atoms(data: bytes) -> list[str]:
    atoms, offset = [], 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        assert size >= 8, f"bad atom size {size} at {offset}"
        atoms.append(kind.decode("ascii"))
        offset += size
    assert offset == len(data)
    return atoms


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def encoded() -> tuple[np.ndarray, bytes]:
    frames = gradient_with_moving_square()
    return frames, encode_mp4(frames, fps=16)


def test_encoded_mp4_plays_as_h264_yuv420p_with_every_frame(encoded: tuple[np.ndarray, bytes]) -> None:
    import av

    _, data = encoded
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (W, H)
        assert stream.average_rate == 16
        decoded = list(container.decode(video=0))
    assert len(decoded) == T
    assert all(frame.format.name == "yuv420p" for frame in decoded)


def test_decoded_frames_match_the_input(encoded: tuple[np.ndarray, bytes]) -> None:
    frames, data = encoded
    decoded = decode_mp4(data)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert psnr(decoded, frames) > 30
    assert all(psnr(decoded[i], frames[i]) > 30 for i in range(T))  # every frame, in order


def test_mp4_is_faststart(encoded: tuple[np.ndarray, bytes]) -> None:
    atoms = top_level_atoms(encoded[1])
    assert atoms[0] == "ftyp"
    assert atoms.index("moov") < atoms.index("mdat")


def test_same_frames_give_the_same_bytes(encoded: tuple[np.ndarray, bytes]) -> None:
    frames, data = encoded
    assert encode_mp4(frames, fps=16) == data
    assert encode_mp4(frames, fps=16, crf=30) != data


def test_streamed_chunks_and_torch_input_equal_one_shot_encoding(encoded: tuple[np.ndarray, bytes]) -> None:
    frames, data = encoded
    with Mp4Encoder(W, H, fps=16) as encoder:
        encoder.write(frames[:4])
        encoder.write(torch.from_numpy(frames[4:]))
        assert encoder.finish() == data
        with pytest.raises(RuntimeError, match="twice"):
            encoder.finish()
        with pytest.raises(RuntimeError, match="after finish"):
            encoder.write(frames)


def test_odd_size_is_rejected_and_even_size_crops_down() -> None:
    with pytest.raises(ValueError, match="width"):
        Mp4Encoder(47, 32)
    with pytest.raises(ValueError, match="height"):
        Mp4Encoder(48, 31)
    with pytest.raises(ValueError, match="width"):
        encode_mp4(np.zeros((2, 18, 31, 3), dtype=np.uint8))
    assert even_size(18, 31) == (18, 30)
    assert even_size(17, 30) == (16, 30)
    assert even_size(2, 3) == (2, 2)
    with pytest.raises(ValueError, match="height"):
        even_size(1, 16)
    h, w = even_size(19, 31)
    assert decode_mp4(encode_mp4(gradient_with_moving_square(3, 19, 31)[:, :h, :w])).shape == (3, 18, 30, 3)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (np.zeros((2, H, W, 3), dtype=np.float32), TypeError),
        (np.zeros((2, H, W), dtype=np.uint8), ValueError),
        (np.zeros((2, H, W, 4), dtype=np.uint8), ValueError),
        (np.zeros((2, H + 2, W, 3), dtype=np.uint8), ValueError),
        ([[0]], TypeError),
    ],
)
def test_bad_frames_are_rejected_naming_frames(bad: object, error: type[Exception]) -> None:
    with Mp4Encoder(W, H) as encoder:
        with pytest.raises(error, match="`frames`"):
            encoder.write(bad)


def test_finish_without_frames_and_close_clean_up() -> None:
    import os

    encoder = Mp4Encoder(W, H)
    path = encoder._path
    assert os.path.exists(path)
    with pytest.raises(ValueError, match="no frames"):
        encoder.finish()
    encoder.close()
    assert not os.path.exists(path)
    with Mp4Encoder(W, H) as abandoned:
        abandoned.write(gradient_with_moving_square(2))
        path = abandoned._path
    assert not os.path.exists(path)
