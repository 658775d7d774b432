"""Stage 1: train the canary VAE (`AutoencoderKLWan`) on short clips; measure PSNR on held-out clips.

Loss: L1 + MSE of the reconstruction, weighted up on saturated (object) pixels, plus a small penalty on the
latent mean's magnitude; the decoder sees the posterior mean plus a little fixed noise, so it tolerates the small
errors a generator makes. Latents are normalised per channel afterwards (`latent_stats`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.canary.data import clip_seed, held_out_specs, pixel_batch
from pipeline.canary.grammar import SIZE, ClipSpec, sample_spec, trajectory

logger = logging.getLogger(__name__)

VAE_FRAMES = 5  # px frames per training clip: 2 latent frames (the first-frame and the 4-frame paths)
VAE_CROP = 32  # px: training crops (the VAE is convolutional)
DECODER_NOISE = 0.02


def _object_weight(x: torch.Tensor) -> torch.Tensor:
    """``1 + 5 * saturation`` per pixel of ``x [B, 3, T, H, W]`` in [-1, 1] (greys weigh 1)."""
    sat = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2.0
    return 1.0 + 5.0 * sat


def _object_crop(spec: ClipSpec, start: int, generator: torch.Generator) -> torch.Tensor:
    """``[3, VAE_FRAMES, VAE_CROP, VAE_CROP]``: a crop around the object's start position, jittered."""
    x = pixel_batch([spec], VAE_FRAMES, [start])[0]
    centre = trajectory(spec, 1, start)[0]
    jitter = torch.randint(-10, 11, (2,), generator=generator)
    left, top = ((centre.round().long() + jitter - VAE_CROP // 2).clamp(0, SIZE - VAE_CROP)).tolist()
    return x[..., top:top + VAE_CROP, left:left + VAE_CROP]


def _vae_loss(vae: Any, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    vae.clear_cache()
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + DECODER_NOISE * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    recon = vae.decode(z).sample
    weight = _object_weight(x)
    err = recon - x
    loss = (weight * (err.abs() + err.pow(2))).mean() + 1e-4 * posterior.mean.pow(2).mean()
    return loss, float(err.pow(2).mean())


def train_vae(vae: Any, *, seed: int, steps: int, batch: int, device: str, lr: float = 2e-3,
              on_log: Callable[[int, dict[str, float]], None] | None = None, log_every: int = 10) -> list[float]:
    """Train in place; returns the loss curve."""
    vae.train().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(
        math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    curve = []
    start = time.monotonic()
    for step in range(steps):
        specs = [sample_spec(clip_seed(seed, step * batch + b)) for b in range(batch)]
        starts = [int(torch.randint(0, 256, (), generator=generator)) for _ in specs]
        x = torch.stack([_object_crop(s, start, generator) for s, start in zip(specs, starts)]).to(device)
        loss, mse = _vae_loss(vae, x, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(float(loss))
        if on_log is not None and (step % log_every == 0 or step == steps - 1):
            on_log(step, {"loss": float(loss), "mse": mse, "elapsed_s": time.monotonic() - start})
    vae.eval()
    return curve


@torch.no_grad()
def encode_mean(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """Unnormalised posterior means ``[B, 16, F, h, w]`` of pixels ``x [B, 3, T, H, W]``."""
    vae.clear_cache()
    return vae.encode(x).latent_dist.mean


@torch.no_grad()
def held_out_psnr(vae: Any, *, clips: int = 4, frames: int = 17, device: str = "cpu") -> float:
    """Mean PSNR (dB, pixels in [0, 255]) of encode->decode on held-out clips."""
    values = []
    for spec in held_out_specs(clips):
        x = pixel_batch([spec], frames).to(device)
        vae.clear_cache()
        recon = vae.decode(encode_mean(vae, x)).sample.clamp(-1.0, 1.0)
        mse = float(((recon - x) * 127.5).pow(2).mean())
        values.append(10.0 * math.log10(255.0**2 / max(mse, 1e-10)))
    return sum(values) / len(values)


@torch.no_grad()
def latent_stats(vae: Any, *, seed: int, clips: int = 8, frames: int = 17,
                 device: str = "cpu") -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means over training clips (for `latents_mean` / `latents_std`)."""
    specs = [sample_spec(clip_seed(seed + 1, k)) for k in range(clips)]
    z = torch.cat([encode_mean(vae, pixel_batch(specs[i:i + 8], frames).to(device)) for i in range(0, clips, 8)])
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def finetune_decoder(vae: Any, *, seed: int, steps: int, batch: int, device: str, lr: float = 1e-3,
                     on_log: Callable[[int, dict[str, float]], None] | None = None, log_every: int = 5,
                     on_checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 50) -> list[float]:
    """Stage 1b: train the decoder (and ``post_quant_conv``) on whole 64x64 frames with the encoder frozen, so the
    latents a generator was trained on keep their meaning. Fixes what 32x32 crops leave (the middle block's
    attention sees the whole frame only here)."""
    vae.to(device).train()
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 5)
    curve = []
    start = time.monotonic()
    for step in range(steps):
        specs = [sample_spec(clip_seed(seed + 5, step * batch + b)) for b in range(batch)]
        starts = [int(torch.randint(0, 256, (), generator=generator)) for _ in specs]
        x = pixel_batch(specs, VAE_FRAMES, starts).to(device)
        z = encode_mean(vae, x)
        z = z + DECODER_NOISE * torch.randn(z.shape, generator=generator).to(device)
        vae.clear_cache()
        err = vae.decode(z).sample - x
        loss = (_object_weight(x) * (err.abs() + err.pow(2))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(float(loss))
        if on_log is not None and (step % log_every == 0 or step == steps - 1):
            on_log(step, {"loss": float(loss), "mse": float(err.detach().pow(2).mean()),
                          "elapsed_s": time.monotonic() - start})
        if on_checkpoint is not None and (step + 1) % checkpoint_every == 0:
            on_checkpoint(step + 1)
    vae.eval().requires_grad_(False)
    return curve
