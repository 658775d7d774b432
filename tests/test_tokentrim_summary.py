"""latent_summary, token_drift, unstable_set and num_unstable against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrim import latent_summary, num_unstable, token_drift, unstable_set

SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def summary_reference(latents: np.ndarray, p_h: int, p_w: int, mode: str = "mean") -> np.ndarray:
    """[B, C, F, H, W] -> [B, N, D], row-major tokens, by explicit loops over the patch grid: the frame mean of each
    p_h x p_w patch, averaged (mode "mean", D = C) or flattened channel-major (mode "patch", D = C * p_h * p_w)."""
    b, c, _, h, w = latents.shape
    frame_mean = latents.astype(np.float64).mean(axis=2)  # [B, C, H, W]
    tokens = []
    for i in range(h // p_h):
        for j in range(w // p_w):
            patch = frame_mean[:, :, i * p_h:(i + 1) * p_h, j * p_w:(j + 1) * p_w]  # [B, C, p_h, p_w]
            tokens.append(patch.mean(axis=(2, 3)) if mode == "mean" else patch.reshape(b, -1))
    return np.stack(tokens, axis=1)


@SETTINGS
@given(
    seed=seeds,
    b=st.integers(1, 3),
    c=st.integers(1, 5),
    f=st.integers(1, 4),
    h_tokens=st.integers(1, 5),
    w_tokens=st.integers(1, 5),
    p_h=st.integers(1, 3),
    p_w=st.integers(1, 3),
    mode=st.sampled_from(["patch", "mean"]),
)
def test_latent_summary_matches_numpy(
    seed: int, b: int, c: int, f: int, h_tokens: int, w_tokens: int, p_h: int, p_w: int, mode: str
) -> None:
    latents = np.random.default_rng(seed).standard_normal((b, c, f, h_tokens * p_h, w_tokens * p_w))
    z = latent_summary(torch.from_numpy(latents.astype(np.float32)), (1, p_h, p_w), mode)  # type: ignore[arg-type]
    assert z.dtype == torch.float32
    assert z.shape == (b, h_tokens * w_tokens, c * (p_h * p_w if mode == "patch" else 1))
    np.testing.assert_allclose(
        z.numpy(), summary_reference(latents.astype(np.float32), p_h, p_w, mode), rtol=1e-5, atol=1e-6
    )


def test_default_summary_is_the_flattened_patch() -> None:
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    assert latent_summary(latents).shape == (1, 6, 64)  # C * 1 * 2 * 2 values per token, as for Wan
    torch.testing.assert_close(latent_summary(latents), latent_summary(latents, (1, 2, 2), "patch"), rtol=0, atol=0)


def test_a_zero_mean_checkerboard_inside_patches_is_seen_by_the_patch_summary_only() -> None:
    """A +-4 checkerboard inside 2x2 patches averages out per patch: the mean summary cannot see it."""
    from tokentrim import TrimConfig
    from tokentrim.demo import run_demo

    clean = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    board = torch.tensor([[4.0, -4.0], [-4.0, 4.0]]).repeat(4, 4)  # [8, 8], zero mean in every 2x2 patch
    corrupted = clean + board
    mean_drift = token_drift(latent_summary(corrupted, mode="mean"), latent_summary(clean, mode="mean"))
    patch_drift = token_drift(latent_summary(corrupted), latent_summary(clean))
    assert float(mean_drift.max()) < 1e-5
    torch.testing.assert_close(patch_drift, torch.full((1, 16), 4.0 * 8.0), rtol=1e-5, atol=1e-5)  # sqrt(64 * 16)
    for summary, caught in (("patch", True), ("mean", False)):
        rows = run_demo(12, 3, [8], TrimConfig(summary=summary), corrupt_tokens=4, corrupt_scale=4.0,
                        corrupt_kind="checkerboard")
        assert (rows[8]["verdict"] == "pruned") == caught, summary
        if caught:
            assert set(rows[8]["corrupted_positions"]) <= set(rows[8]["pruned_positions"])


def test_latent_summary_tokens_are_row_major_patches() -> None:
    """Fill each 2x2 patch of a 3x4 token grid with its row-major index: token n must read n."""
    h_tokens, w_tokens = 3, 4
    index = torch.arange(h_tokens * w_tokens, dtype=torch.float32).reshape(h_tokens, w_tokens)
    image = index.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)  # [6, 8]
    latents = image.expand(2, 3, 5, 6, 8)  # [B, C, F, H, W]
    expected = torch.arange(h_tokens * w_tokens, dtype=torch.float32)[None, :, None]
    torch.testing.assert_close(latent_summary(latents, (1, 2, 2), "mean"), expected.expand(2, -1, 3), rtol=0, atol=0)
    torch.testing.assert_close(latent_summary(latents, (1, 2, 2)), expected.expand(2, -1, 12), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_latent_summary_accepts_any_float_dtype_and_returns_float32(dtype: torch.dtype) -> None:
    latents = torch.randn(2, 4, 3, 8, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    z = latent_summary(latents)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, latent_summary(latents.float()), rtol=0, atol=0)


def test_latent_summary_rejects_indivisible_size_naming_latents_and_shape() -> None:
    with pytest.raises(ValueError, match=r"`latents`.*\(1, 4, 3, 7, 8\)"):
        latent_summary(torch.zeros(1, 4, 3, 7, 8))


def test_latent_summary_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="`latents`"):
        latent_summary(torch.zeros(4, 3, 8, 8))
    with pytest.raises(TypeError, match="`latents`"):
        latent_summary(torch.zeros(1, 4, 3, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="`latents`"):
        latent_summary(np.zeros((1, 4, 3, 8, 8)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`patch_size`"):
        latent_summary(torch.zeros(1, 4, 3, 8, 8), (1, 0, 2))


@SETTINGS
@given(seed=seeds, b=st.integers(1, 3), n=st.integers(1, 40), d=st.integers(1, 8))
def test_token_drift_matches_numpy(seed: int, b: int, n: int, d: int) -> None:
    rng = np.random.default_rng(seed)
    z, z_prev = rng.standard_normal((2, b, n, d)).astype(np.float32)
    drift = token_drift(torch.from_numpy(z), torch.from_numpy(z_prev))
    assert drift.shape == (b, n) and drift.dtype == torch.float32
    expected = np.sqrt(((z.astype(np.float64) - z_prev) ** 2).sum(axis=-1))
    np.testing.assert_allclose(drift.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_token_drift_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="`z`"):
        token_drift(torch.zeros(1, 4, 2), torch.zeros(1, 5, 2))


@SETTINGS
@given(seed=seeds, b=st.integers(1, 4), n=st.integers(1, 60), p=st.floats(0.01, 1.0))
def test_unstable_set_matches_numpy_top_k(seed: int, b: int, n: int, p: float) -> None:
    rng = np.random.default_rng(seed)
    # Distinct values (a scaled permutation plus a small offset), so the top-k set is unique.
    drift = np.stack([rng.permutation(n) for _ in range(b)]).astype(np.float32) * 0.5 + 0.25
    positions, severity = unstable_set(torch.from_numpy(drift), p)
    k = num_unstable(n, p)
    expected = np.sort(np.argsort(-drift, axis=1)[:, :k], axis=1)
    assert positions.dtype == torch.long and positions.shape == (b, k)
    np.testing.assert_array_equal(positions.numpy(), expected)
    np.testing.assert_allclose(severity.numpy(), np.take_along_axis(drift, expected, 1).mean(axis=1), rtol=1e-6)


@SETTINGS
@given(seed=seeds, n=st.integers(2, 40), p=st.floats(0.01, 1.0))
def test_unstable_set_with_ties_picks_top_values(seed: int, n: int, p: float) -> None:
    drift = np.random.default_rng(seed).integers(0, 4, size=(2, n)).astype(np.float32)  # many ties
    positions, severity = unstable_set(torch.from_numpy(drift), p)
    k = num_unstable(n, p)
    chosen = np.take_along_axis(drift, positions.numpy(), 1)
    assert (np.diff(positions.numpy(), axis=1) > 0).all()  # ascending and distinct
    np.testing.assert_array_equal(np.sort(chosen, axis=1), np.sort(drift, axis=1)[:, n - k :])
    np.testing.assert_allclose(severity.numpy(), chosen.mean(axis=1), rtol=1e-6)


@given(n=st.integers(1, 10_000), p=st.floats(1e-4, 1.0))
@settings(max_examples=200, deadline=None)
def test_num_unstable_is_ceil_p_n(n: int, p: float) -> None:
    k = num_unstable(n, p)
    assert 1 <= k <= n
    assert k >= p * n - 1e-6 and k - 1 < p * n + 1e-6  # k = ceil(p n) up to float rounding of p * n


def test_num_unstable_is_exact_on_round_products() -> None:
    # 0.07 * 100 = 7.000000000000001 in floating point; the set must still have 7 tokens.
    assert num_unstable(100, 0.07) == 7
    assert num_unstable(150, 0.14) == 21
    assert num_unstable(1560, 0.1) == 156
    assert num_unstable(7, 1.0) == 7


def test_num_unstable_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`p`"):
        num_unstable(10, 0.0)
    with pytest.raises(ValueError, match="`num_tokens`"):
        num_unstable(0, 0.5)
