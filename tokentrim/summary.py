"""Latent summaries, per-token drift and the unstable set (DESIGN.md §2, steps 1-3).

Shapes:
    latents   [B, C, F, H, W]   (diffusers layout)
    summary   [B, N, D]         N = (H // p_h) * (W // p_w) tokens in row-major (h, w) order, D = C
    drift     [B, N]            L2 distance per token position
    positions [B, k]            k = ceil(p * N) unstable positions per sample, sorted ascending
    severity  [B]               mean drift over the unstable set

All functions are pure, vectorised over the batch and the tokens, and work on CPU or CUDA for any floating
dtype; they compute and return float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _check_float_tensor(name: str, value: object, ndim: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must have a floating dtype, got {value.dtype}")
    if value.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dims, got shape {tuple(value.shape)}")
    return value


def num_unstable(num_tokens: int, p: float) -> int:
    """Size k = ceil(p * N) of the unstable set, in [1, N].

    The product is rounded to 9 decimals first so that e.g. p=0.07, N=100 gives 7, not 8 from 7.000000000000001.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise TypeError(f"`num_tokens` must be an int, got {num_tokens!r}")
    if num_tokens < 1:
        raise ValueError(f"`num_tokens` must be >= 1, got {num_tokens!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"`p` must be a float in (0, 1], got {p!r}")
    k = math.ceil(round(p * num_tokens, 9))
    return min(max(k, 1), num_tokens)


def latent_summary(latents: Tensor, patch_size: Sequence[int] = (1, 2, 2)) -> Tensor:
    """Z = mean over the F frames, average-pooled to the (p_h, p_w) patch grid.

    Args:
        latents: [B, C, F, H, W]; H and W divisible by p_h and p_w.
        patch_size: (p_t, p_h, p_w); p_t is unused since all frames are averaged.

    Returns:
        [B, N, D] float32 with N = (H // p_h) * (W // p_w) in row-major (h, w) order and D = C.
    """
    latents = _check_float_tensor("latents", latents, 5)
    if len(patch_size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in patch_size):
        raise ValueError(f"`patch_size` must be 3 positive ints (t, h, w), got {patch_size!r}")
    _, p_h, p_w = patch_size
    b, c, _, h, w = latents.shape
    if h % p_h or w % p_w:
        raise ValueError(
            f"`latents` H and W must be divisible by the patch size ({p_h}, {p_w}), got shape {tuple(latents.shape)}"
        )
    frame_mean = latents.float().mean(dim=2)  # [B, C, H, W]
    # [B, C, H, W] -> [B, C, H/p_h, p_h, W/p_w, p_w]: split each spatial axis into (patch index, offset in patch)
    patches = frame_mean.reshape(b, c, h // p_h, p_h, w // p_w, p_w)
    pooled = patches.mean(dim=(3, 5))  # [B, C, H/p_h, W/p_w]
    # [B, C, H', W'] -> [B, C, N] with N in row-major (h, w) order -> [B, N, C]
    return pooled.reshape(b, c, -1).transpose(1, 2).contiguous()


def token_drift(z: Tensor, z_prev: Tensor) -> Tensor:
    """d_i = || z(i) - z_prev(i) ||_2 per token position.

    Args:
        z, z_prev: [B, N, D] summaries of the candidate and of the previous accepted chunk.

    Returns:
        [B, N] float32.
    """
    z = _check_float_tensor("z", z, 3)
    z_prev = _check_float_tensor("z_prev", z_prev, 3)
    if z.shape != z_prev.shape:
        raise ValueError(f"`z` and `z_prev` must have the same shape, got {tuple(z.shape)} and {tuple(z_prev.shape)}")
    return torch.linalg.vector_norm(z.float() - z_prev.float(), ord=2, dim=-1)


def unstable_set(drift: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """The top ceil(p * N) positions by drift and their mean drift.

    Args:
        drift: [B, N] per-token drift.
        p: fraction in (0, 1].

    Returns:
        positions [B, k] long, sorted ascending, and severity [B] float32 (mean drift over the set). Ties are
        broken by `torch.topk`; the severity does not depend on how.
    """
    drift = _check_float_tensor("drift", drift, 2)
    k = num_unstable(drift.shape[1], p)
    # topk values come sorted descending, so the severity sum runs in a value order, not a position order.
    values, indices = torch.topk(drift.float(), k, dim=-1, largest=True, sorted=True)  # [B, k] each
    severity = values.mean(dim=-1)  # [B]
    positions = indices.sort(dim=-1).values  # [B, k] ascending
    return positions, severity
