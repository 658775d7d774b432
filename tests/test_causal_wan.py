"""The cached causal Wan equals diffusers' Wan over the whole sequence with a block-causal mask."""

from __future__ import annotations

import pytest
import torch

from pipeline.causal_wan import CausalWan
from tests.wan_oracle import reference_forward, tiny_transformer

CHUNK = 3
H = W = 8  # latent size -> 4x4 patch grid, 16 tokens per frame
TOKENS = 16


def _mask(num_chunks: int, sink: int, window: int | None, pruned: dict[tuple[int, int], int], batch: int,
          sample: int) -> torch.Tensor:
    """Token visibility for chunks 0..num_chunks-1 processed in order. ``pruned[(frame, pos)] = chunk`` hides that
    key from the given chunk on (for ``sample``)."""
    frames_total = num_chunks * CHUNK
    frame = torch.arange(frames_total).repeat_interleave(TOKENS)
    pos = torch.arange(TOKENS).repeat(frames_total)
    chunk = frame // CHUNK
    visible = chunk[None, :] <= chunk[:, None]
    if window is not None:
        # at chunk k the cache holds sink frames and the last `window` non-sink frames before k*CHUNK
        first = chunk[:, None] * CHUNK
        in_window = (frame[None, :] >= first - window) | (frame[None, :] < sink) | (frame[None, :] >= first)
        visible &= in_window
    for (f, p), from_chunk in pruned.items():
        key = (frame == f) & (pos == p)
        visible &= ~(key[None, :] & (chunk[:, None] >= from_chunk) & (frame[:, None] != f))
    return visible


