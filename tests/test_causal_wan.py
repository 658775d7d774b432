"""The cached causal Wan equals diffusers' Wan over the whole sequence with a block-causal mask."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.causal_wan import CausalWan
from tests.wan_oracle import frame_keep_mask, reference_forward, tiny_transformer, visibility

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


def test_a_cache_that_keeps_pruned_rows_fails_the_masked_reference(monkeypatch):
    """The guard for an engine that counts pruned rows but still attends them: the regression's quality measures do
    not see it on the canary (bench/RESULTS.md, "Does TokenTrim help?"), this comparison does."""
    from pipeline.model.kv_cache import KVCache

    monkeypatch.setattr(KVCache, "_compact", lambda self, *args, **kwargs: None)
    with pytest.raises(AssertionError):
        test_pruned_cache_equals_masked_reference_per_sample()


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
    assert frame_keep_mask(cache, 1)[0, :3].tolist() == [False, False, False]
    assert frame_keep_mask(cache, 0).all()


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


# ---------------------------------------------------------------------------------------------------------------
# Rolling forcing: the joint window pass (per-frame timesteps, staggered noise levels) against diffusers' forward


def _rolling_reference(backend, config, seed: int, prompt: str):
    """Rolling forcing written out against the oracle: every pass is diffusers' forward over [committed clean chunks
    (t = 0, block-causal) | the window's chunks (each frame at its chunk's level, seeing all committed frames and the
    whole window)]. Returns the finished chunks in order and, after each finished chunk, the in-flight window."""
    from pipeline.rollout.sampler import chunk_noise

    levels, frames, chunks = config.timesteps, config.chunk_frames, config.num_chunks
    depth, text = len(levels), backend.encode_prompts([prompt])
    grid = tuple(backend.latent_size(config.height_px, config.width_px))
    tokens = grid[0] * grid[1] // 4

    def noise(chunk: int, step: int) -> torch.Tensor:
        return chunk_noise([seed], chunk, step, 0, (16, frames, *grid))

    window: dict[int, torch.Tensor] = {}
    committed: list[torch.Tensor] = []
    windows: list[dict[int, torch.Tensor]] = []
    for p in range(chunks + depth - 1):
        if p < chunks:
            window[p] = noise(p, 0)
        live = sorted(j for j in window if p - depth < j <= p)
        seq = torch.cat([*committed, *(window[j] for j in live)], dim=2)  # [1, C, F_total, h, w]
        n_clean = len(committed) * frames
        frame_levels = [0.0] * n_clean + [levels[p - j] for j in live for _ in range(frames)]
        chunk_of = torch.tensor([f // frames if f < n_clean else len(committed) for f in range(len(frame_levels))])
        frames_all = range(len(frame_levels))
        visible = {f: {g for g in frames_all if chunk_of[g] <= chunk_of[f]} for f in frames_all}
        mask = visibility(torch.arange(len(frame_levels)).repeat_interleave(tokens), visible)[None]
        flow = reference_forward(backend.causal.transformer, seq, torch.tensor([frame_levels]), text, mask)
        for i, j in enumerate(live):
            part = slice(n_clean + i * frames, n_clean + (i + 1) * frames)
            sigma = levels[p - j] / 1000.0
            x0 = seq[:, :, part] - sigma * flow[:, :, part]
            if p - j == depth - 1:
                committed.append(x0)
                del window[j]
            else:
                nxt = levels[p - j + 1] / 1000.0
                window[j] = (1.0 - nxt) * x0 + nxt * noise(j, p - j + 1)
        if p >= depth - 1:
            windows.append(dict(window))
    return committed, windows


@pytest.mark.parametrize(("height_px", "width_px"), [(64, 96), (96, 32)])  # 4x6 and 6x2 patch grids
def test_rolling_window_pass_equals_diffusers_forward_with_per_frame_timesteps(height_px, width_px):
    from pipeline.config import RolloutConfig
    from pipeline.model.backend import load_backend
    from pipeline.rollout.loop import Rollout

    backend = load_backend("tiny", with_vae=False)
    # 3 chunks: the window fills, drains and never evicts a frame, so every key sits at its absolute frame
    config = RolloutConfig(mode="rolling-forcing", num_chunks=3, height_px=height_px, width_px=width_px)
    records = list(Rollout(backend, config, ["a cat"], [5]))
    finished, windows = _rolling_reference(backend, config, 5, "a cat")
    assert len(set(config.timesteps)) == len(config.timesteps) == 5  # staggered, distinct levels
    for c, record in enumerate(records):
        torch.testing.assert_close(record.latents, finished[c], rtol=0, atol=2e-5, msg=f"chunk {c}")
        assert sorted(record.window) == sorted(windows[c])
        for j, x in record.window.items():
            torch.testing.assert_close(x, windows[c][j], rtol=0, atol=2e-5, msg=f"chunk {c}, in flight {j}")


def _attention_spans(backend, config) -> list[int]:
    """Key frames (cached + the pass's own) of every denoise pass of a rollout."""
    from pipeline.rollout.loop import Rollout

    spans: list[int] = []
    denoise = backend.causal.denoise

    def counting(latents, timestep, text, cache, first_frame):
        spans.append(len(cache.frames) + latents.shape[2])
        return denoise(latents, timestep, text, cache, first_frame)

    rollout = Rollout(backend, config, ["a cat"], [1])
    rollout.backend.causal.denoise = counting  # instance attribute: only this backend object
    try:
        list(rollout)
    finally:
        del rollout.backend.causal.denoise
    return spans


def test_rolling_forcing_attends_to_at_most_21_latent_frames_by_default():
    from pipeline.config import ROLLING_ATTENTION_FRAMES, RolloutConfig
    from pipeline.model.backend import load_backend

    backend = load_backend("tiny", with_vae=False)
    capped = _attention_spans(backend, RolloutConfig(mode="rolling-forcing", num_chunks=9))
    assert ROLLING_ATTENTION_FRAMES == 21
    assert max(capped) == 21  # sink chunk 3 + cached 3 + working 15: reached, never exceeded
    wider = _attention_spans(backend, RolloutConfig(mode="rolling-forcing", num_chunks=9, window_frames=30))
    assert max(wider) > 21  # the option for more
