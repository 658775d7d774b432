"""Model backends: the causal Wan transformer, its text encoder and its VAE, built from a preset or a folder.

Presets:
- ``tiny``: the same code with small dims and seeded random weights, a locally built tokenizer and text encoder,
  a small VAE. No network, no files; a rollout runs on a CPU in seconds.
- ``canary``: a small trained model shipped as package data (`canary`): 64x64 px, 16 fps, coloured
  shapes moving as their caption says; the same transformer/VAE classes and causal path as Wan.
- ``canary-ctx``: the context canary (`pipeline/model/canary_ctx_weights`): the same grammar and VAE, 1x1x1 patches (64
  tokens per latent frame), trained to carry uncaptioned content forward from its cache (TrimConfig patch_size
  (1, 1, 1)).
- ``wan2.1-1.3b``: the full Wan2.1-T2V-1.3B shapes with seeded random weights (for benchmarks); the text encoder is
  a one-layer stand-in with umT5-XXL's width, since it runs once per prompt.
- a path: a diffusers-format Wan2.1 folder (``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vae/``),
  optionally with a causal generator checkpoint (Self Forcing / Rolling Forcing / original Wan key names).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import InputError
from pipeline.model.causal_wan import CausalWan
from pipeline.model.text import TextEncoder, build_tiny_text_encoder, load_text_encoder
from pipeline.model.vae import StreamingDecoder, build_tiny_vae, load_vae

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

logger = logging.getLogger(__name__)

SPATIAL_SCALE = 8  # pixels per latent pixel (Wan2.1 VAE)
LATENT_CHANNELS = 16
WAN_HEIGHT_PX, WAN_WIDTH_PX = 480, 832  # Wan2.1-T2V-1.3B's output size
WAN_TEXT_LEN = 512  # umT5 prompt tokens Wan2.1 was trained with

TINY_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
    "out_channels": 16, "text_dim": 32, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
}
WAN_1_3B_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}


@dataclass(frozen=True)
class ModelSpec:
    """What a backend is: recorded in outputs and part of the config hash."""

    name: str
    height_px: int
    width_px: int
    text_len: int
    weights: str | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "height_px": self.height_px, "width_px": self.width_px,
                "text_len": self.text_len, "weights": self.weights, "seed": self.seed}


PRESETS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("tiny", height_px=64, width_px=96, text_len=32),
    "canary": ModelSpec("canary", height_px=64, width_px=64, text_len=64),
    "canary-ctx": ModelSpec("canary-ctx", height_px=64, width_px=64, text_len=64),
    "wan2.1-1.3b": ModelSpec("wan2.1-1.3b", height_px=WAN_HEIGHT_PX, width_px=WAN_WIDTH_PX, text_len=WAN_TEXT_LEN),
}
# each preset's transformer patch (t, h, w): one token per patch, TokenTrim's grid (tests check it against the loaded
# transformers); a diffusers folder's is known once it is loaded
PRESET_PATCH_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (1, 2, 2), "canary": (1, 2, 2), "canary-ctx": (1, 1, 1), "wan2.1-1.3b": (1, 2, 2)}


def preset_patch_size(model: str) -> tuple[int, int, int] | None:
    """The transformer patch of preset ``model`` (None: not a preset)."""
    return PRESET_PATCH_SIZES.get(model)


class WanBackend:
    """The model protocol of a rollout: encode prompts once, denoise / commit chunks, decode latents streaming."""

    def __init__(self, spec: ModelSpec, causal: CausalWan, text: TextEncoder, vae: AutoencoderKLWan | None) -> None:
        self.spec, self.causal, self.text, self.vae = spec, causal, text, vae

    @property
    def device(self) -> torch.device:
        return self.causal.device

    @property
    def dtype(self) -> torch.dtype:
        return self.causal.dtype

    def latent_size(self, height_px: int, width_px: int) -> tuple[int, int]:
        """Latent ``(h, w)`` for an output size; both must be multiples of 16 (VAE x patch)."""
        step = SPATIAL_SCALE * self.causal.patch_size[1]
        for name, value in (("height_px", height_px), ("width_px", width_px)):
            if value % step:
                raise InputError(f"`{name}` must be a multiple of {step}, got {value}")
        return height_px // SPATIAL_SCALE, width_px // SPATIAL_SCALE

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``[B, text_len, text_dim]`` embeddings on the transformer's device and dtype."""
        return self.text.encode(prompts, device=self.device, dtype=self.dtype)

    def new_decoder(self) -> StreamingDecoder:
        if self.vae is None:
            raise InputError("this backend was built without a VAE (`with_vae=False`); it cannot decode")
        return StreamingDecoder(self.vae)


def seeded_transformer(config: dict[str, Any], seed: int, device: torch.device | str,
                       dtype: torch.dtype) -> Any:
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**config)
        for param in model.parameters():  # diffusers leaves some weights at zero; give every weight a value
            param.data.normal_(0.0, 0.2 if config["num_layers"] <= 4 else 0.02)
    return _cast(model, device, dtype)


