"""The context canary (``--model canary-ctx``): its uncaptioned marks (`canary.marks`), the warm start from
the canary, and the shipped weights (64 tokens per latent frame; the named object rendered; a mark pasted into a
committed chunk carried on by the model)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from canary.data import clip_seed, pixel_batch
from canary.detect import colour_masks, detect
from canary.grammar import COLOURS, caption, sample_spec
from canary.marks import (
    MARK_MAX,
    MARK_MIN,
    Mark,
    entry_frame,
    entry_mask,
    mark_cover,
    paint_marks,
    sample_marks,
)
from canary.render import render_clip
from pipeline.model.canary import CTX_WEIGHTS_DIR, WEIGHTS_DIR, build_transformer, init_from, transformer_config


def _marks(n: int = 200, chunks: int = 3) -> list[tuple[int, str, bool, list[Mark]]]:
    out = []
    for k in range(n):
        named = list(COLOURS)[k % len(COLOURS)]
        anchored = k % 2 == 0
        out.append((k, named, anchored, sample_marks(clip_seed(4, k), named, chunks, anchored)))
    return out


def test_marks_are_seeded_uncaptioned_and_never_in_an_anchored_first_chunk():
    drawn = _marks()
    assert [m for *_, m in drawn] == [m for *_, m in _marks()]  # a pure function of the seed
    counts = {0: 0, 1: 0, 2: 0}
    entries = set()
    for _, named, anchored, marks in drawn:
        counts[len(marks)] += 1
        assert len({m.colour for m in marks}) == len(marks)  # two marks never share a colour
        for m in marks:
            assert m.colour != named and MARK_MIN <= m.side <= MARK_MAX and 0 <= m.chunk < 3
            assert not (anchored and m.chunk == 0)
            entries.add((anchored, m.chunk))
        if not anchored:
            assert marks  # a free clip always carries content
    assert all(counts.values())  # clips with none, one and two marks
    assert entries == {(True, 1), (True, 2), (False, 0), (False, 1), (False, 2)}


def test_marks_are_painted_under_the_object_from_their_entry_chunk():
    spec = sample_spec(3, colour="red", shape="square", motion="right", background="striped")
    mark = Mark("blue", 30, 24, 12, chunk=1)  # the square (x 22..42, y 22..42 at frame 0) covers part of it
    clean = render_clip(spec, 13)
    painted = paint_marks(clean, [mark], chunk_frames=3)
    first = entry_frame(1, 3)
    assert first == 9
    assert torch.equal(painted[:first], clean[:first])  # not before its chunk
    blue = colour_masks(painted)["blue"]
    assert int(blue[:first].sum()) == 0
    cover = mark_cover(mark)
    red = colour_masks(clean)["red"]
    for t in range(first, 13):
        assert torch.equal(painted[t][red[t]], clean[t][red[t]])  # the object stays in front
        assert bool(blue[t][cover & ~red[t]].all())
    changed = (painted != clean).any(dim=-1)
    assert not bool(changed[:, ~cover].any())  # nothing outside the mark
    # pixel_batch paints the same marks
    x = pixel_batch([spec], 13, marks=[[mark]], chunk_frames=3)
    ref = painted.float() / 127.5 - 1.0
    torch.testing.assert_close(x[0], ref.permute(3, 0, 1, 2))


def test_entry_mask_leaves_out_only_the_entry_chunk_cells():
    mark = Mark("green", 60, 0, 8, chunk=2)  # wraps: columns 60..67 -> 60..63, 0..3
    keep = entry_mask([mark], 9, 3)
    assert keep.shape == (1, 9, 8, 8)
    assert bool((keep[:, :6] == 1).all()) and bool((keep[:, 6:] == keep[:, 6:7]).all())
    dropped = keep[0, 6] == 0
    # cells of the mark (row 0, columns 7 and 0) and their neighbours on the torus
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for r in (7, 0, 1):
        for c in (6, 7, 0, 1):
            expected[r, c] = True
    assert torch.equal(dropped, expected)
    with pytest.raises(ValueError, match="side"):
        Mark("green", 0, 0, 4)
    with pytest.raises(ValueError, match="colour"):
        Mark("purple", 0, 0, 8)


def test_init_from_embeds_a_flat_field_as_the_coarse_patch_did():
    fine = build_transformer(1, transformer_config(4, 96, (1, 1, 1)))
    adapted = init_from(fine, WEIGHTS_DIR)
    assert sorted(adapted) == ["patch_embedding.weight", "proj_out.bias", "proj_out.weight"]
    coarse = build_transformer(1, transformer_config(4, 96, (1, 2, 2)))
    init_from(coarse, WEIGHTS_DIR)
    z = torch.randn(1, 16, 1, 1, 1).expand(1, 16, 3, 8, 8)  # flat in space
    with torch.no_grad():
        a, b = fine.patch_embedding(z), coarse.patch_embedding(z)  # [1, 96, 3, 8, 8], [1, 96, 3, 4, 4]
    torch.testing.assert_close(a[..., ::2, ::2], b, atol=1e-5, rtol=1e-4)


def test_glitch_tokens_and_probe_tokens_follow_the_patch():
    from canary.effect import glitch_tokens
    from pipeline.rollout.probe import add_to_tokens

    assert glitch_tokens((1, 2, 2), 8) == [0]
    assert glitch_tokens((1, 1, 1), 8) == [0, 1, 8, 9]  # the 2x2 latent cells the glitch pastes
    x0 = torch.zeros(1, 2, 3, 8, 8)
    assert torch.equal(add_to_tokens(x0, [9], 1.0, (1, 1, 1)).nonzero()[:, 3:].unique(dim=0), torch.tensor([[1, 1]]))
    coarse = add_to_tokens(x0, [5], 1.0, (1, 2, 2))  # default 1x2x2: token 5 of the 4x4 grid = cells (2..3, 2..3)
    assert torch.equal(coarse.nonzero()[:, 3:].unique(dim=0), torch.tensor([[2, 2], [2, 3], [3, 2], [3, 3]]))


# ---------------------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def ctx_backend():
    from pipeline.model.backend import load_backend

    return load_backend("canary-ctx")


def test_ctx_card_and_size():
    with open(os.path.join(CTX_WEIGHTS_DIR, "card.json"), encoding="utf-8") as fh:
        card = json.load(fh)
    assert card["name"] == "canary-ctx" and card["marks"] is True
    assert card["transformer_config"]["patch_size"] == [1, 1, 1]
    assert any("--marks" in c and "--patch 1,1,1" in c for c in card["commands"])
    size = sum(os.path.getsize(os.path.join(CTX_WEIGHTS_DIR, f)) for f in os.listdir(CTX_WEIGHTS_DIR))
    assert size <= 20 * 2**20
    # the VAE is the canary's, unchanged
    with open(os.path.join(CTX_WEIGHTS_DIR, "vae.safetensors"), "rb") as a, \
            open(os.path.join(WEIGHTS_DIR, "vae.safetensors"), "rb") as b:
        assert a.read() == b.read()


def test_ctx_renders_the_named_colour_with_64_tokens_per_frame_and_carries_a_pasted_mark(ctx_backend):
    """One prompt, 5 chunks: 64 tokens per latent frame; the named colour moving the named way over the trained
    horizon (chunks 0-2, before the paste); a square of another colour pasted into chunk 3's first attempt (as
    `bench.effect` does) is still drawn by the model in chunk 4. The shipped `canary` leaves 28-45 px of it there
    (the VAE decoder's carry-over, gone by chunk 5); this model keeps the square (~256 px)."""
    from canary.effect import Glitch, chunk_span, foreign_colour, glitch_latents
    from pipeline.config import RolloutConfig
    from pipeline.rollout.loop import Rollout

    assert tuple(ctx_backend.causal.patch_size) == (1, 1, 1)
    assert ctx_backend.latent_size(64, 64) == (8, 8)  # 8 x 8 = 64 tokens per latent frame
    prompt = caption("red", "circle", "right")
    rollout = Rollout(ctx_backend, RolloutConfig(mode="self-forcing", num_chunks=5), [prompt], [0])
    rollout.perturb = Glitch(3, glitch_latents(ctx_backend, prompt)[None])
    decoder = ctx_backend.new_decoder()
    with torch.no_grad():
        frames = torch.cat([decoder.decode(r.latents) for r in rollout], dim=1)[0]
    found = detect(frames[:chunk_span(2, 3)[1]], "red")
    assert (found.colour, found.motion) == ("red", "right")
    lo, hi = chunk_span(4, 3)
    pasted = colour_masks(frames[lo:hi])[foreign_colour("red")][:, :24, :24].float().sum(dim=(1, 2))
    assert float(pasted.mean()) >= 100.0, pasted.tolist()


def test_render_takes_the_context_canarys_token_grid_without_being_told(tmp_path):
    """`tokentrim render --model canary-ctx` judges on the model's 1x1x1 grid (no --patch-size needed); an explicit
    grid that is not the model's is refused with one line."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from jobs.cli import main

    prompt = caption("red", "square", "right", "plain")
    args = ["render", prompt, "--model", "canary-ctx", "--num-chunks", "4", "--id", "c"]
    done = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    stats = pq.read_table(tmp_path / "a" / "c.stats.parquet").to_pylist()
    assert [r["verdict"] for r in stats][:3] == ["warmup"] * 3 and stats[3]["verdict"] in ("accepted", "pruned")
    refused = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--patch-size", "1", "4", "4"])
    assert refused.exit_code != 0 and "patch_size" in refused.output + str(refused.exception)
