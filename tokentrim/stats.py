"""Per-sample running statistics of accepted severities (DESIGN.md §2, step 4); every buffer is [B], float64.

``welford``: exact mean and sample variance (ddof=1). ``ema``: exponentially weighted mean and variance; in this mode
the ``m2`` buffer holds the weighted variance itself, and `sigma` applies the reliability-weights correction (ddof=1
for two values). `sigma` is NaN until a sample holds two values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokentrim.config import STATS_MODES, StatsMode

_STATE_DTYPES: dict[str, torch.dtype] = {"count": torch.long, "mean": torch.float64, "m2": torch.float64}


class RunningStats:
    """Running mean / std of one scalar per sample.

    Args:
        batch_size: B >= 1.
        mode: "welford" or "ema".
        ema_decay: decay in (0, 1) for mode "ema".
        device: where the [B] buffers live.
    """

    def __init__(
        self,
        batch_size: int,
        mode: StatsMode = "welford",
        ema_decay: float = 0.9,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
        if mode not in STATS_MODES:
            raise ValueError(f"`mode` must be one of {STATS_MODES}, got {mode!r}")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0.0 < ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be a float in (0, 1), got {ema_decay!r}")
        self.batch_size = batch_size
        self.mode: StatsMode = mode
        self.ema_decay = float(ema_decay)
        self.device = torch.device(device)
        self.count = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # [B]
        self.mean = torch.zeros(batch_size, dtype=torch.float64, device=self.device)  # [B]
        self.m2 = torch.zeros(batch_size, dtype=torch.float64, device=self.device)  # [B]

    def _check_batch(self, name: str, value: object, bool_dtype: bool) -> Tensor:
        if not isinstance(value, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != (self.batch_size,):
            raise ValueError(f"`{name}` must have shape ({self.batch_size},), got {tuple(value.shape)}")
        if bool_dtype and value.dtype != torch.bool:
            raise TypeError(f"`{name}` must be a bool tensor, got {value.dtype}")
        if not bool_dtype and not value.is_floating_point():
            raise TypeError(f"`{name}` must have a floating dtype, got {value.dtype}")
        return value.to(self.device)

    def update(self, values: Tensor, mask: Tensor | None = None, *, check: bool = True) -> None:
        """Add `values[b]` to sample b's statistics where `mask[b]` (default: every sample).

        Args:
            values: [B] float; must be finite where masked.
            mask: [B] bool.
            check: read the values on the host to raise `ValueError` for a non-finite masked value (a device wait on
                an accelerator). False for callers whose values are finite by construction: no wait.
        """
        x = self._check_batch("values", values, bool_dtype=False).double()
        if mask is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        m = self._check_batch("mask", mask, bool_dtype=True)
        bad = m & ~torch.isfinite(x)
        if check and bool(bad.any()):
            samples = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"`values` must be finite where masked, got {x.tolist()} (non-finite for samples {samples})"
            )
        x = torch.where(m, x, self.mean)  # unmasked entries become no-ops below
        new_count = self.count + m.long()
        if self.mode == "welford":
            delta = x - self.mean
            new_mean = self.mean + delta / new_count.clamp(min=1).double()
            new_m2 = self.m2 + delta * (x - new_mean)
        else:
            a = self.ema_decay
            first = self.count == 0
            diff = x - self.mean
            new_mean = torch.where(first, x, self.mean + (1.0 - a) * diff)
            new_m2 = torch.where(first, torch.zeros_like(self.m2), a * (self.m2 + (1.0 - a) * diff * diff))
        self.mean = torch.where(m, new_mean, self.mean)
        self.m2 = torch.where(m, new_m2, self.m2)
        self.count = new_count

    @property
    def mu(self) -> Tensor:
        """[B] float64 running mean; NaN where a sample has no value yet."""
        return torch.where(self.count > 0, self.mean, torch.full_like(self.mean, float("nan")))

    @property
    def sigma(self) -> Tensor:
        """[B] float64 running sample std (ddof=1, or its weighted analogue for ema); NaN below two values."""
        n = self.count.double()
        if self.mode == "welford":
            var = self.m2 / (n - 1.0).clamp(min=1.0)
        else:
            a = self.ema_decay
            decay = torch.pow(torch.full_like(n, a * a), (n - 1.0).clamp(min=0.0))  # a^(2(n-1))
            sum_w2 = decay + (1.0 - a) * (1.0 - decay) / (1.0 + a)  # sum of squared weights, 1 for n = 1
            var = self.m2 / (1.0 - sum_w2).clamp(min=1e-300)
        sigma = var.clamp(min=0.0).sqrt()
        return torch.where(self.count > 1, sigma, torch.full_like(sigma, float("nan")))

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of the [B] buffers: `count` (long), `mean` and `m2` (float64)."""
        return {"count": self.count.clone(), "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        """Restore buffers saved by `state_dict` (exact: dtypes and shapes are checked, values copied)."""
        if set(d) != set(_STATE_DTYPES):
            raise ValueError(f"RunningStats state must have keys {sorted(_STATE_DTYPES)}, got {sorted(d)}")
        for key, dtype in _STATE_DTYPES.items():
            value = d[key]
            if not isinstance(value, Tensor) or value.dtype != dtype or tuple(value.shape) != (self.batch_size,):
                got = (value.dtype, tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"RunningStats state `{key}` must be {dtype} of shape ({self.batch_size},), got {got!r}"
                )
        self.count = d["count"].to(self.device).clone()
        self.mean = d["mean"].to(self.device).clone()
        self.m2 = d["m2"].to(self.device).clone()
