"""bench/capacity.py's prediction: exact on the cases that can be worked out by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bench.capacity import Inputs, chunks_per_video, predict

MEASURED = dict(startup_s=30.0, per_prompt_s=1.0, dispatch_s=0.0, end_s=2.0, store_chunk_s=0.0, cpu_chunk_s=0.4)


def test_90_s_at_16_fps_is_120_chunks_of_12_frames():
    assert chunks_per_video(Inputs(**MEASURED)) == 120


def test_without_a_loss_the_job_is_rounds_of_whole_prompts():
    inputs = Inputs(prompts=17, gpus=4, **MEASURED)
    out = predict(inputs)
    prompt = 120 * 12 / 24 + 1.0
    assert out["prompt_s"] == pytest.approx(prompt)
    assert out["clean_s"] == pytest.approx(30.0 + math.ceil(17 / 4) * prompt + 2.0)


def test_a_node_back_at_once_costs_only_the_resume():
    inputs = Inputs(prompts=800, gpus=8, detect_s=0.0, replace_s=0.0, model_load_s=0.0, lease_s=0.0, **MEASURED)
    out = predict(inputs)
    # the interrupted rollout's extra work (restore + half a chunk), spread over 8 GPUs
    assert out["replaced_s"] - out["clean_s"] == pytest.approx(out["resume_cost_s"] / 8)
    assert out["lease_idle_s"] == 0.0


def test_a_node_away_for_a_while_costs_its_share_and_never_back_costs_more():
    base = Inputs(prompts=800, gpus=8, detect_s=15.0, replace_s=300.0, model_load_s=60.0, lease_s=0.0, **MEASURED)
    out = predict(base)
    assert out["replaced_s"] - out["clean_s"] == pytest.approx((360.0 + out["resume_cost_s"]) / 8)
    slower = predict(dataclasses.replace(base, replace_s=900.0))
    assert out["replaced_s"] < slower["replaced_s"] < slower["not_replaced_s"]
    # a lease longer than the node's absence leaves the restarted actor idle for the difference
    leased = predict(dataclasses.replace(base, lease_s=500.0))
    assert leased["lease_idle_s"] == pytest.approx(140.0)
    assert leased["replaced_s"] - out["replaced_s"] == pytest.approx(140.0 / 8)
