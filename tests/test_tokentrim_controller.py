"""RunningStats against NumPy / Python references; TrimController verdicts, batching, resume and dtypes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrim import VERDICT_KINDS, Judgement, RunningStats, TrimConfig, TrimController, num_unstable

SETTINGS = settings(max_examples=20, deadline=None)
seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------------------------
# RunningStats


def _draw_updates(seed: int, b: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((steps, b)) * rng.uniform(0.01, 100.0) + rng.uniform(-50.0, 50.0)
    masks = rng.random((steps, b)) < 0.7
    return values, masks


@SETTINGS
@given(seed=seeds, b=st.integers(1, 4), steps=st.integers(1, 25))
def test_welford_matches_numpy_sample_stats(seed: int, b: int, steps: int) -> None:
    values, masks = _draw_updates(seed, b, steps)
    stats = RunningStats(b, "welford")
    for v, m in zip(values, masks, strict=True):
        # Unmasked entries are NaN: they must be ignored, not folded in.
        stats.update(torch.from_numpy(np.where(m, v, np.nan)), torch.from_numpy(m))
    for i in range(b):
        seen = values[masks[:, i], i]
        assert int(stats.count[i]) == len(seen)
        if len(seen) == 0:
            assert math.isnan(stats.mu[i]) and math.isnan(stats.sigma[i])
        else:
            np.testing.assert_allclose(float(stats.mu[i]), seen.mean(), rtol=1e-12, atol=1e-12)
        if len(seen) == 1:
            assert math.isnan(stats.sigma[i])  # one severity says nothing about the spread
        elif len(seen) > 1:
            np.testing.assert_allclose(float(stats.sigma[i]), seen.std(ddof=1), rtol=1e-9, atol=1e-9)


def ema_reference(seen: list[float], a: float) -> tuple[float, float]:
    """EMA mean and the sample std of the exponentially weighted values (reliability-weights correction, computed
    from the explicit weights); NaN std below two values."""
    mean, var = seen[0], 0.0
    for x in seen[1:]:
        diff = x - mean
        mean += (1.0 - a) * diff
        var = a * (var + (1.0 - a) * diff * diff)
    n = len(seen)
    weights = [a ** (n - 1)] + [(1.0 - a) * a ** (n - i) for i in range(2, n + 1)]
    assert abs(sum(weights) - 1.0) < 1e-9
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(var / (1.0 - sum(w * w for w in weights)))


def test_ema_sigma_of_two_values_is_their_sample_std() -> None:
    stats = RunningStats(1, "ema", ema_decay=0.7)
    for x in (3.0, 5.5):
        stats.update(torch.tensor([x], dtype=torch.float64))
    np.testing.assert_allclose(float(stats.sigma[0]), np.std([3.0, 5.5], ddof=1), rtol=1e-12)


@SETTINGS
@given(seed=seeds, b=st.integers(1, 4), steps=st.integers(1, 25), a=st.floats(0.05, 0.99))
def test_ema_matches_python_reference(seed: int, b: int, steps: int, a: float) -> None:
    values, masks = _draw_updates(seed, b, steps)
    stats = RunningStats(b, "ema", ema_decay=a)
    for v, m in zip(values, masks, strict=True):
        stats.update(torch.from_numpy(v), torch.from_numpy(m))
    for i in range(b):
        seen = values[masks[:, i], i].tolist()
        if not seen:
            assert math.isnan(stats.mu[i])
            continue
        mean, sigma = ema_reference(seen, a)
        np.testing.assert_allclose(float(stats.mu[i]), mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(stats.sigma[i]), sigma, rtol=1e-7, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("mode", ["welford", "ema"])
def test_running_stats_state_dict_round_trip(mode: str) -> None:
    values, masks = _draw_updates(7, 3, 10)
    a, b = RunningStats(3, mode), RunningStats(3, mode)  # type: ignore[arg-type]
    for v, m in zip(values[:5], masks[:5], strict=True):
        a.update(torch.from_numpy(v), torch.from_numpy(m))
    b.load_state_dict(a.state_dict())
    for v, m in zip(values[5:], masks[5:], strict=True):
        a.update(torch.from_numpy(v), torch.from_numpy(m))
        b.update(torch.from_numpy(v), torch.from_numpy(m))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_running_stats_rejects_bad_input() -> None:
    stats = RunningStats(2)
    with pytest.raises(ValueError, match="`values`"):
        stats.update(torch.tensor([1.0, float("nan")]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="`values`"):
        stats.update(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="`mask`"):
        stats.update(torch.tensor([1.0, 2.0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="`mode`"):
        RunningStats(2, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="m2"):
        stats.load_state_dict({"count": stats.count, "mean": stats.mean, "m2": stats.m2.float()})


# ---------------------------------------------------------------------------------------------------------------
# Synthetic summary sequences [T, B, N, D]


def translating_field(seed: int, n: int, d: int, chunks: int) -> torch.Tensor:
    """A fixed random field panned by one token per chunk (periodic): a stationary, smoothly moving sequence.

    Integer values keep every squared distance exact in float32, so the drift at chunk t is exactly the drift at
    chunk 1 rolled by t - 1: every chunk has bit-identical top-k values, hence bit-identical severity, sigma = 0 and
    threshold = mu = that severity, and `severity > threshold` is False with certainty (not just probability).
    """
    base = torch.randint(-4, 5, (n, d), generator=torch.Generator().manual_seed(seed)).float()
    return torch.stack([base.roll(t, dims=0) for t in range(chunks)])[:, None]  # [T, 1, N, D]


def settling_drift(seed: int, n: int, d: int, chunks: int, p: float, r: float = 0.8) -> torch.Tensor:
    """A drift whose speed decays by r per chunk, plus iid uniform jitter in [-delta, delta].

    Without jitter the severity at chunk t is r^(t-1) * S. The top-k mean is 1-Lipschitz in the max norm and the
    jitter moves each drift by at most 2 * delta * sqrt(d), so delta below r^T * S * (1 - r) / (4 sqrt(d)) keeps the
    severities strictly decreasing: every severity is below the mean of the earlier ones, so below mu + lam * sigma,
    for every draw of the jitter.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    velocity = torch.randn(n, d, generator=g, dtype=torch.float64)
    top = velocity.norm(dim=-1).topk(num_unstable(n, p)).values.mean()  # S
    delta = float(r**chunks * top * (1 - r) / (8 * math.sqrt(d)))
    jitter = (torch.rand(chunks, n, d, generator=g, dtype=torch.float64) * 2 - 1) * delta
    travelled = torch.tensor([(1 - r**t) / (1 - r) for t in range(chunks)], dtype=torch.float64)
    z = base + travelled[:, None, None] * velocity + jitter  # [T, N, D]
    return z.float()[:, None]  # [T, 1, N, D]


