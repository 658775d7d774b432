"""Drift of long canary rollouts, with and without TokenTrim, in both modes; and a p x lambda x prune_scope sweep.

    python -m bench.canary_drift --out bench/canary_drift [--modes self-forcing rolling-forcing] [--skip-sweep]

Renders the `PROMPTS` (8: every colour, motion, shape and background) for 3x and 10x the trained horizon through
the real rollout (`--model canary`), decodes every chunk, and measures per chunk:

- canary-aware (`canary.detect.canary_metrics`): ``mass_ratio`` (named-colour pixels / shape area),
  ``background_err`` (mean |pixel - true background| away from objects), ``objects`` (saturated blobs),
  ``traj_err`` (|displacement - the named motion's velocity| px/frame), and ``motion_ok`` (the detector reads the
  named colour and motion in the chunk's frames);
- model-free: ``latent_dist_first`` (stats rows) and the pixel proxies of `pipeline.outputs.pixel_stats`
  (``hist_dist_first``, ``saturation``, ``steadiness``).

Each figure is reported as Δ = mean over the last trained-horizon of chunks - mean over the first, median over the
samples with its min..max spread. The noise floor is the same run with only the seeds changed (no TokenTrim): a
TokenTrim effect smaller than |Δ(seed A) - Δ(seed B)| is not resolved. Writes ``results.json``, ``table.md`` and
per-chunk SVG plots to ``--out``; prints the table and one ``BENCH_JSON`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from canary.detect import canary_metrics, detect
from canary.grammar import parse_caption
from canary.prompts import prompt_rows
from canary.sample import sample_videos, write_svg_curves
from pipeline.config import RolloutConfig
from pipeline.model.backend import load_backend
from pipeline.model.canary import read_card
from pipeline.model.vae import pixel_frames_for
from pipeline.outputs.pixel_stats import PixelTracker
from tokentrim import TrimConfig

_ROWS = prompt_rows()[:8]  # every colour, motion, shape and background (the canary prompt table's first rows)
PROMPTS = [str(r["prompt"]) for r in _ROWS]
SEEDS_A = [int(r["seed"]) for r in _ROWS]
SEEDS_B = [s + 100_000 for s in SEEDS_A]  # the noise floor: the same prompts, only the random draw changed
METRICS = ("motion_ok", "mass_ratio", "background_err", "objects", "traj_err", "latent_dist_first",
           "hist_dist_first", "saturation", "steadiness")
SWEEP_P, SWEEP_LAM, SWEEP_SCOPE = (0.05, 0.2), (1.0, 2.0, 3.0), ("last", "window")


def _chunk_frames(videos: torch.Tensor, chunk: int) -> torch.Tensor:
    """Pixel frames of latent chunk ``chunk`` (3 latent frames: 9 px frames for chunk 0, 12 after)."""
    lo = 0 if chunk == 0 else pixel_frames_for(3 * chunk)
    hi = pixel_frames_for(3 * (chunk + 1))
    return videos[:, lo:hi]


def per_chunk_metrics(videos: torch.Tensor, rows: list[list[dict[str, Any]]], prompts: list[str]
                      ) -> dict[str, list[list[float]]]:
    """``{metric: [sample][chunk]}`` for decoded ``videos [B, T, 64, 64, 3]`` and the rollout's stats rows."""
    out: dict[str, list[list[float]]] = {m: [[] for _ in prompts] for m in METRICS + ("pruned",)}
    for b, prompt in enumerate(prompts):
        colour, shape, motion, bg = parse_caption(prompt)
        tracker = PixelTracker()
        for c in range(len(rows)):
            frames = _chunk_frames(videos[b:b + 1], c)[0]
            # the detector reads a chunk with one frame of overlap so a displacement crosses the boundary
            ctx = videos[b, max(0, (0 if c == 0 else pixel_frames_for(3 * c)) - 1):pixel_frames_for(3 * (c + 1))]
            found = detect(ctx, colour)
            m = canary_metrics(ctx, colour, shape, motion, bg)
            pix = tracker.update(frames.numpy()).to_dict()
            values = {"motion_ok": float(found.colour == colour and found.motion == motion),
                      **{k: float(v.float().nanmean()) for k, v in m.items()},
                      "latent_dist_first": rows[c][b]["latent_dist_first"],
                      "hist_dist_first": pix["hist_dist_first"], "saturation": pix["saturation"],
                      "steadiness": pix["steadiness"], "pruned": float(rows[c][b]["tokens_pruned"] > 0)}
            for k, v in values.items():
                out[k][b].append(v)
    return out


def summarise(curves: dict[str, list[list[float]]], horizon: int) -> dict[str, dict[str, float]]:
    """Per metric: Δ (last ``horizon`` chunks - first ``horizon``) median/min/max over samples, and the last
    segment's median."""
    out = {}
    for name, per_sample in curves.items():
        deltas = [statistics.fmean(s[-horizon:]) - statistics.fmean(s[:horizon]) for s in per_sample]
        lasts = [statistics.fmean(s[-horizon:]) for s in per_sample]
        out[name] = {"delta_median": statistics.median(deltas), "delta_min": min(deltas), "delta_max": max(deltas),
                     "last_median": statistics.median(lasts)}
    return out


def run_one(backend: Any, mode: str, chunks: int, seeds: list[int], trim: TrimConfig | None
            ) -> dict[str, list[list[float]]]:
    config = RolloutConfig(mode=mode, num_chunks=chunks)  # type: ignore[arg-type]
    videos, rows = sample_videos(backend, PROMPTS, seeds, config=config, trim=trim)
    return per_chunk_metrics(videos, rows, PROMPTS)


