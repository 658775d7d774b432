"""The FLOP budget of one chunk at full Wan2.1-1.3B shapes, and the frames/s bound it puts on a card.

Transformer passes are counted analytically from the transformer config (matmul FLOPs, 2 per multiply-add:
projections, self-attention over the attended context, cross-attention to the prompt, FFN, patch embedding and
output, the text embedder diffusers runs on every pass); `check_analytic` compares the formula with
`torch.utils.flop_counter.FlopCounterMode` on real passes of a small config (math attention, so that attention is
counted). The VAE decode is counted by `FlopCounterMode` on the full-size decoder built on the meta device (shapes
only, nothing computed). TokenTrim's summary and drift are element counts. Steady state: a chunk after the first
(``4 * chunk_frames`` pixel frames) with ``--context-frames`` latent frames attended (chunk included).

    python -m bench.flops [--peak-tflops 989] [--mode self-forcing|rolling-forcing] [--context-frames 21]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import RolloutConfig
from pipeline.model.backend import (
    LATENT_CHANNELS,
    SPATIAL_SCALE,
    WAN_1_3B_TRANSFORMER,
    WAN_HEIGHT_PX,
    WAN_TEXT_LEN,
    WAN_WIDTH_PX,
)
from pipeline.model.vae import TEMPORAL_SCALE
from tokentrim import TrimConfig

H100_SXM_DENSE_BF16_TFLOPS = 989.0  # NVIDIA's H100 SXM datasheet, dense (no sparsity)
SELF_FORCING_CONTEXT = 21  # latent frames attended at steady state (Self Forcing's cache, Rolling Forcing's cap)


@dataclass(frozen=True)
class Shape:
    """The transformer dims the count needs (from a `WanTransformer3DModel` config dict)."""

    dim: int
    ffn: int
    layers: int
    text_dim: int
    text_len: int
    patch_volume: int
    channels: int
    freq_dim: int

    @classmethod
    def of(cls, config: dict[str, Any], text_len: int) -> Shape:
        return cls(dim=config["num_attention_heads"] * config["attention_head_dim"], ffn=config["ffn_dim"],
                   layers=config["num_layers"], text_dim=config["text_dim"], text_len=text_len,
                   patch_volume=math.prod(config["patch_size"]), channels=config["in_channels"],
                   freq_dim=config["freq_dim"])


def pass_flops(s: Shape, queries: int, keys: int, batch: int = 1) -> dict[str, int]:
    """Matmul FLOPs of one transformer pass: ``queries`` tokens of the pass attending to ``keys`` tokens (cached
    context + the pass's own), the prompt K/V cached (projected once per prompt, not counted here)."""
    d, q, L = s.dim, queries, s.text_len
    per_block = {
        "projections": 2 * q * d * d * 6,  # self q, k, v, out + cross q, out
        "self_attention": 2 * 2 * q * keys * d,  # scores and weighted values
        "cross_attention": 2 * 2 * q * L * d,
        "ffn": 2 * 2 * q * d * s.ffn,
    }
    out = {k: v * s.layers * batch for k, v in per_block.items()}
    time_embed = 2 * s.freq_dim * d + 2 * d * d + 2 * d * 6 * d  # sinusoid -> dim -> dim, then 6 modulations
    out["embed_and_out"] = batch * (2 * q * s.channels * s.patch_volume * d * 2  # patch embedding + proj_out
                                    + 2 * L * s.text_dim * d + 2 * L * d * d + time_embed)  # text embedder per pass
    return out


@dataclass(frozen=True)
class ChunkPlan:
    """The transformer passes of one steady-state chunk: (name, queries, keys) each."""

    passes: tuple[tuple[str, int, int], ...]
    pixel_frames: int
    tokens_per_frame: int


def chunk_plan(config: RolloutConfig, tokens_per_frame: int, context_frames: int) -> ChunkPlan:
    """Self-forcing: ``len(steps)`` denoising passes and a commit pass over the chunk; rolling-forcing: one pass of
    the joint window (``len(steps)`` chunks) and the commit pass. Keys: ``context_frames`` latent frames (at least
    the pass's own)."""
    chunk = config.chunk_frames * tokens_per_frame
    if config.mode == "self-forcing":
        keys = max(context_frames * tokens_per_frame, chunk)
        passes = [("denoise", chunk, keys)] * len(config.timesteps)
    else:
        window = len(config.timesteps) * chunk
        passes = [("denoise", window, max(context_frames * tokens_per_frame, window))]
        keys = max(context_frames * tokens_per_frame, chunk)
    passes.append(("commit", chunk, keys))
    return ChunkPlan(tuple(passes), TEMPORAL_SCALE * config.chunk_frames, tokens_per_frame)


def trim_flops(trim: TrimConfig, chunk_frames: int, latent_hw: tuple[int, int], tokens: int) -> int:
    """TokenTrim per candidate: the summary (a mean over the chunk's frames of every latent value) and the drift
    (difference, square, sum over D, root per token); the top-k is a selection, no FLOPs."""
    width = LATENT_CHANNELS * (math.prod(trim.patch_size) if trim.summary == "patch" else 1)
    summary = chunk_frames * LATENT_CHANNELS * latent_hw[0] * latent_hw[1]
    return summary + 3 * tokens * width + tokens


def vae_decode_flops(chunk_frames: int, latent_hw: tuple[int, int]) -> int:
    """FLOPs of the full Wan2.1 VAE decoding one steady-state chunk (the streaming decoder warmed by one chunk),
    counted on the meta device."""
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model.vae import StreamingDecoder

    with torch.device("meta"):
        vae = AutoencoderKLWan().eval()
    decoder = StreamingDecoder(vae)
    latents = torch.zeros(1, LATENT_CHANNELS, chunk_frames, *latent_hw, device="meta")
    decoder.decode_float(latents)  # chunk 0 (one pixel frame for its first latent frame)
    with FlopCounterMode(display=False) as counter:
        decoder.decode_float(latents)
    return int(counter.get_total_flops())


def counted_pass_flops(backend: Any, frames: int, first_frame: int, commit: bool) -> int:
    """FlopCounterMode's count of one real pass (math attention) of ``backend`` on a fresh cache holding
    ``first_frame`` committed frames."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    h, w = backend.latent_size(backend.spec.height_px, backend.spec.width_px)
    text = backend.encode_prompts(["a lantern"])
    cache = backend.causal.new_cache(1, h, w)
    gen = torch.Generator().manual_seed(0)
    if first_frame:
        backend.causal.commit(torch.randn(1, LATENT_CHANNELS, first_frame, h, w, generator=gen), text, cache, 0)
    x = torch.randn(1, LATENT_CHANNELS, frames, h, w, generator=gen)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if commit:
            backend.causal.commit(x, text, cache, first_frame)
        else:
            backend.causal.denoise(x, torch.full((1,), 900.0), text, cache, first_frame)
    return int(counter.get_total_flops())


def check_analytic(frames: int = 3, context: int = 6) -> list[tuple[str, int, int]]:
    """(pass, analytic, counted) for a denoising and a commit pass of the tiny preset after ``context`` frames."""
    from pipeline.model.backend import PRESETS, TINY_TRANSFORMER, load_backend

    backend = load_backend("tiny", with_vae=False)
    h, w = backend.latent_size(backend.spec.height_px, backend.spec.width_px)
    tokens = backend.causal.tokens_per_frame(h, w)
    shape = Shape.of(TINY_TRANSFORMER, PRESETS["tiny"].text_len)
    analytic = sum(pass_flops(shape, frames * tokens, (context + frames) * tokens).values())
    return [(name, analytic, counted_pass_flops(backend, frames, context, commit))
            for name, commit in (("denoise", False), ("commit", True))]


def budget(config: RolloutConfig, trim: TrimConfig, context_frames: int) -> dict[str, float]:
    """FLOPs per phase of one steady-state chunk at Wan2.1-1.3B 480x832 (denoise, commit, trim, decode)."""
    latent_hw = (WAN_HEIGHT_PX // SPATIAL_SCALE, WAN_WIDTH_PX // SPATIAL_SCALE)
    patch = WAN_1_3B_TRANSFORMER["patch_size"]
    tokens = (latent_hw[0] // patch[1]) * (latent_hw[1] // patch[2])
    shape = Shape.of(WAN_1_3B_TRANSFORMER, WAN_TEXT_LEN)
    plan = chunk_plan(config, tokens, context_frames)
    phases = {"denoise": 0.0, "commit": 0.0}
    for name, queries, keys in plan.passes:
        phases[name] += sum(pass_flops(shape, queries, keys).values())
    phases["trim"] = float(trim_flops(trim, config.chunk_frames, latent_hw, tokens))
    phases["decode"] = float(vae_decode_flops(config.chunk_frames, latent_hw))
    return phases


def bound_fps(flops: float, pixel_frames: int, peak_tflops: float) -> float:
    """Pixel frames/s if ``flops`` per chunk ran at the card's peak."""
    return pixel_frames / (flops / (peak_tflops * 1e12)) if flops else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_DENSE_BF16_TFLOPS,
                        help="the card's peak dense bf16 TFLOP/s (default: H100 SXM)")
    parser.add_argument("--mode", choices=["self-forcing", "rolling-forcing"], default="self-forcing")
    parser.add_argument("--context-frames", type=int, default=SELF_FORCING_CONTEXT,
                        help="latent frames each pass attends to, its own included")
    parser.add_argument("--no-check", action="store_true", help="skip the FlopCounterMode check on the tiny preset")
    args = parser.parse_args()
    config, trim = RolloutConfig(mode=args.mode), TrimConfig()
    if not args.no_check:
        for name, analytic, counted in check_analytic():
            print(f"check, tiny preset {name} pass: analytic {analytic} FLOPs, FlopCounterMode {counted} "
                  f"({'equal' if analytic == counted else f'{analytic / counted:.4f}x'})")
    phases = budget(config, trim, args.context_frames)
    frames = TEMPORAL_SCALE * config.chunk_frames
    total = sum(phases.values())
    print(f"Wan2.1-1.3B 480x832 {args.mode}, one steady-state chunk ({frames} pixel frames), "
          f"{args.context_frames} latent frames attended, at {args.peak_tflops:g} TFLOP/s peak:")
    for name, flops in phases.items():
        fps = bound_fps(flops, frames, args.peak_tflops)
        print(f"  {name:<8} {flops / 1e9:12.3f} GFLOP  {flops / total:6.1%}  bound {fps:12.4g} frames/s")
    transformer = phases["denoise"] + phases["commit"]
    print(f"  transformer alone {transformer / 1e12:.3f} TFLOP: bound "
          f"{bound_fps(transformer, frames, args.peak_tflops):.1f} frames/s")
    print(f"  end to end {total / 1e12:.3f} TFLOP: bound {bound_fps(total, frames, args.peak_tflops):.1f} frames/s")
    print(f"reproduce: python -m bench.flops --peak-tflops {args.peak_tflops:g} --mode {args.mode} "
          f"--context-frames {args.context_frames}")


if __name__ == "__main__":
    main()
