"""End-to-end throughput on one device: pixel frames/s with VAE decode and mp4 encode, per-phase seconds, peak memory,
and TokenTrim's overhead (DESIGN.md §6: Wan2.1-1.3B shapes, bf16, 480x832, self-forcing >= 20 frames/s on one H100,
TokenTrim overhead <= 3%).

Per mode, in this order (each variant starts with a warm-up, excluded):
  render   `render_prompts` of ``--chunks`` chunks to ``memory://`` without TokenTrim (``none``) and
           with
           never-pruning TokenTrim (``never``: lam=1e9, warmup=3): steady frames/s = new pixel frames per chunk /
           median wall seconds between chunks (decode + encode included), whole-render frames/s (setup, chunk 0 and
           the final mp4/parquet writes included), rollout-only frames/s (t_denoise + t_trim + t_commit), per-phase
           medians and peak device memory (reset per variant). The warm-up is a 1-chunk render.
  overhead `bench.trim_overhead.measure`: none / never / prune rollouts stepped in lockstep (no decode), per-chunk
           ratios never/none (target <= 1.03x) and prune/none (information; pruned every judged chunk through the
           fault-injection hook in self-forcing). The warm-up is one 2-chunk lockstep round.
With ``--all`` (issue 13), after the modes (windowed self-forcing, `bench.speed`'s variants):
  text_kv  prompt K/V cached / projected every pass, per chunk;
  reads    tensor-to-host reads per chunk (each a device wait), trim none, never and prune (corrupted chunks
           regenerated): one per candidate;
  batch    pixel frames/s (before decode) of one rollout of B = 1, 2, 4 prompts;
  window   the passes of one chunk at chunk 60 / chunk 10 with window 9 + sink 3;
  vae      ms per decoded chunk, channels-last 3D copy of the VAE / the default layout;
  compile  static eager / dynamic and compiled / dynamic per chunk, compile seconds apart (paid once per shape).
Each prints its peak device memory. A variant that runs out of device memory (or, for compile, fails) is reported
and skipped (exit status 2 at the end); no variant starts when its estimated time would pass ``--time-limit``. The
last line is ``BENCH_JSON {...}``.

    python -m bench.gpu --preset tiny --device cpu --all                          # CPU here, ~2 min
    timeout 540 python -m bench.gpu --preset wan2.1-1.3b --device cuda --all      # one H100, <= 7.5 min
"""

from __future__ import annotations

import gc
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import torch

from bench.common import (
    PROMPT,
    Reporter,
    base_parser,
    chunk_gaps,
    command_line,
    median,
    require,
    set_threads,
    spread,
    step_seconds,
    sync,
)
from bench.trim_overhead import VARIANTS, chunk_ratios, first_judged, measure, pruned_mask
from pipeline.config import MODES, RolloutConfig
from pipeline.model.backend import WanBackend, load_backend
from pipeline.model.vae import pixel_frames_for
from pipeline.outputs.render import render_prompts
from pipeline.store import Store
from tokentrim import TrimConfig

T = TypeVar("T")
PHASES = ("denoise", "trim", "commit", "decode", "encode")
# DESIGN.md §6, for Wan2.1-1.3B shapes on CUDA; the tiny preset only exercises the code path (information)
FPS_TARGET = 20.0  # self-forcing pixel frames/s on one H100
OVERHEAD_TARGET = 1.03


