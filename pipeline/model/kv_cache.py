"""A prunable, windowed KV cache of committed latent frames.

Per layer, keys (after RoPE, at their absolute frame index) and values ``[B, heads, L, head_dim]`` in one buffer,
grouped in per-frame segments that record which spatial positions each sample's rows hold. Pruning removes rows for
good; samples that keep different counts are padded and masked by ``valid [B, L]``. Sink frames are never evicted
(nor, with ``protect_sink``, pruned); ``sink_rope="adjacent"`` re-rotates the sink next to the oldest cached frame.
The one non-obvious thing: no method on a pass's path waits for the device; a prune is planned on the device
(`plan_prune`), its sizes read by the caller with its other figures, and applied with them (`apply_prune`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.config import SinkRope
from pipeline.model.rope import apply_rope

logger = logging.getLogger(__name__)


@dataclass
class Segment:
    """One committed latent frame: ``length`` rows starting at ``start`` in every layer's buffer."""

    frame: int
    start: int
    length: int
    sink: bool
    ragged: bool = False  # some samples keep fewer rows than ``length`` (padding, masked by ``valid``)


@dataclass
class PrunePlan:
    """A prune worked out on the device by `KVCache.plan_prune` for a cache of ``segments`` segments and ``length``
    rows: ``keep_rows [B, L]`` bool and ``sizes`` ``[1 + 3 * (segments - first)]`` long (rows removed, then per
    segment from ``first`` on: loses a row, most and fewest rows a sample keeps)."""

    segments: int
    length: int
    first: int
    keep_rows: torch.Tensor
    sizes: torch.Tensor


@dataclass
class StaticPass:
    """Per-pass inputs of the static path: the rows ``index [n]`` (on the device) the pass writes at, and the mask
    ``[B, 1, 1, capacity]`` (True = attend): committed valid rows plus the pass's own rows."""

    index: torch.Tensor
    mask: torch.Tensor


