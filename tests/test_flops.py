"""`bench.flops`: the analytic count of a transformer pass equals FlopCounterMode's on real passes of the tiny preset,
and a chunk's budget adds up per mode."""

from __future__ import annotations

import pytest

from bench.flops import check_analytic, chunk_plan
from pipeline.config import RolloutConfig


@pytest.mark.parametrize(("frames", "context"), [(3, 1), (2, 5)])  # after a commit: prompt K/V cached
def test_the_analytic_pass_count_equals_flop_counter_mode_on_the_tiny_preset(frames, context):
    for name, analytic, counted in check_analytic(frames, context):
        assert analytic == counted, name


def test_a_chunk_has_its_mode_s_passes():
    sf = chunk_plan(RolloutConfig(), tokens_per_frame=10, context_frames=21)
    assert [p[0] for p in sf.passes] == ["denoise"] * 4 + ["commit"] and sf.pixel_frames == 12
    assert all(q == 30 and k == 210 for _, q, k in sf.passes)
    rf = chunk_plan(RolloutConfig(mode="rolling-forcing"), tokens_per_frame=10, context_frames=21)
    assert rf.passes == (("denoise", 150, 210), ("commit", 30, 210))
