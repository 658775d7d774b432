"""The autoregressive rollout with TokenTrim in the loop.

`Rollout.step` makes one chunk: 1. denoise a candidate from its noise (self-forcing: step by step over the cache;
rolling-forcing: one pass of the joint window, `pipeline.rollout.rolling_window`); 2. judge its x0 with the
`TrimController`; 3. for the samples that reject it, prune the unstable positions from the cache and regenerate
(at most ``max_retries`` times); 4. commit: the clean context pass writes the kept chunk's K/V.

The one thing to know: the host reads the device exactly once per attempt (`Rollout._read`, a `_Readout`): which
samples reject, the sizes of the prune that would follow, and the stats figures. Verdicts, thresholds and masks stay
on the device. (`RolloutConfig.early_stop` adds one read per self-forcing attempt that may retry.) A resumed rollout
replays each `ChunkRecord`'s prunes and commit (`Rollout.restore`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pipeline.config import RolloutConfig
from pipeline.errors import InputError, NonFiniteLatentError
from pipeline.model.backend import LATENT_CHANNELS, WanBackend
from pipeline.model.host import read_flat
from pipeline.model.kv_cache import PrunePlan
from pipeline.rollout.chunk_stats import FIGURES, ChunkFigures
from pipeline.rollout.probe import Probe
from pipeline.rollout.records import ChunkRecord, PruneEvent
from pipeline.rollout.rolling_window import RollingWindow
from pipeline.rollout.sampler import ChunkNoise, renoise, to_x0
from pipeline.timing import PhaseTimer
from tokentrim import Judgement, TrimConfig, TrimController, latent_summary

logger = logging.getLogger(__name__)


@dataclass
class _Judged:
    """A candidate, its latent summary and TokenTrim's judgement of it."""

    x0: torch.Tensor  # [B, C, F, h, w]
    summary: torch.Tensor | None  # [B, N, D]; None when TokenTrim is off
    judgement: Judgement | None

    def rejects_all(self, done: torch.Tensor) -> bool:
        """Whether every sample not in ``done`` ([B] bool) rejects this candidate (a host read)."""
        return self.judgement is not None and bool((self.judgement.prune | done).all())

    def rejected(self, done: torch.Tensor) -> torch.Tensor:
        """[B] bool: the samples not in ``done`` that reject this candidate."""
        if self.judgement is None:
            return torch.zeros_like(done)
        return self.judgement.prune & ~done


@dataclass(frozen=True)
class _Readout:
    """The attempt's one host read (`Rollout._read`): per sample, whether it rejects the candidate; the sizes of the
    prune that would follow (empty when no retry can follow); the chunk's stats figures as the chunk stands."""

    rejected: list[bool]
    prune_sizes: list[float]
    figures: ChunkFigures


@dataclass
class _Accepted:
    """Per sample, the candidate it accepted and what it cost: the chunk being built by `Rollout.step`."""

    done: torch.Tensor  # [B] bool: accepted a candidate
    attempts: torch.Tensor  # [B] long: 1-based attempt of the accepted candidate
    pruned_tokens: torch.Tensor  # [B] long: cache positions pruned while generating the chunk
    severity: torch.Tensor  # [B] float64, NaN where not judged; likewise mu, sigma, threshold
    mu: torch.Tensor
    sigma: torch.Tensor
    threshold: torch.Tensor
    codes: torch.Tensor  # [B] long: TokenTrim's verdict code (`VERDICT_KINDS`) of the accepted candidate, -1 unjudged
    latents: torch.Tensor | None = None  # [B, C, F, h, w], set by the first `Rollout._accept`

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> _Accepted:
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        nan = torch.full((batch,), float("nan"), dtype=torch.float64, device=device)
        return cls(zeros.bool(), zeros.clone(), zeros.clone(), nan, nan.clone(), nan.clone(), nan.clone(),
                   zeros - 1)


