"""Speed paths (issue 13) against their references: prompt K/V cached per prompt batch vs projected every pass,
the static (fixed-capacity, masked) path and the compiled path vs the dynamic eager path, and host syncs counted."""

from __future__ import annotations

import pytest
import torch

from bench.speed import switched
from pipeline.config import RolloutConfig
from pipeline.model.backend import load_backend
from pipeline.model.host import HostReadCounter, to_host
from pipeline.rollout.loop import Rollout
from tokentrim import TrimConfig

PROMPTS, SEEDS = ["a cat", "a red car on a long road"], [1, 2]  # a ragged batch once pruned
ITEM = torch.Tensor.item


@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny", with_vae=False)


def _latents(backend, config, trim=None, perturb=None) -> torch.Tensor:
    rollout = Rollout(backend, config, PROMPTS, SEEDS, trim)
    rollout.perturb = perturb
    return torch.cat([r.latents for r in rollout], dim=2)


def _jump(c: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
    """A jump in chunk 2's first candidate for sample 0 only, so that TokenTrim prunes one sample (ragged cache)."""
    if c != 2 or attempt != 0:
        return x0
    x0 = x0.clone()
    x0[0, :, :, :4, :4] += 6.0
    return x0


CONFIGS = [
    pytest.param(RolloutConfig(num_chunks=4), None, id="self-forcing"),
    pytest.param(RolloutConfig(num_chunks=5, window_frames=6), TrimConfig(warmup=2, lam=0.0), id="sf-window-pruned"),
    pytest.param(RolloutConfig(mode="rolling-forcing", num_chunks=4, window_frames=6), TrimConfig(warmup=2, lam=0.0),
                 id="rolling-pruned"),
]




# --------------------------------------------------------------------------------------- prompt K/V per rollout
@pytest.mark.parametrize(("config", "trim"), CONFIGS)
def test_cached_prompt_kv_gives_exactly_the_uncached_rollout(backend, config, trim):
    with switched(backend, cache_text=False):
        reference = _latents(backend, config, trim, _jump)
    for _ in range(2):  # identical over repeated runs
        assert torch.equal(_latents(backend, config, trim, _jump), reference)


def test_prompt_kv_is_projected_once_per_prompt_batch(backend):
    calls = []
    hook = backend.causal.transformer.blocks[1].attn2.to_k.register_forward_hook(lambda *a: calls.append(1))
    config = RolloutConfig(num_chunks=3)  # 3 chunks x (4 denoise passes + 1 commit pass)
    try:
        _latents(backend, config)
        assert len(calls) == 1
        _latents(backend, config)  # a new rollout encodes its prompts anew: projected once more
        assert len(calls) == 2
        with switched(backend, cache_text=False):
            _latents(backend, config)
        assert len(calls) == 2 + 15
    finally:
        hook.remove()


def test_prompt_kv_follows_an_in_place_edit_of_the_prompt_embeddings(backend):
    causal = backend.causal
    text = backend.encode_prompts(PROMPTS)
    x = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    first = causal.forward(x, t, text, None, 0)
    text.mul_(-1.5)
    with switched(backend, cache_text=False):
        reference = causal.forward(x, t, text, None, 0)
    again = causal.forward(x, t, text, None, 0)
    assert torch.equal(again, reference)
    assert not torch.allclose(first, again)


# --------------------------------------------------------------------------------------- static and compiled paths
@pytest.mark.parametrize(("config", "trim"), CONFIGS)
def test_static_path_matches_the_dynamic_path(backend, config, trim):
    reference = _latents(backend, config, trim, _jump)
    with switched(backend, static=True):
        rollout = Rollout(backend, config, PROMPTS, SEEDS, trim)
        assert rollout.cache.static
        rollout.perturb = _jump
        static = torch.cat([r.latents for r in rollout], dim=2)
    torch.testing.assert_close(static, reference, rtol=1e-4, atol=1e-4)
    assert not torch.equal(static, torch.zeros_like(static))


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_compile_once_per_shape():
    """Inductor on the CPU (~1-2 min on a loaded 2-core machine): all blocks share one graph, compiled once."""
    from torch._dynamo.utils import counters

    backend = load_backend("tiny", with_vae=False)
    config = RolloutConfig(num_chunks=3, window_frames=3)
    trim = TrimConfig(warmup=2, lam=0.0)
    reference = _latents(backend, config, trim, _jump)
    torch._dynamo.reset()
    counters.clear()
    backend.causal.compile()
    compiled = _latents(backend, config, trim, _jump)
    graphs, seconds = counters["stats"]["unique_graphs"], backend.causal.compile_seconds
    again = _latents(backend, config, trim, _jump)  # a second prompt batch: nothing compiles
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, compiled)
    assert graphs == 1  # one graph for every block and every pass (fixed capacity)
    assert seconds > 0 and backend.causal.compile_seconds == seconds
    assert counters["stats"]["unique_graphs"] == graphs


# --------------------------------------------------------------------------------------- host syncs
def test_the_counter_sees_each_kind_of_host_read():
    t = torch.ones(3)
    with HostReadCounter() as counter:
        t.sum().item(), t.tolist(), bool(t[0]), int(t[0]), float(t[0]), [0, 1][t[0].long()], t.cpu()
    assert counter.count == 7, counter.calls
    assert torch.Tensor.item is ITEM  # restored


@pytest.mark.parametrize("sink_rope", ["absolute", "adjacent"])
def test_denoise_and_commit_passes_never_read_the_device(backend, sink_rope):
    causal, text = backend.causal, backend.encode_prompts(PROMPTS)
    cache = causal.new_cache(2, 4, 6, sink_frames=2, window_frames=4, sink_rope=sink_rope)
    x = torch.randn(2, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    with HostReadCounter() as counter:
        for chunk in range(5):  # the window fills at chunk 3: commits evict, the adjacent sink is re-rotated
            causal.denoise(x, torch.full((2,), 900.0), text, cache, 2 * chunk)
            causal.denoise(x, torch.full((2, 2), 500.0), text, cache, 2 * chunk)
            causal.commit(x, text, cache, 2 * chunk)
    assert counter.count == 0, counter.calls
    assert cache.frames == [0, 1, 6, 7, 8, 9]


@pytest.mark.parametrize("mode", ["self-forcing", "rolling-forcing"])
def test_a_chunk_without_trim_reads_the_device_once(backend, mode):
    rollout = Rollout(backend, RolloutConfig(mode=mode, num_chunks=4, window_frames=6), PROMPTS, SEEDS)
    counts = []
    for _ in range(4):
        with HostReadCounter() as counter:
            rollout.step()
        counts.append(counter.count)
    assert counts == [1, 1, 1, 1]


def test_to_host_reads_several_tensors_exactly():
    got = to_host({"a": torch.tensor([1.5, -2.0]), "n": torch.tensor([3, 2**40]), "ok": torch.tensor([True, False])})
    assert got == {"a": [1.5, -2.0], "n": [3.0, float(2**40)], "ok": [1.0, 0.0]}
    with pytest.raises(ValueError, match="must all be"):
        to_host({"a": torch.ones(2), "b": torch.ones(3)})
