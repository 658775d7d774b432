"""Speed paths (issue 13) against their references: prompt K/V cached per prompt batch vs projected every pass,
the static (fixed-capacity, masked) path and the compiled path vs the dynamic eager path, and host reads counted (one
per candidate of a chunk, with or without TokenTrim)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.propagation import PATCH, add_to_tokens
from bench.speed import switched
from jobs.spec import JobSpec
from pipeline.config import RolloutConfig
from pipeline.hashing import digest, job_settings, output_hash
from pipeline.model.backend import load_backend
from pipeline.model.host import HostReadCounter, read_flat
from pipeline.rollout.loop import Rollout
from tokentrim import TrimConfig, TrimController

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


def _corrupt(c: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
    """Jumps in chunks 3 and 4 of every attempt and sample: TokenTrim (warmup 2) regenerates them until its retries
    are spent."""
    return add_to_tokens(x0, [0, 1, 5], 6.0, PATCH) if c in (3, 4) else x0


def _reads_per_chunk(rollout: Rollout) -> tuple[list[int], list[list[int]], torch.Tensor]:
    """Host reads of each `step`, candidates per chunk and sample (``[chunk][sample]``), and the latents."""
    counts, attempts, latents = [], [], []
    while not rollout.done:
        with HostReadCounter() as counter:
            record = rollout.step()
        counts.append(counter.count)
        attempts.append([s.attempts for s in record.stats])
        latents.append(record.latents)
    return counts, attempts, torch.cat(latents, dim=2)


READ_TRIMS = {"none": None, "never": TrimConfig(lam=1e9, warmup=3), "retry1": TrimConfig(warmup=2),
              "retry2": TrimConfig(warmup=2, max_retries=2)}


@pytest.mark.parametrize("trim", list(READ_TRIMS))
@pytest.mark.parametrize("mode", ["self-forcing", "rolling-forcing"])
def test_a_chunk_reads_the_device_once_per_candidate(backend, mode, trim):
    """One host read per chunk, with or without TokenTrim; a regenerated chunk reads once per candidate (without
    early_stop, whose extra read is the next test's)."""
    config = RolloutConfig(mode=mode, num_chunks=5, window_frames=6, early_stop=False)
    rollout = Rollout(backend, config, PROMPTS, SEEDS, READ_TRIMS[trim])
    rollout.perturb = _corrupt
    counts, attempts, _ = _reads_per_chunk(rollout)
    candidates = [max(a) for a in attempts]
    retries = READ_TRIMS[trim].max_retries if trim.startswith("retry") else 0
    assert candidates[:4] == [1, 1, 1, 1 + retries]  # chunk 3 really is regenerated until the retries are spent
    assert retries or candidates == [1] * 5
    assert counts == candidates


def _early_stop_runs(backend, config: RolloutConfig, trim: TrimConfig, perturb,
                     switches: tuple[bool, ...] = (False, True, False)) -> list[tuple]:
    """(reads per chunk, candidates per chunk and sample, latents, transformer passes) per early_stop switch."""
    forwards = []
    hook = backend.causal.transformer.blocks[0].register_forward_hook(lambda *a: forwards.append(1))
    try:
        runs = []
        for early_stop in switches:
            rollout = Rollout(backend, dataclasses.replace(config, early_stop=early_stop), PROMPTS, SEEDS, trim)
            rollout.perturb = perturb
            forwards.clear()
            runs.append((*_reads_per_chunk(rollout), len(forwards)))
    finally:
        hook.remove()
    return runs


def test_early_stop_reads_once_more_per_attempt_that_may_retry_and_skips_rejected_steps(backend):
    config, trim = RolloutConfig(num_chunks=5, window_frames=6), TrimConfig(warmup=2)
    runs = _early_stop_runs(backend, config, trim, _corrupt)
    (counts, attempts, latents, passes), (early_counts, early_attempts, early_latents, early_passes) = runs[:2]
    assert attempts == early_attempts and attempts[3] == [2, 2]  # chunk 3: both samples reject their first candidate
    assert early_counts == [c + 1 for c in counts]  # the verdict at measure_step of attempt 0
    all_rejected = sum(min(a) > 1 for a in attempts)  # chunks whose first candidate every sample rejects
    assert passes - early_passes == all_rejected * (len(config.timesteps) - 1 - trim.measure_step)
    assert torch.equal(early_latents, latents) and torch.equal(runs[2][2], latents)


@pytest.mark.parametrize("mode", ["self-forcing", "rolling-forcing"])
def test_early_stop_never_changes_the_latents_nor_the_config_hash(backend, mode):
    """Without pruning (self-forcing: one read more per chunk, no pass saved) and in rolling-forcing (judged on the
    finished chunk: nothing to skip, nothing read), early_stop changes no latent; it is not part of the hashes."""
    config, trim = RolloutConfig(mode=mode, num_chunks=3, window_frames=6), TrimConfig(warmup=2, lam=1e9)
    (counts, _, latents, passes), (early_counts, _, early_latents, early_passes) = _early_stop_runs(
        backend, config, trim, None, (False, True))
    assert torch.equal(early_latents, latents) and early_passes == passes
    assert early_counts == ([c + 1 for c in counts] if mode == "self-forcing" else counts)
    early = dataclasses.replace(config, early_stop=True)
    assert early.to_dict()["early_stop"] and RolloutConfig.from_dict(early.to_dict()) == early
    assert output_hash(backend.spec, early, trim, "float32") == output_hash(backend.spec, config, trim, "float32")
    assert digest(job_settings("tiny", None, early, trim, "float32", 0)) == digest(
        job_settings("tiny", None, config, trim, "float32", 0))


def test_a_prune_reads_once_and_the_tokens_after_a_commit_are_known_before_it(backend):
    causal, text = backend.causal, backend.encode_prompts(PROMPTS)
    cache = causal.new_cache(2, 4, 6, sink_frames=1, window_frames=3)
    x = torch.randn(2, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    for chunk in range(5):  # the window evicts frames that were pruned for sample 0 only (ragged)
        frames = [2 * chunk, 2 * chunk + 1]
        expected = cache.num_tokens_after_commit(frames)
        causal.commit(x, text, cache, 2 * chunk)
        assert torch.equal(cache.num_tokens(), expected), chunk
        before = cache.num_tokens()
        with HostReadCounter() as counter:
            removed = cache.prune(frames, torch.tensor([[0, 4], [1, 2]]), torch.tensor([True, False]),
                                  protect_sink=False)
        assert counter.count == 1
        assert removed == (before - cache.num_tokens()).sum().item() == 4  # 2 positions x 2 frames, sample 0
    assert cache.num_tokens().tolist() == [4 + 3 * 4, 6 + 3 * 6]  # the sink frame 0 and frames 7-9


def test_the_controller_without_host_checks_never_reads_the_device():
    trim = TrimConfig(warmup=1, lam=0.0)
    controller = TrimController(trim, 2, host_checks=False)
    summaries = torch.randn(4, 2, 6, 3, generator=torch.Generator().manual_seed(0))
    with HostReadCounter() as counter:
        for summary in summaries:
            judgement = controller.judge(summary, 0)
            controller.accept(summary, judgement, ~judgement.prune)
    assert counter.count == 0, counter.calls
    assert judgement.kinds == [("warmup", "accepted", "pruned")[c] for c in judgement.codes.tolist()]


def test_read_flat_reads_several_tensors_exactly():
    got = read_flat({"a": torch.tensor([1.5, -2.0]), "n": torch.tensor([3, 2**40]), "ok": torch.tensor([True, False]),
                     "m": torch.tensor([[1, 2], [3, 4]])})
    assert got == {"a": [1.5, -2.0], "n": [3.0, float(2**40)], "ok": [1.0, 0.0], "m": [1.0, 2.0, 3.0, 4.0]}
    assert read_flat({}) == {}


@pytest.mark.parametrize(("argv", "expected"), [([], True), (["--no-early-stop"], False), (["--early-stop"], True)])
def test_early_stop_is_an_option_of_the_command_line(argv, expected):
    from jobs.job_cmds import spec_from
    from jobs.job_cmds import submit as submit_command

    params = submit_command.make_context("submit", ["t.parquet", "--out", "o", *argv]).params
    spec = spec_from({k: v for k, v in params.items() if "__" in k}, input_url="t.parquet", output_url="o",
                     no_trim=False, storage_options=None)
    assert spec.render.rollout.early_stop is expected
    assert JobSpec.from_dict(spec.to_dict()).render.rollout.early_stop is expected  # kept in job.json for resume
