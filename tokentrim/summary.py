"""Latent summaries, per-token drift and the unstable set (DESIGN.md §2, steps 1-3).

Shapes:
    latents   [B, C, F, H, W]   (diffusers layout)
    summary   [B, N, D]         N = (H // p_h) * (W // p_w) tokens in row-major (h, w) order; D = C * p_t * p_h * p_w
                                (mode "patch", the flattened patch) or D = C (mode "mean", the patch mean)
    drift     [B, N]            L2 distance per token position (same position, or the variants of `drift_score`)
    grid      (H', W')          the patch grid the N tokens lie on, N = H' * W' (row-major)
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

from tokentrim.config import DRIFT_MODES, SUMMARY_MODES, DriftMode, SummaryMode


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


def latent_summary(latents: Tensor, patch_size: Sequence[int] = (1, 2, 2), mode: SummaryMode = "patch") -> Tensor:
    """Z = mean over the F frames (in groups of p_t), one vector per token of the (p_h, p_w) patch grid.

    Args:
        latents: [B, C, F, H, W]; F divisible by p_t, H and W by p_h and p_w.
        patch_size: (p_t, p_h, p_w), the transformer's patch.
        mode: "patch" keeps every value of the frame-averaged patch (D = C * p_t * p_h * p_w, so a change that
            averages out inside a patch is still seen); "mean" averages the patch (D = C).

    Returns:
        [B, N, D] float32 with N = (H // p_h) * (W // p_w) in row-major (h, w) order.
    """
    latents = _check_float_tensor("latents", latents, 5)
    if len(patch_size) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in patch_size):
        raise ValueError(f"`patch_size` must be 3 positive ints (t, h, w), got {patch_size!r}")
    if mode not in SUMMARY_MODES:
        raise ValueError(f"`mode` must be one of {SUMMARY_MODES}, got {mode!r}")
    p_t, p_h, p_w = patch_size
    b, c, f, h, w = latents.shape
    if f % p_t or h % p_h or w % p_w:
        raise ValueError(
            f"`latents` F, H and W must be divisible by the patch size {tuple(patch_size)}, "
            f"got shape {tuple(latents.shape)}"
        )
    # [B, C, F, H, W] -> [B, C, F/p_t, p_t, H, W] -> mean over the F/p_t temporal patches: [B, C, p_t, H, W]
    frame_mean = latents.float().reshape(b, c, f // p_t, p_t, h, w).mean(dim=2)
    # split each spatial axis into (patch index, offset in patch): [B, C, p_t, H/p_h, p_h, W/p_w, p_w]
    patches = frame_mean.reshape(b, c, p_t, h // p_h, p_h, w // p_w, p_w)
    if mode == "mean":
        pooled = patches.mean(dim=(2, 4, 6))  # [B, C, H/p_h, W/p_w]
        # [B, C, H', W'] -> [B, C, N] with N in row-major (h, w) order -> [B, N, C]
        return pooled.reshape(b, c, -1).transpose(1, 2).contiguous()
    # [B, C, p_t, H', p_h, W', p_w] -> [B, H', W', C, p_t, p_h, p_w] -> [B, N, C*p_t*p_h*p_w]
    tokens = patches.permute(0, 3, 5, 1, 2, 4, 6)
    return tokens.reshape(b, (h // p_h) * (w // p_w), c * p_t * p_h * p_w).contiguous()


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


def _check_grid(grid: object, num_tokens: int) -> tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
        raise ValueError(f"`grid` must be two positive ints (H', W') of the patch grid, got {grid!r}")
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"`grid` {tuple(grid)} holds {grid[0] * grid[1]} tokens, the summaries have {num_tokens}")
    return grid[0], grid[1]


def motion_drift(z: Tensor, z_prev: Tensor, grid: Sequence[int], radius: int) -> Tensor:
    """d_i = min over shifts (dy, dx), |dy|, |dx| <= ``radius``, of || z(h, w) - z_prev(h + dy, w + dx) ||_2 for token
    i = (h, w), over the shifts that stay inside the grid: a token whose content moved by at most ``radius`` tokens
    has found its match. Shift (0, 0) is always searched, so this is <= `token_drift` everywhere and equal to it at
    ``radius`` 0.

    Args:
        z, z_prev: [B, N, D] summaries on the patch grid ``grid`` = (H', W'), N = H' * W' in row-major order.
        grid: (H', W').
        radius: >= 0 tokens searched each way, on both axes.

    Returns:
        [B, N] float32.
    """
    drift = token_drift(z, z_prev)  # [B, N]: shift (0, 0), the paper's
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"`radius` must be an int >= 0, got {radius!r}")
    gh, gw = _check_grid(grid, z.shape[1])
    if radius == 0:
        return drift
    b, _, d = z.shape
    cur = z.float().reshape(b, gh, gw, d)  # [B, N, D] -> [B, H', W', D]
    prev = z_prev.float().reshape(b, gh, gw, d)
    best = drift.reshape(b, gh, gw).clone()  # [B, H', W']
    for dy in range(-min(radius, gh - 1), min(radius, gh - 1) + 1):
        for dx in range(-min(radius, gw - 1), min(radius, gw - 1) + 1):
            if dy == 0 and dx == 0:
                continue
            # token (h, w) against prev (h + dy, w + dx): both sliced to where that stays inside the grid
            ys, yp = slice(max(0, -dy), gh - max(0, dy)), slice(max(0, dy), gh + min(0, dy))
            xs, xp = slice(max(0, -dx), gw - max(0, dx)), slice(max(0, dx), gw + min(0, dx))
            dist = torch.linalg.vector_norm(cur[:, ys, xs] - prev[:, yp, xp], ord=2, dim=-1)
            best[:, ys, xs] = torch.minimum(best[:, ys, xs], dist)
    return best.reshape(b, gh * gw)


def relative_drift(drift: Tensor) -> Tensor:
    """max(0, d_i - median_j d_j): a token's drift beyond the chunk's typical (global, background) change.

    Args:
        drift: [B, N] per-token drift.

    Returns:
        [B, N] float32 (the lower median for even N, `torch.median`'s).
    """
    drift = _check_float_tensor("drift", drift, 2).float()
    median = drift.median(dim=-1, keepdim=True).values  # [B, 1]
    return (drift - median).clamp_min(0.0)


def drift_score(z: Tensor, z_prev: Tensor, mode: DriftMode = "same", grid: Sequence[int] | None = None,
                radius: int = 1) -> Tensor:
    """Per-token drift of ``mode`` (`TrimConfig.drift`): "same" is `token_drift` (the paper's, bit for bit),
    "motion" `motion_drift` within ``radius`` on ``grid``, "relative" `relative_drift` of the same-position drift.

    Returns:
        [B, N] float32.
    """
    if mode not in DRIFT_MODES:
        raise ValueError(f"`mode` must be one of {DRIFT_MODES}, got {mode!r}")
    if mode == "motion":
        if grid is None:
            raise ValueError("drift \"motion\" needs the patch `grid` (H', W') of the summaries")
        return motion_drift(z, z_prev, grid, radius)
    drift = token_drift(z, z_prev)
    return relative_drift(drift) if mode == "relative" else drift


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
