"""The drift scores beside the paper's: motion-compensated and background-relative (`tokentrim.summary.drift_score`),
against NumPy references and the properties they are made for; the paper's same-position drift unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrim import TrimConfig, TrimController, drift_score, motion_drift, relative_drift, token_drift

SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def stored(z: torch.Tensor) -> torch.Tensor:
    """The previous summary as the controller keeps it: in 16 bits (the checkpoint stays under 1 MB per chunk)."""
    return z.clamp(-65504.0, 65504.0).to(torch.float16).float()


def _summaries(seed: int, b: int, gh: int, gw: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, gh * gw, d, generator=g), torch.randn(b, gh * gw, d, generator=g)


def motion_reference(z: np.ndarray, z_prev: np.ndarray, gh: int, gw: int, r: int) -> np.ndarray:
    """Explicit loops: for each token the smallest distance to a previous token within r on both axes."""
    b, _, d = z.shape
    cur, prev = z.reshape(b, gh, gw, d).astype(np.float64), z_prev.reshape(b, gh, gw, d).astype(np.float64)
    out = np.empty((b, gh, gw))
    for i in range(b):
        for h in range(gh):
            for w in range(gw):
                out[i, h, w] = min(np.linalg.norm(cur[i, h, w] - prev[i, h + dy, w + dx])
                                   for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                                   if 0 <= h + dy < gh and 0 <= w + dx < gw)
    return out.reshape(b, gh * gw)


@SETTINGS
@given(seed=seeds, b=st.integers(1, 3), gh=st.integers(1, 5), gw=st.integers(1, 5), d=st.integers(1, 6),
       r=st.integers(0, 3))
def test_motion_drift_matches_the_reference(seed, b, gh, gw, d, r):
    z, zp = _summaries(seed, b, gh, gw, d)
    got = motion_drift(z, zp, (gh, gw), r)
    np.testing.assert_allclose(got.numpy(), motion_reference(z.numpy(), zp.numpy(), gh, gw, r), rtol=1e-5, atol=1e-5)
    assert bool((got <= token_drift(z, zp)).all())  # shift (0, 0) is always searched


@SETTINGS
@given(seed=seeds, gh=st.integers(2, 8), gw=st.integers(2, 8), r=st.integers(1, 3), data=st.data())
def test_a_translation_within_the_radius_is_no_motion_drift(seed, gh, gw, r, data):
    """Content moved by (dy, dx), |dy|, |dx| <= r tokens: every token whose content was on the grid before has ~zero
    motion drift, while the paper's same-position drift sees the move."""
    dy = data.draw(st.integers(-min(r, gh - 1), min(r, gh - 1)))
    dx = data.draw(st.integers(-min(r, gw - 1), min(r, gw - 1)))
    prev = torch.randn(2, gh, gw, 5, generator=torch.Generator().manual_seed(seed))
    moved = torch.roll(prev, shifts=(dy, dx), dims=(1, 2))  # moved[h, w] = prev[h - dy, w - dx] (wrapping)
    drift = motion_drift(moved.reshape(2, -1, 5), prev.reshape(2, -1, 5), (gh, gw), r).reshape(2, gh, gw)
    came_from_inside = drift[:, max(0, dy): gh + min(0, dy), max(0, dx): gw + min(0, dx)]
    assert float(came_from_inside.abs().max()) < 1e-6
    if (dy, dx) != (0, 0):
        assert float(token_drift(moved.reshape(2, -1, 5), prev.reshape(2, -1, 5)).max()) > 0.1


@SETTINGS
@given(seed=seeds, b=st.integers(1, 3), n=st.integers(1, 40))
def test_relative_drift_matches_the_reference(seed, b, n):
    drift = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) * 5
    ref = np.stack([np.maximum(0.0, row - np.sort(row)[(n - 1) // 2]) for row in drift.numpy()])
    np.testing.assert_allclose(relative_drift(drift).numpy(), ref, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(seed=seeds, offset=st.floats(0.5, 20.0))
def test_a_change_of_the_whole_chunk_is_no_relative_drift_but_a_local_jump_on_top_is(seed, offset):
    prev = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(seed))
    global_change = prev + offset  # every token moves by the same vector
    assert float(relative_drift(token_drift(global_change, prev)).max()) < 1e-4
    assert float(token_drift(global_change, prev).min()) > 0.5  # the paper's drift sees it everywhere
    jumped = global_change.clone()
    jumped[0, 6] += 10.0
    rel = drift_score(jumped, prev, "relative")
    assert int(rel.argmax()) == 6 and float(rel[0, 6]) > 5.0


@SETTINGS
@given(seed=seeds, b=st.integers(1, 3), gh=st.integers(1, 5), gw=st.integers(1, 5))
def test_same_is_the_papers_drift_bit_for_bit_in_the_controller(seed, b, gh, gw):
    z0, z1 = _summaries(seed, b, gh, gw, 4)
    assert torch.equal(drift_score(z1, z0, "same"), token_drift(z1, z0))
    for grid in (None, (gh, gw)):
        ctl = TrimController(TrimConfig(), b, grid=grid)
        ctl.accept(z0, ctl.judge(z0, 0))
        assert torch.equal(ctl.judge(z1, 0).drift, token_drift(z1, stored(z0)))


def test_the_controller_uses_the_configured_drift_and_needs_the_grid_for_motion():
    z0, z1 = _summaries(3, 2, 4, 4, 6)
    with pytest.raises(ValueError, match="grid"):
        TrimController(TrimConfig(drift="motion"), 2)
    ctl = TrimController(TrimConfig(drift="motion", drift_radius=2), 2, grid=(4, 4))
    ctl.accept(z0, ctl.judge(z0, 0))
    assert torch.equal(ctl.judge(z1, 0).drift, motion_drift(z1, stored(z0), (4, 4), 2))
    with pytest.raises(ValueError, match="grid"):
        motion_drift(z1, z0, (3, 5), 1)
    with pytest.raises(ValueError, match="radius"):
        motion_drift(z1, z0, (4, 4), -1)


@pytest.mark.parametrize("drift", ["motion", "relative"])
def test_the_rollout_judges_with_the_configured_drift_on_its_patch_grid(drift):
    """Through the real rollout (tiny preset): each chunk's severity is the configured drift's, on the latent's patch
    grid, computed from the candidates the rollout showed its perturb hook."""
    from canary.effect import Glitch
    from pipeline.config import RolloutConfig
    from pipeline.model.backend import load_backend
    from pipeline.rollout.loop import Rollout
    from tokentrim import latent_summary, unstable_set

    backend = load_backend("tiny", with_vae=False)
    trim = TrimConfig(drift=drift, drift_radius=1, lam=1e9)  # never prunes: every candidate is the accepted one
    rollout = Rollout(backend, RolloutConfig(num_chunks=3), ["a cat", "a dog"], [1, 2], trim=trim)
    hook = Glitch()  # records each chunk's first x0, pastes nothing
    rollout.perturb = hook
    rows = [record.rows for record in rollout]
    h, w = rollout.latent_hw
    z = [latent_summary(hook.first_x0[c], trim.patch_size) for c in range(3)]
    for c in (1, 2):
        expected = unstable_set(drift_score(z[c], stored(z[c - 1]), drift, (h // 2, w // 2), 1), trim.p)[1]
        got = torch.tensor([row["severity"] for row in rows[c]], dtype=torch.float32)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
