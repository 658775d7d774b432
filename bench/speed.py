"""Speed paths of issue 13 side by side on one device: prompt K/V cached vs projected every pass, host reads per chunk,
static and compiled paths vs the dynamic eager one (compile time apart), B prompts per rollout, and chunk 60 vs chunk
10 with a window. On a CPU the figures are information (syncs cost nothing there; counts are what carries over).

    python -m bench.speed [--preset mid|tiny] [--chunks 6] [--repeats 3] [--compile]
The functions here are also the extra variants of `bench.gpu --all`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bench.common import (
    PROMPT,
    Reporter,
    base_parser,
    build_mid_backend,
    command_line,
    median,
    require,
    set_threads,
    spread,
)
from pipeline.config import Mode, RolloutConfig
from pipeline.model.backend import WanBackend, load_backend
from pipeline.model.host import HostReadCounter
from pipeline.model.vae import pixel_frames_for
from pipeline.rollout.loop import Rollout
from tokentrim import TrimConfig

NEVER = TrimConfig(lam=1e9, warmup=3)
PRUNE = TrimConfig(warmup=2)  # with `_corrupt_odd_chunks`: regenerates chunks 3, 5, ...


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(backend: WanBackend, config: RolloutConfig, batch: int = 1, trim: TrimConfig | None = None,
               seed: int = 0) -> list[float]:
    """Wall seconds of each chunk of one rollout of ``batch`` prompts (device synchronised around each)."""
    rollout = Rollout(backend, config, [f"{PROMPT} #{b}" for b in range(batch)], [seed + b for b in range(batch)],
                      trim)
    out = []
    for _ in range(config.num_chunks):
        sync(backend.device)
        began = time.perf_counter()
        rollout.step()
        sync(backend.device)
        out.append(time.perf_counter() - began)
    return out


@contextmanager
def switched(backend: WanBackend, **attrs: Any) -> Iterator[None]:
    """Set attributes of ``backend.causal`` for the block (e.g. ``cache_text=False``)."""
    old = {k: getattr(backend.causal, k) for k in attrs}
    for k, v in attrs.items():
        setattr(backend.causal, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(backend.causal, k, v)


def paired(variants: dict[str, Callable[[], list[float]]], repeats: int) -> dict[str, list[float]]:
    """Per variant, the per-chunk seconds (chunk 0 dropped) of ``repeats`` interleaved runs, order rotated."""
    names = list(variants)
    got: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            got[n].extend(variants[n]()[1:])
    return got


def ratio(got: dict[str, list[float]], num: str, den: str) -> tuple[float, list[float]]:
    per_chunk = [a / b for a, b in zip(got[num], got[den], strict=True)]
    return median(per_chunk), per_chunk


def text_kv(rep: Reporter, backend: WanBackend, config: RolloutConfig, repeats: int) -> dict[str, Any]:
    """Item 1: per-chunk time with the prompt K/V cached / projected in every pass."""
    def uncached() -> list[float]:
        with switched(backend, cache_text=False):
            return step_times(backend, config)

    got = paired({"cached": lambda: step_times(backend, config), "uncached": uncached}, repeats)
    value, per_chunk = ratio(got, "cached", "uncached")
    rep.report(f"{config.mode}: prompt K/V cached / projected every pass, per chunk", value, None,
               note=spread(per_chunk))
    return {"variant": "text_kv", "mode": config.mode, "cached_over_uncached": value}


def _corrupt_odd_chunks(c: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
    """A jump at a few tokens in every odd chunk from chunk 3 on, every attempt: TokenTrim regenerates those."""
    from bench.propagation import PATCH, add_to_tokens

    return add_to_tokens(x0, [0, 1, 5], 6.0, PATCH) if c >= 3 and c % 2 else x0


def host_reads(rep: Reporter, backend: WanBackend, config: RolloutConfig) -> dict[str, Any]:
    """Item 3: tensor-to-host reads (each a device wait on CUDA) per chunk, without TokenTrim, with never-prune
    TokenTrim and with TokenTrim regenerating corrupted chunks (``prune``: one read per candidate is the target)."""
    out: dict[str, Any] = {"variant": "host_reads", "mode": config.mode}
    config = dataclasses.replace(config, early_stop=False)  # the one-read path; bench.early_stop counts its read
    for name, trim in (("none", None), ("never", NEVER), ("prune", PRUNE)):
        rollout = Rollout(backend, config, [PROMPT], [0], trim)
        rollout.perturb = _corrupt_odd_chunks if name == "prune" else None
        counts, attempts = [], []
        for _ in range(config.num_chunks):
            with HostReadCounter() as counter:
                record = rollout.step()
            counts.append(counter.count)
            attempts.append(max(s.attempts for s in record.stats))
        out[name], out[f"{name}_attempts"] = counts, attempts
        regenerated = sum(a > 1 for a in attempts)
        require(regenerated > 0 if name == "prune" else regenerated == 0,
                f"host reads, trim {name}: {regenerated} chunks regenerated (candidates per chunk {attempts})")
        extra = max(n - a for n, a in zip(counts, attempts, strict=True))
        rep.report(f"{config.mode}: host reads per chunk, trim {name}", max(counts), None, unit="reads",
                   note=f"per chunk {counts}, candidates per chunk {attempts}")
        rep.report(f"{config.mode}: host reads per candidate beyond one, trim {name}", extra, 0.0, unit="reads")
    return out


def static_and_compiled(rep: Reporter, backend: WanBackend, config: RolloutConfig, repeats: int,
                        compile_too: bool, mode: str | None = None) -> dict[str, Any]:
    """Item 2: static eager / dynamic eager and (``compile_too``) compiled / dynamic eager, per chunk; compile
    seconds apart (the first compiled rollout, excluded from the ratio)."""
    def static() -> list[float]:
        with switched(backend, static=True):
            return step_times(backend, config)

    variants = {"dynamic": lambda: step_times(backend, config), "static": static}
    out: dict[str, Any] = {"variant": "compile", "mode": config.mode}
    if compile_too:
        def compiled() -> list[float]:
            backend.causal.compile(mode)
            try:
                return step_times(backend, config)
            finally:
                backend.causal.eager()

        began = time.perf_counter()
        compiled()  # warm-up: compiles once per shape
        out["compile_s"] = backend.causal.compile_seconds
        out["first_compiled_rollout_s"] = time.perf_counter() - began
        variants["compiled"] = compiled
    got = paired(variants, repeats)
    out["static_over_dynamic"] = ratio(got, "static", "dynamic")[0]
    rep.report(f"{config.mode}: static path (eager) / dynamic path, per chunk", out["static_over_dynamic"], None,
               note="fixed-capacity buffers, masked attention")
    if compile_too:
        out["compiled_over_dynamic"] = ratio(got, "compiled", "dynamic")[0]
        rep.report(f"{config.mode}: compiled / dynamic eager, per chunk", out["compiled_over_dynamic"], None,
                   note=f"compile {out['compile_s']:.1f} s once per shape (first rollout "
                        f"{out['first_compiled_rollout_s']:.1f} s), excluded")
    return out


def batching(rep: Reporter, backend: WanBackend, config: RolloutConfig, batches: tuple[int, ...] = (1, 2, 4)
             ) -> dict[str, Any]:
    """Item 5: pixel frames/s of one rollout of B prompts (median chunk after chunk 0)."""
    new_frames = pixel_frames_for(2 * config.chunk_frames) - pixel_frames_for(config.chunk_frames)
    out: dict[str, Any] = {"variant": "batching", "mode": config.mode}
    base = None
    for b in batches:
        seconds = median(step_times(backend, config, batch=b)[1:])
        fps = b * new_frames / seconds
        base = base or fps
        out[f"fps_b{b}"] = fps
        rep.report(f"{config.mode}: B={b} prompts per rollout, pixel frames/s (before decode)", fps, None, unit="fps",
                   note=f"{seconds * 1e3:.1f} ms per chunk; {fps / base:.2f}x B=1")
    return out


def window_flatness(rep: Reporter, backend: WanBackend, mode: Mode, repeats: int, early: int = 10, late: int = 60,
                    window: int = 9, sink: int = 3) -> dict[str, Any]:
    """Per-chunk time at chunk ``late`` / chunk ``early`` with a window (the passes of one chunk, interleaved)."""
    from bench.window_scaling import advance, chunk_passes

    def at(chunk: int) -> Rollout:
        config = RolloutConfig(mode=mode, num_chunks=chunk + 1, window_frames=window, sink_frames=sink)
        rollout = Rollout(backend, config, [PROMPT], [0])
        advance(rollout, chunk)
        return rollout

    first, last = at(early), at(late)

    def passes(rollout: Rollout) -> Callable[[], list[float]]:
        def run() -> list[float]:
            sync(backend.device)
            began = time.perf_counter()
            chunk_passes(rollout)
            sync(backend.device)
            return [0.0, time.perf_counter() - began]  # [chunk 0 placeholder, the timed passes]
        return run

    got = paired({"early": passes(first), "late": passes(last)}, repeats)
    value, per_chunk = ratio(got, "late", "early")
    rep.report(f"{mode}: passes of one chunk, chunk {late} / chunk {early} (window {window} + sink {sink})",
               value, 1.1,
               note=f"{median(got['early']) * 1e3:.1f} -> {median(got['late']) * 1e3:.1f} ms, {spread(per_chunk)}")
    return {"variant": "window", "mode": mode, "late_over_early": value, "early_ms": 1e3 * median(got["early"]),
            "late_ms": 1e3 * median(got["late"])}


def vae_decode(rep: Reporter, backend: WanBackend, repeats: int, chunks: int = 4) -> dict[str, Any]:
    """Item 4: ms per decoded chunk (3 latent frames) of the backend's VAE vs a channels-last 3D copy of it."""
    import copy

    from pipeline.model.backend import LATENT_CHANNELS
    from pipeline.model.vae import StreamingDecoder, speed_up_vae

    if backend.vae is None:
        raise ValueError("vae_decode needs a backend built with its VAE")
    h, w = backend.latent_size(backend.spec.height_px, backend.spec.width_px)
    z = torch.randn(1, LATENT_CHANNELS, 3, h, w, generator=torch.Generator().manual_seed(0))
    z = z.to(backend.device, backend.dtype)
    vaes = {"default": backend.vae, "channels_last": speed_up_vae(copy.deepcopy(backend.vae), channels_last=True)}

    def decode(vae: Any) -> Callable[[], list[float]]:
        def run() -> list[float]:
            decoder, out = StreamingDecoder(vae), []
            for _ in range(chunks):
                sync(backend.device)
                began = time.perf_counter()
                decoder.decode(z)
                sync(backend.device)
                out.append(time.perf_counter() - began)
            return out
        return run

    got = paired({k: decode(v) for k, v in vaes.items()}, repeats)
    value, per_chunk = ratio(got, "channels_last", "default")
    rep.report("VAE decode per chunk, channels-last 3D / default layout", value, None,
               note=f"{median(got['default']) * 1e3:.1f} ms per chunk default, {spread(per_chunk)}")
    return {"variant": "vae", "channels_last_over_default": value, "default_ms": 1e3 * median(got["default"])}


def build(preset: str, seed: int) -> WanBackend:
    if preset == "mid":
        return build_mid_backend(seed=seed, with_vae=False)
    return load_backend(preset, seed=seed, with_vae=False)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["mid", "tiny"], default="mid")
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the compiled path (inductor: minutes)")
    args = parser.parse_args()
    set_threads(args.threads)
    rep = Reporter("speed", command_line("bench.speed"))
    backend = build(args.preset, args.seed)
    print(f"speed: {args.preset} model, {args.chunks} chunks, {args.repeats} repeats, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    runs = []
    for mode in ("self-forcing", "rolling-forcing"):
        config = RolloutConfig(mode=mode, num_chunks=args.chunks, window_frames=6)
        runs.append(text_kv(rep, backend, config, args.repeats))
        runs.append(host_reads(rep, backend, config))
    config = RolloutConfig(num_chunks=args.chunks, window_frames=6)
    runs.append(static_and_compiled(rep, backend, config, args.repeats, args.compile))
    runs.append(batching(rep, backend, config))
    runs.append(window_flatness(rep, backend, "self-forcing", args.repeats, early=3, late=12, window=6, sink=3))
    rep.extra["runs"] = runs
    rep.finish()


if __name__ == "__main__":
    main()