class Budget:
    """Wall-clock budget of the whole script: refuses to start work whose estimate would pass the limit."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s, self.began = limit_s, time.perf_counter()
        self.per_chunk_s = 0.0  # the slowest chunk seen so far (all work scales with chunks)
        self.skipped: list[str] = []

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def allows(self, name: str, chunks: int) -> bool:
        estimate = 1.3 * chunks * self.per_chunk_s
        if self.elapsed + estimate <= self.limit_s:
            return True
        print(f"  skip {name}: {self.elapsed:.0f} s elapsed + ~{estimate:.0f} s estimated > --time-limit "
              f"{self.limit_s:.0f} s", flush=True)
        self.skipped.append(name)
        return False

    def observe(self, seconds: float, chunks: int) -> None:
        self.per_chunk_s = max(self.per_chunk_s, seconds / max(1, chunks))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def timed_render(backend: WanBackend, config: RolloutConfig, trim: TrimConfig | None, seed: int
                 ) -> tuple[float, list[float], list[dict[str, Any]]]:
    """One render to a fresh ``memory://`` root: (wall seconds, seconds between chunks, stats rows)."""
    out = Store(f"memory://bench-gpu/{uuid.uuid4().hex}")
    stamps: list[float] = []

    def on_chunk(index: int, rows: list[dict[str, Any]]) -> None:
        sync(backend.device)  # the timer of the next chunk syncs anyway; this keeps the stamps honest
        stamps.append(time.perf_counter())

    sync(backend.device)
    began = time.perf_counter()
    try:
        result = render_prompts(backend, [PROMPT], ["bench"], out, config=config, trim=trim, seeds=[seed],
                                on_chunk=on_chunk)
        sync(backend.device)
        wall = time.perf_counter() - began
    finally:
        for key in out.list():
            out.delete(key)
    return wall, chunk_gaps(stamps), result[0].rows


def render_variant(rep: Reporter, backend: WanBackend, config: RolloutConfig, name: str, trim: TrimConfig | None,
                   seed: int, target: float | None) -> dict[str, Any]:
    """Warm-up render (1 chunk), then the timed one; prints and returns its figures."""
    timed_render(backend, replace(config, num_chunks=1), trim, seed)
    reset_peak(backend.device)
    wall, per_chunk, rows = timed_render(backend, config, trim, seed)
    pruned = sum(r["verdict"] == "pruned" for r in rows)
    require(name != "never" or not pruned, f"{config.mode} render {name} pruned {pruned} chunks")
    new_frames = pixel_frames_for(2 * config.chunk_frames) - pixel_frames_for(config.chunk_frames)
    steady = new_frames / median(per_chunk) if per_chunk else float("nan")
    later = rows[1:] or rows
    figures = {
        "mode": config.mode, "variant": name, "chunks": config.num_chunks, "wall_s": wall,
        "fps_steady": steady, "fps_whole": pixel_frames_for(config.num_frames) / wall,
        "fps_rollout": new_frames / median(step_seconds(r) for r in later),
        "per_chunk_s": median(per_chunk) if per_chunk else float("nan"), "peak_gib": peak_gib(backend.device),
        "phases_ms": {k: 1e3 * median(float(r.get(f"t_{k}_s", 0.0)) for r in later) for k in PHASES},
    }
    phases = "  ".join(f"t_{k} {v:.1f}" for k, v in figures["phases_ms"].items())
    peak = f"{figures['peak_gib']:.2f} GiB" if backend.device.type == "cuda" else "n/a on a CPU"
    print(f"    {config.mode} {name}: {figures['per_chunk_s'] * 1e3:.1f} ms/chunk, peak device memory {peak}; "
          f"median ms per chunk: {phases}", flush=True)
    rep.report(f"{config.mode} {name}: pixel frames/s, steady, decode+encode incl.", steady, target, unit="fps",
               op=">=", note=f"{new_frames} new frames per chunk; median wall seconds between chunks")
    rep.report(f"{config.mode} {name}: pixel frames/s, whole render", figures["fps_whole"], None, unit="fps",
               note="setup, chunk 0, mp4 + parquet writes included")
    rep.report(f"{config.mode} {name}: pixel frames/s, rollout only", figures["fps_rollout"], None, unit="fps",
               note="t_denoise + t_trim + t_commit from the stats rows")
    return figures


def overhead_variant(rep: Reporter, backend: WanBackend, config: RolloutConfig, seed: int, target: float | None
                     ) -> dict[str, Any]:
    """Lockstep none / never / prune rollouts; never/none against ``target``, prune/none as information."""
    measure(backend, replace(config, num_chunks=2), seed, 1, check=False)  # warm-up: no chunk is judged yet
    reset_peak(backend.device)
    seconds, records = measure(backend, config, seed, 1, VARIANTS)
    peak = peak_gib(backend.device)
    never = chunk_ratios(seconds, "never", "none")
    prune = chunk_ratios(seconds, "prune", "none")
    mask = pruned_mask(records["prune"])  # `measure` checked: every judged chunk pruned
    pruned = sum(sum(run[1:]) for run in mask)
    judged = config.num_chunks - first_judged(VARIANTS["prune"])
    rep.report(f"{config.mode}: TokenTrim never-prune / no-trim, per chunk", median(never), target,
               note=f"lockstep, no decode, {spread(never)}" + (f"; peak {peak:.2f} GiB" if peak == peak else ""))
    rep.report(f"{config.mode}: TokenTrim prune / no-trim, per chunk", median(prune), None,
               note=f"{pruned} of {judged} judged chunks pruned and regenerated")
    return {"mode": config.mode, "variant": "overhead", "never_over_none": median(never),
            "prune_over_none": median(prune), "pruned_chunks": pruned, "peak_gib": peak,
            "step_ms": {n: 1e3 * median(s for run in v for s in run[1:]) for n, v in seconds.items()}}


