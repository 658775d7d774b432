"""Pixel drift proxies against a per-pixel Python reference, and across chunk boundaries and resumes."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.outputs.pixel_stats import PixelStats, PixelTracker


def reference_stats(chunks: list[np.ndarray]) -> list[PixelStats]:
    """Per-pixel loops in plain Python: the oracle for PixelTracker over a sequence of chunks."""

    def hist(chunk: np.ndarray) -> list[list[float]]:
        counts = [[0] * 16 for _ in range(3)]
        pixels = [px for frame in chunk for row in frame for px in row]
        for px in pixels:
            for c in range(3):
                counts[c][int(px[c]) // 16] += 1
        return [[n / len(pixels) for n in channel] for channel in counts]

    out, previous, first = [], None, None
    for chunk in chunks:
        pixels = [[int(v) for v in px] for frame in chunk for row in frame for px in row]
        luma = sum(0.299 * r + 0.587 * g + 0.114 * b for r, g, b in pixels) / len(pixels)
        sat = sum(colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)[1] for r, g, b in pixels) / len(pixels)
        clipped = sum(any(v <= 2 or v >= 253 for v in px) for px in pixels) / len(pixels)
        frames = ([previous] if previous is not None else []) + list(chunk)
        scores = []
        for a, b in zip(frames[:-1], frames[1:], strict=True):
            diffs = [abs(int(x) - int(y)) for x, y in zip(a.ravel(), b.ravel(), strict=True)]
            scores.append((255 - sum(diffs) / len(diffs)) / 255)
        flicker = sum(scores) / len(scores) if scores else 1.0
        h = hist(chunk)
        first = first or h
        dist = sum(0.5 * sum(abs(x - y) for x, y in zip(h[c], first[c], strict=True)) for c in range(3)) / 3
        out.append(PixelStats(luma, sat, clipped, flicker, dist))
        previous = chunk[-1]
    return out


def assert_stats_close(got: PixelStats, want: PixelStats) -> None:
    for name, value in got.to_dict().items():
        assert value == pytest.approx(getattr(want, name), rel=1e-6, abs=1e-9), name


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    lengths=st.lists(st.integers(1, 3), min_size=1, max_size=3),
)
def test_stats_match_a_per_pixel_reference(data: st.DataObject, h: int, w: int, lengths: list[int]) -> None:
    chunks = [data.draw(arrays(np.uint8, (t, h, w, 3))) for t in lengths]
    tracker = PixelTracker()
    for got, want in zip([tracker.update(c) for c in chunks], reference_stats(chunks), strict=True):
        assert_stats_close(got, want)


def test_stats_match_the_reference_on_seeded_random_chunks() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, size=(3, 5, 6, 3), dtype=np.uint8) for _ in range(3)]
    chunks[1][:, :2] = 255  # some clipped pixels
    chunks[2][:, :, :1] = 0  # and black ones (saturation 0 by convention)
    tracker = PixelTracker()
    results = [tracker.update(c) for c in chunks]
    for got, want in zip(results, reference_stats(chunks), strict=True):
        assert_stats_close(got, want)
    assert 0 < results[1].clipped <= 1 and results[0].hist_dist_first == 0.0


def test_identical_frames_do_not_flicker() -> None:
    frame = np.random.default_rng(1).integers(0, 256, size=(1, 8, 8, 3), dtype=np.uint8)
    tracker = PixelTracker()
    assert tracker.update(frame).steadiness == 1.0  # one frame, nothing before it
    assert tracker.update(np.repeat(frame, 4, axis=0)).steadiness == 1.0
    assert tracker.update(255 - frame).steadiness < 1.0  # the jump from the previous chunk counts


def test_flicker_counts_the_pair_across_the_chunk_boundary() -> None:
    black = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    white = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    tracker = PixelTracker()
    tracker.update(black)
    assert tracker.update(white).steadiness == pytest.approx(0.5)  # pairs: black->white (0), white->white (1)


def test_histogram_distance_is_zero_for_the_first_chunk_and_grows_with_recolouring() -> None:
    rng = np.random.default_rng(2)
    chunk = rng.integers(60, 120, size=(2, 8, 8, 3), dtype=np.uint8)
    tracker = PixelTracker()
    assert tracker.update(chunk).hist_dist_first == 0.0
    assert tracker.update(chunk).hist_dist_first == 0.0
    warmer = chunk.copy()
    warmer[..., 0] += 100  # red moves to bins the first chunk never used
    dist = tracker.update(warmer).hist_dist_first
    assert dist == pytest.approx(1 / 3)  # red: disjoint (1.0); green, blue unchanged (0.0)


def test_bad_input_names_the_argument() -> None:
    tracker = PixelTracker()
    with pytest.raises(TypeError, match="`frames`"):
        tracker.update(np.zeros((1, 2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="`frames`"):
        tracker.update(np.zeros((2, 2, 3), dtype=np.uint8))
    tracker.update(np.zeros((1, 2, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="`frames`"):
        tracker.update(np.zeros((1, 4, 2, 3), dtype=np.uint8))
