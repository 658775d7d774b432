"""Where a render's decoded frames go: per chunk and sample, one video segment and the pixel proxies.

`ChunkWriter` decodes each chunk in the caller's thread; encoding and pixel proxies run in one worker thread (chunks
in order), overlapping the next chunk's denoising. On resume, `warm_up` re-decodes only the last few chunks.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.model.backend import WanBackend
from pipeline.model.vae import StreamDecoder
from pipeline.outputs.pixel_stats import PixelTracker
from pipeline.outputs.redecode import decoder_lookback, warmup_start
from pipeline.outputs.segments import encode_segment, remux_segments
from pipeline.outputs.video import VideoSettings, even_size
from pipeline.timing import PhaseTimer

logger = logging.getLogger(__name__)


@dataclass
class ChunkOutput:
    """One chunk's outputs, per sample: its video segment and its pixel proxies (with ``t_encode_s``)."""

    segments: list[bytes]
    pixels: list[dict[str, float]]

    def committed_json(self, first_hist: list[Any] | None) -> dict[str, Any]:
        """What a checkpoint keeps of it (the segments are objects of their own): the proxies without timings, and
        the first chunk's colour histograms (the pixel trackers' only state that no later chunk gives back)."""
        pixels = [{k: v for k, v in p.items() if not k.startswith("t_")} for p in self.pixels]
        return {"pixels": pixels, **({"first_hist": first_hist} if first_hist is not None else {})}


class ChunkWriter:
    """Per-sample segment encoding and pixel trackers fed from one streaming decoder."""

    def __init__(self, backend: WanBackend, batch: int, fps: int, timer: PhaseTimer, video: VideoSettings) -> None:
        self.decoder = backend.new_decoder()
        self.decoder_dtype = next(self.decoder.vae.parameters()).dtype
        self.stream = StreamDecoder(self.decoder)
        self.trackers = [PixelTracker() for _ in range(batch)]
        self.segments: list[list[bytes]] = [[] for _ in range(batch)]  # per sample, chunk after chunk
        self.fps, self.timer, self.video = fps, timer, video
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokentrim-encode")

    def feed(self, latents: torch.Tensor) -> Future[ChunkOutput]:
        """Decode one chunk ``[B, C, F, h, w]`` now; its segments and per-sample pixel proxies come as a future."""
        with self.timer.phase("decode"):  # on CUDA: queued on the decode stream (overlaps the next chunk)
            pending = self.stream.submit(latents.to(self.decoder_dtype))  # [B, T, H, W, 3] uint8
        return self._worker.submit(lambda: self._encode(pending.result().numpy()))

    @staticmethod
    def _crop(frames: np.ndarray) -> np.ndarray:
        height, width = even_size(frames.shape[2], frames.shape[3])
        return frames[:, :, :height, :width]

    def _encode(self, frames: np.ndarray) -> ChunkOutput:
        began = time.perf_counter()
        frames = self._crop(frames)
        segments = [encode_segment(frames[b], self.fps, self.video) for b in range(len(self.trackers))]
        stats = [tracker.update(frames[b]).to_dict() for b, tracker in enumerate(self.trackers)]
        seconds = time.perf_counter() - began
        return ChunkOutput(segments, [{"pixel_frames": frames.shape[1], **s, "t_encode_s": seconds} for s in stats])

    def first_hist(self) -> list[Any]:
        """The first chunk's colour histogram per sample, as JSON (after the first chunk was encoded)."""
        return [t.first_hist.tolist() if t.first_hist is not None else None for t in self.trackers]

    def keep(self, output: ChunkOutput) -> None:
        """Append a completed chunk's segments to the video."""
        for b, segment in enumerate(output.segments):
            self.segments[b].append(segment)

    def warm_up(self, latents: list[torch.Tensor], chunk_frames: int, first_hist: list[Any]) -> int:
        """Resume after ``latents`` (the committed chunks 0..k-1, in order): decode only the chunks the decoder's
        receptive field needs for exact frames from chunk k on, discard them, and give the pixel trackers chunk
        k-1's last frame and ``first_hist``. Returns the number of chunks re-decoded."""
        if not latents:
            raise ValueError("`latents` is empty: nothing to resume after")
        lookback = self._lookback()
        start = 0 if lookback is None else warmup_start(len(latents), chunk_frames, lookback)
        self.decoder.reset()
        for chunk in latents[start:]:
            frames = self.stream.submit(chunk.to(self.decoder_dtype)).result().numpy()
        frames = self._crop(frames)  # chunk k-1's
        for b, tracker in enumerate(self.trackers):
            tracker.last_frame = frames[b, -1].copy()
            tracker.first_hist = np.asarray(first_hist[b], dtype=np.float64)
        logger.info("re-decoded chunks %d..%d of %d to resume (decoder lookback %s latent frames)",
                    start, len(latents) - 1, len(latents), lookback)
        return len(latents) - start

    def _lookback(self) -> int | None:
        try:
            return decoder_lookback(self.decoder.vae)
        except TypeError as exc:  # not a Wan2.1 decoder: its memory is unknown, so re-decode every chunk
            logger.warning("%s; a resume re-decodes every committed chunk", exc)
            return None

    def mp4(self, sample: int) -> bytes:
        """The final mp4 of ``sample``: its segments remuxed."""
        return remux_segments(self.segments[sample], self.fps)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
