"""KVCache invariants under random sequences of commits, prunes and evictions (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.model.kv_cache import KVCache
from tests.wan_oracle import frame_keep_mask

TOKENS, LAYERS, HEADS, DIM = 6, 2, 1, 2


def _commit(cache: KVCache, frames: list[int]) -> None:
    """Write rows whose key encodes (sample, frame, position) and whose value encodes the layer."""
    b = cache.batch_size
    frame = torch.tensor(frames).repeat_interleave(TOKENS)  # [n]
    pos = torch.arange(TOKENS).repeat(len(frames))
    code = (frame * 100 + pos).float()
    key = torch.stack([code[None].expand(b, -1), torch.arange(b).float()[:, None].expand(-1, code.numel())], -1)
    key = key[:, None].expand(b, HEADS, -1, DIM).contiguous()  # [B, H, n, 2]
    for layer in range(LAYERS):
        cache.attend(layer, key, key + 1000.0 * layer)
    cache.commit(frames)


def _held(cache: KVCache, layer: int = 0) -> list[set[tuple[int, int]]]:
    """(frame, position) of every valid row, per sample, read back from the keys."""
    keys, values = cache.attend(layer, torch.zeros(cache.batch_size, HEADS, 0, DIM), torch.zeros(
        cache.batch_size, HEADS, 0, DIM))
    cache.end_pass()
    out = []
    for b in range(cache.batch_size):
        code = keys[b, 0, :, 0][cache.valid[b]].long().tolist()
        assert torch.equal(values[b, 0, :, 0][cache.valid[b]], keys[b, 0, :, 0][cache.valid[b]] + 1000.0 * layer)
        assert (keys[b, 0, :, 1][cache.valid[b]] == b).all()  # no row crossed to another sample
        out.append({(c // 100, c % 100) for c in code})
    return out


operations = st.lists(st.one_of(
    st.tuples(st.just("commit"), st.integers(1, 3)),
    st.tuples(st.just("prune"), st.lists(st.integers(0, TOKENS - 1), min_size=1, max_size=3),
              st.lists(st.booleans(), min_size=2, max_size=2), st.integers(1, 4)),
), min_size=1, max_size=14)


@settings(max_examples=60, deadline=None)
@given(ops=operations, sink=st.integers(0, 2), window=st.one_of(st.none(), st.integers(2, 6)), static=st.booleans())
def test_cache_holds_exactly_the_rows_a_reference_model_says(ops, sink, window, static):
    cache = KVCache(LAYERS, 2, HEADS, DIM, TOKENS, sink_frames=sink, window_frames=window, static=static)
    model = [set(), set()]  # (frame, position) each sample should hold
    next_frame = 0
    for op in ops:
        if op[0] == "commit":
            frames = list(range(next_frame, next_frame + op[1]))
            next_frame += op[1]
            _commit(cache, frames)
            for held in model:
                held |= {(f, p) for f in frames for p in range(TOKENS)}
            body = sorted({f for f, _ in model[0] | model[1] if f >= sink})
            evicted = set(body[: max(0, len(body) - window)]) if window is not None else set()
            for held in model:
                held -= {(f, p) for f, p in held if f in evicted}
        else:
            _, positions, samples, depth = op
            frames = sorted({f for f, _ in model[0] | model[1]})[-depth:]
            k = len(positions)
            pos = torch.tensor([positions, positions[::-1]])[:, :k]
            cache.prune(frames, pos, torch.tensor(samples))
            for b, held in enumerate(model):
                if samples[b]:
                    held -= {(f, p) for f in frames if f >= sink for p in pos[b].tolist()}
        for layer in range(LAYERS):
            assert _held(cache, layer) == model
        assert cache.length == sum(s.length for s in cache.segments)
        assert [s.start for s in cache.segments] == [sum(s.length for s in cache.segments[:i])
                                                     for i in range(len(cache.segments))]
        assert cache.num_tokens().tolist() == [len(h) for h in model]
        for seg in cache.segments:
            keep = frame_keep_mask(cache, seg.frame)
            for b in range(2):
                assert {p for p in range(TOKENS) if keep[b, p]} == {p for f, p in model[b] if f == seg.frame}
        # padding is tracked on the host (no device read): a mask exactly when some row is padding
        assert (cache.attention_mask(1) is None) == bool(cache.valid.all())
        if static:
            _check_static_pass(cache)


def _check_static_pass(cache: KVCache, n: int = 4) -> None:
    """A static pass attends over the whole capacity: valid committed rows + its own n rows, nothing else; it
    writes at rows length .. length+n-1; unused rows hold finite values (zeros until written)."""
    step = cache.static_pass(n)
    cap, length = cache.capacity, cache.length
    assert step.index.tolist() == list(range(length, length + n))
    assert step.mask.shape == (2, 1, 1, cap)
    mask = step.mask[:, 0, 0]
    assert torch.equal(mask[:, :length], cache.valid)
    assert mask[:, length:length + n].all() and not mask[:, length + n:].any()
    for layer in range(LAYERS):
        assert all(bool(torch.isfinite(t).all()) for t in cache.layer_buffers(layer))
        assert cache.layer_buffers(layer)[0].shape == (2, HEADS, cap, DIM)
    cache.end_pass()


def test_padding_is_masked_and_bytes_follow_the_longest_sample():
    cache = KVCache(LAYERS, 2, HEADS, DIM, TOKENS)
    _commit(cache, [0, 1])
    full = cache.nbytes()
    cache.prune([0, 1], torch.tensor([[0, 1], [0, 1]]), torch.tensor([True, False]))
    assert cache.nbytes() == full  # sample 1 keeps every row: sample 0's rows become padding
    mask = cache.attention_mask(3)
    assert mask.shape == (2, 1, 1, cache.length + 3)
    assert mask[0].sum() == 2 * TOKENS - 4 + 3 and mask[1].all()
    cache.prune([0, 1], torch.tensor([[0, 1], [0, 1]]))
    assert cache.nbytes() < full and cache.attention_mask(3) is None


def test_static_capacity_is_fixed_with_a_window_and_doubles_without():
    windowed = KVCache(LAYERS, 1, HEADS, DIM, TOKENS, sink_frames=1, window_frames=2, static=True)
    unbounded = KVCache(LAYERS, 1, HEADS, DIM, TOKENS, static=True)
    caps: dict[str, list[int]] = {"windowed": [], "unbounded": []}
    for chunk in range(6):
        for name, cache in (("windowed", windowed), ("unbounded", unbounded)):
            cache.static_pass(2 * TOKENS)
            cache.end_pass()
            caps[name].append(cache.capacity)
            _commit(cache, [2 * chunk, 2 * chunk + 1])
    assert caps["windowed"] == [5 * TOKENS] * 6  # sink + window + one pass: one shape for every pass
    assert caps["unbounded"] == [2 * TOKENS, 4 * TOKENS, 8 * TOKENS, 8 * TOKENS, 16 * TOKENS, 16 * TOKENS]
    with pytest.raises(RuntimeError, match="static=True"):
        KVCache(LAYERS, 1, HEADS, DIM, TOKENS).static_pass(TOKENS)


def test_misuse_is_refused():
    cache = KVCache(LAYERS, 1, HEADS, DIM, TOKENS)
    with pytest.raises(RuntimeError, match="commit"):
        cache.commit([0])
    _commit(cache, [0])
    with pytest.raises(ValueError, match="follow"):
        _commit(cache, [0])
    with pytest.raises(ValueError, match="positions"):
        cache.prune([0], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="window_frames"):
        KVCache(LAYERS, 1, HEADS, DIM, TOKENS, window_frames=0)
