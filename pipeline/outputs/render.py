"""Render prompts to videos: rollout, streaming decode, mp4, per-chunk stats, optional checkpoints.

`render_prompts` (what `tokentrim render` and the job workers call) writes ``<id>.mp4`` and ``<id>.stats.parquet``
to the ``out`` store and, given a ``state`` store, commits each chunk's latent context and video segments there once
they are encoded, and resumes from them: earlier segments are reused byte for byte, and only the last few chunks are
decoded again to rebuild the decoder's causal cache (`pipeline.outputs.redecode`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RolloutConfig
from pipeline.errors import CorruptStateError, InputError
from pipeline.hashing import output_hash
from pipeline.model.backend import WanBackend
from pipeline.outputs.chunk_writer import ChunkOutput, ChunkWriter
from pipeline.outputs.video import VideoSettings
from pipeline.rollout.chunk_stats import STATS_FIELDS, stats_row, stats_schema
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


def render_prompts(backend: WanBackend, prompts: list[str], prompt_ids: list[str], out: Store, *,
                   config: RolloutConfig, trim: TrimConfig | None, seeds: list[int], state: Store | None = None,
                   force_restart: bool = False,
                   on_chunk: Callable[[int, list[dict[str, Any]]], None] | None = None,
                   names: tuple[str, str] = ("{id}.mp4", "{id}.stats.parquet"),
                   video: VideoSettings | None = None, probe: Probe | None = None,
                   fence: Callable[[], None] | None = None) -> list[RenderResult]:
    """Render a batch of prompts (one sample each) with one rollout; see the module docstring.

    ``names`` are the keys of the video and the stats table in ``out``, ``{id}`` being the prompt id.
    ``on_chunk(index, rows)`` is called once per chunk, in order, when its rows are complete. ``video``: the
    H.264 encoder settings (default `VideoSettings()`), part of the config hash. ``probe``: a known fault injected
    into the rollout (`pipeline.rollout.probe`; regressions and benches), part of the config hash. ``fence()`` is
    called right before every commit (each checkpoint chunk, the outputs): it raises to stop the render there (a job
    worker whose claim on the prompt is no longer current).
    """
    if not isinstance(out, Store) or not isinstance(state, (Store, type(None))):
        raise TypeError(f"`out` and `state` must be `pipeline.store.Store`s (state: or None), got "
                        f"{type(out).__name__} and {type(state).__name__}")
    if len(prompt_ids) != len(prompts):
        raise InputError(f"need one prompt id per prompt, got {len(prompt_ids)} ids for {len(prompts)} prompts")
    for pid in prompt_ids:
        validate_key(pid, name="prompt_id")
        if "/" in pid:
            raise InputError(f"`prompt_id` must not contain '/', got {pid!r}")
    video = VideoSettings() if video is None else video
    digest = render_hash(backend, config, trim, video, probe)
    timer = PhaseTimer(backend.device)  # collected here, once per chunk; the rollout only records into it
    rollout = Rollout(backend, config, prompts, seeds, trim, timer, probe=probe)
    writer = ChunkWriter(backend, len(prompts), config.fps, timer, video)
    checkpoints = _open_checkpoints(state, digest, prompt_ids, force_restart)
    rows: list[list[dict[str, Any]]] = [[] for _ in prompts]

    def complete(record: ChunkRecord, output: ChunkOutput) -> None:
        writer.keep(output)
        chunk_rows = [stats_row(s, record.timings, pix) for s, pix in zip(record.stats, output.pixels)]
        for b, row in enumerate(chunk_rows):
            rows[b].append(row)
        if on_chunk is not None:
            on_chunk(record.index, chunk_rows)

    def commit(record: ChunkRecord, output: Future[ChunkOutput], prepared: Any) -> None:
        done = output.result()
        if checkpoints is not None:  # the chunk is committed once its segments exist, and with them
            if fence is not None:
                fence()
            with timer.phase("checkpoint"):
                checkpoints.commit(prepared, done.segments,
                                   done.committed_json(writer.first_hist() if record.index == 0 else None), fence)
        complete(record, done)

    try:
        resumed = _resume(rollout, writer, checkpoints, complete)
        pending: tuple[ChunkRecord, Future, Any] | None = None
        for record in rollout:
            output = writer.feed(record.latents)
            prepared = None
            if checkpoints is not None:
                with timer.phase("checkpoint"):
                    prepared = checkpoints.prepare(record)
            record.timings = timer.collect()
            if pending is not None:  # the previous chunk's encoding overlapped with this chunk's denoising
                commit(*pending)
            pending = (record, output, prepared)
        if pending is not None:
            commit(*pending)
        if fence is not None:
            fence()
        return [_write_outputs(out, pid, writer.mp4(b), rows[b], digest, resumed, names, seeds[b])
                for b, pid in enumerate(prompt_ids)]
    finally:
        writer.close()


def _open_checkpoints(state: Store | None, digest: str, prompt_ids: list[str], force_restart: bool):
    if state is None:
        return None
    from pipeline.outputs.checkpoint import RolloutCheckpoints

    return RolloutCheckpoints(state, digest, prompt_ids, force_restart=force_restart)


def _resume(rollout: Rollout, writer: ChunkWriter, checkpoints,
            complete: Callable[[ChunkRecord, ChunkOutput], None]) -> int:
    """Continue after the committed chunks: the rollout's cache is rebuilt from their latents, their segments and
    pixel proxies are taken as committed, and the decoder is warmed up on the last few. Returns the chunks resumed."""
    if checkpoints is None:
        return 0
    records = checkpoints.load()
    if not records:
        return 0
    for record in records:
        outputs = checkpoints.outputs(record.index)
        if len(checkpoints.segments(record.index)) != len(writer.trackers) or not isinstance(outputs, dict):
            raise CorruptStateError(f"chunk {record.index} under {checkpoints.store.url} was committed without its "
                                    "video segments and pixel proxies; resume it with --restart")
    rollout.restore(records)
    redecoded = 0
    if len(records) < rollout.config.num_chunks:  # chunks left to render: their frames need the decoder's cache
        redecoded = writer.warm_up([r.latents.to(rollout.backend.device) for r in records],
                                   rollout.config.chunk_frames, checkpoints.outputs(0)["first_hist"])
    for record in records:
        pixels = [_renamed(p) for p in checkpoints.outputs(record.index)["pixels"]]
        complete(record, ChunkOutput(checkpoints.segments(record.index), pixels))
    rollout.timer.collect()
    logger.info("resumed after %d committed chunks (%d re-decoded)", len(records), redecoded)
    return len(records)


def _write_outputs(out: Store, pid: str, video: bytes, rows: list[dict[str, Any]], digest: str,
                   resumed: int, names: tuple[str, str], seed: int) -> RenderResult:
    import pyarrow as pa

    video_key, stats_key = (name.format(id=pid) for name in names)
    out.put_bytes(video_key, video)
    unknown = sorted({k for r in rows for k in r} - set(STATS_FIELDS))
    if unknown:
        raise ValueError(f"stats rows hold columns outside `STATS_COLUMNS`: {unknown}")
    table = pa.Table.from_pylist([{"prompt_id": pid, "seed": seed, "render_hash": digest,
                                   **{k: _clean(v) for k, v in r.items()}} for r in rows], schema=stats_schema())
    out.put_table(stats_key, table)
    return RenderResult(pid, out.join(video_key), out.join(stats_key), digest, rows, resumed)


def _renamed(pixels: dict[str, Any]) -> dict[str, Any]:
    """Pixel proxies as a checkpoint written before the column rename holds them (``flicker``) -> today's names."""
    return {("steadiness" if k == "flicker" else k): v for k, v in pixels.items()}


def _clean(value: Any) -> Any:
    """NaN floats become nulls in the table (no severity before the first comparison)."""
    return None if isinstance(value, float) and math.isnan(value) else value
