"""Checkpoint reading, key layouts and checked loading into a tiny seeded WanTransformer3DModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from pipeline.errors import WeightsError
from pipeline.weights import (
    detect_layout,
    load_transformer_weights,
    read_state_dict,
    to_diffusers_keys,
    to_original_keys,
)


def _tiny_model(seed: int, num_layers: int = 2) -> WanTransformer3DModel:
    """A ~23k-parameter Wan DiT whose every parameter is drawn from `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=32,
            ffn_dim=32,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # no zero-initialised tensors: every key matters to the output
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def _forward(model: WanTransformer3DModel) -> torch.Tensor:
    """Output [B, C, F, H, W] on a fixed random input: latents [1, 16, 2, 4, 4], text [1, 5, 32]."""
    generator = torch.Generator().manual_seed(123)
    latents = torch.randn(1, 16, 2, 4, 4, generator=generator)
    text = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        return model(latents, timestep=torch.tensor([500]), encoder_hidden_states=text).sample


@pytest.fixture(scope="module")
def source() -> WanTransformer3DModel:
    return _tiny_model(seed=0)


def _original_state(model: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in to_original_keys(model.state_dict()).items()}


def test_original_layout_safetensors_loads_exactly(source: WanTransformer3DModel, tmp_path: Path) -> None:
    path = tmp_path / "wan.safetensors"
    save_file(_original_state(source), str(path))
    target = _tiny_model(seed=1)
    assert not torch.equal(_forward(target), _forward(source))
    load_transformer_weights(target, str(path))
    assert torch.equal(_forward(target), _forward(source))


def test_self_forcing_pt_prefers_generator_ema(source: WanTransformer3DModel, tmp_path: Path) -> None:
    other = _tiny_model(seed=2)
    path = tmp_path / "self_forcing.pt"
    checkpoint = {
        "generator": {f"model.{k}": v for k, v in _original_state(other).items()},
        "generator_ema": {f"model.{k}": v for k, v in _original_state(source).items()},
        "step": 1000,
    }
    torch.save(checkpoint, path)
    target = _tiny_model(seed=1)
    load_transformer_weights(target, path)
    assert torch.equal(_forward(target), _forward(source))
    load_transformer_weights(target, str(path), key="generator")
    assert torch.equal(_forward(target), _forward(other))


def test_generator_without_ema_and_an_in_memory_dict_load(source: WanTransformer3DModel) -> None:
    checkpoint = {"generator": {f"model.{k}": v for k, v in _original_state(source).items()}}
    target = _tiny_model(seed=1)
    load_transformer_weights(target, checkpoint)
    assert torch.equal(_forward(target), _forward(source))


def test_diffusers_layout_passes_through(source: WanTransformer3DModel, tmp_path: Path) -> None:
    path = tmp_path / "diffusers.safetensors"
    save_file(dict(source.state_dict()), str(path))
    assert detect_layout(read_state_dict(str(path))) == "diffusers"
    target = _tiny_model(seed=1)
    load_transformer_weights(target, str(path))
    assert torch.equal(_forward(target), _forward(source))


def test_key_round_trip_is_exact_and_uses_wan_names(source: WanTransformer3DModel) -> None:
    state = source.state_dict()
    original = to_original_keys(state)
    assert detect_layout(original) == "original"
    for name in ("blocks.0.self_attn.q.weight", "blocks.1.cross_attn.o.bias", "blocks.0.ffn.0.weight",
                 "blocks.0.norm3.weight", "blocks.0.modulation", "head.head.weight", "head.modulation",
                 "time_embedding.0.weight", "time_projection.1.bias", "text_embedding.2.weight"):  # fmt: skip
        assert name in original, name
    snapshot = dict(original)
    back = to_diffusers_keys(original)
    assert original == snapshot  # the input is not consumed
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)
    assert to_original_keys(original) == original and to_diffusers_keys(state) == dict(state)


def test_mixed_layouts_are_refused(source: WanTransformer3DModel) -> None:
    state = dict(source.state_dict())
    state["blocks.0.self_attn.q.weight"] = state.pop("blocks.0.attn1.to_q.weight")
    with pytest.raises(WeightsError, match="mixes key layouts"):
        to_diffusers_keys(state)


def test_all_problems_are_reported_in_one_error(source: WanTransformer3DModel) -> None:
    state = _original_state(source)
    del state["blocks.1.self_attn.k.weight"]
    state["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    state["head.head.bias"] = torch.zeros(7)
    target = _tiny_model(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_transformer_weights(target, state)
    message = str(info.value)
    assert "1 missing" in message and "blocks.1.attn1.to_k.weight" in message
    assert "1 unexpected" in message and "blocks.0.attn1.extra.weight" in message
    assert "1 shape mismatch" in message and "proj_out.bias: checkpoint (7,) vs model (64,)" in message
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded


def test_many_missing_keys_are_counted_and_truncated(source: WanTransformer3DModel) -> None:
    deeper = _tiny_model(seed=1, num_layers=3)
    per_block = sum(k.startswith("blocks.2.") for k in deeper.state_dict())
    with pytest.raises(WeightsError, match=rf"{per_block} missing: \['blocks\.2\..*\(\+{per_block - 10} more\)"):
        load_transformer_weights(deeper, _original_state(source))


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[Path]]:
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"generator_ema": {"model.blocks.0.self_attn.q.weight": Payload()}}, path)
    with pytest.raises(WeightsError, match=r"evil\.pt.*weights_only"):
        read_state_dict(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["weights.ckpt", "weights.npz", "weights"])
def test_unknown_suffix_is_refused_naming_the_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"x")
    with pytest.raises(WeightsError, match=f"`path`.*{name}"):
        read_state_dict(str(path))


def test_missing_and_corrupt_files_raise_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"absent\.safetensors.*not a file"):
        read_state_dict(str(tmp_path / "absent.safetensors"))
    for name in ("bad.safetensors", "bad.pt"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
            read_state_dict(str(tmp_path / name))


def test_absent_key_and_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"generator": {"model.a": torch.zeros(1)}}, path)
    with pytest.raises(WeightsError, match=r"`key` 'generator_ema'.*\['generator'\]"):
        read_state_dict(str(path), key="generator_ema")
    torch.save({"a": torch.zeros(1), "step": 3}, path)
    with pytest.raises(WeightsError, match=r"not tensors.*'step'"):
        read_state_dict(str(path))


def test_flat_prefixed_safetensors_select_the_key(source: WanTransformer3DModel, tmp_path: Path) -> None:
    path = tmp_path / "flat.safetensors"
    save_file({f"generator_ema.model.{k}": v for k, v in _original_state(source).items()}, str(path))
    state = read_state_dict(str(path))
    assert set(state) == set(to_original_keys(source.state_dict()))
