"""The pieces of bench/propagation.py that its figure rests on: the noise floor changes only the redrawn chunk's
random draw, and the corruption reaches the committed chunk with and without TokenTrim. No quality claim here."""

from __future__ import annotations

import torch

from bench.propagation import _run, corrupt_tokens
from pipeline.config import RolloutConfig
from pipeline.model.backend import load_backend
from tokentrim import TrimConfig


def test_noise_floor_redraws_one_chunk_and_the_corruption_is_committed():
    backend = load_backend("tiny", with_vae=False)
    config, at, positions = RolloutConfig(num_chunks=5), 3, [1, 7]
    clean = _run(backend, config, [0, 1], None)
    redraw = _run(backend, config, [0, 1], None, redraw=at)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(clean[:at], redraw[:at]))
    assert not torch.equal(clean[at].latents, redraw[at].latents)
    hit = corrupt_tokens(at, positions, 8.0)
    for trim in (None, TrimConfig()):
        records = _run(backend, config, [0, 1], trim, hit)
        committed = records[at].latents  # [B, C, F, h, w]; token 1 is patch (0, 1), token 7 patch (1, 1) of a 4x6 grid
        for i, j in ((0, 1), (1, 1)):
            patch = committed[:, :, :, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2]
            assert float(patch.mean()) > 4.0, trim  # +8 per step on latents of unit scale: the corruption is committed
