"""The Wan2.1 VAE: streaming decode of latents one AR chunk at a time, frame counts, loaders.

Wan's VAE is causal in time: 1 latent frame decodes to 1 pixel frame, every later latent frame to 4
(`F_px = 1 + 4 * (F_lat - 1)`), and space is scaled by 8. `AutoencoderKLWan._decode` already runs its
decoder one latent frame at a time, carrying a per-conv feature cache (`_feat_map`, indexed through
`_conv_idx`) and passing `first_chunk=True` for frame 0 only; `decode()` clears that cache on every call.
`StreamingDecoder` keeps its own copy of the cache across calls, so decoding chunk after chunk gives
exactly the frames one whole-sequence `decode()` gives.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import WeightsError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

logger = logging.getLogger(__name__)

TEMPORAL_SCALE = 4  # pixel frames per latent frame after the first (Wan2.1 VAE)


def latent_frames_for(pixel_frames: int) -> int:
    """Latent frames for `pixel_frames` pixel frames: `1 + (pixel_frames - 1) / 4`; needs `pixel_frames % 4 == 1`."""
    if isinstance(pixel_frames, bool) or not isinstance(pixel_frames, int) or pixel_frames < 1:
        raise ValueError(f"`pixel_frames` must be a positive int, got {pixel_frames!r}")
    if (pixel_frames - 1) % TEMPORAL_SCALE != 0:
        raise ValueError(f"`pixel_frames` must be 1 + {TEMPORAL_SCALE}k, got {pixel_frames}")
    return 1 + (pixel_frames - 1) // TEMPORAL_SCALE


def pixel_frames_for(latent_frames: int) -> int:
    """Pixel frames decoded from `latent_frames` latent frames: `1 + 4 * (latent_frames - 1)`."""
    if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames < 1:
        raise ValueError(f"`latent_frames` must be a positive int, got {latent_frames!r}")
    return 1 + TEMPORAL_SCALE * (latent_frames - 1)


def denormalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents `[B, z_dim, F, h, w]` -> the VAE's own scale: `latents * std + mean` per channel."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
    return latents * std + mean


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """Pixels `[B, 3, T, H, W]` in [-1, 1] -> uint8 frames `[B, T, H, W, 3]` (clamped, then rounded)."""
    scaled = (video.clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()  # [B, T, H, W, 3]


class StreamingDecoder:
    """Decodes latents one AR chunk at a time with AutoencoderKLWan's causal feature cache.

    Gives exactly the frames a whole-sequence decode gives. Latents are normalised (model space); they
    are denormalised with `vae.config.latents_mean` / `latents_std` here. The cache lives in this
    object (not on the VAE), so other `vae.decode()` calls in between do not disturb a stream.

    Attributes:
        frames_decoded: latent frames decoded since the last `reset()`.
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        if vae.config.patch_size is not None:
            raise ValueError(f"`vae` must be a Wan2.1 VAE without patchify, got patch_size={vae.config.patch_size}")
        self.vae = vae
        self._num_convs = self._count_causal_convs()
        self._feat_map: list[Any] = []
        self.frames_decoded = 0
        self.reset()

    def _count_causal_convs(self) -> int:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        return sum(isinstance(m, WanCausalConv3d) for m in self.vae.decoder.modules())

    def reset(self) -> None:
        """Forget all decoded frames: the next `decode` starts a new video."""
        self._feat_map = [None] * self._num_convs
        self.frames_decoded = 0

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, z_dim, F, h, w]` (the next F frames) -> pixels `[B, 3, T, 8h, 8w]` in [-1, 1].

        `T = 1 + 4 * (F - 1)` on the first call after `reset()`, `4 * F` after.
        """
        if latents.ndim != 5 or latents.shape[1] != self.vae.config.z_dim or latents.shape[2] < 1:
            raise ValueError(
                f"`latents` must be [B, {self.vae.config.z_dim}, F>=1, h, w], got shape {tuple(latents.shape)}"
            )
        param = next(self.vae.parameters())
        z = denormalize_latents(self.vae, latents.to(device=param.device, dtype=param.dtype))
        x = self.vae.post_quant_conv(z)  # [B, z_dim, F, h, w], a 1x1x1 conv: frames stay independent
        outs = []
        for i in range(x.shape[2]):
            conv_idx = [0]  # each decoder call walks the cache from its first conv
            out = self.vae.decoder(
                x[:, :, i : i + 1],
                feat_cache=self._feat_map,
                feat_idx=conv_idx,
                first_chunk=self.frames_decoded == 0,
            )
            outs.append(out)  # [B, 3, 1 or 4, H, W]
            self.frames_decoded += 1
        return torch.cat(outs, dim=2).clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, z_dim, F, h, w]` (the next F frames) -> uint8 frames `[B, T, 8h, 8w, 3]`.

        `T = 1 + 4 * (F - 1)` on the first call after `reset()`, `4 * F` after.
        """
        return to_uint8_frames(self.decode_float(latents))


def build_tiny_vae(seed: int = 0) -> AutoencoderKLWan:
    """A seeded, CPU-sized Wan VAE (base_dim 3, z_dim 16; spatial scale 8, temporal 4) in eval mode; no download.

    The same `seed` gives the same weights in every process; the global RNG is left untouched.
    """
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    return vae.eval()


def load_vae(folder: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """Load `AutoencoderKLWan` from the `vae/` subfolder of a diffusers-format Wan folder (local files only)."""
    from diffusers import AutoencoderKLWan

    path = os.path.join(folder, "vae")
    if not os.path.isdir(path):
        raise WeightsError(f"`folder` {folder!r} has no `vae/` subfolder (looked for {path!r})")
    try:
        vae = AutoencoderKLWan.from_pretrained(path, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot load the VAE from `folder` {folder!r}: {exc}") from exc
    logger.info("loaded VAE from %s (z_dim=%d)", path, vae.config.z_dim)
    return vae.to(device).eval()