class KVCache:
    """K/V rows of committed frames for every transformer layer, with typed append / prune / evict."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        *,
        sink_frames: int = 0,
        window_frames: int | None = None,
        sink_rope: SinkRope = "absolute",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        static: bool = False,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("heads", heads),
                            ("head_dim", head_dim), ("tokens_per_frame", tokens_per_frame)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if sink_frames < 0:
            raise ValueError(f"`sink_frames` must be >= 0, got {sink_frames}")
        if window_frames is not None and window_frames < 1:
            raise ValueError(f"`window_frames` must be >= 1 or None, got {window_frames}")
        self.num_layers, self.batch_size, self.heads, self.head_dim = num_layers, batch_size, heads, head_dim
        self.tokens_per_frame = tokens_per_frame
        if sink_rope not in ("absolute", "adjacent"):
            raise ValueError(f"`sink_rope` must be 'absolute' or 'adjacent', got {sink_rope!r}")
        self.sink_frames, self.window_frames, self.sink_rope = sink_frames, window_frames, sink_rope
        self.sink_shift = 0  # frames the sink keys are currently rotated by
        self._sink_keys: list[torch.Tensor] | None = None  # pristine sink keys per layer, at frames 0..sink-1
        self.dtype, self.device, self.static = dtype, torch.device(device), static
        self.segments: list[Segment] = []
        self.length = 0  # committed rows
        self._capacity = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self.valid = torch.ones(batch_size, 0, dtype=torch.bool, device=self.device)  # [B, L]
        self.positions = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)  # [B, L]
        self._padded = False
        self._pending: int | None = None  # rows written by the current forward pass (scratch)

    # ----------------------------------------------------------------- views used by the attention processor
    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the current pass's ``key``/``value`` ``[B, heads, n, head_dim]`` after the committed rows of ``layer``
        and return the views ``[B, heads, L + n, head_dim]`` to attend over. Nothing is committed until `commit`."""
        n = key.shape[2]
        if self._pending is None:
            self._pending = n
            self._reserve(self.length + n)
        elif self._pending != n:
            raise RuntimeError(f"layer {layer} wrote {n} rows, earlier layers of this pass wrote {self._pending}")
        end = self.length + n
        self._keys[layer][:, :, self.length:end] = key
        self._values[layer][:, :, self.length:end] = value
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def attention_mask(self, n: int) -> torch.Tensor | None:
        """Bool mask ``[B, 1, 1, L + n]`` (True = attend) for a pass of ``n`` new rows; None when nothing is padded."""
        if not self._padded:
            return None
        new = torch.ones(self.batch_size, n, dtype=torch.bool, device=self.device)
        return torch.cat([self.valid, new], dim=1)[:, None, None, :]

    def static_pass(self, n: int) -> StaticPass:
        """Start a pass of ``n`` new rows on the static path: its rows go at ``length .. length+n-1`` of every
        layer's fixed-capacity buffer (see `layer_buffers`); nothing is committed until `commit`."""
        if not self.static:
            raise RuntimeError("static_pass() needs a cache built with static=True")
        self._pending = n
        self._reserve(self.length + n)
        index = torch.arange(self.length, self.length + n, device=self.device)
        free = self._capacity - self.length - n
        mask = torch.cat([self.valid, torch.ones(self.batch_size, n, dtype=torch.bool, device=self.device),
                          torch.zeros(self.batch_size, free, dtype=torch.bool, device=self.device)], dim=1)
        return StaticPass(index, mask[:, None, None, :])

    def layer_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers ``[B, heads, capacity, head_dim]`` of ``layer`` (static path)."""
        return self._keys[layer], self._values[layer]

    @property
    def capacity(self) -> int:
        return self._capacity

    def end_pass(self) -> None:
        """Forget the scratch rows of a pass that is not committed (a denoising step)."""
        self._pending = None

    # ----------------------------------------------------------------------------------------- mutations
    def commit(self, frames: list[int]) -> None:
        """Keep the rows written by the pass that just ran as the segments of ``frames`` (in order, whole frames),
        then evict non-sink frames beyond the window."""
        n = self._pending
        if n is None:
            raise RuntimeError("commit() without a forward pass that wrote K/V")
        if n != len(frames) * self.tokens_per_frame:
            raise ValueError(f"`frames` {frames} do not match the {n} rows written "
                             f"({self.tokens_per_frame} per frame)")
        if self.segments and frames and frames[0] <= self.segments[-1].frame:
            raise ValueError(f"`frames` {frames} must follow the last committed frame {self.segments[-1].frame}")
        pos = torch.arange(self.tokens_per_frame, device=self.device).repeat(len(frames))
        for i, frame in enumerate(frames):
            sink = frame < self.sink_frames
            self.segments.append(Segment(frame, self.length + i * self.tokens_per_frame, self.tokens_per_frame, sink))
        self.positions = torch.cat([self.positions, pos.expand(self.batch_size, -1)], dim=1)
        self.valid = torch.cat([self.valid, torch.ones(self.batch_size, n, dtype=torch.bool, device=self.device)], 1)
        self.length += n
        self._pending = None
        self.evict()

    def evict(self) -> list[int]:
        """Drop the oldest non-sink frames beyond ``window_frames``; returns the frames dropped."""
        if self.window_frames is None:
            return []
        body = [s for s in self.segments if not s.sink]
        drop = body[: max(0, len(body) - self.window_frames)]
        if drop:
            self._keep_segments([s for s in self.segments if s not in drop])
        return [s.frame for s in drop]

    def prune(self, frames: list[int], positions: torch.Tensor, samples: torch.Tensor | None = None,
              *, protect_sink: bool = True) -> int:
        """Remove, for each sample ``b`` where ``samples[b]``, the rows of ``frames`` whose spatial position is in
        ``positions[b]`` (``[B, k]`` long). Rows are really dropped (or become padding when other samples keep more).
        Returns the number of rows removed over the batch. One host read (`plan_prune` then `apply_prune`)."""
        plan = self.plan_prune(frames, positions, samples, protect_sink=protect_sink)
        return self.apply_prune(plan, plan.sizes.to(torch.float64).tolist())

    def plan_prune(self, frames: list[int], positions: torch.Tensor, samples: torch.Tensor | None = None,
                   *, protect_sink: bool = True) -> PrunePlan:
        """The device half of `prune` (no host read): which rows each sample keeps and, in ``sizes``, what the
        compaction must know on the host. A caller reads ``sizes`` with its other figures and calls `apply_prune`
        before the cache changes otherwise."""
        if positions.ndim != 2 or positions.shape[0] != self.batch_size:
            raise ValueError(f"`positions` must be [B={self.batch_size}, k], got {tuple(positions.shape)}")
        samples = torch.ones(self.batch_size, dtype=torch.bool, device=self.device) if samples is None else samples
        hit = torch.zeros(self.batch_size, self.tokens_per_frame, dtype=torch.bool, device=self.device)
        hit.scatter_(1, positions.to(self.device), True)
        hit &= samples.to(self.device)[:, None]
        remove = torch.zeros_like(self.valid)  # [B, L]
        targets = set(frames)
        first = len(self.segments)  # the first segment that can lose rows
        for i, seg in enumerate(self.segments):
            if seg.frame in targets and not (seg.sink and (protect_sink or self.sink_rope == "adjacent")):
                rows = slice(seg.start, seg.start + seg.length)
                remove[:, rows] = hit.gather(1, self.positions[:, rows]) & self.valid[:, rows]
                first = min(first, i)
        keep_rows = self.valid & ~remove
        sizes = [remove.sum()]
        for seg in self.segments[first:]:  # per segment: loses a row, most and fewest rows a sample keeps
            rows = slice(seg.start, seg.start + seg.length)
            counts = keep_rows[:, rows].sum(dim=1)
            sizes += [remove[:, rows].any().long(), counts.max(), counts.min()]
        return PrunePlan(len(self.segments), self.length, first, keep_rows, torch.stack(sizes).long())

    def apply_prune(self, plan: PrunePlan, sizes: list[float]) -> int:
        """Carry out ``plan`` with ``sizes``, its `PrunePlan.sizes` as read on the host; returns the rows removed."""
        if (plan.segments, plan.length) != (len(self.segments), self.length):
            raise RuntimeError("apply_prune() after the cache changed since plan_prune()")
        if len(sizes) != 1 + 3 * (plan.segments - plan.first):
            raise ValueError(f"`sizes` must have the {1 + 3 * (plan.segments - plan.first)} values of the plan, "
                             f"got {len(sizes)}")
        removed = int(sizes[0])
        if removed:
            per_segment = [(bool(sizes[i]), int(sizes[i + 1]), int(sizes[i + 2])) for i in range(1, len(sizes), 3)]
            self._compact(plan.keep_rows, plan.first, per_segment)
        return removed

    def sink_shift_for(self, first_frame: int) -> int:
        """The shift that puts the sink right before the oldest cached non-sink frame (or before a pass starting at
        ``first_frame`` when none is cached); 0 for ``sink_rope="absolute"`` or while the sink is being written."""
        if self.sink_rope != "adjacent" or first_frame < self.sink_frames:
            return 0
        body = [s.frame for s in self.segments if not s.sink]
        return (body[0] if body else first_frame) - self.sink_frames

    def shift_sink(self, shift: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate the sink keys to frames ``shift .. shift+sink-1``; ``cos``/``sin`` ``[1, 1, 1, head_dim]`` are
        the RoPE tables of a pure temporal rotation by ``shift`` frames."""
        if shift == self.sink_shift:
            return
        rows = sum(s.length for s in self.segments if s.sink)  # sink segments come first
        if self._sink_keys is None:
            if self.sink_shift != 0:
                raise RuntimeError("sink keys were shifted without a pristine copy")
            self._sink_keys = [k[:, :, :rows].clone() for k in self._keys]
        for layer, pristine in enumerate(self._sink_keys):
            self._keys[layer][:, :, :rows] = apply_rope(pristine, cos, sin)
        self.sink_shift = shift

    # ----------------------------------------------------------------------------------------- reports
    @property
    def frames(self) -> list[int]:
        return [s.frame for s in self.segments]

    def num_tokens(self) -> torch.Tensor:
        """Rows each sample attends to, ``[B]`` long."""
        return self.valid.sum(dim=1)

    def num_tokens_after_commit(self, frames: list[int]) -> torch.Tensor:
        """`num_tokens` as it will be once ``frames`` are committed and the window evicts (``[B]`` long), worked out
        before the commit pass without waiting for the device."""
        body = [s.frame for s in self.segments if not s.sink] + [f for f in frames if f >= self.sink_frames]
        dropped = set(body[: max(0, len(body) - self.window_frames)]) if self.window_frames is not None else set()
        tokens = self.num_tokens() + self.tokens_per_frame * sum(f not in dropped for f in frames)
        for seg in self.segments:
            if seg.frame in dropped:
                tokens = tokens - self.valid[:, seg.start: seg.start + seg.length].sum(dim=1)
        return tokens

    def nbytes(self) -> int:
        """Bytes of committed K/V over all layers (padding included: it is really allocated)."""
        per_row = 2 * self.num_layers * self.batch_size * self.heads * self.head_dim * self._element_size()
        return per_row * self.length

    def allocated_bytes(self) -> int:
        """Bytes of the K/V buffers as allocated over all layers (`capacity` rows: a window's buffer is sized once)."""
        per_row = 2 * self.num_layers * self.batch_size * self.heads * self.head_dim * self._element_size()
        return per_row * self.capacity

    def _element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    # ----------------------------------------------------------------------------------------- internals
    def _reserve(self, rows: int) -> None:
        """Grow every layer's buffer to hold ``rows`` rows. A windowed cache is sized once for a full window plus
        the pass; an unbounded one grows by half. Growth depends only on the history, so a replayed rollout sees
        the same capacities (and bit-identical kernels)."""
        if rows <= self._capacity and self._keys:
            return
        capacity = max(rows, self._capacity + (self._capacity if self.static else self._capacity // 2))
        if self.window_frames is not None:
            pass_rows = rows - self.length
            capacity = max(rows, (self.sink_frames + self.window_frames) * self.tokens_per_frame + pass_rows)
        shape = (self.batch_size, self.heads, capacity, self.head_dim)
        keys, values = [], []
        # the static path attends over every row (masked): unused rows must hold finite values
        alloc = torch.zeros if self.static else torch.empty
        for layer in range(self.num_layers):
            k = alloc(shape, dtype=self.dtype, device=self.device)
            v = alloc(shape, dtype=self.dtype, device=self.device)
            if self._keys:
                k[:, :, : self.length] = self._keys[layer][:, :, : self.length]
                v[:, :, : self.length] = self._values[layer][:, :, : self.length]
            keys.append(k)
            values.append(v)
        self._keys, self._values, self._capacity = keys, values, capacity

    def _keep_segments(self, keep: list[Segment]) -> None:
        """Keep whole segments (eviction): their rows move down in contiguous runs; rows before the first dropped
        segment stay where they are."""
        dst, new_segments = 0, []
        for seg in keep:
            if seg.start != dst:
                for buffers in (self._keys, self._values):
                    for layer in range(self.num_layers):
                        rows = buffers[layer][:, :, seg.start: seg.start + seg.length].clone()
                        buffers[layer][:, :, dst: dst + seg.length] = rows
            self.valid[:, dst: dst + seg.length] = self.valid[:, seg.start: seg.start + seg.length].clone()
            self.positions[:, dst: dst + seg.length] = self.positions[:, seg.start: seg.start + seg.length].clone()
            new_segments.append(Segment(seg.frame, dst, seg.length, seg.sink, seg.ragged))
            dst += seg.length
        self.segments, self.length = new_segments, dst
        self.valid, self.positions = self.valid[:, :dst], self.positions[:, :dst]
        self._padded = any(s.ragged for s in self.segments)  # host bookkeeping: no wait for the device

    def _compact(self, keep_rows: torch.Tensor, start: int, sizes: list[tuple[bool, int, int]]) -> None:
        """Drop rows where ``keep_rows [B, L]`` is False, segment by segment, padding ragged samples. ``sizes``: per
        segment from ``start`` on, whether it loses a row and the most / fewest rows a sample keeps (read on the
        host by the caller). Rows before the first segment that loses one are not touched."""
        first = start + next(i for i, (lost, _, _) in enumerate(sizes) if lost)
        base = self.segments[first].start
        parts: list[torch.Tensor] = []
        valids: list[torch.Tensor] = []
        tail: list[Segment] = []
        for seg, (_, most, least) in zip(self.segments[first:], sizes[first - start:], strict=True):
            rows = keep_rows[:, seg.start: seg.start + seg.length]  # [B, len]
            counts = rows.sum(dim=1, keepdim=True)
            # a stable sort puts each sample's kept rows first, in their original order
            parts.append(torch.sort((~rows).to(torch.int8), dim=1, stable=True).indices[:, :most] + seg.start)
            valids.append(torch.arange(most, device=self.device)[None, :] < counts)
            tail.append(Segment(seg.frame, base + sum(s.length for s in tail), most, seg.sink, least < most))
        index = torch.cat(parts, dim=1)  # [B, n]: source rows of the new tail
        n = index.shape[1]
        idx = index[:, None, :, None].expand(-1, self.heads, -1, self.head_dim)
        for buffers in (self._keys, self._values):
            for layer in range(self.num_layers):
                buffers[layer][:, :, base: base + n] = buffers[layer].gather(2, idx)
        valid = torch.cat(valids, dim=1)
        self.positions = torch.cat([self.positions[:, :base],
                                    self.positions.gather(1, index).masked_fill(~valid, 0)], dim=1)
        self.valid = torch.cat([self.valid[:, :base], valid], dim=1)
        self.segments = self.segments[:first] + tail
        self.length = base + n
        self._padded = any(s.ragged for s in self.segments)