def drift_runs(backend: Any, modes: list[str], horizon: int, multiples: list[int],
               save: Any = None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for mult in multiples:  # every mode at the shorter length first
        for mode in modes:
            for label, seeds, trim in (("off", SEEDS_A, None), ("off, seeds B", SEEDS_B, None),
                                       ("TokenTrim defaults", SEEDS_A, TrimConfig())):
                start = time.monotonic()
                curves = run_one(backend, mode, horizon * mult, seeds, trim)
                results.append({"mode": mode, "multiple": mult, "run": label, "curves": curves,
                                "summary": summarise(curves, horizon), "seconds": time.monotonic() - start})
                print(f"{mode} {mult}x {label}: {time.monotonic() - start:.0f}s", flush=True)
                if save is not None:
                    save(results, [])
    return results


def sweep_runs(backend: Any, horizon: int, mode: str = "self-forcing", mult: int = 3, save: Any = None,
               grid: tuple[tuple[float, ...], tuple[float, ...], tuple[str, ...]] = (SWEEP_P, SWEEP_LAM, SWEEP_SCOPE),
               ) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for scope in grid[2]:
        for p in grid[0]:
            for lam in grid[1]:
                trim = TrimConfig(p=p, lam=lam, prune_scope=scope)  # type: ignore[arg-type]
                curves = run_one(backend, mode, horizon * mult, SEEDS_A, trim)
                results.append({"mode": mode, "multiple": mult, "p": p, "lam": lam, "scope": scope,
                                "summary": summarise(curves, horizon),
                                "prune_rate": statistics.fmean(v for s in curves["pruned"] for v in s)})
                print(f"sweep {scope} p={p} lam={lam} done", flush=True)
                if save is not None:
                    save([], results)
    return results


def _fmt(s: dict[str, float]) -> str:
    return f"{s['delta_median']:+.3f} [{s['delta_min']:+.3f}..{s['delta_max']:+.3f}]"


def tables(drift: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> str:
    cols = ("motion_ok", "mass_ratio", "background_err", "objects", "traj_err", "latent_dist_first",
            "hist_dist_first")
    lines = ["Δ = mean(last trained horizon) - mean(first), median [min..max] over 8 samples; "
             "`motion_ok` last = detector pass rate over the last horizon.", "",
             "| mode | length | run | motion_ok last | " + " | ".join(f"Δ {c}" for c in cols) + " | pruned chunks |",
             "|" + "---|" * (len(cols) + 5)]
    for r in drift:
        s = r["summary"]
        lines.append(f"| {r['mode']} | {r['multiple']}x | {r['run']} | {s['motion_ok']['last_median']:.2f} | "
                     + " | ".join(_fmt(s[c]) for c in cols) + f" | {s['pruned']['last_median']:.2f} |")
    if sweep:
        lines += ["", "Sweep (self-forcing, 3x): Δ median over samples.", "",
                  "| scope | p | λ | prune rate | motion_ok last | Δ traj_err | Δ mass_ratio | Δ objects | "
                  "Δ background_err | Δ latent_dist_first |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sweep:
            s = r["summary"]
            lines.append(f"| {r['scope']} | {r['p']} | {r['lam']} | {r['prune_rate']:.2f} | "
                         f"{s['motion_ok']['last_median']:.2f} | {s['traj_err']['delta_median']:+.3f} | "
                         f"{s['mass_ratio']['delta_median']:+.3f} | {s['objects']['delta_median']:+.3f} | "
                         f"{s['background_err']['delta_median']:+.3f} | "
                         f"{s['latent_dist_first']['delta_median']:+.3f} |")
    return "\n".join(lines)


def plots(drift: list[dict[str, Any]], folder: str) -> None:
    for mode in sorted({r["mode"] for r in drift}):
        for mult in sorted({r["multiple"] for r in drift}):
            runs = [r for r in drift if r["mode"] == mode and r["multiple"] == mult]
            for metric in METRICS:
                curves = {r["run"]: [statistics.fmean(col) for col in zip(*r["curves"][metric])] for r in runs}
                write_svg_curves(os.path.join(folder, f"{mode}_{mult}x_{metric}.svg"), curves,
                                 f"canary {mode} {mult}x: {metric} (mean of 8 samples)", x_label="chunk")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/canary_drift")
    ap.add_argument("--modes", nargs="+", default=["self-forcing", "rolling-forcing"])
    ap.add_argument("--multiples", nargs="+", type=int, default=[3, 10])
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep-p", nargs="+", type=float, default=list(SWEEP_P))
    ap.add_argument("--sweep-lam", nargs="+", type=float, default=list(SWEEP_LAM))
    ap.add_argument("--sweep-scope", nargs="+", default=list(SWEEP_SCOPE))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    backend = load_backend("canary")
    horizon = int(read_card()["trained_horizon"]["chunks"])
    start = time.monotonic()

    def save(drift: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> str:
        """Write what is done so far (a long run can be stopped and still reported)."""
        table = tables(drift, sweep)
        with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as fh:
            fh.write(table + "\n")
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
            json.dump({"drift": drift, "sweep": sweep, "horizon_chunks": horizon, "prompts": PROMPTS}, fh)
        if drift:
            plots(drift, args.out)
        return table

    drift = [] if args.sweep_only else drift_runs(backend, args.modes, horizon, args.multiples, save)
    grid = (tuple(args.sweep_p), tuple(args.sweep_lam), tuple(args.sweep_scope))
    sweep = [] if args.skip_sweep else sweep_runs(backend, horizon, save=lambda d, s: save(drift, s), grid=grid)
    print(save(drift, sweep))
    print("BENCH_JSON " + json.dumps({"canary_drift_seconds": round(time.monotonic() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
