"""Few-step flow-matching sampling: noise that is a pure function of its coordinates (schedules: `pipeline.config`).

The model predicts the flow ``v = noise - x0`` at noise level ``sigma = t / 1000``; ``x_t = (1 - sigma) x0 + sigma
noise``. Between steps the x0 prediction is re-noised to the next level with fresh noise.
"""

from __future__ import annotations

import hashlib

import torch


def noise_seed(seed: int, chunk: int, step: int, attempt: int) -> int:
    """A 63-bit generator seed derived from ``(seed, chunk, step, attempt)``; stable across processes and machines."""
    digest = hashlib.sha256(f"tokentrim-noise:{seed}:{chunk}:{step}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def chunk_noise(seeds: list[int], chunk: int, step: int, attempt: int, shape: tuple[int, ...],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise ``[B, *shape]``, sample b drawn from ``noise_seed(seeds[b], chunk, step, attempt)``.

    Drawn on the CPU so that the same coordinates give the same noise on any device.
    """
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(s, chunk, step, attempt)))
             for s in seeds]
    noise = torch.stack(draws)
    if torch.device(device).type == "cuda":  # pinned + non_blocking: the copy does not wait for queued kernels
        noise = noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device=device, dtype=dtype)


def to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 from a noisy sample and the predicted flow: ``x0 = x_t - sigma * flow``."""
    return x_t - sigma * flow


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise``."""
    return (1.0 - sigma) * x0 + sigma * noise


class ChunkNoise:
    """The noise of one rollout: ``noise(chunk, step, attempt)`` is `chunk_noise` for its seeds and latent shape."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.seeds, self.shape, self.device, self.dtype = list(seeds), shape, device, dtype

    def __call__(self, chunk: int, step: int, attempt: int) -> torch.Tensor:
        """``[B, *shape]`` noise of ``(chunk, step, attempt)``."""
        return chunk_noise(self.seeds, chunk, step, attempt, self.shape, self.device, self.dtype)
