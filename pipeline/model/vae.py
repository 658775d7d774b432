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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import WeightsError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

logger = logging.getLogger(__name__)

TEMPORAL_SCALE = 4  # pixel frames per latent frame after the first (Wan2.1 VAE)


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
        param = next(self.vae.decoder.parameters())
        z = denormalize_latents(self.vae, latents.to(device=param.device, dtype=param.dtype))
        x = self.vae.post_quant_conv(z)  # [B, z_dim, F, h, w], a 1x1x1 conv: frames stay independent
        if _channels_last(self.vae):
            x = x.contiguous(memory_format=torch.channels_last_3d)
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


def speed_up_vae(vae: AutoencoderKLWan, *, dtype: torch.dtype | None = None, channels_last: bool = False
                 ) -> AutoencoderKLWan:
    """Convert ``vae`` in place for faster decoding, once per backend: its weights to ``dtype`` (e.g. bfloat16;
    None: unchanged) and its decoder's 3D convolutions to channels-last (``torch.channels_last_3d``), which
    cuDNN runs faster on recent GPUs. A `StreamingDecoder` follows both (it casts latents to the decoder's dtype and
    lays them out as its weights are)."""
    if dtype is not None:
        torch.nn.Module.to(vae, dtype=dtype)  # every module: the Wan VAE keeps none in float32
    if channels_last:
        for module in vae.decoder.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return vae


def _channels_last(vae: AutoencoderKLWan) -> bool:
    weight = vae.decoder.conv_in.weight
    return weight.shape[1] > 1 and weight.is_contiguous(memory_format=torch.channels_last_3d)


@dataclass
class PendingFrames:
    """A chunk's decode in flight: `result` gives uint8 frames ``[B, T, H, W, 3]`` on the host."""

    frames: torch.Tensor
    done: Any = None  # a torch.cuda.Event recorded after the copy to the host; None: already complete

    def result(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.frames


class StreamDecoder:
    """Decodes each chunk on its own CUDA stream, so it overlaps the next chunk's denoising on the main stream.

    `submit` queues the decode behind the work already queued on the current stream (the chunk's latents are
    ready by then) and a copy of the frames to pinned host memory, and returns at once; `PendingFrames.result`
    waits for that chunk only. On a CPU (or with ``overlap=False``) `submit` decodes in the caller, exactly as
    `StreamingDecoder.decode` does."""

    def __init__(self, decoder: StreamingDecoder, *, overlap: bool = True) -> None:
        self.decoder = decoder
        device = next(decoder.vae.parameters()).device
        self.stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def submit(self, latents: torch.Tensor) -> PendingFrames:
        """Normalised latents ``[B, z_dim, F, h, w]`` (the next F frames) -> their frames, in flight."""
        if self.stream is None:
            return PendingFrames(self.decoder.decode(latents).cpu())
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            frames = self.decoder.decode(latents)
            host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        latents.record_stream(self.stream)  # the main stream's allocator must not reuse it before the decode ran
        return PendingFrames(host, done)


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
