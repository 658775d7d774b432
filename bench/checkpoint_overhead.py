"""What latent-context checkpoints cost (DESIGN.md §6).

1. Per-chunk time of `render` with a ``state`` store (a local ``file://`` folder) vs without (target <= 1.05x). Renders
   alternate (the order flips every round); a chunk's time is the wall time between two ``on_chunk`` reports, so
   it holds the rollout step, the tiny VAE decode, the mp4 encode where it is not overlapped and, with state, the
   checkpoint write. The ratio is the median of per-chunk ratios, chunk i of one round's two renders paired.
2. Resume at chunk k vs regenerating k chunks (target <= 0.3x): `RolloutCheckpoints.load` + `Rollout.restore`
   (one commit pass per chunk) vs k `Rollout.step` calls, interleaved; `Rollout` construction excluded from both.
3. Checkpoint bytes per chunk (data object + JSON marker): measured on the bench model's state folder, and for
   Wan2.1-1.3B at 480x832 from real `ChunkRecord`s with the full shapes (latents ``[1, 16, 3, 60, 104]`` in bf16, a
   real `TrimController` state, one prune event) saved through `RolloutCheckpoints` (target <= 1 MB); fp32 and
   rolling-forcing (whose in-flight window is a separate object kept for the last two chunks only).

    python -m bench.checkpoint_overhead [--chunks 5] [--repeats 4] [--threads 1]
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import uuid
from typing import Any

import torch

from bench.common import (
    PROMPT,
    Reporter,
    base_parser,
    build_mid_backend,
    chunk_gaps,
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
from pipeline.model.backend import LATENT_CHANNELS, PRESETS, SPATIAL_SCALE, WAN_1_3B_TRANSFORMER, WanBackend
from pipeline.outputs.checkpoint import RolloutCheckpoints
from pipeline.outputs.render import render_hash, render_prompts
from pipeline.rollout.chunk_stats import ChunkStats
from pipeline.rollout.loop import Rollout
from pipeline.rollout.records import ChunkRecord, PruneEvent
from pipeline.store import Store
from tokentrim import TrimConfig, TrimController

PROMPT_ID = "bench"
MB = 1e6


def render_chunk_seconds(backend: WanBackend, config: RolloutConfig, trim: TrimConfig, seed: int, out_dir: str,
                         state_url: str | None) -> tuple[list[float], list[dict[str, Any]]]:
    """Wall seconds per chunk of one render (between ``on_chunk`` reports, `chunk_gaps`) and its stats rows."""
    stamps: list[float] = []
    state = Store(state_url) if state_url else None
    results = render_prompts(backend, [PROMPT], [PROMPT_ID], Store(f"file://{out_dir}"), config=config, trim=trim,
                             seeds=[seed], state=state, on_chunk=lambda i, rows: stamps.append(time.perf_counter()))
    return chunk_gaps(stamps), results[0].rows


def folder_bytes_per_chunk(folder: str) -> float:
    """Median over chunks of (data object + marker) bytes in a checkpoint folder."""
    sizes: dict[str, int] = {}
    for name in os.listdir(folder):
        stem = name.split(".")[0]
        sizes[stem] = sizes.get(stem, 0) + os.path.getsize(os.path.join(folder, name))
    return median(sizes.values())


def bench_render(rep: Reporter, backend: WanBackend, config: RolloutConfig, trim: TrimConfig, seed: int,
                 repeats: int, work: str) -> tuple[str, list[dict[str, Any]]]:
    """Part 1; returns the last state folder (a complete rollout) and its rows."""
    gaps: dict[str, list[list[float]]] = {"none": [], "state": []}
    last: dict[str, Any] = {}

    def run(variant: str) -> None:
        state = os.path.join(work, f"state-{uuid.uuid4().hex}") if variant == "state" else None
        seconds, rows = render_chunk_seconds(backend, config, trim, seed, os.path.join(work, "out"),
                                             f"file://{state}" if state else None)
        gaps[variant].append(seconds)
        last[variant] = (state, rows)

    interleaved({"none": lambda: run("none"), "state": lambda: run("state")}, repeats)
    written = [float(r["t_checkpoint"] or 0.0) > 0 for r in last["state"][1]]
    require(all(written) and bool(os.listdir(last["state"][0])),
            f"the --state variant did not checkpoint every chunk ({sum(written)} of {len(written)} wrote)")
    require(not any(float(r["t_checkpoint"] or 0.0) for r in last["none"][1]), "the no-state variant checkpointed")
    # chunk i of the two renders of a round: same context length, seconds apart
    ratios = [a / b for sa, sn in zip(gaps["state"], gaps["none"]) for a, b in zip(sa, sn)]
    rows = last["state"][1][1:]
    phases = {k: median(float(r.get(f"t_{k}_s", 0.0)) for r in rows)
              for k in ("denoise", "trim", "commit", "decode", "encode", "checkpoint")}
    print("    per chunk with state: " + "  ".join(f"t_{k} {v * 1e3:.1f} ms" for k, v in phases.items()), flush=True)
    rep.report("render per chunk, --state file:// / none", median(ratios), 1.05,
               note=f"VAE decode + mp4 encode in both; median of per-chunk ratios, {spread(ratios)}")
    write = median(float(r["t_checkpoint_s"]) for r in rows)
    base = median(g for run in gaps["none"] for g in run)
    rep.report("render per chunk, --state estimate from t_checkpoint", 1.0 + write / base, None,
               note="1 + checkpoint write seconds / per-chunk seconds without state: the same cost without the noise")
    rep.report("checkpoint write / rollout step (no decode)", write / median(step_seconds(r) for r in rows), None,
               note="t_checkpoint over t_denoise+t_trim+t_commit, from the stats rows")
    return last["state"][0], last["state"][1]


def bench_resume(rep: Reporter, backend: WanBackend, config: RolloutConfig, trim: TrimConfig, seed: int,
                 repeats: int, state: str) -> None:
    """Part 2: load + restore the k committed chunks vs stepping k chunks, on fresh rollouts."""
    digest = render_hash(backend, config, trim)
    k = config.num_chunks
    fresh: dict[str, Rollout] = {}

    def prepare() -> None:
        for name in ("resume", "regen"):
            fresh[name] = Rollout(backend, config, [PROMPT], [seed], trim)

    def resume() -> None:
        records = RolloutCheckpoints(Store(f"file://{state}"), digest, [PROMPT_ID]).load()
        if len(records) != k:
            raise RuntimeError(f"expected {k} committed chunks under {state}, found {len(records)}")
        fresh["resume"].restore(records)

    def regen() -> None:
        for _ in range(k):
            fresh["regen"].step()

    times: dict[str, list[float]] = {"resume": [], "regen": []}
    for r in range(repeats):
        prepare()  # not timed: Rollout construction encodes the prompt, both paths need it
        got = interleaved({"resume": resume, "regen": regen} if r % 2 == 0 else {"regen": regen, "resume": resume}, 1)
        for name, seconds in got.items():
            times[name] += seconds
    print(f"    k={k}: load+restore {median(times['resume']) * 1e3:.0f} ms, regenerate "
          f"{median(times['regen']) * 1e3:.0f} ms", flush=True)
    rep.report(f"resume at chunk {k} / regenerate {k} chunks", paired_ratio(times["resume"], times["regen"]), 0.3,
               note="load (read + verify sha256 + decode) + replayed commit passes vs denoise+commit")


def full_size_record(dtype: torch.dtype, rows: list[dict[str, Any]], rolling: bool) -> ChunkRecord:
    """A chunk record with Wan2.1-1.3B's 480x832 shapes: real controller state, one prune event."""
    spec, patch = PRESETS["wan2.1-1.3b"], WAN_1_3B_TRANSFORMER["patch_size"]
    h, w = spec.height_px // SPATIAL_SCALE, spec.width_px // SPATIAL_SCALE
    config = RolloutConfig(mode="rolling-forcing" if rolling else "self-forcing")
    shape = (1, LATENT_CHANNELS, config.chunk_frames, h, w)
    gen = torch.Generator().manual_seed(0)
    trim = TrimConfig()
    controller = TrimController(trim, 1)
    tokens = (h // patch[1]) * (w // patch[2])
    for _ in range(3):  # warm-up chunks, then a judged one: every state field is populated
        width = LATENT_CHANNELS * (math.prod(patch) if trim.summary == "patch" else 1)  # the summary's D
        summary = torch.randn(1, tokens, width, generator=gen)
        controller.accept(summary, controller.judge(summary, 0))
    positions = torch.randperm(tokens, generator=gen)[: math.ceil(trim.p * tokens)].sort().values[None]
    prune = PruneEvent(3, [6, 7, 8], positions, torch.ones(1, dtype=torch.bool))
    window = {j: torch.randn(shape, generator=gen).to(dtype) for j in range(4, 4 + len(config.timesteps) - 1)} \
        if rolling else {}
    stats = [ChunkStats.from_json({f.name: row[f.name] for f in dataclasses.fields(ChunkStats)}) for row in rows]
    return ChunkRecord(3, torch.randn(shape, generator=gen).to(dtype), [prune], controller.state_dict(), window,
                       stats)


def stored_bytes(record: ChunkRecord) -> tuple[int, int, int]:
    """(chunk data object, marker, in-flight window object) bytes as `RolloutCheckpoints.save` writes them (to a
    memory:// store). Window objects are transient: only the last two chunks keep theirs."""
    store = Store(f"memory://bench-checkpoint/{uuid.uuid4().hex}")
    RolloutCheckpoints(store, "0" * 16, [PROMPT_ID]).save(record)
    sizes = {key: len(store.get_bytes(key)) for key in store.list()}
    for key in sizes:
        store.delete(key)
    data = sum(v for k, v in sizes.items() if k.startswith("chunk-") and k.endswith(".safetensors"))
    window = sum(v for k, v in sizes.items() if k.startswith("window-"))
    return data, sum(sizes.values()) - data - window, window


def bench_bytes(rep: Reporter, state: str, rows: list[dict[str, Any]]) -> None:
    """Part 3."""
    rep.report("checkpoint bytes per chunk, bench model", folder_bytes_per_chunk(state) / MB, None, unit="MB",
               note="data + marker, median over chunks of the state folder")
    for name, dtype, rolling, target in (("self-forcing bf16", torch.bfloat16, False, 1.0),
                                         ("self-forcing fp32", torch.float32, False, None),
                                         ("rolling-forcing bf16", torch.bfloat16, True, 1.0)):
        data, marker, window = stored_bytes(full_size_record(dtype, rows[-1:], rolling))
        rep.report(f"checkpoint bytes kept per chunk, Wan2.1-1.3B 480x832 {name}", (data + marker) / MB, target,
                   unit="MB", note=f"data {data / MB:.3f} MB + marker {marker / 1e3:.1f} kB"
                   + (f"; plus a {window / MB:.3f} MB window object, kept for the last two chunks only"
                      if window else ""))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=5, help="chunks per render; also k of the resume figure")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds")
    args = parser.parse_args()
    set_threads(args.threads)
    rep = Reporter("checkpoint_overhead", command_line("bench.checkpoint_overhead"))
    backend = build_mid_backend(seed=args.seed)
    config, trim = RolloutConfig(num_chunks=args.chunks), TrimConfig()
    print(f"checkpoint_overhead: bench-mid model + tiny VAE, {backend.spec.height_px}x{backend.spec.width_px} px, "
          f"{args.chunks} chunks x {args.repeats} rounds, {torch.get_num_threads()} thread(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="tokentrim-bench-") as work:
        state, rows = bench_render(rep, backend, config, trim, args.seed, args.repeats, work)
        bench_resume(rep, backend, config, trim, args.seed, args.repeats, state)
        bench_bytes(rep, state, rows)
    rep.finish()


if __name__ == "__main__":
    main()
