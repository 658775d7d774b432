"""Stage 1: train the canary VAE (`AutoencoderKLWan`) on short whole-frame clips; measure PSNR on held-out clips.

Loss: L1 + MSE of the reconstruction, weighted up `OBJECT_WEIGHT` times on saturated (object) pixels, plus a small
penalty on the latent mean's magnitude; the decoder sees the posterior mean plus a little fixed noise, so it
tolerates the small errors a generator makes. Latents are normalised per channel afterwards (`latent_stats`).

Measured while choosing this (bench/RESULTS.md, "Canary"): with the object weighted ~5x the tiny VAE spends its
first thousand steps on the grey background and reconstructs no object at all (held-out PSNR ~20 dB is what a
background-only picture scores); weighted ~30x it learns the object within a few hundred steps. 32x32 crops are
4x cheaper but do not carry over to whole frames (the middle block's attention sees the whole latent frame).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from canary.data import clip_seed, held_out_specs, pixel_batch
from canary.grammar import sample_spec
from canary.render import render_scene, to_model_pixels

logger = logging.getLogger(__name__)

VAE_FRAMES = 9  # px frames per training clip: 3 latent frames (the first frame, then 4-frame steps: the second
# one runs with a full causal cache, as every later step of a long video does)
DECODER_NOISE = 0.02
OBJECT_WEIGHT = 40.0  # loss weight per unit of saturation ((max - min) / 2 of a pixel in [-1, 1]): ~30x on objects
FINAL_OBJECT_WEIGHT = 8.0  # ... falling linearly to this over the run
SCENE_OBJECTS = 3  # objects per training scene


def _object_weight(x: torch.Tensor, object_weight: float = OBJECT_WEIGHT) -> torch.Tensor:
    """``1 + object_weight * saturation`` per pixel of ``x [B, 3, T, H, W]`` in [-1, 1] (greys weigh 1)."""
    sat = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2.0
    return 1.0 + object_weight * sat


def _vae_loss(vae: Any, x: torch.Tensor, generator: torch.Generator,
              object_weight: float = OBJECT_WEIGHT) -> tuple[torch.Tensor, float]:
    vae.clear_cache()
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + DECODER_NOISE * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
    recon = vae.decode(z).sample
    weight = _object_weight(x, object_weight)
    err = recon - x
    loss = (weight * (err.abs() + err.pow(2))).mean() + 1e-4 * posterior.mean.pow(2).mean()
    return loss, float(err.detach().pow(2).mean())


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: Any,
                   sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """Backpropagate ``loss``, clip the gradient norm of ``params`` to 1, step ``opt`` (and ``sched``); the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss)


def training_scenes(seed: int, step: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, 3, VAE_FRAMES, 64, 64]``: scenes of `SCENE_OBJECTS` grammar objects, each from a random frame of
    its trajectory (so anywhere in the frame), on the first one's background."""
    scenes = []
    for b in range(batch):
        index = (step * batch + b) * SCENE_OBJECTS
        specs = [sample_spec(clip_seed(seed, index + k)) for k in range(SCENE_OBJECTS)]
        starts = [int(torch.randint(0, 256, (), generator=generator)) for _ in specs]
        scenes.append(to_model_pixels(render_scene(specs, VAE_FRAMES, starts)))
    return torch.stack(scenes)


def train_vae(vae: Any, *, seed: int, steps: int, batch: int, device: str, lr: float = 1e-3,
              on_log: Callable[[int, dict[str, float]], None] | None = None, log_every: int = 10) -> list[float]:
    """Train in place on `training_scenes`; returns the loss curve. The object weight falls from `OBJECT_WEIGHT`
    to `FINAL_OBJECT_WEIGHT` over the run (objects first, then the background catches up); the learning rate
    is constant after a short warm-up and decays over the last fifth."""
    vae.train().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20, 5.0 * (1.0 - s / steps) + 0.05))
    generator = torch.Generator().manual_seed(seed)
    curve = []
    start = time.monotonic()
    for step in range(steps):
        x = training_scenes(seed, step, batch, generator).to(device)
        weight = OBJECT_WEIGHT + (FINAL_OBJECT_WEIGHT - OBJECT_WEIGHT) * step / max(1, steps - 1)
        loss, mse = _vae_loss(vae, x, generator, weight)
        curve.append(optimizer_step(loss, opt, vae.parameters(), sched))
        if on_log is not None and (step % log_every == 0 or step == steps - 1):
            on_log(step, {"loss": float(loss), "mse": mse, "object_weight": weight,
                          "elapsed_s": time.monotonic() - start})
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
        curve.append(optimizer_step(loss, opt, params))
        if on_log is not None and (step % log_every == 0 or step == steps - 1):
            on_log(step, {"loss": float(loss), "mse": float(err.detach().pow(2).mean()),
                          "elapsed_s": time.monotonic() - start})
        if on_checkpoint is not None and (step + 1) % checkpoint_every == 0:
            on_checkpoint(step + 1)
    vae.eval().requires_grad_(False)
    return curve