def random_jumps(seed: int, b: int, n: int, d: int, chunks: int, retries: int) -> torch.Tensor:
    """Candidates [T, R + 1, B, N, D]: a random walk whose first candidates sometimes jump at a few tokens."""
    g = torch.Generator().manual_seed(seed)
    walk = torch.randn(chunks, b, n, d, generator=g).cumsum(dim=0) * 0.1  # [T, B, N, D]
    candidates = walk[:, None] + 0.01 * torch.randn(chunks, retries + 1, b, n, d, generator=g)
    jumps = (torch.rand(chunks, b, n, 1, generator=g) < 0.05) * torch.rand(chunks, b, 1, 1, generator=g) * 5.0
    candidates[:, 0] += jumps * (torch.rand(chunks, b, 1, 1, generator=g) < 0.4)
    return candidates


def drive(controller: TrimController, candidates: torch.Tensor) -> list[list[dict[str, Any]]]:
    """Run an engine-like loop over candidates [T, R + 1, B, N, D]; return each sample's judgement rows."""
    chunks, attempts, b = candidates.shape[:3]
    rows: list[list[dict[str, Any]]] = [[] for _ in range(b)]
    for t in range(chunks):
        pending = torch.ones(b, dtype=torch.bool, device=candidates.device)
        for attempt in range(attempts):
            judgement = controller.judge(candidates[t, attempt], attempt)
            for i in pending.nonzero().flatten().tolist():
                rows[i].append(_row(judgement, i, t, attempt))
            controller.accept(candidates[t, attempt], judgement, pending & ~judgement.prune)
            pending &= judgement.prune
            if not bool(pending.any()):
                break
    return rows


