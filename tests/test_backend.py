"""Backends: a diffusers-format Wan folder loads into the same model the tiny preset builds."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import RolloutConfig
from pipeline.errors import InputError
from pipeline.model.backend import load_backend
from pipeline.model.weights import to_original_keys
from pipeline.rollout.loop import Rollout
from tokentrim import TrimConfig


def _latents(backend, chunks=2):
    rollout = Rollout(backend, RolloutConfig(num_chunks=chunks, height_px=64, width_px=96), ["a boat"], [3],
                      TrimConfig())
    return torch.cat([r.latents for r in rollout], dim=2)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """The tiny preset written as a diffusers-format Wan2.1 folder."""
    tiny = load_backend("tiny")
    root = tmp_path_factory.mktemp("wan")
    tiny.causal.transformer.save_pretrained(root / "transformer")
    tiny.text.encoder.save_pretrained(root / "text_encoder")
    tiny.text.tokenizer.save_pretrained(root / "tokenizer")
    tiny.vae.save_pretrained(root / "vae")
    return tiny, root


def test_diffusers_folder_loads_the_same_model(wan_folder):
    tiny, root = wan_folder
    loaded = load_backend(str(root), text_len=tiny.text.text_len)
    torch.testing.assert_close(_latents(loaded), _latents(tiny), rtol=0, atol=1e-5)
    frames = loaded.new_decoder().decode(_latents(loaded))
    assert frames.shape[2:] == (64, 96, 3)


def test_self_forcing_checkpoint_over_a_folder_replaces_the_generator(wan_folder, tmp_path):
    tiny, root = wan_folder
    other = load_backend("tiny", seed=5)
    state = {"generator_ema": {f"model.{k}": v for k, v in
                               to_original_keys(other.causal.transformer.state_dict()).items()}}
    torch.save(state, tmp_path / "self_forcing.pt")
    loaded = load_backend(str(root), text_len=tiny.text.text_len, weights=str(tmp_path / "self_forcing.pt"))
    reference = load_backend("tiny")  # seed-0 text encoder and VAE, seed-5 generator
    reference.causal.transformer.load_state_dict(other.causal.transformer.state_dict())
    torch.testing.assert_close(_latents(loaded), _latents(reference), rtol=0, atol=1e-5)
    assert not torch.equal(_latents(loaded), _latents(tiny))


def test_unknown_model_is_named():
    with pytest.raises(InputError, match="no-such-model"):
        load_backend("no-such-model")


@pytest.mark.parametrize("model", ["tiny", "canary", "canary-ctx"])
def test_each_presets_patch_size_is_its_transformers(model):
    from pipeline.model.backend import PRESET_PATCH_SIZES, WAN_1_3B_TRANSFORMER

    backend = load_backend(model, device="cpu", with_vae=False)
    assert tuple(backend.causal.patch_size) == PRESET_PATCH_SIZES[model]
    assert tuple(WAN_1_3B_TRANSFORMER["patch_size"]) == PRESET_PATCH_SIZES["wan2.1-1.3b"]
