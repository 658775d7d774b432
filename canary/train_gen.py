"""Stage 2: train the generator on VAE latents with the block-causal masked full-sequence forward.

Scheme (see `canary.sequence`): teacher forcing for self-forcing (a noisy chunk at one of the sampler's
warped levels over clean context) mixed with rolling-forcing window passes (staggered levels, joint window),
flow-matching loss on the noisy chunks. No training on the model's own rollouts.

Half of the pool's clips are *anchored* (they start at frame 0 of their trajectory, the object at the centre as
every rollout starts), half *free* (they start at a random frame, so the object can be anywhere): the free clips
teach the model to continue the motion it sees in its context instead of reading the position off the frame index.
The first chunk of a free clip has no context that fixes its position, so it is left out of the loss. The loss is
weighted up where the object is (`OBJECT_WEIGHT`), since the object is a few latent pixels of a mostly grey frame.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from canary.data import clip_seed, pixel_batch
from canary.grammar import sample_spec
from canary.marks import entry_mask, sample_marks
from canary.masked import install, masked_forward
from canary.sequence import build_sequence
from canary.train_vae import encode_mean, optimizer_step
from pipeline.model.canary import CHUNK_FRAMES
from pipeline.model.text import TextEncoder
from pipeline.model.vae import pixel_frames_for

logger = logging.getLogger(__name__)

OBJECT_WEIGHT = 4.0  # extra loss weight on latent pixels the object covers


def latent_object_mask(x: torch.Tensor) -> torch.Tensor:
    """Pixels ``[B, 3, T, 64, 64]`` in [-1, 1] -> ``[B, 1, F, 8, 8]`` in [0, 1]: where a saturated (object) pixel
    falls in each latent pixel (latent frame 0 is pixel frame 0, latent frame k the pixel frames 4k-3 .. 4k)."""
    sat = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)).clamp(0.0, 1.0)  # [B, 1, T, H, W]
    first, rest = sat[:, :, :1], sat[:, :, 1:]
    rest = rest.unflatten(2, (-1, 4)).amax(dim=3)
    return torch.nn.functional.max_pool3d(torch.cat([first, rest], dim=2), (1, 8, 8))


@dataclass
class LatentPool:
    """Pre-encoded training clips: normalised latents ``[N, 16, F, 8, 8]`` and caption embeddings."""

    latents: torch.Tensor
    text: torch.Tensor  # [N, text_len, text_dim]
    weights: torch.Tensor  # [N, 1, F, 8, 8] loss weights (1 + OBJECT_WEIGHT where the object is)
    anchored: torch.Tensor  # [N] bool: the clip starts at frame 0 of its trajectory


@torch.no_grad()
def build_pool(vae: Any, text: TextEncoder, *, seed: int, clips: int, chunks: int, device: str,
               on_log: Callable[[int, dict[str, float]], None] | None = None, marks: bool = False) -> LatentPool:
    """Encode ``clips`` training clips of ``chunks`` chunks with the trained VAE: even-numbered clips start at frame
    0 (anchored), odd-numbered ones at a random frame (free). ``marks``: add the context canary's uncaptioned
    static marks (`canary.marks`), their entry chunk's cells out of the loss."""
    frames = pixel_frames_for(chunks * CHUNK_FRAMES)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device)
    std = torch.tensor(vae.config.latents_std).view(shape).to(device)
    generator = torch.Generator().manual_seed(seed + 2)
    latents, weights, captions = [], [], []
    for i in range(0, clips, 8):
        index = range(i, min(i + 8, clips))
        specs = [sample_spec(clip_seed(seed + 2, k)) for k in index]
        starts = [int(torch.randint(0, 256, (), generator=generator)) * (k % 2) for k in index]
        drawn = [sample_marks(clip_seed(seed + 4, k), s.colour, chunks, k % 2 == 0) if marks else []
                 for k, s in zip(index, specs)]
        x = pixel_batch(specs, frames, starts, drawn, CHUNK_FRAMES)
        z = encode_mean(vae, x.to(device))
        latents.append(((z - mean) / std).cpu())
        keep = torch.stack([entry_mask(m, chunks * CHUNK_FRAMES, CHUNK_FRAMES) for m in drawn])
        weights.append((1.0 + OBJECT_WEIGHT * latent_object_mask(x)) * keep)
        captions += [s.caption for s in specs]
        if on_log is not None:
            on_log(i, {"encoded": float(i + len(specs))})
    embeddings = {c: text.encode([c])[0] for c in sorted(set(captions))}
    anchored = torch.arange(clips) % 2 == 0
    return LatentPool(torch.cat(latents), torch.stack([embeddings[c] for c in captions]), torch.cat(weights),
                      anchored)


def train_generator(transformer: Any, pool: LatentPool, *, seed: int, steps: int, batch: int, device: str,
                    lr: float = 2e-3, rolling_fraction: float = 0.5, context_noise: float = 0.05,
                    on_log: Callable[[int, dict[str, float]], None] | None = None, log_every: int = 10,
                    on_sample: Callable[[int], None] | None = None, sample_every: int = 0,
                    on_checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0,
                    curve: list[float] | None = None) -> list[float]:
    """Train in place with AdamW (cosine schedule, warm-up); returns the loss curve (appended to ``curve`` when
    given). ``on_checkpoint(step)`` every ``checkpoint_every`` steps (a partial run stays usable)."""
    transformer.train().requires_grad_(True).to(device)
    state = install(transformer)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps))))
    generator = torch.Generator().manual_seed(seed + 3)
    curve = [] if curve is None else curve
    start = time.monotonic()
    for step in range(steps):
        idx = torch.randint(pool.latents.shape[0], (batch,), generator=generator)
        seq = build_sequence(pool.latents[idx], CHUNK_FRAMES, generator, rolling_fraction, context_noise)
        seq.latents, seq.target = seq.latents.to(device), seq.target.to(device)
        flow = masked_forward(transformer, state, seq, pool.text[idx].to(device))
        frames = seq.target.shape[2]
        weight = pool.weights[idx].clone()
        weight[~pool.anchored[idx], :, :CHUNK_FRAMES] = 0.0  # a free clip's first chunk: nothing fixes it
        weight = weight.to(device)
        loss = (weight * (flow[:, :, frames:] - seq.target).pow(2)).sum() / (weight.sum() * flow.shape[1])
        curve.append(optimizer_step(loss, opt, transformer.parameters(), sched))
        if on_log is not None and (step % log_every == 0 or step == steps - 1):
            recent = curve[-log_every:]
            on_log(step, {"loss": sum(recent) / len(recent), "elapsed_s": time.monotonic() - start})
        if on_sample is not None and sample_every and (step + 1) % sample_every == 0 and step + 1 < steps:
            transformer.eval()
            on_sample(step + 1)
            transformer.train()
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(step + 1)
    transformer.eval()
    return curve