def _row(j: Judgement, i: int, chunk: int, attempt: int) -> dict[str, Any]:
    keys = ("severity", "mu", "sigma", "threshold", "prune", "positions", "drift")
    return {"chunk": chunk, "attempt": attempt, "kind": j.kinds[i]} | {k: getattr(j, k)[i].cpu().numpy() for k in keys}


def assert_rows_equal(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            np.testing.assert_array_equal(ra[key], rb[key], err_msg=f"{key} at chunk {ra['chunk']}")


configs = st.builds(
    TrimConfig,
    p=st.floats(0.02, 0.5),
    lam=st.floats(0.0, 3.0),
    warmup=st.integers(1, 4),
    max_retries=st.integers(0, 2),
    stats=st.sampled_from(["welford", "ema"]),
    sigma_floor=st.sampled_from([0.0, 0.05, 0.3]),
)


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


@pytest.mark.parametrize("process", ["translating", "settling"])
@SETTINGS
@given(seed=seeds, n=st.integers(8, 64), d=st.integers(1, 6), p=st.floats(0.05, 0.5), lam=st.floats(0.0, 3.0))
def test_unperturbed_sequence_is_accepted_at_every_chunk(
    process: str, seed: int, n: int, d: int, p: float, lam: float
) -> None:
    chunks, warmup = 14, 4
    z = translating_field(seed, n, d, chunks) if process == "translating" else settling_drift(seed, n, d, chunks, p)
    rows = drive(TrimController(TrimConfig(p=p, lam=lam, warmup=warmup), 1), z[:, None])[0]
    assert [r["kind"] for r in rows] == ["warmup"] * warmup + ["accepted"] * (chunks - warmup)
    assert all(r["attempt"] == 0 for r in rows)


@pytest.mark.parametrize("process", ["translating", "settling"])
@SETTINGS
@given(seed=seeds, data=st.data(), n=st.integers(8, 64), d=st.integers(1, 6), p=st.floats(0.05, 0.5))
def test_corrupted_tokens_are_found_and_the_chunk_pruned(
    process: str, seed: int, data: st.DataObject, n: int, d: int, p: float
) -> None:
    chunks = 10
    warmup = data.draw(st.integers(2, 4), label="warmup")
    at = data.draw(st.integers(max(warmup, 3), chunks - 1), label="corrupted chunk")  # judged from two severities on
    k = data.draw(st.integers(1, num_unstable(n, p)), label="corrupted tokens")
    bad = sorted(data.draw(st.permutations(range(n)), label="order")[:k])
    z = translating_field(seed, n, d, chunks) if process == "translating" else settling_drift(seed, n, d, chunks, p)
    # Every clean drift is <= c = 2 * max|z| * sqrt(d); corrupted tokens move by 10 * k * (c + 1) * sqrt(d), so they
    # lead the top-k, and the severity (>= 9c + 10) exceeds the threshold mu + lam * max(sigma, floor * mu), which is
    # <= c + 3 * max(c / sqrt(2), 0.1 c) at the defaults (the sample std of values in [0, c] is <= c / sqrt(2)).
    shift = 10 * k * (2 * float(z.abs().max()) * math.sqrt(d) + 1)
    candidates = z[:, None].repeat(1, 2, 1, 1, 1)  # [T, 2, 1, N, D]: attempt 1 is the clean regeneration
    candidates[at, 0, 0, bad] += shift
    rows = drive(TrimController(TrimConfig(p=p, warmup=warmup, max_retries=1), 1), candidates)[0]
    flagged = [r for r in rows if r["kind"] == "pruned"]
    assert [(r["chunk"], r["attempt"]) for r in flagged] == [(at, 0)]
    assert set(bad) <= set(flagged[0]["positions"].tolist())
    assert flagged[0]["severity"] > flagged[0]["threshold"]
    assert [r["kind"] for r in rows if r["chunk"] > at or r["attempt"] == 1] == ["accepted"] * (chunks - at)


def test_last_candidate_is_accepted_whatever_its_severity() -> None:
    z = translating_field(0, 32, 4, 5)  # [T, 1, N, D]
    for retries in range(3):
        controller = TrimController(TrimConfig(warmup=2, max_retries=retries), 1)
        for t in range(4):
            controller.accept(z[t], controller.judge(z[t], 0))
        corrupted = z[4].clone()
        corrupted[0, :5] += 1000.0
        for attempt in range(retries + 1):
            j = controller.judge(corrupted, attempt)
            assert bool(j.severity[0] > j.threshold[0])
            assert bool(j.prune[0]) == (attempt < retries)
            assert j.kinds == ["pruned" if attempt < retries else "accepted"]
        with pytest.raises(ValueError, match="`attempt`"):
            controller.judge(corrupted, retries + 1)


@SETTINGS
@given(seed=seeds, config=configs)
def test_prune_rule_matches_reference_statistics(seed: int, config: TrimConfig) -> None:
    """mu / sigma / threshold / prune follow the severities of the accepted candidates (clipped at their threshold),
    by an independent oracle."""
    candidates = random_jumps(seed, 1, 24, 3, 12, config.max_retries)
    controller = TrimController(config, 1)
    accepted: list[float] = []
    for t in range(candidates.shape[0]):
        for attempt in range(config.max_retries + 1):
            j = controller.judge(candidates[t, attempt], attempt)
            in_warmup = t < config.warmup or len(accepted) < 2
            assert j.kinds[0] == ("warmup" if in_warmup else "pruned" if j.prune[0] else "accepted")
            assert math.isnan(j.severity[0]) == (t == 0)
            if accepted:
                mu, std = (
                    (float(np.mean(accepted)), float(np.std(accepted, ddof=1)) if len(accepted) > 1 else math.nan)
                    if config.stats == "welford"
                    else ema_reference(accepted, 0.9)
                )
                sigma = max(std, config.sigma_floor * abs(mu)) if not math.isnan(std) else math.nan
                np.testing.assert_allclose(float(j.mu[0]), mu, rtol=1e-12)
                np.testing.assert_allclose(float(j.sigma[0]), sigma, rtol=1e-7, atol=1e-12, equal_nan=True)
            if not in_warmup:
                threshold = float(j.mu[0]) + config.lam * float(j.sigma[0])
                assert float(j.threshold[0]) == threshold
                assert bool(j.prune[0]) == (float(j.severity[0]) > threshold and attempt < config.max_retries)
            if not bool(j.prune[0]):
                controller.accept(candidates[t, attempt], j)
                severity = float(j.severity[0])  # a forced accept counts at the threshold it failed
                accepted += [] if t == 0 else [severity if in_warmup else min(severity, float(j.threshold[0]))]
                break
    assert controller.chunks_accepted.tolist() == [candidates.shape[0]]


@pytest.mark.parametrize("warmup", [1, 2, 3, 5])
def test_first_warmup_chunks_only_feed_statistics(warmup: int) -> None:
    z = translating_field(3, 16, 2, warmup + 3)
    rows = drive(TrimController(TrimConfig(warmup=warmup), 1), z[:, None])[0]
    # Chunk 0 has no severity, and nothing is judged before the statistics hold two: chunks 0-2 are always warmup.
    effective = max(warmup, 3)
    assert [r["kind"] for r in rows] == ["warmup"] * effective + ["accepted"] * (len(rows) - effective)
    assert np.isnan(rows[0]["severity"]) and np.isnan(rows[0]["drift"]).all()
    assert all(np.isnan(r["threshold"]) for r in rows[:effective])
    assert all(np.isfinite(r["severity"]) and np.isfinite(r["threshold"]) for r in rows[effective:])


@SETTINGS
@given(seed=seeds, config=configs)
def test_batch_samples_are_judged_independently(seed: int, config: TrimConfig) -> None:
    candidates = random_jumps(seed, 3, 20, 3, 10, config.max_retries)  # [T, R + 1, 3, N, D]
    together = drive(TrimController(config, 3), candidates)
    for i in range(3):
        alone = drive(TrimController(config, 1), candidates[:, :, i : i + 1])[0]
        assert_rows_equal(together[i], alone)


@SETTINGS
@given(seed=seeds, config=configs)
def test_runs_are_deterministic(seed: int, config: TrimConfig) -> None:
    candidates = random_jumps(seed, 2, 20, 3, 8, config.max_retries)
    first, second = drive(TrimController(config, 2), candidates), drive(TrimController(config, 2), candidates)
    for a, b in zip(first, second, strict=True):
        assert_rows_equal(a, b)


@SETTINGS
@given(seed=seeds, config=configs)
def test_without_host_checks_the_judgements_are_the_same(seed: int, config: TrimConfig) -> None:
    candidates = random_jumps(seed, 2, 20, 3, 8, config.max_retries)
    checked, unchecked = TrimController(config, 2), TrimController(config, 2, host_checks=False)
    for a, b in zip(drive(checked, candidates), drive(unchecked, candidates), strict=True):
        assert_rows_equal(a, b)
    assert all(torch.equal(v, unchecked.state_dict()[k]) for k, v in checked.state_dict().items())


def test_verdict_codes_index_the_kinds() -> None:
    controller = TrimController(TrimConfig(warmup=1, lam=0.0), 3)
    z = torch.zeros(3, 4, 2)
    first = controller.judge(z, 0)
    assert first.codes.dtype == torch.long and first.codes.tolist() == [0, 0, 0] and first.kinds == ["warmup"] * 3
    for t in range(1, 4):
        controller.accept(z + t, controller.judge(z + t, 0))
    jumped = z + 3.0
    jumped[0, 0] += 50.0  # sample 0 jumps: pruned; samples 1 and 2 accepted
    j = controller.judge(jumped, 0)
    assert j.codes.tolist() == [2, 1, 1] and j.kinds == [VERDICT_KINDS[c] for c in (2, 1, 1)]
    assert controller.judge(jumped, 1).kinds == ["accepted"] * 3  # no retry left


def test_without_host_checks_a_non_finite_summary_is_flagged_not_raised() -> None:
    nan = torch.zeros(2, 4, 2)
    nan[1, 2, 0] = float("nan")
    controller = TrimController(TrimConfig(), 2, host_checks=False)
    assert controller.judge(nan, 0).finite.tolist() == [True, False]
    assert TrimController(TrimConfig(), 2).judge(torch.zeros(2, 4, 2), 0).finite.tolist() == [True, True]
    stats = RunningStats(2)
    stats.update(torch.tensor([1.0, float("nan")]), check=False)  # the check is the caller's: no host read, no raise
    assert stats.count.tolist() == [1, 1]


def test_judge_does_not_change_state() -> None:
    candidates = random_jumps(5, 2, 20, 3, 6, 1)
    controller = TrimController(TrimConfig(), 2)
    drive(controller, candidates[:4])
    before = controller.state_dict()
    first, second = controller.judge(candidates[4, 0], 0), controller.judge(candidates[4, 0], 0)
    for key, value in controller.state_dict().items():
        assert torch.equal(value, before[key]), key
    for i in range(2):
        assert_rows_equal([_row(first, i, 4, 0)], [_row(second, i, 4, 0)])


@pytest.mark.parametrize("split", [0, 1, 5])
@pytest.mark.parametrize("stats", ["welford", "ema"])
def test_state_dict_round_trip_resumes_bit_exactly(split: int, stats: str) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    config = TrimConfig(stats=stats, max_retries=2)  # type: ignore[arg-type]
    candidates = random_jumps(11, 3, 20, 4, 12, config.max_retries)
    original = TrimController(config, 3)
    drive(original, candidates[:split])
    state = original.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    resumed = TrimController(config, 3)
    resumed.load_state_dict(safetensors_torch.load(safetensors_torch.save(state)))
    assert torch.equal(resumed.chunks_accepted, original.chunks_accepted)
    for a, b in zip(drive(original, candidates[split:]), drive(resumed, candidates[split:]), strict=True):
        assert_rows_equal(a, b)


def test_the_previous_summary_is_stored_and_judged_in_16_bits() -> None:
    """The stored summary is the accepted one rounded to float16 (clamped to its finite range), the drift is taken
    to that stored value, and a float32 state from elsewhere is refused rather than rounded on load."""
    z = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0)) * 100
    z[1, 0, 0] = 1e6  # beyond float16's range
    controller = TrimController(TrimConfig(), 2)
    controller.accept(z, controller.judge(z, 0))
    prev = controller.state_dict()["prev_summary"]
    max16 = torch.finfo(torch.float16).max
    assert prev.dtype == torch.float16 and torch.equal(prev, z.clamp(-max16, max16).half())
    later = z + 0.001
    drift = controller.judge(later, 0).drift
    assert torch.isfinite(drift).all()
    assert torch.equal(drift, (later - prev.float()).norm(dim=-1))
    with pytest.raises(ValueError, match="prev_summary"):
        controller.load_state_dict(dict(controller.state_dict(), prev_summary=prev.float()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_summaries_are_judged_like_their_float32_values(dtype: torch.dtype) -> None:
    config = TrimConfig(max_retries=1)
    half = random_jumps(2, 2, 20, 4, 8, config.max_retries).to(dtype)
    judged_half = drive(TrimController(config, 2), half)
    judged_float = drive(TrimController(config, 2), half.float())
    for a, b in zip(judged_half, judged_float, strict=True):
        assert_rows_equal(a, b)
    assert any(r["kind"] != "warmup" for r in judged_half[0])


def test_masked_accept_commits_only_masked_samples() -> None:
    z = random_jumps(4, 2, 10, 3, 3, 0)[:, 0]  # [T, B, N, D]
    controller = TrimController(TrimConfig(), 2)
    controller.accept(z[0], controller.judge(z[0], 0), torch.tensor([True, False]))
    assert controller.chunks_accepted.tolist() == [1, 0]
    j = controller.judge(z[1], 0)
    assert not math.isnan(j.severity[0]) and math.isnan(j.severity[1])
    assert j.kinds == ["warmup", "warmup"]


def test_controller_rejects_bad_summaries() -> None:
    controller = TrimController(TrimConfig(), 2)
    with pytest.raises(ValueError, match="`summary`"):
        controller.judge(torch.zeros(3, 4, 2), 0)
    with pytest.raises(TypeError, match="`summary`"):
        controller.judge(torch.zeros(2, 4, 2, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="`attempt`"):
        controller.judge(torch.zeros(2, 4, 2), True)  # type: ignore[arg-type]
    nan = torch.zeros(2, 4, 2)
    nan[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`summary` has non-finite values for samples \[1\]"):
        controller.judge(nan, 0)
    ok = torch.zeros(2, 4, 2)
    controller.accept(ok, controller.judge(ok, 0))
    with pytest.raises(ValueError, match="`summary`"):
        controller.judge(torch.zeros(2, 5, 2), 0)
    with pytest.raises(ValueError, match="`mask`"):
        controller.accept(ok, controller.judge(ok, 0), torch.tensor([1, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    config = TrimConfig(max_retries=1)
    candidates = random_jumps(9, 2, 32, 4, 8, config.max_retries)
    on_cpu = drive(TrimController(config, 2), candidates)
    on_gpu = drive(TrimController(config, 2, device="cuda"), candidates.cuda())
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert [r["kind"] for r in a] == [r["kind"] for r in b]


def _stationary(gen: torch.Generator, base: torch.Tensor) -> torch.Tensor:
    return base + 0.05 * torch.randn(base.shape, generator=gen)


@SETTINGS
@given(seed=seeds, jump=st.floats(5.0, 500.0))
def test_a_forced_accept_does_not_lift_the_threshold_over_the_next_corruption(seed: int, jump: float) -> None:
    """Retries spent, a corrupted candidate is accepted: its severity feeds the statistics only up to the
    threshold it failed, so a second corruption of the same size right after is still judged prune."""
    gen = torch.Generator().manual_seed(seed)
    ctl = TrimController(TrimConfig(max_retries=0), batch_size=1)
    base = torch.randn(1, 64, 16, generator=gen)
    for _ in range(8):  # clean, stationary chunks: warmup, then accepted
        z = _stationary(gen, base)
        ctl.accept(z, ctl.judge(z, attempt=0))
    before = ctl.judge(_stationary(gen, base), attempt=0).threshold.item()
    bad = _stationary(gen, base)
    bad[:, :6] += jump
    forced = ctl.judge(bad, attempt=0)
    assert forced.kinds == ["accepted"] and forced.severity.item() > forced.threshold.item()  # no retry left
    ctl.accept(bad, forced)
    after = ctl.judge(_stationary(gen, base), attempt=0)
    assert after.threshold.item() <= before * 1.5
    worse = _stationary(gen, base)
    worse[:, 10:16] += jump
    ctl_retry = TrimController(TrimConfig(max_retries=1), batch_size=1)
    ctl_retry.load_state_dict(ctl.state_dict())
    assert ctl_retry.judge(worse, attempt=0).kinds == ["pruned"]
