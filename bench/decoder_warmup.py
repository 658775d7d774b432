"""How far back must a resumed render re-decode for exact frames? And how big is the VAE decoder's state?

A resume at chunk k restarts the streaming VAE decoder (`pipeline.model.vae.StreamingDecoder`) with an empty causal
cache at latent frame ``k * F - L`` (a warm-up of ``L`` latent frames, decoded and discarded) and compares every frame
from chunk k on with the uninterrupted decode, bit for bit (``torch.equal``). Printed per VAE:

- the smallest exact warm-up ``L`` (and that every shorter one is inexact), next to the decoder's temporal receptive
  field `pipeline.outputs.segments.decoder_lookback` computes from its layers;
- the decoder state (the feature cache after a chunk) in bytes, measured at the test size and scaled to a 480x832
  video (60x104 latent) in bf16, next to one chunk's latent checkpoint at that size.

VAEs: ``tiny`` (`build_tiny_vae`) and ``wan`` (the Wan2.1 VAE architecture, `AutoencoderKLWan()`'s default config,
seeded random weights: the receptive field is a property of the layers, not of the weights) at a 2x2 latent.

    python -m bench.decoder_warmup [--frames 45] [--chunk 3]
"""

from __future__ import annotations

import argparse

import torch

from pipeline.model.vae import StreamingDecoder, build_tiny_vae
from pipeline.outputs.redecode import decoder_lookback


def _wan_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan().eval()


def smallest_exact_warmup(vae, latents: torch.Tensor, resume: int, chunk: int) -> tuple[int, bool]:
    """The smallest warm-up (latent frames decoded before ``resume`` by a fresh decoder, then discarded) whose frames
    from ``resume`` on equal the uninterrupted chunk-by-chunk decode, and whether every shorter warm-up was inexact."""
    last = latents.shape[2]

    def frames_from(start: int) -> torch.Tensor:
        decoder = StreamingDecoder(vae)
        if start < resume:
            decoder.decode_float(latents[:, :, start:resume])
        return torch.cat([decoder.decode_float(latents[:, :, i:i + chunk]) for i in range(resume, last, chunk)], 2)

    reference = StreamingDecoder(vae)
    for i in range(0, resume, chunk):
        reference.decode_float(latents[:, :, i:i + chunk])
    want = torch.cat([reference.decode_float(latents[:, :, i:i + chunk]) for i in range(resume, last, chunk)], 2)
    results = [torch.equal(frames_from(resume - w), want) for w in range(resume + 1)]
    smallest = results.index(True) if True in results else resume
    monotone = all(ok == (w >= smallest) for w, ok in enumerate(results))
    return smallest, monotone


def state_bytes(vae, latents: torch.Tensor, chunk: int, *, latent_hw: tuple[int, int], bytes_per: int = 2) -> int:
    """Bytes of the decoder's feature cache after a few chunks, scaled from the test latent size to ``latent_hw``."""
    decoder = StreamingDecoder(vae)
    for i in range(0, 2 * chunk, chunk):
        decoder.decode_float(latents[:, :, i:i + chunk])
    scale = latent_hw[0] * latent_hw[1] / (latents.shape[3] * latents.shape[4])
    return int(sum(t.numel() for t in decoder._feat_map if isinstance(t, torch.Tensor)) * scale * bytes_per)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=45, help="latent frames decoded (a multiple of --chunk)")
    parser.add_argument("--chunk", type=int, default=3, help="latent frames per chunk")
    parser.add_argument("--vae", choices=("tiny", "wan", "both"), default="both")
    parser.add_argument("--scan", choices=("tiny", "wan", "both"), default="tiny",
                        help="which VAEs get the warm-up scan (the Wan architecture's takes long on a CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    chunk_ckpt = 16 * args.chunk * 60 * 104 * 2  # one chunk's latents [1, 16, F, 60, 104] in bf16
    for name in ("tiny", "wan") if args.vae == "both" else (args.vae,):
        vae = build_tiny_vae() if name == "tiny" else _wan_vae()
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 16, args.frames, 2, 2, generator=gen)
        lookback = decoder_lookback(vae)
        print(f"{name}: receptive field from the layers (decoder_lookback): {lookback} latent frames")
        if args.scan in (name, "both"):
            resume = args.frames - 2 * args.chunk  # two chunks after the resume point are compared
            smallest, monotone = smallest_exact_warmup(vae, latents, resume, args.chunk)
            print(f"{name}: resume at latent frame {resume} (chunk {resume // args.chunk} of {args.chunk} latent "
                  f"frames): smallest exact warm-up {smallest} latent frames ({-(-smallest // args.chunk)} chunks); "
                  f"every shorter one inexact: {monotone}")
        own = state_bytes(vae, latents, args.chunk, latent_hw=(2, 2), bytes_per=4)
        state = state_bytes(vae, latents, args.chunk, latent_hw=(60, 104))
        print(f"{name}: decoder state per sample: {own} B at a 2x2 latent in fp32; {state / 2**20:.1f} MiB at 480x832 "
              f"in bf16, against {chunk_ckpt / 2**20:.3f} MiB for one chunk's latent checkpoint there "
              f"({state / chunk_ckpt:.0f}x)")


if __name__ == "__main__":
    main()
