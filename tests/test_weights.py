"""Checkpoint reading, key layouts and checked loading into a tiny seeded WanTransformer3DModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from pipeline.errors import WeightsError
from pipeline.model.weights import (
    detect_layout,
    load_transformer_weights,
    read_checkpoint,
    read_state_dict,
    strip_wrappers,
    to_diffusers_keys,
    to_original_keys,
    transformer_config_from_checkpoint,
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
    assert "1 missing: ['blocks.1.attn1.to_k.weight (file: blocks.1.self_attn.k.weight)']" in message
    assert "1 unexpected: ['blocks.0.attn1.extra.weight (file: blocks.0.self_attn.extra.weight)']" in message
    assert "1 shape mismatch: ['proj_out.bias (file: head.head.bias): checkpoint (7,) vs model (64,)']" in message
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
    with pytest.raises(WeightsError, match=r"evil\.pt.*weights_only.*the global `getattr`, which was refused"):
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
    with pytest.raises(WeightsError, match=r"holds no generator .*top-level keys are \['a', 'step'\]"):
        read_state_dict(str(path))
    torch.save({"a": torch.zeros(1), "generator": {"model.a": torch.zeros(1), "step": 3}}, path)
    with pytest.raises(WeightsError, match=r"not tensors.*'step'"):
        read_state_dict(str(path))


def test_flat_prefixed_safetensors_select_the_key(source: WanTransformer3DModel, tmp_path: Path) -> None:
    path = tmp_path / "flat.safetensors"
    save_file({f"generator_ema.model.{k}": v for k, v in _original_state(source).items()}, str(path))
    state = read_state_dict(str(path))
    assert set(state) == set(to_original_keys(source.state_dict()))


# ---------------------------------------------------------------------------------------------------------------
# Wrapper prefixes (Rolling Forcing saves through FSDP) and the transformer config read from the file


def _wrapped(key: str) -> str:
    """An FSDP + activation-checkpointing + compile style name for an original Wan key."""
    if key.startswith("blocks."):
        index, rest = key.split(".", 2)[1:]
        return f"model._fsdp_wrapped_module._orig_mod.blocks.{index}._checkpoint_wrapped_module.{rest}"
    return f"model._fsdp_wrapped_module.{key}"


def test_strip_wrappers_removes_every_wrapper_segment_only() -> None:
    assert strip_wrappers("_fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.weight") == (
        "blocks.0.ffn.0.weight"
    )
    assert strip_wrappers("module._orig_mod.module.head.head.bias") == "head.head.bias"
    assert strip_wrappers("blocks.0.submodule.weight") == "blocks.0.submodule.weight"  # not a segment


def _tiny_weights(seed: int, **dims: object) -> dict[str, torch.Tensor]:
    """Original-layout weights of a seeded transformer with the tiny preset's config updated by `dims`."""
    from pipeline.model.backend import TINY_TRANSFORMER

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**{**TINY_TRANSFORMER, **dims})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return {k: v.clone() for k, v in to_original_keys(model.state_dict()).items()}


def _rollout_latents(weights: str | None) -> list[torch.Tensor]:
    from pipeline.config import RolloutConfig
    from pipeline.model.backend import load_backend
    from pipeline.rollout.loop import Rollout

    backend = load_backend("tiny", weights=weights, with_vae=False)
    return [r.latents for r in Rollout(backend, RolloutConfig(num_chunks=2), ["a cat"], [3])]


def test_self_forcing_and_rolling_forcing_files_of_the_same_weights_give_the_same_latents(tmp_path: Path) -> None:
    weights = _tiny_weights(seed=7)
    self_forcing, rolling_forcing = tmp_path / "self_forcing.pt", tmp_path / "rolling_forcing.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in weights.items()}, "step": 10}, self_forcing)
    torch.save({"generator": {_wrapped(k): v for k, v in weights.items()}}, rolling_forcing)
    a, b = _rollout_latents(str(self_forcing)), _rollout_latents(str(rolling_forcing))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    preset = _rollout_latents(None)  # guards the comparison: the file's weights are really used
    assert not torch.equal(a[-1], preset[-1])


def test_tiny_preset_takes_its_dims_from_the_file(tmp_path: Path) -> None:
    dims = {"num_layers": 3, "freq_dim": 256, "ffn_dim": 48, "text_dim": 16, "num_attention_heads": 4}
    path = tmp_path / "other_dims.safetensors"
    save_file(_tiny_weights(seed=3, **dims), str(path))
    from pipeline.model.backend import TINY_TRANSFORMER, load_backend

    with pytest.raises(WeightsError, match=r"shape mismatch.*transformer_config_from_checkpoint"):
        load_transformer_weights(_tiny_model(seed=1), str(path))  # the preset's own dims do not fit
    config = transformer_config_from_checkpoint(read_checkpoint(str(path)), TINY_TRANSFORMER)
    assert {k: config[k] for k in dims} == {**dims, "num_attention_heads": 4}
    assert config["attention_head_dim"] == 12 and config["out_channels"] == 16 and config["patch_size"] == (1, 2, 2)
    backend = load_backend("tiny", weights=str(path), with_vae=False)
    loaded = backend.causal.transformer.state_dict()
    want = to_diffusers_keys(_tiny_weights(seed=3, **dims))
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], want[k]) for k in want)
    assert backend.encode_prompts(["a cat"]).shape[-1] == 16


def test_a_width_no_head_split_fits_is_named_with_the_fix(tmp_path: Path) -> None:
    from pipeline.model.backend import TINY_TRANSFORMER

    state = _tiny_weights(seed=3, num_attention_heads=5, attention_head_dim=14)  # width 70: neither 12 nor 128
    with pytest.raises(WeightsError, match=r"`patch_embedding.weight` has width 70.*diffusers folder"):
        transformer_config_from_checkpoint(read_checkpoint(state), TINY_TRANSFORMER)


def test_shape_mismatch_names_stored_and_converted_keys_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "rf.pt"
    state = _tiny_weights(seed=3, freq_dim=64)
    torch.save({"generator": {_wrapped(k): v for k, v in state.items()}}, path)
    with pytest.raises(WeightsError) as info:
        load_transformer_weights(_tiny_model(seed=1), str(path))
    message = str(info.value)
    assert ("condition_embedder.time_embedder.linear_1.weight (file: generator/model._fsdp_wrapped_module."
            "time_embedding.0.weight): checkpoint (24, 64) vs model (24, 32)") in message
    assert "transformer_config_from_checkpoint" in message


def test_a_checkpoint_without_a_generator_lists_its_top_level_keys(tmp_path: Path) -> None:
    path = tmp_path / "trainer.pt"
    torch.save({"model": {"blocks.0.q": torch.zeros(1)}, "optimizer": {"lr": torch.zeros(1)}, "epoch": 3}, path)
    expected = r"no generator \(generator_ema / generator\).*top-level keys are \['epoch', 'model', 'optimizer'\]"
    with pytest.raises(WeightsError, match=expected):
        read_state_dict(str(path))