def _cast(model: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """Move a diffusers model, keeping the modules it names in ``_keep_in_fp32_modules`` in float32 (as
    ``from_pretrained(torch_dtype=...)`` does)."""
    model = model.to(device)
    if dtype == torch.float32:
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if keep.isdisjoint(name.split(".")):
            param.data = param.data.to(dtype)
    return model


def _random_wide_text_encoder(text_dim: int, text_len: int, seed: int) -> TextEncoder:
    """The tiny tokenizer with a one-layer umT5 of width ``text_dim`` (a stand-in for benchmarks)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tiny = build_tiny_text_encoder(text_len=text_len, seed=seed)
    config = UMT5Config(vocab_size=tiny.encoder.config.vocab_size, d_model=text_dim, d_kv=64, d_ff=256,
                        num_layers=1, num_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(config).eval()
    return TextEncoder(tiny.tokenizer, encoder, text_len)


def load_backend(model: str = "tiny", *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 weights: str | None = None, seed: int = 0, with_vae: bool = True,
                 text_len: int | None = None, compile: bool = False) -> WanBackend:
    """Build a backend from a preset name (``tiny``, ``canary``, ``wan2.1-1.3b``) or a diffusers-format Wan2.1 folder
    (``text_len``: prompt tokens for a folder's umT5, default `WAN_TEXT_LEN` as Wan was trained; ``compile``:
    compile the transformer blocks on the static path, `CausalWan.compile`)."""
    backend = _load_backend(model, device=device, dtype=dtype, weights=weights, seed=seed, with_vae=with_vae,
                            text_len=text_len)
    if compile:
        backend.causal.compile()
    return backend


def _load_backend(model: str, *, device: torch.device | str, dtype: torch.dtype, weights: str | None, seed: int,
                  with_vae: bool, text_len: int | None) -> WanBackend:
    if model in ("tiny", "wan2.1-1.3b"):
        base = TINY_TRANSFORMER if model == "tiny" else WAN_1_3B_TRANSFORMER
        checkpoint = None
        if weights is not None:  # no diffusers folder: the file's shapes fix the transformer's dims
            from pipeline.model.weights import read_checkpoint, transformer_config_from_checkpoint

            checkpoint = read_checkpoint(weights)
            base = transformer_config_from_checkpoint(checkpoint, base)
        spec = PRESETS[model]
        transformer = seeded_transformer(base, seed, device, dtype)
        if model == "tiny":
            text = build_tiny_text_encoder(text_dim=base["text_dim"], text_len=spec.text_len, seed=seed)
            vae = build_tiny_vae(seed) if with_vae else None
        else:
            text = _random_wide_text_encoder(base["text_dim"], spec.text_len, seed)
            vae = _random_full_vae(seed) if with_vae else None
        if checkpoint is not None:
            from pipeline.model.weights import load_transformer_weights

            load_transformer_weights(transformer, checkpoint)
    elif model in ("canary", "canary-ctx"):
        from pipeline.model.canary import CTX_WEIGHTS_DIR, WEIGHTS_DIR, load_canary

        spec = PRESETS[model]
        folder = CTX_WEIGHTS_DIR if model == "canary-ctx" else WEIGHTS_DIR
        transformer, text, vae, _ = load_canary(folder, with_vae=with_vae)
        transformer = _cast(transformer, device, dtype)
        if weights is not None:
            from pipeline.model.weights import load_transformer_weights

            load_transformer_weights(transformer, weights)
    elif os.path.isdir(model):
        return _load_folder(model, device=device, dtype=dtype, weights=weights, with_vae=with_vae,
                            text_len=text_len or WAN_TEXT_LEN)
    else:
        raise InputError(f"`model` must be 'tiny', 'canary', 'canary-ctx', 'wan2.1-1.3b' or a diffusers Wan2.1 "
                         f"folder, got {model!r}")
    spec = ModelSpec(spec.name, spec.height_px, spec.width_px, spec.text_len, weights, seed)
    text.encoder.to(device)
    if vae is not None:
        vae = _cast(vae, device, dtype)
    return WanBackend(spec, CausalWan(transformer), text, vae)


def _random_full_vae(seed: int) -> Any:
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan().eval()


def _load_folder(folder: str, *, device: torch.device | str, dtype: torch.dtype, weights: str | None,
                 with_vae: bool, text_len: int) -> WanBackend:
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(os.path.join(folder, "transformer"), local_files_only=True)
    if weights is not None:
        from pipeline.model.weights import load_transformer_weights

        load_transformer_weights(transformer, weights)
    transformer = _cast(transformer, device, dtype)
    text = load_text_encoder(folder, text_len=text_len, device=device, dtype=dtype)
    vae = load_vae(folder, device=device, dtype=dtype) if with_vae else None
    spec = ModelSpec(os.path.abspath(folder), height_px=WAN_HEIGHT_PX, width_px=WAN_WIDTH_PX, text_len=text.text_len,
                     weights=weights)
    return WanBackend(spec, CausalWan(transformer), text, vae)
