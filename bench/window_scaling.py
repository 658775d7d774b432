"""Time and KV-cache memory per chunk at chunk 60 vs chunk 10 with a local window (DESIGN.md §6: both <= 1.1x).

With ``--window 9 --sink 3`` the cache holds at most 3 sink + 9 window latent frames, full from chunk 4 on, so a
chunk should cost the same at chunk 60 as at chunk 10. Two rollouts of the same prompt and seed are brought to
chunk 10 and chunk 60; then, side by side and interleaved, the passes of one chunk (4 denoise passes + 1 pass at
t = 0, none committed) are timed on each cache ``--repeats`` times, and the median ratio is printed. The memory
ratio compares the committed K/V bytes (`KVCache.nbytes`, the `cache_bytes` stats column) after each chunk's commit;
the allocated buffer bytes (capacity, which only grows) are printed too. The per-chunk step seconds of the long run,
read from its stats rows around both chunks, are printed as information.

    python -m bench.window_scaling [--early 10] [--late 60] [--window 9] [--sink 3] [--repeats 10] [--trim]
"""

from __future__ import annotations

import torch

from bench.common import (
    PROMPT,
    Reporter,
    base_parser,
    build_mid_backend,
    command_line,
    interleaved,
    median,
    paired_ratio,
    require,
    set_threads,
    spread,
    step_seconds,
)
from pipeline.config import RolloutConfig
from pipeline.model.backend import LATENT_CHANNELS
from pipeline.rollout.loop import Rollout
from pipeline.rollout.records import ChunkRecord
from pipeline.rollout.sampler import chunk_noise
from tokentrim import TrimConfig


def chunk_passes(rollout: Rollout) -> None:
    """The forwards of the rollout's next chunk without changing its state: each denoise level, then t = 0."""
    causal, config = rollout.backend.causal, rollout.config
    c = rollout.next_chunk
    shape = (LATENT_CHANNELS, config.chunk_frames, *rollout.latent_hw)
    x = chunk_noise(rollout.seeds, c, 0, 0, shape, rollout.backend.device, rollout.backend.dtype)
    levels = [*rollout.timesteps, 0.0]
    for t in levels:
        level = torch.full((rollout.batch,), t, device=rollout.backend.device)
        causal.denoise(x, level, rollout.text, rollout.cache, c * config.chunk_frames)


def advance(rollout: Rollout, chunks: int) -> list[ChunkRecord]:
    return [rollout.step() for _ in range(chunks)]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--early", type=int, default=10, help="the early chunk")
    parser.add_argument("--late", type=int, default=60, help="the late chunk")
    parser.add_argument("--window", type=int, default=9, help="window_frames (latent frames)")
    parser.add_argument("--sink", type=int, default=3, help="sink_frames")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timings of each chunk's passes")
    parser.add_argument("--trim", action="store_true", help="run with the default TokenTrim (default: no trim)")
    args = parser.parse_args()
    set_threads(args.threads)
    rep = Reporter("window_scaling", command_line("bench.window_scaling"))
    backend = build_mid_backend(seed=args.seed, with_vae=False)
    trim = TrimConfig() if args.trim else None
    print(f"window_scaling: bench-mid model, window {args.window} + sink {args.sink} latent frames, chunk "
          f"{args.late} vs {args.early}, trim={'default' if trim else 'none'}, {torch.get_num_threads()} thread(s)",
          flush=True)

    def rollout(chunks: int) -> Rollout:
        config = RolloutConfig(num_chunks=chunks, window_frames=args.window, sink_frames=args.sink)
        return Rollout(backend, config, [PROMPT], [args.seed], trim)

    early, late = rollout(args.early + 1), rollout(args.late + 1)
    advance(early, args.early)
    history = advance(late, args.late)
    times = interleaved({"early": lambda: chunk_passes(early), "late": lambda: chunk_passes(late)}, args.repeats)
    ratios = [a / b for a, b in zip(times["late"], times["early"])]
    early_row, late_row = early.step().rows[0], late.step().rows[0]
    require(early_row["cache_tokens"] == late_row["cache_tokens"] > 0,
            f"the window did not bound the cache: {early_row['cache_tokens']} tokens at chunk {args.early}, "
            f"{late_row['cache_tokens']} at chunk {args.late}")
    print(f"    passes of one chunk: chunk {args.early} {median(times['early']) * 1e3:.1f} ms, chunk {args.late} "
          f"{median(times['late']) * 1e3:.1f} ms; cache tokens {early_row['cache_tokens']} vs "
          f"{late_row['cache_tokens']}; allocated K/V {early.cache.allocated_bytes() / 2**20:.2f} MiB vs "
          f"{late.cache.allocated_bytes() / 2**20:.2f} MiB", flush=True)
    rep.report(f"time per chunk, chunk {args.late} / chunk {args.early}", paired_ratio(times["late"], times["early"]),
               1.1, note=f"interleaved, median of per-round ratios, {spread(ratios)}")
    rep.report(f"KV-cache bytes, chunk {args.late} / chunk {args.early}",
               late_row["cache_bytes"] / early_row["cache_bytes"], 1.1,
               note=f"{early_row['cache_bytes'] / 2**20:.2f} MiB -> {late_row['cache_bytes'] / 2**20:.2f} MiB")
    rep.report(f"allocated K/V buffer bytes, chunk {args.late} / chunk {args.early}",
               late.cache.allocated_bytes() / early.cache.allocated_bytes(), None,
               note="a windowed cache is sized once: full window + sink + the largest pass")
    rows = [r.rows[0] for r in history] + [late_row]
    around = {c: median(step_seconds(r) for r in rows if abs(r["chunk"] - c) <= 2) for c in (args.early, args.late)}
    rep.report(f"step seconds from stats rows, chunks {args.late}+-2 / {args.early}+-2",
               around[args.late] / around[args.early], None, note="one run, not interleaved: load drift shows here")
    rep.finish()


if __name__ == "__main__":
    main()
