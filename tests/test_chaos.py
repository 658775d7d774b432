"""The chaos soak in CI size (`tests.chaos`; the long run is `python -m tests.chaos --seconds 600`)."""

from __future__ import annotations

import pytest

from tests.chaos import SoakConfig, run_soak


@pytest.mark.slow
def test_every_valid_row_is_rendered_exactly_once_through_kills_freezes_cuts_and_concurrent_submits(s3, tmp_path):
    config = SoakConfig(seed=3, seconds=20.0, prompts=3, chunks=3, lease_s=2.0, concurrency=2)
    report = run_soak(config, tmp_path, s3.endpoint, f"{s3.url}/soak", s3.storage_options)
    assert not report.problems, "\n".join([*report.problems, *report.faults])
    assert report.exits and set(report.exits) == {0}, report.exits
    assert report.faults, "no fault was injected"