class Rollout:
    """One AR rollout of a batch of prompts on one device.

    ``timer``: the `PhaseTimer` the phases are recorded into. A caller that passes one owns it (collects it once
    per chunk); without one the rollout makes its own and puts each chunk's seconds into `ChunkRecord.timings`.
    ``probe``: a known fault added to the candidates' x0 (`pipeline.rollout.probe`), on the model's patch grid.
    ``perturb``: any other fault injection, for tests and drift studies: (chunk, attempt, x0 [B, C, F, h, w]) -> x0.
    """

    def __init__(self, backend: WanBackend, config: RolloutConfig, prompts: list[str], seeds: list[int],
                 trim: TrimConfig | None = None, timer: PhaseTimer | None = None, *, probe: Probe | None = None,
                 perturb: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None) -> None:
        if len(prompts) != len(seeds) or not prompts:
            raise InputError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        self.backend, self.config, self.trim, self.seeds = backend, config, trim, list(seeds)
        self.batch = len(prompts)
        self.timer = timer or PhaseTimer(backend.device)
        self._owns_timer = timer is None
        self.timesteps = config.timesteps
        self._check_trim(trim)
        height = config.height_px or backend.spec.height_px
        width = config.width_px or backend.spec.width_px
        self.latent_hw = backend.latent_size(height, width)
        self.noise = ChunkNoise(self.seeds, (LATENT_CHANNELS, config.chunk_frames, *self.latent_hw),
                                backend.device, backend.dtype)
        self.text = backend.encode_prompts(prompts)
        self.cache = backend.causal.new_cache(self.batch, *self.latent_hw, sink_frames=config.effective_sink_frames,
                                              window_frames=config.attention_window,
                                              sink_rope=config.effective_sink_rope)
        # no host checks: a non-finite summary is caught by the attempt's one host read (`_read`)
        self.controller = (TrimController(trim, self.batch, backend.device, host_checks=False,
                                          grid=self._token_grid(trim)) if trim is not None else None)
        self.window = (RollingWindow(backend.causal, self.text, self.cache, self.noise, self.timesteps,
                                     config.chunk_frames, config.num_chunks, self.timer)
                       if config.mode == "rolling-forcing" else None)
        self.next_chunk = 0
        self._first: torch.Tensor | None = None  # [B, C, h, w] frame-averaged latents of chunk 0
        self._prev: torch.Tensor | None = None  # same, of the previous chunk
        self.probe, self.perturb = probe, perturb

    def _check_trim(self, trim: TrimConfig | None) -> None:
        if trim is None:
            return
        if tuple(trim.patch_size) != tuple(self.backend.causal.patch_size):
            raise InputError(f"`patch_size` {trim.patch_size} of the TrimConfig must equal the transformer's "
                             f"{self.backend.causal.patch_size}: one token is one KV-cache position")
        if self.config.mode == "self-forcing" and trim.measure_step >= len(self.timesteps):
            raise InputError(f"`measure_step` {trim.measure_step} must be < the {len(self.timesteps)} steps")

    def _token_grid(self, trim: TrimConfig) -> tuple[int, int]:
        """(H', W'): the patch grid of a latent frame's tokens, which TokenTrim's summaries lie on."""
        return self.latent_hw[0] // trim.patch_size[1], self.latent_hw[1] // trim.patch_size[2]

    @property
    def done(self) -> bool:
        return self.next_chunk >= self.config.num_chunks

    def __iter__(self) -> Iterator[ChunkRecord]:
        while not self.done:
            yield self.step()

    # ------------------------------------------------------------------------------------------------ one chunk
    def step(self) -> ChunkRecord:
        """Generate the next chunk: denoise -> judge -> prune/regenerate -> commit (the module docstring)."""
        c = self.next_chunk
        if self.window is not None and c == 0:
            self.window.fill()  # rolling-forcing: chunks 0..depth-2 enter the window
        chunk = _Accepted.empty(self.batch, self.backend.device)
        prunes: list[PruneEvent] = []
        for attempt in range(self._max_attempts()):
            judged = self._candidate(c, attempt, chunk.done)  # 1-2. denoise -> judge
            rejected = self._accept(chunk, judged, attempt)  # the samples that accept keep this candidate
            plan = self._plan_prune(judged, rejected, attempt)  # None when no retry can follow
            read = self._read(c, chunk, judged, rejected, plan)  # the attempt's one host read
            if not any(read.rejected):
                break
            prunes.append(self._prune(c, judged, rejected, chunk, plan, read))  # 3. prune, then regenerate
        self._commit(c, chunk)  # 4. commit
        if self.window is not None:
            self.window.settle(chunk.attempts)
        latents = chunk.latents
        assert latents is not None, "every sample accepted a candidate"
        stats = read.figures.stats(c, self.config.chunk_frames, self.cache.nbytes() // self.batch)
        record = ChunkRecord(c, latents, prunes, self.controller.state_dict() if self.controller else {},
                             self.window_state(), stats)
        if self._owns_timer:
            record.timings = self.timer.collect()
        self._advance(latents)
        return record

    def _candidate(self, c: int, attempt: int, done: torch.Tensor) -> _Judged:
        """Steps 1-2 for one attempt of chunk ``c`` (``done``: [B] samples that accepted an earlier candidate)."""
        if self.window is None:
            return self._self_forcing_candidate(c, attempt, done)
        x0 = self._perturbed(c, attempt, self.window.finish(c, attempt))
        return self._judge(x0, attempt)

    def _self_forcing_candidate(self, c: int, attempt: int, done: torch.Tensor) -> _Judged:
        """Denoise chunk ``c`` from its noise step by step over the cache, judging x0 at ``measure_step``. With
        `RolloutConfig.early_stop`, stops there when every undecided sample's candidate is rejected (a host read)."""
        x = self.noise(c, 0, attempt)
        x0, verdict = x, None
        for i, t in enumerate(self.timesteps):  # 1. denoise
            with self.timer.phase("denoise"):
                flow = self.backend.causal.denoise(x, self._levels(i), self.text, self.cache,
                                                   c * self.config.chunk_frames)
                x0 = to_x0(x, flow, t / 1000.0)
            x0 = self._perturbed(c, attempt, x0)
            if self.trim is not None and i == self.trim.measure_step:
                verdict = self._judge(x0, attempt)  # 2. judge
                if self.config.early_stop and attempt < self.trim.max_retries and verdict.rejects_all(done):
                    return verdict
            if i + 1 < len(self.timesteps):
                x = renoise(x0, self.noise(c, i + 1, attempt), self.timesteps[i + 1] / 1000.0)
        return _Judged(x0, None, None) if verdict is None else _Judged(x0, verdict.summary, verdict.judgement)

    def _perturbed(self, c: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
        if self.probe is not None and c == self.probe.chunk:
            x0 = self.probe.apply(x0, self.backend.causal.patch_size)
        return x0 if self.perturb is None else self.perturb(c, attempt, x0)

    def _levels(self, step: int) -> torch.Tensor:
        return torch.full((self.batch,), self.timesteps[step], device=self.backend.device)

    def _max_attempts(self) -> int:
        return 1 + (self.trim.max_retries if self.trim is not None else 0)

    def _judge(self, x0: torch.Tensor, attempt: int) -> _Judged:
        """Step 2: TokenTrim's judgement of a candidate x0 (none when TokenTrim is off)."""
        if self.controller is None or self.trim is None:
            return _Judged(x0, None, None)
        with self.timer.phase("trim"):
            summary = latent_summary(x0, self.trim.patch_size, self.trim.summary)
            return _Judged(x0, summary, self.controller.judge(summary, attempt))

    def _accept(self, chunk: _Accepted, judged: _Judged, attempt: int) -> torch.Tensor:
        """Step 2: the undecided samples that do not reject ``judged`` keep it as their chunk and feed the
        controller. Returns [B] bool, the samples that reject it."""
        rejected = judged.rejected(chunk.done)
        take = ~chunk.done & ~rejected
        mask = take.view(-1, 1, 1, 1, 1)
        chunk.latents = judged.x0 if chunk.latents is None else torch.where(mask, judged.x0, chunk.latents)
        chunk.attempts = torch.where(take, attempt + 1, chunk.attempts)
        chunk.done |= take
        judgement = judged.judgement
        if judgement is None or judged.summary is None or self.controller is None:
            return rejected
        self.controller.accept(judged.summary, judgement, take)
        for name in ("severity", "mu", "sigma", "threshold"):
            value = getattr(judgement, name).to(torch.float64)
            setattr(chunk, name, torch.where(take.to(value.device), value, getattr(chunk, name)))
        chunk.codes = torch.where(take.to(judgement.codes.device), judgement.codes, chunk.codes)
        return rejected

    def _plan_prune(self, judged: _Judged, rejected: torch.Tensor, attempt: int) -> tuple[list[int], PrunePlan] | None:
        """Step 3, on the device: the frames and the cache's plan of the prune that follows if a sample rejects
        ``judged``, so that its sizes travel with the attempt's host read; None when no retry can follow."""
        judgement, trim = judged.judgement, self.trim
        if judgement is None or trim is None or attempt >= trim.max_retries:
            return None
        with self.timer.phase("trim"):
            frames = self._prune_frames(trim)
            return frames, self.cache.plan_prune(frames, judgement.positions, rejected, protect_sink=trim.protect_sink)

    def _prune(self, c: int, judged: _Judged, rejected: torch.Tensor, chunk: _Accepted,
               plan: tuple[list[int], PrunePlan] | None, read: _Readout) -> PruneEvent:
        """Step 3: drop the unstable positions from the cached frames of the scope, for the rejected samples (``plan``
        and its sizes in ``read``)."""
        assert judged.judgement is not None and plan is not None, "only a judged candidate with a retry is rejected"
        frames, cache_plan = plan
        with self.timer.phase("trim"):
            before = self.cache.num_tokens()
            self.cache.apply_prune(cache_plan, read.prune_sizes)
            chunk.pruned_tokens += before - self.cache.num_tokens()
        logger.debug("chunk %d: pruned samples %s from frames %s", c,
                     [b for b, r in enumerate(read.rejected) if r], frames)
        return PruneEvent(c, frames, judged.judgement.positions.clone(), rejected.clone())

    def _prune_frames(self, trim: TrimConfig) -> list[int]:
        cached = [s.frame for s in self.cache.segments if not (s.sink and trim.protect_sink)]
        if trim.prune_scope == "window":
            return cached
        last = self.cache.frames[-1] if self.cache.frames else -1
        lo = last - self.config.chunk_frames + 1
        return [f for f in cached if lo <= f <= last]

    def _commit(self, c: int, chunk: _Accepted) -> None:
        """Step 4: the clean context pass that writes chunk ``c``'s K/V (after `_read` found its latents finite)."""
        assert chunk.latents is not None, "`_accept` ran"
        with self.timer.phase("commit"):
            self.backend.causal.commit(chunk.latents, self.text, self.cache, c * self.config.chunk_frames)

    def _advance(self, latents: torch.Tensor) -> None:
        averaged = latents.float().mean(dim=2)  # [B, C, F, h, w] -> [B, C, h, w]
        if self._first is None:
            self._first = averaged
        self._prev = averaged
        self.next_chunk += 1

    def window_state(self) -> dict[int, torch.Tensor]:
        """Rolling-forcing: a copy of the in-flight window (chunk -> noisy latents); empty for self-forcing."""
        return {j: x.clone() for j, x in self.window.chunks.items()} if self.window is not None else {}

    # ----------------------------------------------------------------------------------------------- host read
    def _read(self, c: int, chunk: _Accepted, judged: _Judged, rejected: torch.Tensor,
              plan: tuple[list[int], PrunePlan] | None) -> _Readout:
        """The attempt's one host read: which samples reject ``judged`` ([B] ``rejected``), the sizes of the prune
        that would follow (``plan``; None when no retry can follow) and chunk ``c``'s stats figures as the chunk
        stands (kept when no sample retries). `NonFiniteLatentError` when a sample's latents or summary are not
        finite."""
        latents = chunk.latents
        assert latents is not None, "`_accept` ran"
        averaged = latents.float().mean(dim=2)  # [B, C, F, h, w] -> [B, C, h, w]: frame-averaged
        prev = self._prev if self._prev is not None else averaged
        first = self._first if self._first is not None else averaged
        finite = torch.isfinite(latents).flatten(1).all(dim=1)  # [B]
        if judged.judgement is not None:
            finite = finite & judged.judgement.finite.to(finite.device)
        frames = list(range(c * self.config.chunk_frames, (c + 1) * self.config.chunk_frames))
        figures = {"severity": chunk.severity, "mu": chunk.mu, "sigma": chunk.sigma, "threshold": chunk.threshold,
                   "codes": chunk.codes, "attempts": chunk.attempts, "tokens_pruned": chunk.pruned_tokens,
                   "cache_tokens": self.cache.num_tokens_after_commit(frames),
                   "latent_dist_prev": (averaged - prev).pow(2).mean(dim=(1, 2, 3)).sqrt(),
                   "latent_dist_first": (averaged - first).pow(2).mean(dim=(1, 2, 3)).sqrt()}
        extra = {"finite": finite, "rejected": rejected, **({"prune": plan[1].sizes} if plan is not None else {})}
        host = read_flat({**figures, **extra})
        if not all(host["finite"]):
            raise NonFiniteLatentError(f"chunk {c} has NaN or Inf latents")
        return _Readout([bool(r) for r in host["rejected"]], host.get("prune", []),
                        ChunkFigures(**{name: host[name] for name in FIGURES}))

    # ----------------------------------------------------------------------------------------------- resume
    def restore(self, records: list[ChunkRecord]) -> None:
        """Rebuild the state after ``records`` (chunks 0..k-1, in order) by replaying prunes and commit passes."""
        if self.next_chunk:
            raise RuntimeError("restore() needs a fresh Rollout")
        protect_sink = self.trim.protect_sink if self.trim else True
        for expected, record in enumerate(records):
            if record.index != expected:
                raise InputError(f"resume records must be chunks 0..k-1 in order; got chunk {record.index} "
                                 f"at position {expected}")
            for event in record.prunes:
                self.cache.prune(event.frames, event.positions.to(self.backend.device),
                                 event.samples.to(self.backend.device), protect_sink=protect_sink)
            latents = record.latents.to(device=self.backend.device, dtype=self.backend.dtype)
            self.backend.causal.commit(latents, self.text, self.cache, record.index * self.config.chunk_frames)
            self._advance(latents)
        if records:
            last = records[-1]
            if self.controller is not None:
                self.controller.load_state_dict({k: v.to(self.backend.device) for k, v in last.trim_state.items()})
            if self.window is not None:
                self.window.chunks = {j: x.to(device=self.backend.device, dtype=self.backend.dtype)
                                      for j, x in last.window.items()}
        if self._owns_timer:
            self.timer.collect()  # replay is not a chunk's work