def guarded(name: str, device: torch.device, work: Callable[[], T], failures: list[str], catch_all: bool = False
            ) -> T | None:
    """Run one variant; out of device memory (or, with ``catch_all``, any error: a compile that fails): report
    it, free what can be freed, go on (None)."""
    caught: tuple[type[BaseException], ...] = (Exception,) if catch_all else (torch.cuda.OutOfMemoryError,)
    try:
        return work()
    except caught as exc:  # OutOfMemoryError is an alias of torch.OutOfMemoryError in recent torch
        first = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    print(f"  FAILED {name} on {device_name(device)}: {first}", flush=True)
    failures.append(name)
    gc.collect()  # after the handler: the traceback no longer holds the variant's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None


def build(args: Any, device: torch.device, dtype: torch.dtype) -> WanBackend:
    backend = load_backend(args.preset, device=device, dtype=dtype, seed=args.seed)
    if args.compile:  # whole blocks on the static path (fixed-capacity cache); compiles on the first pass
        backend.causal.compile(args.compile_mode)
    return backend


def run_extras(rep: Reporter, backend: WanBackend, args: Any, budget: Budget, failures: list[str]
               ) -> list[dict[str, Any]]:
    """The `--all` variants of issue 13 (see the module docstring), each within the time budget."""
    from bench import speed

    config = RolloutConfig(num_chunks=args.chunks, window_frames=9, sink_frames=3)
    repeats = 2
    plan: list[tuple[str, int, Callable[[], dict[str, Any]]]] = []
    if not args.compile:  # compiled vs eager on one backend; compile time apart, so give it room
        plan.append(("compile", 6 * repeats * args.chunks + int(args.compile_budget / max(budget.per_chunk_s, 1e-3)),
                     partial(speed.static_and_compiled, rep, backend, config, repeats, True, args.compile_mode)))
    plan += [
        ("text_kv", 2 * repeats * args.chunks, partial(speed.text_kv, rep, backend, config, repeats)),
        ("reads", 4 * args.chunks, partial(speed.host_reads, rep, backend, config)),
        ("batch", 7 * args.chunks, partial(speed.batching, rep, backend, config)),
        ("window", 70 + 4 * repeats, partial(speed.window_flatness, rep, backend, "self-forcing", repeats)),
        ("vae", 4 * repeats, partial(speed.vae_decode, rep, backend, repeats)),
    ]
    runs = []
    for name, cost, work in plan:
        if not budget.allows(name, cost):
            continue
        reset_peak(backend.device)
        began = time.perf_counter()
        got = guarded(name, backend.device, work, failures, catch_all=name == "compile")
        budget.observe(time.perf_counter() - began, cost)
        if got is not None:
            got["peak_gib"] = peak_gib(backend.device)
            peak = f"{got['peak_gib']:.2f} GiB" if backend.device.type == "cuda" else "n/a on a CPU"
            print(f"    {name}: peak device memory {peak}, {time.perf_counter() - began:.0f} s", flush=True)
            runs.append(got)
    return runs


