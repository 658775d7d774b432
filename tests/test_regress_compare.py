"""`jobs.regress.compare`: which drifts count as regressions (replaces test_jobs.py's `compare(b, b, 0, 0) == []`,
which holds for any implementation that returns an empty list)."""

from __future__ import annotations

import pytest

from jobs.regress import checks, compare

BASE = {"tokentrim": {"steadiness": 0.2, "luma": 0.05}, "no-trim": {"steadiness": 0.4}}


def test_equal_or_smaller_drift_passes_and_extra_metrics_are_ignored() -> None:
    assert compare(BASE, BASE, tolerance=0.0, slack=0.0) == []
    better = {"tokentrim": {"steadiness": 0.1, "luma": 0.0, "new_metric": 9.0}, "no-trim": {"steadiness": 0.39}}
    assert compare(better, BASE, tolerance=0.0, slack=0.0) == []


@pytest.mark.parametrize(("tolerance", "slack", "steadiness", "fails"), [
    (0.10, 0.0, 0.2 * 1.10, False),        # exactly at the tolerance: allowed
    (0.10, 0.0, 0.2 * 1.10 + 1e-9, True),  # just above it
    (0.0, 0.01, 0.2 + 0.01, False),        # the absolute slack is added
    (0.0, 0.01, 0.2 + 0.0101, True),
])
def test_growth_beyond_tolerance_plus_slack_is_a_regression(tolerance, slack, steadiness, fails) -> None:
    current = {"tokentrim": {"steadiness": steadiness, "luma": 0.05}, "no-trim": {"steadiness": 0.4}}
    failures = compare(current, BASE, tolerance=tolerance, slack=slack)
    assert len(failures) == int(fails)
    if fails:
        assert failures[0].startswith(f"tokentrim/steadiness: {steadiness:.5f} > baseline 0.20000")


def test_every_regressed_or_missing_metric_is_named_once() -> None:
    current = {"tokentrim": {"steadiness": 0.5}, "no-trim": {"steadiness": 0.9}}
    failures = compare(current, BASE, tolerance=0.1, slack=0.0)
    assert sorted(f.split(":")[0] for f in failures) == [
        "no-trim/steadiness", "tokentrim/luma", "tokentrim/steadiness"]
    assert "tokentrim/luma: missing from this run" in failures
    assert compare({}, BASE, tolerance=0.1, slack=0.0) == [f"{v}/{m}: missing from this run"
                                                           for v, ms in BASE.items() for m in ms]


def test_checks_give_every_baseline_metric_its_limit_and_verdict() -> None:
    current = {"tokentrim": {"steadiness": 0.25, "luma": 0.05}, "no-trim": {"steadiness": 0.4}}
    got = checks(current, BASE, tolerance=0.1, slack=0.0)
    assert [(c.variant, c.metric, c.baseline, c.now, c.passed) for c in got] == [
        ("tokentrim", "steadiness", 0.2, 0.25, False), ("tokentrim", "luma", 0.05, 0.05, True),
        ("no-trim", "steadiness", 0.4, 0.4, True)]
    assert got[0].allowed == "<= 0.22 (10% + 0.0)" and got[0].failure == compare(current, BASE, tolerance=0.1,
                                                                                  slack=0.0)[0]
