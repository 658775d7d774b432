"""The TokenTrim verdict: judge a candidate chunk against the running statistics (DESIGN.md §2, steps 2-6).

Shapes (B samples, N tokens per latent frame, D channels, k = ceil(p * N)):
    summary   [B, N, D]  latent summary of the candidate chunk (`tokentrim.summary.latent_summary`)
    drift     [B, N]     per-token drift to the sample's previous accepted summary
    positions [B, k]     unstable positions, sorted ascending
    severity, mu, sigma, threshold, prune, chunks_accepted   [B]

Each sample has its own previous summary, statistics and chunk count: sample i's judgement never depends on
sample j. The engine calls `judge` for every candidate and `accept` for the candidate it keeps; `judge` does not
change state, so a rejected candidate leaves no trace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokentrim.config import TrimConfig
from tokentrim.stats import RunningStats
from tokentrim.summary import drift_score, unstable_set

logger = logging.getLogger(__name__)

VerdictKind = Literal["warmup", "accepted", "pruned"]
# The one verdict vocabulary (the stats rows use it too). `Judgement.codes` index it: 0 warmup (only feeds the
# statistics), 1 accepted, 2 pruned (over the threshold with retries left: the cache is pruned, the chunk regenerated)
VERDICT_KINDS: tuple[VerdictKind, ...] = ("warmup", "accepted", "pruned")

_STATS_PREFIX = "stats."
# The previous accepted summary is kept (and checkpointed) in 16 bits, clamped to the dtype's finite range: half the
# checkpoint bytes of float32, and judging against the stored value keeps a resumed rollout bit-exact.
PREV_DTYPE = torch.float16
_PREV_MAX = torch.finfo(PREV_DTYPE).max


@dataclass
class Judgement:
    """The verdict on one candidate chunk of a batch.

    Attributes:
        severity: [B] float32 mean drift over the unstable set; NaN where the sample has no previous summary.
        mu: [B] float64 running mean of accepted severities (NaN before the first one).
        sigma: [B] float64 the sigma of the threshold: the running sample std of accepted severities, floored at
            `sigma_floor * mu` (NaN before the second one).
        threshold: [B] float64 mu + lam * sigma; NaN for samples in warmup.
        prune: [B] bool; reject this candidate, prune `positions` and regenerate.
        positions: [B, k] long unstable positions (in range for every sample; meaningful where severity is finite).
        codes: [B] long verdict codes, indices into `VERDICT_KINDS` (0 warmup, 1 accepted, 2 pruned).
        drift: [B, N] float32 per-token drift (NaN where the sample has no previous summary).
        finite: [B] bool, the summary is finite (always true unless the controller was made with
            ``host_checks=False``, which leaves this check to the caller).
    """

    severity: Tensor
    mu: Tensor
    sigma: Tensor
    threshold: Tensor
    prune: Tensor
    positions: Tensor
    codes: Tensor
    drift: Tensor
    finite: Tensor

    @property
    def kinds(self) -> list[str]:
        """Per sample "warmup" | "accepted" | "pruned" (the verdicts of the stats rows). Reads `codes` on the host
        (a device wait on an accelerator): callers that avoid waits read the codes with their other figures."""
        return [VERDICT_KINDS[code] for code in self.codes.tolist()]


class TrimController:
    """Per-sample TokenTrim state: previous accepted summary, running statistics and accepted-chunk count.

    Args:
        config: the method's settings.
        batch_size: B >= 1.
        device: where the state lives; summaries are moved here.
        host_checks: check summaries for non-finite values on the host and raise `ValueError` (the default). False:
            `judge` and `accept` never wait for the device; a non-finite summary is flagged in `Judgement.finite`
            instead, and the caller must check it before trusting the judgement or the state after `accept`.
        grid: (H', W') patch grid of the summaries' N tokens (row-major); needed by ``config.drift == "motion"``.
    """

    def __init__(self, config: TrimConfig, batch_size: int, device: torch.device | str = "cpu",
                 host_checks: bool = True, grid: tuple[int, int] | None = None) -> None:
        if not isinstance(config, TrimConfig):
            raise TypeError(f"`config` must be a TrimConfig, got {type(config).__name__}")
        if config.drift == "motion" and grid is None:
            raise ValueError("`grid` (H', W') of the patch grid is needed for drift \"motion\", got None")
        self.grid = grid
        self.config = config
        self.device = torch.device(device)
        self.stats = RunningStats(batch_size, config.stats, config.ema_decay, self.device)
        self.batch_size = batch_size
        self.host_checks = host_checks
        self._chunks = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # [B]
        self._prev: Tensor | None = None  # [B, N, D] PREV_DTYPE, allocated on the first accept

    @property
    def chunks_accepted(self) -> Tensor:
        """[B] long number of chunks accepted per sample."""
        return self._chunks.clone()

    def _check_summary(self, summary: object, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Validate a [B, N, D] summary: it as float32 on the controller's device and [B] bool, which samples' are
        finite (non-finite ones in ``mask`` raise, unless ``host_checks`` is off)."""
        if not isinstance(summary, Tensor):
            raise TypeError(f"`summary` must be a torch.Tensor, got {type(summary).__name__}")
        if not summary.is_floating_point():
            raise TypeError(f"`summary` must have a floating dtype, got {summary.dtype}")
        if summary.ndim != 3 or summary.shape[0] != self.batch_size or summary.shape[1] < 1 or summary.shape[2] < 1:
            raise ValueError(f"`summary` must have shape [{self.batch_size}, N, D], got {tuple(summary.shape)}")
        if self._prev is not None and summary.shape[1:] != self._prev.shape[1:]:
            raise ValueError(
                f"`summary` must keep the [N, D] = {tuple(self._prev.shape[1:])} of earlier chunks, "
                f"got {tuple(summary.shape)}"
            )
        z = summary.to(device=self.device, dtype=torch.float32)
        finite = torch.isfinite(z).flatten(1).all(dim=1)  # [B]
        if not self.host_checks:
            return z, finite
        checked = ~finite if mask is None else mask & ~finite
        if bool(checked.any()):
            raise ValueError(f"`summary` has non-finite values for samples {checked.nonzero().flatten().tolist()}")
        return z, finite

    def _check_attempt(self, attempt: object) -> int:
        if isinstance(attempt, bool) or not isinstance(attempt, int):
            raise TypeError(f"`attempt` must be an int, got {attempt!r}")
        if not 0 <= attempt <= self.config.max_retries:
            raise ValueError(f"`attempt` must be in [0, max_retries={self.config.max_retries}], got {attempt}")
        return attempt

    def judge(self, summary: Tensor, attempt: int) -> Judgement:
        """Judge a candidate chunk; does not change state.

        A sample is in warmup while it has accepted fewer than `config.warmup` chunks, or its statistics hold
        fewer than two severities (the first chunk has none, so at least chunks 0-2 are warmup). Otherwise
        prune = severity > mu + lam * max(sigma, sigma_floor * mu) and attempt < max_retries: the candidate of
        attempt `max_retries` is accepted whatever its severity.

        Args:
            summary: [B, N, D] summary of the candidate, finite.
            attempt: 0 for the first candidate of a chunk, +1 per regeneration, at most `config.max_retries`.
        """
        z, finite = self._check_summary(summary)
        attempt = self._check_attempt(attempt)
        has_prev = self._chunks > 0  # [B]
        nan = float("nan")
        if self._prev is None:
            drift = torch.full(z.shape[:2], nan, dtype=torch.float32, device=self.device)  # [B, N]
        else:
            prev = self._prev.float()  # stored in 16 bits (the checkpoint), judged in fp32
            score = drift_score(z, prev, self.config.drift, self.grid, self.config.drift_radius)  # [B, N]
            drift = torch.where(has_prev[:, None], score, nan)
        # Samples without a previous summary get in-range placeholder positions (their drift is all zero here).
        positions, severity = unstable_set(torch.nan_to_num(drift, nan=0.0), self.config.p)  # [B, k], [B]
        severity = torch.where(has_prev, severity, nan)
        mu = self.stats.mu  # [B] float64
        sigma = torch.maximum(self.stats.sigma, self.config.sigma_floor * mu.abs())  # NaN stays NaN
        warmup = (self._chunks < self.config.warmup) | (self.stats.count < 2)
        threshold = torch.where(warmup, nan, mu + self.config.lam * sigma)
        over = severity.double() > threshold  # False wherever threshold or severity is NaN
        prune = ~warmup & over & (attempt < self.config.max_retries)
        codes = torch.where(warmup, 0, torch.where(prune, 2, 1))  # VERDICT_KINDS, kept on the device
        return Judgement(
            severity=severity,
            mu=mu,
            sigma=sigma,
            threshold=threshold,
            prune=prune,
            positions=positions,
            codes=codes,
            drift=drift,
            finite=finite,
        )

    def accept(self, summary: Tensor, judgement: Judgement, mask: Tensor | None = None) -> None:
        """Commit the kept candidate of the samples in `mask` (default: all).

        Its summary becomes the sample's previous one, its severity (if finite) feeds the running statistics and
        the sample's chunk count grows by one. Accepting a candidate over its threshold is allowed (its retries
        are spent, or nothing is left to prune); its severity then feeds the statistics clipped to that threshold,
        so one corrupted chunk cannot lift the threshold over the chunks that follow it, while a lasting change of
        regime still raises the statistics a little with each chunk.

        Args:
            summary: [B, N, D] summary of the accepted candidate (the one `judgement` was made on).
            judgement: `judge(summary, attempt)`.
            mask: [B] bool, the samples that accept this candidate.
        """
        if not isinstance(judgement, Judgement):
            raise TypeError(f"`judgement` must be a Judgement, got {type(judgement).__name__}")
        if mask is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (self.batch_size,):
            got = (mask.dtype, tuple(mask.shape)) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"`mask` must be a bool tensor of shape ({self.batch_size},), got {got}")
        mask = mask.to(self.device)
        z = self._check_summary(summary, mask)[0]
        if tuple(judgement.severity.shape) != (self.batch_size,):
            raise ValueError(f"`judgement` is for batch size {judgement.severity.shape}, not {self.batch_size}")
        severity = judgement.severity.to(self.device)
        threshold = judgement.threshold.to(self.device)
        over = severity.double() > threshold  # False where the threshold is NaN (warmup)
        severity = torch.where(over, threshold, severity.double())  # a forced accept counts at its threshold
        # finite by construction (nan_to_num), so the statistics need not check it on the host
        self.stats.update(torch.nan_to_num(severity, nan=0.0), mask & torch.isfinite(severity), check=False)
        stored = z.clamp(-_PREV_MAX, _PREV_MAX).to(PREV_DTYPE)  # NaN stays NaN (flagged in `finite`)
        if self._prev is None:
            self._prev = torch.zeros_like(stored)
        self._prev = torch.where(mask[:, None, None], stored, self._prev)
        self._chunks = self._chunks + mask.long()
        if logger.isEnabledFor(logging.DEBUG):  # .tolist() waits for the device: only when it is logged
            logger.debug("accepted chunk for samples %s", mask.nonzero().flatten().tolist())

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to resume bit-exactly, as tensors only (safetensors-compatible).

        Keys: `chunks_accepted` [B] long, `prev_summary` [B, N, D] float16 ([B, 0, 0] before the first accept),
        `stats.count` [B] long, `stats.mean` and `stats.m2` [B] float64.
        """
        prev = self._prev if self._prev is not None else torch.zeros(self.batch_size, 0, 0, dtype=PREV_DTYPE,
                                                                     device=self.device)
        state = {"chunks_accepted": self._chunks.clone(), "prev_summary": prev.clone()}
        state.update({_STATS_PREFIX + key: value for key, value in self.stats.state_dict().items()})
        return state

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        """Restore a state saved by `state_dict` (on any device); shapes and dtypes are checked."""
        expected = {"chunks_accepted", "prev_summary"} | {_STATS_PREFIX + k for k in ("count", "mean", "m2")}
        if set(d) != expected:
            raise ValueError(f"TrimController state must have keys {sorted(expected)}, got {sorted(d)}")
        chunks, prev = d["chunks_accepted"], d["prev_summary"]
        if chunks.dtype != torch.long or tuple(chunks.shape) != (self.batch_size,):
            raise ValueError(f"state `chunks_accepted` must be long of shape ({self.batch_size},), got {chunks.dtype}")
        if prev.dtype != PREV_DTYPE or prev.ndim != 3 or prev.shape[0] != self.batch_size:
            raise ValueError(f"state `prev_summary` must be {PREV_DTYPE} [{self.batch_size}, N, D], got {prev.dtype} "
                             f"{tuple(prev.shape)}")
        if prev.numel() == 0 and bool((chunks > 0).any()):
            raise ValueError("state `prev_summary` is empty but `chunks_accepted` says chunks were accepted")
        stats = {key[len(_STATS_PREFIX) :]: value for key, value in d.items() if key.startswith(_STATS_PREFIX)}
        self.stats.load_state_dict(stats)
        self._chunks = chunks.to(self.device).clone()
        self._prev = prev.to(self.device).clone() if prev.numel() > 0 else None
