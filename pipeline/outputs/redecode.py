"""How far back a resumed render re-decodes: the Wan VAE decoder's temporal receptive field.

The decoder's causal cache holds the last two frames of each causal conv's input, so frames decoded from latent
frame ``n`` depend on latent frames ``n - L .. n`` only (`decoder_lookback`). A decoder restarted ``L`` or more frames
back decodes every later frame bit for bit; a shorter warm-up never does (measured in bench/RESULTS.md).
`warmup_start` goes back far enough that chunk ``k - 1`` decodes exactly too (its last frame seeds the pixel proxies).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any


def decoder_lookback(vae: Any) -> int:
    """Latent frames of the decoder's temporal receptive field (the longest causal path), ``L`` above."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    if getattr(vae.decoder, "temperal_upsample", None) is None:
        raise TypeError(f"`vae` must be an AutoencoderKLWan, got {type(vae).__name__}")
    modules = list(vae.decoder.modules())  # registration order is the forward order in WanDecoder3d
    time_ups = {id(m.time_conv) for m in modules if isinstance(m, WanResample) and m.mode == "upsample3d"}
    rate, total = 1, Fraction(0)
    for module in modules:
        if isinstance(module, WanCausalConv3d):
            total += Fraction(module.kernel_size[0] - 1, rate)
            if id(module) in time_ups:
                rate *= 2  # each latent frame becomes two frames from here on
    return math.ceil(total)


def warmup_start(resume_chunk: int, chunk_frames: int, lookback: int) -> int:
    """The first chunk a resume at ``resume_chunk`` re-decodes (with a fresh decoder) so that chunks
    ``resume_chunk - 1`` on decode exactly; ``chunk_frames`` latent frames per chunk."""
    for name, value in (("resume_chunk", resume_chunk), ("chunk_frames", chunk_frames), ("lookback", lookback)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "chunk_frames" else 0):
            raise ValueError(f"`{name}` must be an int >= {1 if name == 'chunk_frames' else 0}, got {value!r}")
    if resume_chunk == 0:
        return 0
    return max(0, resume_chunk - 1 - math.ceil(lookback / chunk_frames))
