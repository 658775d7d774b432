"""TokenTrim's options in a real rollout (tiny model): what each one changes in the KV cache and the stats rows.

`prune_scope`, `protect_sink`, `measure_step` and the EMA statistics, each checked on the exact frames and
positions that lose rows, or on the values the rows must hold; plus determinism compared row by row (NaN-aware)
and rolling-forcing's prune verdicts checked chunk by chunk.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from pipeline.config import RolloutConfig
from pipeline.model.backend import load_backend
from pipeline.rollout.loop import Rollout
from pipeline.rollout.probe import add_to_tokens
from pipeline.rollout.records import ChunkRecord
from tests.wan_oracle import frame_keep_mask
from tokentrim import TrimConfig
from tokentrim.stats import RunningStats

TIMING = ("t_denoise_s", "t_trim_s", "t_commit_s")
CORRUPT = [3, 10, 17]  # patch-grid tokens of the corrupted chunk


@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny", with_vae=False)


def _corrupt(chunk: int, positions: list[int], *, step: int | None = None, amount: float = 8.0):
    """A perturb hook adding ``amount`` to the given tokens of ``chunk``'s x0 on attempt 0 (at every denoising
    step, or only at ``step``)."""
    calls: dict[tuple[int, int], int] = {}

    def perturb(c: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
        i = calls.get((c, attempt), 0)
        calls[(c, attempt)] = i + 1
        if c != chunk or attempt != 0 or (step is not None and i != step):
            return x0
        return add_to_tokens(x0, positions, amount, TrimConfig().patch_size)

    return perturb


def _run_until(backend, config: RolloutConfig, trim: TrimConfig | None, chunk: int, perturb=None,
               seed: int = 1) -> tuple[Rollout, list[ChunkRecord]]:
    """Run chunks 0..``chunk``; the rollout is returned with its cache as it is right after ``chunk``."""
    rollout = Rollout(backend, config, ["a cat"], [seed], trim)
    rollout.perturb = perturb
    return rollout, [rollout.step() for _ in range(chunk + 1)]


def _lost(rollout: Rollout, frames: list[int]) -> dict[int, set[int]]:
    """Per cached frame, the spatial positions sample 0 no longer holds."""
    return {f: set((~frame_keep_mask(rollout.cache, f)[0]).nonzero().flatten().tolist()) for f in frames}


def _same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (the first chunk's severity and statistics are NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _rows_equal(a: list[ChunkRecord], b: list[ChunkRecord]) -> None:
    for x, y in zip(a, b, strict=True):
        rx = {k: v for k, v in x.rows[0].items() if k not in TIMING}
        ry = {k: v for k, v in y.rows[0].items() if k not in TIMING}
        assert rx.keys() == ry.keys()
        bad = {k: (rx[k], ry[k]) for k in rx if not _same(rx[k], ry[k])}
        assert not bad, f"chunk {x.index}: rows differ in {bad}"


# ----------------------------------------------------------------------------------------------- prune scope
@pytest.mark.parametrize("scope", ["last", "window"])
def test_prune_scope_names_the_frames_that_lose_the_unstable_positions(backend, scope):
    """Chunk 4 is corrupted: "last" removes the unstable positions from chunk 3's frames only, "window" from every
    cached frame; the chunk that was regenerated keeps all its rows."""
    config = RolloutConfig(num_chunks=6)
    rollout, records = _run_until(backend, config, TrimConfig(warmup=3, prune_scope=scope), 4,
                                  _corrupt(4, CORRUPT))
    row = records[4].rows[0]
    assert row["verdict"] == "pruned" and row["attempts"] == 2
    found = set(records[4].prunes[0].positions[0].tolist())
    assert set(CORRUPT) <= found
    hit = [9, 10, 11] if scope == "last" else list(range(12))
    assert records[4].prunes[0].frames == hit
    lost = _lost(rollout, list(range(15)))
    assert lost == {f: (found if f in hit else set()) for f in range(15)}
    assert row["tokens_pruned"] == len(hit) * len(found)
    assert row["cache_tokens"] == 15 * 24 - len(hit) * len(found)
    assert all(r.rows[0]["tokens_pruned"] == 0 for r in records[:4])


# ----------------------------------------------------------------------------------------------- sink
@pytest.mark.parametrize(("protect", "rope", "sink_touched"),
                         [(True, "absolute", False), (False, "absolute", True), (False, "adjacent", False)])
def test_protect_sink_decides_whether_the_sink_frames_are_pruned(backend, protect, rope, sink_touched):
    """A 3-frame sink and prune_scope="window": with protect_sink the sink keeps every row; without it the sink
    loses the unstable positions like any frame, except under sink_rope="adjacent" (a re-rotated sink is never
    pruned)."""
    config = RolloutConfig(num_chunks=6, sink_frames=3, sink_rope=rope)
    trim = TrimConfig(warmup=3, prune_scope="window", protect_sink=protect)
    rollout, records = _run_until(backend, config, trim, 4, _corrupt(4, CORRUPT))
    assert records[4].rows[0]["verdict"] == "pruned"
    found = set(records[4].prunes[0].positions[0].tolist())
    lost = _lost(rollout, list(range(12)))
    assert all(lost[f] == found for f in range(3, 12))  # every non-sink cached frame
    assert [lost[f] for f in range(3)] == [found if sink_touched else set()] * 3
    assert (0 in records[4].prunes[0].frames) == (not protect)


# ----------------------------------------------------------------------------------------------- measure step
@pytest.mark.parametrize(("measure", "corrupted_step", "pruned"), [(2, 2, True), (1, 2, False), (0, 0, True)])
def test_measure_step_judges_the_x0_of_that_step(backend, measure, corrupted_step, pruned):
    """Corrupt chunk 4's x0 at one denoising step only: TokenTrim sees it when it measures at that step, and not
    when it measures at an earlier one (the judgement is made before the corruption happens)."""
    config = RolloutConfig(num_chunks=5)
    trim = TrimConfig(warmup=3, measure_step=measure)
    _, records = _run_until(backend, config, trim, 4, _corrupt(4, CORRUPT, step=corrupted_step, amount=20.0))
    row = records[4].rows[0]
    assert row["verdict"] == ("pruned" if pruned else "accepted")
    assert row["attempts"] == (2 if pruned else 1)
    if pruned:
        assert set(CORRUPT) <= set(records[4].prunes[0].positions[0].tolist())
    else:
        assert row["severity"] <= row["threshold"]


def test_measure_step_changes_the_severity_but_not_an_unjudged_rollout(backend):
    """The severities measured at step 0 and step 2 differ (different x0), while chunks in warmup (never pruned)
    are the same latents: measuring does not change the denoising."""
    config = RolloutConfig(num_chunks=4)
    _, early = _run_until(backend, config, TrimConfig(warmup=10, measure_step=0), 3)
    _, late = _run_until(backend, config, TrimConfig(warmup=10, measure_step=2), 3)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(early, late))
    severities = [(a.rows[0]["severity"], b.rows[0]["severity"]) for a, b in zip(early[1:], late[1:])]
    assert all(x != y for x, y in severities), severities


# ----------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("stats", ["ema", "welford"])
def test_rows_carry_the_configured_running_statistics_of_accepted_severities(backend, stats):
    """Each row's mu/sigma are the statistics (of the configured kind) of the severities of the chunks accepted
    before it, in order (a chunk accepted over its threshold counts at the threshold; sigma floored at
    ``sigma_floor * mu``); EMA and Welford give different values on the same severities."""
    trim = TrimConfig(warmup=2, lam=0.5, stats=stats, ema_decay=0.5)
    _, records = _run_until(backend, RolloutConfig(num_chunks=8), trim, 7)
    rows = [r.rows[0] for r in records]
    oracle, other = RunningStats(1, stats, 0.5), RunningStats(1, "welford" if stats == "ema" else "ema", 0.5)
    differs = 0
    for row in rows:
        mu, sigma = oracle.mu.item(), oracle.sigma.item()
        sigma = max(sigma, trim.sigma_floor * abs(mu)) if not math.isnan(sigma) else sigma
        assert _same(row["mu"], mu) and _same(row["sigma"], sigma), (row["chunk"], row["sigma"], sigma)
        differs += not _same(other.mu.item(), mu)
        if not math.isnan(row["severity"]):
            fed = row["severity"] if math.isnan(row["threshold"]) else min(row["severity"], row["threshold"])
            for s in (oracle, other):
                s.update(torch.tensor([fed], dtype=torch.float64))
    assert differs >= 3  # from the third accepted severity on, the kinds disagree
    assert all(_same(r["threshold"], r["mu"] + 0.5 * r["sigma"]) for r in rows if r["verdict"] != "warmup")


# ----------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("mode", ["self-forcing", "rolling-forcing"])
def test_rollout_is_deterministic_for_a_seed(backend, mode):
    """Replaces test_rollout.py's str()-compared rows: latents, prune events, controller state and every row value
    equal (NaN-aware) for one seed, over repeated runs; another seed gives other latents."""
    config = RolloutConfig(mode=mode, num_chunks=6)
    trim = TrimConfig(warmup=2, lam=0.0)  # lambda 0 prunes, so prune replay is part of what must repeat
    runs = [_run_until(backend, config, trim, 5)[1] for _ in range(3)]
    assert any(r.rows[0]["verdict"] == "pruned" for r in runs[0])
    for other in runs[1:]:
        _rows_equal(other, runs[0])
        for x, y in zip(other, runs[0]):
            assert torch.equal(x.latents, y.latents), f"chunk {x.index}"
            assert [(e.frames, e.positions.tolist(), e.samples.tolist()) for e in x.prunes] == \
                [(e.frames, e.positions.tolist(), e.samples.tolist()) for e in y.prunes]
            assert x.trim_state.keys() == y.trim_state.keys()
            assert all(torch.equal(x.trim_state[k], y.trim_state[k]) for k in x.trim_state)
    seed2 = _run_until(backend, config, trim, 5, seed=2)[1]
    assert not torch.equal(seed2[-1].latents, runs[0][-1].latents)


def test_rolling_forcing_prunes_exactly_the_chunks_over_threshold(backend):
    """Replaces test_rollout.py's `"pruned" in verdicts`: with lambda 0, every judged chunk is either accepted at
    once with severity <= threshold, or pruned: regenerated once, the previous chunk's 3 frames losing the unstable
    positions (the sink, re-rotated, is never pruned)."""
    config = RolloutConfig(mode="rolling-forcing", num_chunks=6)
    _, records = _run_until(backend, config, TrimConfig(warmup=2, lam=0.0), 5)
    rows = [r.rows[0] for r in records]
    assert [r["verdict"] for r in rows[:3]] == ["warmup"] * 3  # judged once the statistics hold two severities
    assert sum(r["verdict"] == "pruned" for r in rows) >= 1
    for record, row in zip(records[3:], rows[3:]):
        c = record.index
        if row["verdict"] == "pruned":
            assert row["attempts"] == 2 and len(record.prunes) == 1
            event = record.prunes[0]
            assert event.frames == [3 * (c - 1), 3 * (c - 1) + 1, 3 * (c - 1) + 2]
            assert row["tokens_pruned"] == 3 * event.positions.shape[1] == 3 * math.ceil(0.1 * 24)
        else:
            assert row["verdict"] == "accepted" and row["attempts"] == 1 and record.prunes == []
            assert row["tokens_pruned"] == 0 and row["severity"] <= row["threshold"]
    assert sorted(records[0].window) == [1, 2, 3, 4] and records[-1].window == {}