def _run(model: CausalWan, clean: torch.Tensor, noisy: torch.Tensor, t: float, text: torch.Tensor, *, sink: int,
         window: int | None, prunes: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Cached rollout: per chunk k, apply the prune planned at k, denoise the noisy chunk, commit the clean one."""
    batch = clean.shape[0]
    cache = model.new_cache(batch, H, W, sink_frames=sink, window_frames=window)
    outs = []
    for k in range(clean.shape[2] // CHUNK):
        if k in prunes:
            frames, positions, samples = prunes[k]
            cache.prune(frames, positions, samples)
        frames = slice(k * CHUNK, (k + 1) * CHUNK)
        level = torch.full((batch,), t)
        outs.append(model.denoise(noisy[:, :, frames], level, text, cache, k * CHUNK))
        model.commit(clean[:, :, frames], text, cache, k * CHUNK)
    return outs


def _reference(base, clean, noisy, t, text, k, mask) -> torch.Tensor:
    """Chunk k's flow: diffusers over clean chunks 0..k-1 (t=0) and noisy chunk k (t)."""
    n = (k + 1) * CHUNK
    latents = torch.cat([clean[:, :, : k * CHUNK], noisy[:, :, k * CHUNK: n]], dim=2)
    levels = torch.zeros(latents.shape[0], n)
    levels[:, k * CHUNK:] = t
    out = reference_forward(base, latents, levels, text, mask[: n * TOKENS, : n * TOKENS][None])
    return out[:, :, k * CHUNK: n]


def _inputs(batch: int, chunks: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(batch, 16, chunks * CHUNK, H, W, generator=g)
    noisy = torch.randn(batch, 16, chunks * CHUNK, H, W, generator=g)
    text = torch.randn(batch, 8, 32, generator=g)
    return clean, noisy, text


@pytest.mark.parametrize(("sink", "window"), [(0, None), (0, 3), (3, 3), (3, 6)])
def test_cached_chunks_equal_block_causal_single_pass(sink, window):
    base = tiny_transformer()
    model = CausalWan(tiny_transformer())
    clean, noisy, text = _inputs(1, 4)
    outs = _run(model, clean, noisy, 750.0, text, sink=sink, window=window, prunes={})
    mask = _mask(4, sink, window, {}, 1, 0)
    for k, out in enumerate(outs):
        ref = _reference(base, clean, noisy, 750.0, text, k, mask)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=f"chunk {k}")


def test_window_changes_the_result():
    """Guards the oracle itself: a window that evicts frames must change later chunks."""
    model = CausalWan(tiny_transformer())
    clean, noisy, text = _inputs(1, 4)
    full = _run(model, clean, noisy, 750.0, text, sink=0, window=None, prunes={})
    windowed = _run(model, clean, noisy, 750.0, text, sink=0, window=3, prunes={})
    assert torch.equal(full[1], windowed[1])
    assert (full[3] - windowed[3]).abs().max() > 1e-3


def test_pruned_cache_equals_masked_reference_per_sample():
    base = tiny_transformer()
    model = CausalWan(tiny_transformer())
    clean, noisy, text = _inputs(2, 4)
    # before chunk 2: sample 0 loses 4 positions of frames 3..5, sample 1 keeps everything (ragged batch)
    positions = torch.tensor([[0, 5, 6, 15], [1, 2, 3, 4]])
    samples = torch.tensor([True, False])
    outs = _run(model, clean, noisy, 500.0, text, sink=0, window=None, prunes={2: ([3, 4, 5], positions, samples)})
    pruned = {(f, p): 2 for f in (3, 4, 5) for p in (0, 5, 6, 15)}
    for b, hidden in ((0, pruned), (1, {})):
        mask = _mask(4, 0, None, hidden, 2, b)
        for k in (2, 3):
            ref = _reference(base, clean[b: b + 1], noisy[b: b + 1], 500.0, text[b: b + 1], k, mask)
            torch.testing.assert_close(outs[k][b: b + 1], ref, rtol=0, atol=1e-5, msg=f"sample {b} chunk {k}")


def test_pruning_drops_rows_and_bytes():
    model = CausalWan(tiny_transformer())
    clean, _, text = _inputs(1, 2)
    cache = model.new_cache(1, H, W)
    model.commit(clean[:, :, :CHUNK], text, cache, 0)
    before_bytes, before_tokens = cache.nbytes(), int(cache.num_tokens()[0])
    removed = cache.prune([1, 2], torch.tensor([[0, 1, 2]]))
    assert removed == 6
    assert int(cache.num_tokens()[0]) == before_tokens - 6
    assert cache.nbytes() < before_bytes
    assert cache.frame_keep_mask(1)[0, :3].tolist() == [False, False, False]
    assert cache.frame_keep_mask(0).all()


def test_batch_of_two_equals_each_sample_alone():
    model = CausalWan(tiny_transformer())
    clean, noisy, text = _inputs(2, 3)
    positions = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    prunes = {1: ([0, 1, 2], positions, torch.tensor([True, True]))}
    both = _run(model, clean, noisy, 500.0, text, sink=0, window=None, prunes=prunes)
    for b in range(2):
        one = {1: ([0, 1, 2], positions[b: b + 1], torch.tensor([True]))}
        alone = _run(model, clean[b: b + 1], noisy[b: b + 1], 500.0, text[b: b + 1], sink=0, window=None, prunes=one)
        for k in range(3):
            torch.testing.assert_close(both[k][b: b + 1], alone[k], rtol=0, atol=1e-5)


def test_rope_past_its_table_is_refused():
    model = CausalWan(tiny_transformer())
    clean, _, text = _inputs(1, 1)
    cache = model.new_cache(1, H, W)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        model.commit(clean, text, cache, 1023)


def test_adjacent_sink_is_the_sink_committed_right_before_the_window():
    """Rolling Forcing's sink: after eviction its keys equal those of the sink chunk committed at the frames just
    before the oldest cached frame (RoPE is relative, so only the rotation changes)."""
    model = CausalWan(tiny_transformer())
    clean, noisy, text = _inputs(1, 5)
    cache = model.new_cache(1, H, W, sink_frames=3, window_frames=3, sink_rope="adjacent")
    for k in range(4):
        model.commit(clean[:, :, k * CHUNK:(k + 1) * CHUNK], text, cache, k * CHUNK)
    model.denoise(noisy[:, :, 12:15], torch.full((1,), 500.0), text, cache, 12)  # places the sink
    assert cache.frames == [0, 1, 2, 9, 10, 11] and cache.sink_shift == 6
    fresh = model.new_cache(1, H, W)
    model.commit(clean[:, :, :CHUNK], text, fresh, 6)  # the sink chunk as if it stood at frames 6..8
    rows = 3 * TOKENS
    for layer in range(model.num_layers):
        got, _ = cache.attend(layer, *(torch.zeros(1, 2, 0, 12),) * 2)
        want, _ = fresh.attend(layer, *(torch.zeros(1, 2, 0, 12),) * 2)
        torch.testing.assert_close(got[:, :, :rows], want[:, :, :rows], rtol=0, atol=1e-5)
        cache.end_pass()
        fresh.end_pass()


def test_adjacent_sink_changes_nothing_until_frames_are_evicted():
    clean, noisy, text = _inputs(1, 4)
    model = CausalWan(tiny_transformer())
    absolute = _run(model, clean, noisy, 750.0, text, sink=3, window=None, prunes={})
    cache_outs = []
    cache = model.new_cache(1, H, W, sink_frames=3, sink_rope="adjacent")
    for k in range(4):
        cache_outs.append(model.denoise(noisy[:, :, k * CHUNK:(k + 1) * CHUNK], torch.full((1,), 750.0), text, cache,
                                        k * CHUNK))
        model.commit(clean[:, :, k * CHUNK:(k + 1) * CHUNK], text, cache, k * CHUNK)
    assert cache.sink_shift == 0
    assert all(torch.equal(a, b) for a, b in zip(absolute, cache_outs))
    windowed = model.new_cache(1, H, W, sink_frames=3, window_frames=3, sink_rope="adjacent")
    for k in range(3):
        model.commit(clean[:, :, k * CHUNK:(k + 1) * CHUNK], text, windowed, k * CHUNK)
    shifted = model.denoise(noisy[:, :, 9:12], torch.full((1,), 750.0), text, windowed, 9)
    reference = _run(model, clean, noisy, 750.0, text, sink=3, window=3, prunes={})[3]
    assert windowed.sink_shift == 3 and (shifted - reference).abs().max() > 1e-4
