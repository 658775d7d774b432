"""Render prompts to videos: rollout, streaming decode, pixel proxies, mp4, per-chunk stats, optional checkpoints.

`render` is what `tokentrim render` and the job workers call. It writes, under ``out_url``:
``<id>.mp4`` (H.264, yuv420p, faststart) and ``<id>.stats.parquet`` (one row per chunk), each as one whole object.
With ``state_url`` it commits each accepted chunk's latent context there and resumes from it when present.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import RolloutConfig
from pipeline.errors import InputError
from pipeline.hashing import output_hash
from pipeline.model.backend import WanBackend
from pipeline.model.vae import StreamDecoder
from pipeline.outputs.pixel_stats import PixelTracker
from pipeline.outputs.video import Mp4Encoder, VideoSettings, even_size
from pipeline.rollout.chunk_stats import stats_row
from pipeline.rollout.loop import Rollout
from pipeline.rollout.probe import Probe
from pipeline.rollout.records import ChunkRecord
from pipeline.store import Store, validate_key
from pipeline.timing import PhaseTimer
from tokentrim import TrimConfig

logger = logging.getLogger(__name__)


@dataclass
class RenderResult:
    """What a render wrote, per prompt."""

    prompt_id: str
    video_url: str
    stats_url: str
    config_hash: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0


def render_hash(backend: WanBackend, config: RolloutConfig, trim: TrimConfig | None,
                video: VideoSettings | None = None, probe: Probe | None = None) -> str:
    """The `output_hash` of what this backend renders with ``config``, ``trim``, the video encoder settings and a
    probe."""
    return output_hash(backend.spec, config, trim, backend.dtype, video=VideoSettings() if video is None else video,
                       compiled=backend.causal.compiled, probe=probe)


class _Sinks:
    """Per-sample video encoders and pixel trackers fed from one streaming decoder.

    Decoding runs on the model's device in the caller's thread; encoding and the pixel proxies run in one worker
    thread (chunks stay in order), so they overlap with the next chunk's denoising.
    """

    def __init__(self, backend: WanBackend, batch: int, fps: int, timer: PhaseTimer, video: VideoSettings) -> None:
        self.decoder = backend.new_decoder()
        self.decoder_dtype = next(self.decoder.vae.parameters()).dtype
        self.stream = StreamDecoder(self.decoder)
        self.trackers = [PixelTracker() for _ in range(batch)]
        self.encoders: list[Mp4Encoder] | None = None
        self.fps, self.timer, self.video = fps, timer, video
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokentrim-encode")

    def feed(self, latents: torch.Tensor) -> Future[list[dict[str, float]]]:
        """Decode one chunk ``[B, C, F, h, w]`` now; its encoding and per-sample pixel proxies come as a future."""
        with self.timer.phase("decode"):  # on CUDA: queued on the decode stream (overlaps the next chunk)
            pending = self.stream.submit(latents.to(self.decoder_dtype))  # [B, T, H, W, 3] uint8
        return self._worker.submit(lambda: self._encode(pending.result().numpy()))

    def _encode(self, frames: Any) -> list[dict[str, float]]:
        began = time.perf_counter()
        height, width = even_size(frames.shape[2], frames.shape[3])
        frames = frames[:, :, :height, :width]
        if self.encoders is None:
            self.encoders = [Mp4Encoder(width, height, fps=self.fps, settings=self.video) for _ in self.trackers]
        stats = []
        for b, (encoder, tracker) in enumerate(zip(self.encoders, self.trackers)):
            encoder.write(frames[b])
            stats.append(tracker.update(frames[b]).to_dict())
        seconds = time.perf_counter() - began
        return [{**s, "t_encode": seconds} for s in stats]

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        for encoder in self.encoders or []:
            encoder.close()


def render(backend: WanBackend, prompts: list[str], prompt_ids: list[str], out_url: str, *,
           config: RolloutConfig, trim: TrimConfig | None, seeds: list[int], state_url: str | Store | None = None,
           storage_options: dict | None = None, force_restart: bool = False,
           on_chunk: Callable[[int, list[dict[str, Any]]], None] | None = None,
           names: tuple[str, str] = ("{id}.mp4", "{id}.stats.parquet"),
           video: VideoSettings | None = None, probe: Probe | None = None) -> list[RenderResult]:
    """Render a batch of prompts (one sample each) with one rollout; see the module docstring.

    ``names`` are the keys of the video and the stats table under ``out_url``, ``{id}`` being the prompt id.
    ``on_chunk(index, rows)`` is called once per chunk, in order, when its rows are complete. ``video``: the
    H.264 encoder settings (default `VideoSettings()`), part of the config hash. ``probe``: a known fault injected
    into the rollout (`pipeline.rollout.probe`; regressions and benches), part of the config hash.
    """
    if len(prompt_ids) != len(prompts):
        raise InputError(f"need one prompt id per prompt, got {len(prompt_ids)} ids for {len(prompts)} prompts")
    for pid in prompt_ids:
        validate_key(pid, name="prompt_id")
        if "/" in pid:
            raise InputError(f"`prompt_id` must not contain '/', got {pid!r}")
    out = Store(out_url, storage_options)
    video = VideoSettings() if video is None else video
    digest = render_hash(backend, config, trim, video, probe)
    timer = PhaseTimer(backend.device)  # collected here, once per chunk; the rollout only records into it
    rollout = Rollout(backend, config, prompts, seeds, trim, timer)
    rollout.perturb = probe
    sinks = _Sinks(backend, len(prompts), config.fps, timer, video)
    checkpoints = _open_checkpoints(state_url, storage_options, digest, prompt_ids, force_restart)
    rows: list[list[dict[str, Any]]] = [[] for _ in prompts]

    def complete(record: ChunkRecord, pixels: Future[list[dict[str, float]]]) -> None:
        chunk_rows = [stats_row(s, record.timings, pix) for s, pix in zip(record.stats, pixels.result())]
        for b, row in enumerate(chunk_rows):
            rows[b].append(row)
        if on_chunk is not None:
            on_chunk(record.index, chunk_rows)

    try:
        resumed = _resume(rollout, sinks, checkpoints, complete)
        pending: tuple[ChunkRecord, Future] | None = None
        for record in rollout:
            pixels = sinks.feed(record.latents)
            if checkpoints is not None:
                with timer.phase("checkpoint"):
                    checkpoints.save(record)
            record.timings = timer.collect()
            if pending is not None:  # the previous chunk's encoding overlapped with this chunk's denoising
                complete(*pending)
            pending = (record, pixels)
        if pending is not None:
            complete(*pending)
        encoders = sinks.encoders
        assert encoders is not None  # created by the first chunk's frames
        return [_write_outputs(out, pid, encoders[b], rows[b], digest, resumed, names, seeds[b])
                for b, pid in enumerate(prompt_ids)]
    finally:
        sinks.close()


def _open_checkpoints(state: str | Store | None, storage_options: dict | None, digest: str, prompt_ids: list[str],
                      force_restart: bool):
    if state is None:
        return None
    from pipeline.outputs.checkpoint import RolloutCheckpoints

    store = state if isinstance(state, Store) else Store(state, storage_options)
    return RolloutCheckpoints(store, digest, prompt_ids, force_restart=force_restart)


def _resume(rollout: Rollout, sinks: _Sinks, checkpoints, complete: Callable[[ChunkRecord, Future], None]) -> int:
    """Replay committed chunks: the cache is rebuilt, and their frames are decoded once more for the video and the
    pixel proxies (which checkpoints do not store). Returns the number of chunks resumed."""
    if checkpoints is None:
        return 0
    records = checkpoints.load()
    if not records:
        return 0
    rollout.restore(records)
    for record in records:
        complete(record, sinks.feed(record.latents.to(rollout.backend.device)))
    rollout.timer.collect()
    logger.info("resumed after %d committed chunks", len(records))
    return len(records)


def _write_outputs(out: Store, pid: str, encoder: Mp4Encoder, rows: list[dict[str, Any]], digest: str,
                   resumed: int, names: tuple[str, str], seed: int) -> RenderResult:
    import pyarrow as pa

    video_key, stats_key = (name.format(id=pid) for name in names)
    out.put_bytes(video_key, encoder.finish())
    columns = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    table = pa.Table.from_pylist([{"prompt_id": pid, "seed": seed, "config_hash": digest,
                                   **{k: _clean(r.get(k)) for k in columns}} for r in rows])
    out.put_table(stats_key, table)
    return RenderResult(pid, out.join(video_key), out.join(stats_key), digest, rows, resumed)


def _clean(value: Any) -> Any:
    """NaN floats become nulls in the table (no severity before the first comparison)."""
    return None if isinstance(value, float) and math.isnan(value) else value
