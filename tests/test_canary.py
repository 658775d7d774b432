"""The canary: grammar, detector, training forward (against the cached causal model), and the shipped model.

The trained-model tests render through `load_backend("canary")` and the real rollout; the detector they use is
checked on ground-truth clips of every colour x shape x motion first, so a detector bug cannot pass them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from canary import grammar
from canary.detect import canary_metrics, detect
from canary.grammar import COLOURS, MOTIONS, SHAPES, caption, parse_caption, sample_spec
from canary.masked import install, masked_forward
from canary.render import render_clip
from canary.sequence import Sequence, build_sequence
from pipeline.model.canary import CHUNK_FRAMES, WEIGHTS_DIR, build_transformer
from pipeline.model.causal_wan import CausalWan

HAVE_WEIGHTS = os.path.isfile(os.path.join(WEIGHTS_DIR, "card.json"))
PASS_RATE = 0.9  # issue 11: the named colour and motion in >= 90% of seeds
MIN_PSNR_DB = 26.0  # measured 28.5 dB on the shipped VAE (card.json)


# ------------------------------------------------------------------------------------------------ grammar + data
def test_caption_round_trip_covers_the_grammar():
    seen = set()
    for colour in COLOURS:
        for shape in SHAPES:
            for motion in MOTIONS:
                for bg in grammar.BACKGROUNDS:
                    text = caption(colour, shape, motion, bg)
                    assert parse_caption(text) == (colour, shape, motion, bg)
                    seen.add(text)
    assert len(seen) == grammar.grammar_size() == 120
    assert caption("red", "circle", "right") == "a red circle moving right on a plain background"
    with pytest.raises(ValueError, match="colour"):
        parse_caption("a purple circle moving right")
    with pytest.raises(ValueError, match="grammar"):
        parse_caption("a cat surfing a wave")


def test_clips_are_a_pure_function_of_the_seed():
    a, b, c = (render_clip(sample_spec(s), 9) for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (9, 64, 64, 3) and a.dtype == torch.uint8
    # a later start continues the same clip
    assert torch.equal(render_clip(sample_spec(5), 4, start=5), a[5:])


@pytest.mark.parametrize("motion", MOTIONS)
def test_detector_reads_ground_truth_of_every_combination(motion):
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(2):
                spec = sample_spec(100 + k, colour, shape, motion, grammar.BACKGROUNDS[k])
                found = detect(render_clip(spec, 57), colour)
                assert (found.colour, found.motion) == (colour, motion), spec


def test_detector_rejects_wrong_motion_and_colour():
    spec = sample_spec(3, "red", "square", "right")
    frames = render_clip(spec, 57)
    assert detect(frames.flip(2), "red").motion == "left"  # mirrored clip moves the other way
    assert detect(frames[:1].expand(57, -1, -1, -1), "red").motion == "static"
    assert detect(frames, "blue").motion == "none"  # no blue object at all
    grey = torch.full_like(frames, 40)
    assert detect(grey, "red").colour is None


def test_canary_metrics_on_ground_truth_and_on_damage():
    spec = sample_spec(11, "green", "circle", "down", "striped")
    frames = render_clip(spec, 33)
    m = canary_metrics(frames, "green", "circle", "down", "striped")
    assert torch.allclose(m["objects"], torch.ones(33))
    assert float(m["background_err"].max()) < 1.0
    assert 0.9 < float(m["mass_ratio"].mean()) < 1.1
    assert float(m["traj_err"].median()) < 0.2
    damaged = frames.clone()
    damaged[:, :8, :8] = torch.tensor([225, 40, 40], dtype=torch.uint8)  # a second (red) object
    grey = (frames.amax(dim=-1) - frames.amin(dim=-1)) < 30
    band = torch.zeros_like(grey)
    band[:, 40:] = True
    damaged[grey & band] = 200  # a washed-out background band (the object itself left intact)
    m2 = canary_metrics(damaged, "green", "circle", "down", "striped")
    assert float(m2["objects"].min()) >= 2
    assert float(m2["background_err"].mean()) > 20


# ------------------------------------------------------------------------- training forward == cached rollout
def _random_transformer():
    model = build_transformer(0)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for p in model.parameters():
            p.data.normal_(0.0, 0.1)
    return model.eval()


def _sequence(x0, noisy, levels, visible_chunks):
    n = x0.shape[2] // CHUNK_FRAMES
    frame_levels = torch.cat([torch.zeros(1, 3 * n), torch.tensor(levels).repeat_interleave(3)[None]], dim=1)
    vis = torch.tensor(visible_chunks, dtype=torch.bool).repeat_interleave(3, 0).repeat_interleave(3, 1)[None]
    return Sequence(torch.cat([x0, noisy], dim=2), frame_levels, vis, torch.zeros_like(x0),
                    torch.cat([torch.arange(3 * n), torch.arange(3 * n)]))


def test_masked_training_forward_equals_the_cached_self_forcing_and_rolling_passes():
    torch.manual_seed(0)
    model = _random_transformer()
    x0, noisy = torch.randn(1, 16, 9, 8, 8), torch.randn(1, 16, 9, 8, 8)
    text = torch.randn(1, 64, 32)
    # chunks: clean 0..2, noisy 0..2. Noisy 0 and 1 self-forcing; noisy 2 alone in a window after clean 0..1
    T, F_ = True, False
    visible = [[T, F_, F_, F_, F_, F_], [T, T, F_, F_, F_, F_], [T, T, T, F_, F_, F_],
               [F_, F_, F_, T, F_, F_], [T, F_, F_, F_, T, F_], [T, T, F_, F_, F_, T]]
    levels = [937.5, 833.3, 625.0]
    import copy

    trained = copy.deepcopy(model)
    state = install(trained)
    with torch.no_grad():
        full = masked_forward(trained, state, _sequence(x0, noisy, levels, visible), text)[:, :, 9:]
    causal = CausalWan(model)
    cache = causal.new_cache(1, 8, 8)
    outs = []
    for c in range(3):
        sl = slice(3 * c, 3 * c + 3)
        outs.append(causal.denoise(noisy[:, :, sl], torch.tensor([levels[c]]), text, cache, 3 * c))
        causal.commit(x0[:, :, sl], text, cache, 3 * c)
    torch.testing.assert_close(full, torch.cat(outs, dim=2), atol=2e-5, rtol=1e-4)
    # rolling: noisy chunks 1..2 as one window (staggered levels) after clean chunk 0
    visible[4] = [T, F_, F_, F_, T, T]
    visible[5] = [T, F_, F_, F_, T, T]
    with torch.no_grad():
        full = masked_forward(trained, state, _sequence(x0, noisy, levels, visible), text)[:, :, 12:]
    cache = causal.new_cache(1, 8, 8)
    causal.commit(x0[:, :, :3], text, cache, 0)
    frame_levels = torch.tensor(levels[1:]).repeat_interleave(3)[None]
    window = causal.denoise(noisy[:, :, 3:], frame_levels, text, cache, 3)
    torch.testing.assert_close(full, window, atol=2e-5, rtol=1e-4)


def test_build_sequence_masks_and_levels():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 16, 15, 8, 8)
    seq = build_sequence(x0, CHUNK_FRAMES, gen, rolling_fraction=0.5)
    frames = 15
    assert seq.latents.shape == (64, 16, 30, 8, 8)
    assert torch.equal(seq.latents[:, :, :frames], x0)
    assert bool((seq.frame_levels[:, :frames] == 0).all())
    vis = seq.visible
    # clean frames never see noisy frames; nothing sees a later chunk's clean frames
    assert not bool(vis[:, :frames, frames:].any())
    for i in range(frames):
        assert not bool(vis[:, i, (i // 3 + 1) * 3:frames].any())
        assert not bool(vis[:, frames + i, (i // 3) * 3:frames].any())  # a noisy chunk sees only earlier clean
    # the target is the flow noise - x0 of the noisy half
    sigma = (seq.frame_levels[:, frames:] / 1000)[:, None, :, None, None]
    noise = seq.target + x0
    torch.testing.assert_close(seq.latents[:, :, frames:], (1 - sigma) * x0 + sigma * noise)
    used = set(seq.frame_levels[:, frames:].flatten().tolist())
    from canary.sequence import schedules

    sf, rf = (set(torch.tensor(s, dtype=torch.float32).tolist()) for s in schedules())
    assert used <= sf | rf and used & rf and used & sf


# ---------------------------------------------------------------------------------------- the shipped model
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="no shipped canary weights")


@needs_weights
def test_card_records_training():
    with open(os.path.join(WEIGHTS_DIR, "card.json"), encoding="utf-8") as fh:
        card = json.load(fh)
    for key in ("commands", "git_commit", "seed", "gen_steps", "vae_steps", "final_generator_loss",
                "final_vae_loss", "trained_horizon", "vae_psnr_db_held_out"):
        assert key in card, key
    size = sum(os.path.getsize(os.path.join(WEIGHTS_DIR, f)) for f in os.listdir(WEIGHTS_DIR))
    assert size <= 20 * 2**20


@pytest.fixture(scope="module")
def canary_backend():
    from pipeline.model.backend import load_backend

    return load_backend("canary")


@needs_weights
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["self-forcing", "rolling-forcing"])
def test_canary_renders_the_named_colour_and_motion(canary_backend, mode):
    """Within the trained horizon, the detector finds the named colour moving the named way in >= 90% of renders:
    every colour x motion twice (shapes and backgrounds rotating so every colour meets every shape), seeds the
    training never used for sampling."""
    from canary.evaluate import pass_rate
    from pipeline.model.canary import read_card

    horizon = read_card()["trained_horizon"]["chunks"]
    rate, misses = pass_rate(canary_backend, mode=mode, num_chunks=horizon, seeds_per_combo=2, first_seed=7)
    assert rate >= PASS_RATE, f"{mode}: pass rate {rate:.2f}; misses: {misses}"


@needs_weights
def test_vae_reconstructs_held_out_clips(canary_backend):
    from canary.train_vae import held_out_psnr

    psnr = held_out_psnr(canary_backend.vae)
    with open(os.path.join(WEIGHTS_DIR, "card.json"), encoding="utf-8") as fh:
        card = json.load(fh)
    assert psnr == pytest.approx(card["vae_psnr_db_held_out"], abs=0.05)
    assert psnr >= MIN_PSNR_DB


@needs_weights
def test_canary_preset_goes_through_the_causal_backend(canary_backend):
    from pipeline.model.attention import CachedSelfAttention
    from pipeline.model.backend import PRESETS

    assert canary_backend.spec == PRESETS["canary"]
    assert all(isinstance(b.attn1.processor, CachedSelfAttention) for b in canary_backend.causal.transformer.blocks)
    assert canary_backend.latent_size(64, 64) == (8, 8)


def test_training_curves_are_an_svg_with_every_curve_named(tmp_path):
    import xml.etree.ElementTree as ET

    from canary.sample import write_svg_curves

    path = tmp_path / "loss.svg"
    write_svg_curves(str(path), {"vae": [1.0, 0.5, 0.25], "generator": [2.0, 1.0]}, "loss", log_y=True)
    text = path.read_text()
    assert ET.fromstring(text).tag.endswith("svg")
    assert all(name in text for name in ("loss", "vae", "generator"))
