"""The threshold targets of DESIGN §2 at the defaults, over many seeded synthetic sequences (bench/threshold_sweep.py).

Clean stationary latent sequences (AR(1) latents with three correlation times and two jitter levels): at most 5% of
judged chunks pruned. Injected corruptions of four kinds (offsets, zero-mean checkerboards inside patches, single
tokens, whole regions): at least 95% pruned on their first candidate with the unstable set covering them. The seed
blocks are fixed, so the test is deterministic; each block is 64 independent sequences per kind.
"""

from __future__ import annotations

import pytest

from bench.threshold_sweep import KINDS, stationary_rates
from tokentrim import TrimConfig


@pytest.mark.parametrize("first_seed", [1000, 5000])
def test_defaults_meet_the_targets_on_stationary_sequences(first_seed: int) -> None:
    rates = stationary_rates(TrimConfig(), range(first_seed, first_seed + 64))
    assert rates["clean"] <= 0.05, rates
    assert all(rates[kind] >= 0.95 for kind in KINDS), rates


def test_the_targets_can_fail() -> None:
    """Guards the test itself: a low lambda without the floor prunes clean chunks too often, a high floor misses
    offsets, and the patch-mean summary misses the checkerboard."""
    seeds = range(1000, 1064)
    assert stationary_rates(TrimConfig(lam=1.0, sigma_floor=0.0), seeds, ["clean"])["clean"] > 0.05
    assert stationary_rates(TrimConfig(sigma_floor=0.3), seeds, ["offset"])["offset"] < 0.95
    assert stationary_rates(TrimConfig(summary="mean"), seeds, ["checkerboard"])["checkerboard"] < 0.5
