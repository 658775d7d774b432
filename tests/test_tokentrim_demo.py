"""The synthetic demo finds the corruption it injects, is deterministic, and its CLI prints one row per chunk."""

from __future__ import annotations

import runpy
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrim import TrimConfig, num_unstable
from tokentrim.demo import main, run_demo


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_demo_prunes_each_corrupted_chunk_at_the_corrupted_tokens(seed: int, data: st.DataObject) -> None:
    """Corrupted patches shift by 3 in all 16 channels (drift ~12) against clean token drifts ~0.6: they lead the
    top-k and the severity is ~8x the clean severities, far above mu + lam * sigma."""
    config = TrimConfig(warmup=data.draw(st.integers(2, 4), label="warmup"))
    chunks = 12
    judged_from = max(config.warmup, 3)  # nothing is judged before the statistics hold two severities
    corrupt_at = sorted(data.draw(st.sets(st.integers(judged_from, chunks - 1), min_size=1, max_size=3)))
    k = data.draw(st.integers(1, num_unstable(64, config.p)), label="corrupted tokens")  # 16x16 latents -> 64 tokens
    rows = run_demo(chunks, seed, corrupt_at, config, corrupt_tokens=k)
    assert [r["chunk"] for r in rows] == list(range(chunks))
    for row in rows:
        if row["corrupted"]:
            assert row["verdict"] == "pruned" and row["attempts"] == 2
            assert len(row["corrupted_positions"]) == k
            assert set(row["corrupted_positions"]) <= set(row["pruned_positions"])
            assert row["severity"] > max(row["threshold"], row["accepted_severity"])
    assert [r["verdict"] for r in rows[: config.warmup]] == ["warmup"] * config.warmup


def test_corruption_during_warmup_is_only_recorded() -> None:
    rows = run_demo(6, 1, [1], TrimConfig(warmup=3))
    assert rows[1]["corrupted"] and rows[1]["verdict"] == "warmup" and rows[1]["attempts"] == 1


def test_demo_is_deterministic_per_seed() -> None:
    a, b, other = run_demo(10, 4, [6]), run_demo(10, 4, [6]), run_demo(10, 5, [6])
    assert repr(a) == repr(b)  # repr, since NaN != NaN (chunk 0 has no severity)
    assert [r["severity"] for r in a[1:]] != [r["severity"] for r in other[1:]]


def test_main_prints_one_row_per_chunk(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--chunks", "7", "--seed", "2", "--corrupt-at", "4", "--warmup", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert str(TrimConfig(warmup=3).to_dict()) in lines[0]
    assert lines[1].split()[:6] == ["chunk", "severity", "mu", "sigma", "threshold", "verdict"]
    table = [line.split() for line in lines[2:]]
    assert [int(r[0]) for r in table] == list(range(7))
    assert table[4][5] == "pruned" and table[4][-1] == "yes"


def test_module_runs_as_script(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["tokentrim.demo", "--chunks", "3"])
    monkeypatch.delitem(sys.modules, "tokentrim.demo")  # run_module warns when re-running an imported module
    with pytest.raises(SystemExit) as info:
        runpy.run_module("tokentrim.demo", run_name="__main__")
    assert info.value.code == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 + 3


def test_run_demo_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="corrupt_tokens"):
        run_demo(3, 0, [1], corrupt_tokens=0)
    with pytest.raises(ValueError, match="patch"):
        run_demo(3, 0, [1], height=15)