def run_mode(rep: Reporter, backend: WanBackend, config: RolloutConfig, seed: int, budget: Budget,
             failures: list[str], full_size: bool) -> list[dict[str, Any]]:
    """The render variants (none, never) and the lockstep overhead of one mode, each within the time budget."""
    chunks, mode = config.num_chunks, config.mode
    fps_target = FPS_TARGET if full_size and mode == "self-forcing" else None
    plan: list[tuple[str, int, Callable[[], dict[str, Any]]]] = [
        (f"{mode} render {name}", 2 * (chunks + 1),
         partial(render_variant, rep, backend, config, name, trim, seed, fps_target))
        for name, trim in (("none", None), ("never", VARIANTS["never"]))]
    plan.append((f"{mode} overhead", 4 * (chunks + 2), partial(overhead_variant, rep, backend, config, seed,
                                                               OVERHEAD_TARGET if full_size else None)))
    runs = []
    for name, cost, work in plan:  # cost: chunk-sized units of work (render: warm-up + timed, decode ~ a step)
        if not budget.allows(name, cost):
            continue
        began = time.perf_counter()
        got = guarded(name, backend.device, work, failures)
        budget.observe(time.perf_counter() - began, cost)
        if got is not None:
            runs.append(got)
    return runs


def parse_args() -> Any:
    parser = base_parser(__doc__.splitlines()[0], threads=0,
                         threads_help="torch intra-op threads (0: 1 on a CPU, torch's default with CUDA)")
    parser.add_argument("--preset", choices=["tiny", "wan2.1-1.3b"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--chunks", type=int, default=None,
                        help="chunks per timed variant, chunk 0 excluded (default: 8 on CUDA, 6 on a CPU)")
    parser.add_argument("--modes", default="self-forcing,rolling-forcing", help="comma-separated modes")
    parser.add_argument("--compile", action="store_true",
                        help="every variant on compiled blocks (static path); default: eager, and --all compares")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs")
    parser.add_argument("--compile-budget", type=float, default=120.0,
                        help="seconds of the time limit kept for compiling in --all's compile variant")
    parser.add_argument("--all", action="store_true", help="also the issue-13 variants (text K/V, host reads, "
                        "B = 1/2/4, window chunk 60 vs 10, compiled vs eager)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds; no variant starts past it (default 270, 450 with --all)")
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        parser.error(f"--modes must be a comma-separated subset of {MODES}, got {bad or args.modes}")
    on_cuda = torch.device(args.device).type == "cuda"
    args.chunks = args.chunks if args.chunks is not None else (8 if on_cuda else 6)
    args.threads = args.threads or (torch.get_num_threads() if on_cuda else 1)
    args.time_limit = args.time_limit if args.time_limit is not None else (450.0 if args.all else 270.0)
    if args.chunks < 3:
        parser.error(f"--chunks must be >= 3 (chunk 0 and the last report are excluded), got {args.chunks}")
    return args


def main() -> int:
    args = parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available in this torch ({torch.__version__})", flush=True)
        return 2
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    budget, failures, runs = Budget(args.time_limit), [], []
    rep = Reporter("gpu", command_line("bench.gpu"))
    import diffusers

    print(f"gpu bench: {args.preset} on {device_name(device)}, {dtype}, {args.chunks} chunks, modes {args.modes}, "
          f"compile={args.compile}, torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    began = time.perf_counter()
    backend = guarded("build", device, lambda: build(args, device, dtype), failures)
    if backend is not None:
        h, w = backend.latent_size(backend.spec.height_px, backend.spec.width_px)
        params = sum(p.numel() for p in backend.causal.transformer.parameters())
        print(f"  built in {time.perf_counter() - began:.1f} s: transformer {params / 1e6:.2f} M parameters, "
              f"{backend.spec.height_px}x{backend.spec.width_px} px, {backend.causal.tokens_per_frame(h, w)} tokens "
              f"per latent frame", flush=True)
        full_size = args.preset == "wan2.1-1.3b" and device.type == "cuda"
        for i, mode in enumerate(args.modes):
            config = RolloutConfig(mode=mode, num_chunks=args.chunks)
            runs += run_mode(rep, backend, config, args.seed, budget, failures, full_size)
            if args.all and i == 0:  # after the headline mode, before the others
                runs += run_extras(rep, backend, args, budget, failures)
    rep.extra.update({"device": device_name(device), "preset": args.preset, "dtype": str(dtype),
                      "chunks": args.chunks, "compile": args.compile, "runs": runs, "failed": failures,
                      "skipped": budget.skipped, "elapsed_s": budget.elapsed})
    print(f"  done in {budget.elapsed:.0f} s on {device_name(device)}; failed: {failures or 'none'}; "
          f"skipped for time: {budget.skipped or 'none'}", flush=True)
    rep.finish()
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
