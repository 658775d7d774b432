"""The canary's shapes, and loading its shipped weights (package data in ``canary_weights/`` next to this module).

The generator is a small diffusers `WanTransformer3DModel` (1x2x2 patches: a 64x64 frame is an 8x8 latent, 16
tokens), the VAE a small `AutoencoderKLWan` (8x spatial, 4x temporal, 16 latent channels, Wan2.2's residual
shortcuts) and the text encoder
the seeded tiny umT5 of `pipeline.model.text`, frozen. The card (``card.json``) records how the weights were trained.
The context canary (``canary-ctx``, `CTX_WEIGHTS_DIR`) is the same with 1x1x1 patches (64 tokens per latent frame),
trained on clips with uncaptioned marks (`canary.marks`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from pipeline.errors import WeightsError
from pipeline.model.text import TextEncoder, build_tiny_text_encoder

logger = logging.getLogger(__name__)

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "canary_weights")
# the context canary (``canary-ctx``): 1x1x1 patches (64 tokens per latent frame), trained with uncaptioned marks
# (`canary.marks`), the VAE of `WEIGHTS_DIR` unchanged
CTX_WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "canary_ctx_weights")
TEXT_LEN = 64  # tokens: the longest caption is 55 bytes + eos
TEXT_DIM = 32
TEXT_SEED = 0
CHUNK_FRAMES = 3  # latent frames per AR chunk

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2), "num_attention_heads": 3, "attention_head_dim": 32, "in_channels": 16,
    "out_channels": 16, "text_dim": TEXT_DIM, "freq_dim": 32, "ffn_dim": 192, "num_layers": 4,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
# is_residual: the parameter-free space/time-to-channel shortcuts of the Wan2.2 VAE (AvgDown3D / DupUp3D) around
# every down and up block; measured: the tiny VAE learns objects faster with them (bench/RESULTS.md, "Canary").
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
    "temperal_downsample": [False, True, True], "is_residual": True,
}


def transformer_config(layers: int | None = None, dim: int | None = None,
                       patch: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """`TRANSFORMER_CONFIG` with ``layers`` blocks, a model width of ``dim`` (heads of 32 channels, FFN 2x) and a
    ``patch`` size."""
    config = dict(TRANSFORMER_CONFIG)
    if patch is not None:
        config["patch_size"] = tuple(patch)
    if layers is not None:
        config["num_layers"] = layers
    if dim is not None:
        if dim % 32:
            raise ValueError(f"`dim` must be a multiple of 32, got {dim}")
        config.update(num_attention_heads=dim // 32, ffn_dim=2 * dim)
    return config


def vae_config(base_dim: int | None = None) -> dict[str, Any]:
    """`VAE_CONFIG` with another ``base_dim``."""
    return {**VAE_CONFIG, **({"base_dim": base_dim} if base_dim is not None else {})}


def build_transformer(seed: int, config: dict[str, Any] | None = None) -> Any:
    from diffusers import WanTransformer3DModel

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in (config or TRANSFORMER_CONFIG).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config)


def build_vae(seed: int, latents_mean: list[float] | None = None, latents_std: list[float] | None = None,
              config: dict[str, Any] | None = None) -> Any:
    from diffusers import AutoencoderKLWan

    extra: dict[str, Any] = {}
    if latents_mean is not None and latents_std is not None:
        extra = {"latents_mean": list(latents_mean), "latents_std": list(latents_std)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**(config or VAE_CONFIG), **extra)


def build_text() -> TextEncoder:
    return build_tiny_text_encoder(text_dim=TEXT_DIM, text_len=TEXT_LEN, seed=TEXT_SEED)


def read_card(folder: str = WEIGHTS_DIR) -> dict[str, Any]:
    path = os.path.join(folder, "card.json")
    if not os.path.isfile(path):
        raise WeightsError(f"no canary card at {path!r}: train one with `python -m canary.train --out DIR`")
    with open(path, encoding="utf-8") as fh:
        card: dict[str, Any] = json.load(fh)
    return card


def _load_state(model: Any, path: str) -> None:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise WeightsError(f"canary weights missing: {path!r}")
    state = {k: v.float() for k, v in load_file(path).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path!r} does not fit the canary model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")


def load_canary(folder: str = WEIGHTS_DIR, with_vae: bool = True) -> tuple[Any, TextEncoder, Any, dict[str, Any]]:
    """``(transformer, text encoder, vae or None, card)`` from a folder holding ``card.json``,
    ``transformer.safetensors`` and ``vae.safetensors`` (default: the shipped weights)."""
    card = read_card(folder)
    transformer = build_transformer(0, card.get("transformer_config"))
    _load_state(transformer, os.path.join(folder, "transformer.safetensors"))
    vae = None
    if with_vae:
        vae = build_vae(0, card["latents_mean"], card["latents_std"], card.get("vae_config"))
        _load_state(vae, os.path.join(folder, "vae.safetensors"))
        vae = vae.eval()
    return transformer.eval(), build_text(), vae, card


@torch.no_grad()
def init_from(transformer: Any, folder: str) -> list[str]:
    """Warm-start ``transformer`` from the generator in ``folder`` (same width and depth, any patch): every tensor of
    the same shape is copied; the patch embedding is summed over the old patch (a token of the new, finer patch
    embeds a flat field as the old one did) and the output projection averaged over the old patch's positions.
    Returns the names adapted that way."""
    from safetensors.torch import load_file

    old = {k: v.float() for k, v in load_file(os.path.join(folder, "transformer.safetensors")).items()}
    state = transformer.state_dict()
    p_old = tuple(read_card(folder)["transformer_config"]["patch_size"])
    positions = p_old[0] * p_old[1] * p_old[2]
    adapted = []
    for name, value in state.items():
        source = old.get(name)
        if source is None:
            raise WeightsError(f"{folder!r} has no {name!r}: not a generator of this shape")
        if source.shape == value.shape:
            value.copy_(source)
        elif name == "patch_embedding.weight":
            value.copy_(source.sum(dim=(2, 3, 4), keepdim=True).expand_as(value) / value[0, 0].numel())
        elif name in ("proj_out.weight", "proj_out.bias"):
            value.copy_(source.view(positions, -1, *source.shape[1:]).mean(dim=0))
        else:
            raise WeightsError(f"{name!r}: {tuple(source.shape)} in {folder!r}, {tuple(value.shape)} here")
        if source.shape != value.shape:
            adapted.append(name)
    return adapted


def save_weights(model: Any, path: str, half: bool = True) -> None:
    """Save a state dict as safetensors (float16 to keep the package small)."""
    from safetensors.torch import save_file

    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
