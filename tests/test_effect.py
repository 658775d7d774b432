"""The effect harness's parts (`canary.effect`, `bench.effect`): the detector's chunk labels on clips whose
artefacts are known, the AUC and the bootstrap against references, the decoder warmed on another run, and the pasted
object through the real canary rollout (first attempt only)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.effect import (
    GLITCH_PX,
    Glitch,
    auc,
    bootstrap,
    foreign_colour,
    glitch_latents,
    judge_chunk,
    judge_video,
    onsets,
    warm_decode,
)
from canary.grammar import COLOURS, ClipSpec
from canary.render import render_clip
from pipeline.model.canary import WEIGHTS_DIR

PROMPT = "a red square moving right on a plain background"
needs_canary = pytest.mark.skipif(not os.path.isfile(os.path.join(WEIGHTS_DIR, "card.json")),
                                  reason="no canary weights")


def _clip(frames: int = 13) -> torch.Tensor:
    return render_clip(ClipSpec("red", "square", "right", "plain", 32.0, 32.0), frames)  # uint8 [T, H, W, 3]


def test_a_true_clip_has_no_artefact_and_each_fault_gets_its_label():
    clip = _clip()
    assert judge_chunk(clip[1:], PROMPT, clip[0]).clean
    vanished = clip.clone()
    vanished[:] = clip[0, 0, 0]  # background only
    assert judge_chunk(vanished[1:], PROMPT).labels["vanish"]
    split = clip.clone()
    split[:, 20:44, 20:44] = torch.tensor([40, 40, 40], dtype=torch.uint8)  # erase the square ...
    split[:, 10:20, 10:20] = torch.tensor(COLOURS["red"], dtype=torch.uint8)  # ... and draw two halves apart
    split[:, 40:50, 40:50] = torch.tensor(COLOURS["red"], dtype=torch.uint8)
    assert judge_chunk(split[1:], PROMPT).labels["split"]
    pasted = clip.clone()
    pasted[:, :GLITCH_PX, :GLITCH_PX] = torch.tensor(COLOURS[foreign_colour("red")], dtype=torch.uint8)
    verdict = judge_chunk(pasted[1:], PROMPT)
    assert verdict.labels["foreign"] and not verdict.labels["wrong_colour"]
    assert verdict.glitch_px == GLITCH_PX * GLITCH_PX
    recoloured = clip.clone()
    red = (clip == torch.tensor(COLOURS["red"], dtype=torch.uint8)).all(dim=-1)
    recoloured[red] = torch.tensor(COLOURS["blue"], dtype=torch.uint8)
    assert judge_chunk(recoloured[1:], PROMPT).labels["wrong_colour"]


def test_onsets_are_the_chunks_where_an_artefact_starts():
    clip = _clip(1 + 4 * 11)  # four chunks of three latent frames
    video = clip.clone()
    video[21:] = clip[0, 0, 0]  # the object is gone from chunk 2 on (frames 21..)
    verdicts = judge_video(video, PROMPT, 4, 3)
    assert [verdicts[c].labels["vanish"] for c in range(4)] == [False, False, True, True]
    assert onsets(verdicts) == {1: False, 2: True, 3: False}
    assert onsets(verdicts, "split") == {1: False, 2: False, 3: False}


@settings(max_examples=30, deadline=None)
@given(pos=st.lists(st.integers(0, 5), min_size=1, max_size=8), neg=st.lists(st.integers(0, 5), min_size=1,
                                                                             max_size=8))
def test_auc_is_the_mann_whitney_probability(pos, neg):
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert auc([float(p) for p in pos], [float(n) for n in neg]) == pytest.approx(sum(pairs) / len(pairs))


def test_bootstrap_interval_holds_the_value_and_is_seeded():
    values = [float(v) for v in np.linspace(0.0, 1.0, 21)]
    stat = lambda units: float(np.median([values[i] for i in units]))  # noqa: E731
    value, low, high = bootstrap(stat, len(values), draws=300)
    assert value == 0.5 and low < 0.5 < high
    assert bootstrap(stat, len(values), draws=300) == (value, low, high)
    assert bootstrap(lambda u: 1.0, 5, draws=50) == (1.0, 1.0, 1.0)


def test_the_glitch_hook_pastes_on_the_first_attempt_only_and_records_it():
    latents = torch.full((2, 16, 2, 2), 7.0)
    hook = Glitch(1, latents)
    x0 = torch.zeros(2, 16, 3, 8, 8)
    assert torch.equal(hook(0, 0, x0), x0)
    pasted = hook(1, 0, x0)
    assert bool((pasted[:, :, :, :2, :2] == 7.0).all()) and float(pasted[:, :, :, 2:].abs().sum()) == 0.0
    assert torch.equal(hook(1, 1, x0), x0)  # a regenerated candidate is clean
    assert sorted(hook.first_x0) == [0, 1] and bool((hook.first_x0[1][:, :, :, :2, :2] == 7.0).all())


@needs_canary
def test_the_pasted_object_shows_in_the_canary_and_a_warm_decoder_forgets_the_run_before():
    from canary.sample import sample_videos
    from pipeline.config import RolloutConfig
    from pipeline.model.backend import load_backend
    from pipeline.rollout.loop import Rollout

    backend = load_backend("canary")
    config = RolloutConfig(num_chunks=3)
    clean, _ = sample_videos(backend, [PROMPT], [5], config=config)
    rollout = Rollout(backend, config, [PROMPT], [5])
    rollout.perturb = Glitch(1, glitch_latents(backend, PROMPT)[None])
    chunks = [record.latents for record in rollout]
    glitched = warm_decode(backend.new_decoder, [], chunks)
    assert judge_video(glitched[0], PROMPT, 3, 3, [1])[1].glitch_px > 100  # the pasted square is seen
    assert judge_video(clean[0], PROMPT, 3, 3, [1])[1].glitch_px < 10
    # chunks 0-1 of another run, then chunk 2: the same frames of chunk 2 as one decoder over that run
    other = Rollout(backend, config, [PROMPT], [6])
    others = [record.latents for record in other]
    warm = warm_decode(backend.new_decoder, others[:2], chunks[2:])
    reference = warm_decode(backend.new_decoder, [], [*others[:2], chunks[2]])
    assert torch.equal(warm, reference)
    assert not torch.equal(warm[:, -12:], glitched[:, -12:])  # the decoder's memory of chunk 1 is in the frames
