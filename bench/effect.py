"""Does TokenTrim help on the canary? The effect, measured by what a viewer sees, against a floor.

    python -m bench.effect --out bench/effect [--model canary] [--prompts 20] [--chunks 12] [--mode self-forcing]
                           [--threads 1]

Renders the first ``--prompts`` canary prompts (every colour x motion in the first 20) through the real rollout and
judges every chunk with the detector (`canary.effect`: vanish, split, foreign object, wrong colour):

(a) AUC of each drift score's chunk severity for labelled artefact onsets vs artefact-free chunks, over the chunks
    TokenTrim judges (c >= warmup), on the run without TokenTrim (seeds A) and on the same prompts with other seeds
    (B: the floor); the severities of every variant are computed from the same candidates, so they are paired.
(b) persistence of a pasted foreign object (`Glitch`: a square of another colour over one token of chunk ``G``, on
    the first attempt only) in chunks G+1..G+K, without and with TokenTrim (each drift variant), decoded by a
    decoder warmed on the clean run; the floor is the same figure between two clean runs (seeds A vs B).
(c) false prunes and hits on clean rollouts: per sample, until its first prune the TokenTrim run equals the run
    without it, so each judged chunk's verdict is set against that chunk's label.
(d) cost per chunk of each drift score (canary and Wan2.1-1.3B summary shapes).

Medians over prompts with paired bootstrap 95% intervals (resampling prompts). Writes ``results.json`` and
``table.md`` to ``--out``; prints the tables, the command and one ``BENCH_JSON`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from canary.effect import (
    FOREIGN_MIN_PX,
    LABELS,
    Glitch,
    auc,
    bootstrap,
    glitch_latents,
    glitch_tokens,
    judge_video,
    median,
    onsets,
    warm_decode,
)
from canary.prompts import prompt_rows
from pipeline.config import RolloutConfig
from pipeline.model.backend import load_backend
from pipeline.rollout.loop import Rollout
from tokentrim import TrimConfig, drift_score, latent_summary, unstable_set

MODELS = ("canary", "canary-ctx")


def variants(patch: tuple[int, int, int] = (1, 2, 2)) -> dict[str, TrimConfig]:
    """The drift scores judged online, at the transformer's ``patch``."""
    return {"same": TrimConfig(patch_size=patch), "motion r1": TrimConfig(drift="motion", drift_radius=1,
                                                                          patch_size=patch),
            "relative": TrimConfig(drift="relative", patch_size=patch)}


def offline_only(patch: tuple[int, int, int] = (1, 2, 2)) -> dict[str, TrimConfig]:
    """AUC only (on the canary's 4x4 grid, r2 is most of it)."""
    return {"motion r2": TrimConfig(drift="motion", drift_radius=2, patch_size=patch)}


VARIANTS, OFFLINE_ONLY = variants(), offline_only()
SEED_B_OFFSET = 100_000
GLITCH_CHUNK, GLITCH_AFTER = 3, 3  # the first chunk TokenTrim judges (warmup 3); chunks G+1..G+3 after it
PERSISTENCE = ("glitch_px", "foreign", "mass_err", "vanish", "split", "traj_err")


@dataclass
class Run:
    """One rendered batch: accepted latents per chunk, stats rows, prune events, recorded first candidates."""

    latents: list[torch.Tensor]  # per chunk [B, C, F, h, w]
    rows: list[list[dict[str, Any]]]  # per chunk, per sample
    glitch_found: list[bool]  # per sample: chunk G's first candidate was rejected with the glitch's token in its set
    first_x0: dict[int, torch.Tensor]  # chunk -> [B, C, F, h, w] first candidate's x0 (attempt 0)
    seconds: float


def roll_out(backend: Any, prompts: list[str], seeds: list[int], config: RolloutConfig, trim: TrimConfig | None,
             glitch: torch.Tensor | None = None) -> Run:
    tokens = set(glitch_tokens(tuple(backend.causal.patch_size), backend.spec.width_px // 8))
    start = time.monotonic()
    rollout = Rollout(backend, config, prompts, seeds, trim=trim)
    hook = Glitch(GLITCH_CHUNK if glitch is not None else None, glitch)
    rollout.perturb = hook
    latents, rows, found = [], [], [False] * len(prompts)
    with torch.no_grad():
        for record in rollout:
            latents.append(record.latents.cpu())
            rows.append(record.rows)
            for event in record.prunes:  # chunk G's first candidate rejected: the glitch never enters the cache
                if event.chunk == GLITCH_CHUNK:
                    for b in event.samples.nonzero().flatten().tolist():
                        found[b] = found[b] or not tokens.isdisjoint(event.positions[b].tolist())
    return Run(latents, rows, found, hook.first_x0, time.monotonic() - start)


def decode(backend: Any, run: Run, warm_from: Run | None = None, start: int = GLITCH_CHUNK + 1) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]``; with ``warm_from``, chunks 0..start-1 come from that (clean) run, so the decoder
    carries nothing of ``run``'s chunks before ``start``."""
    if warm_from is None:
        return warm_decode(backend.new_decoder, [], run.latents)
    return warm_decode(backend.new_decoder, warm_from.latents[:start], run.latents[start:])


def judge_glitched(backend: Any, run: Run, clean: Run, prompts: list[str], chunks: int, cf: int
                   ) -> list[dict[int, Any]]:
    """Per sample, the verdicts of chunk G (decoded after the clean chunks 0..G-1) and of chunks G+1.. (decoded
    after the clean chunks 0..G)."""
    at = decode(backend, run, clean, GLITCH_CHUNK)
    after = decode(backend, run, clean, GLITCH_CHUNK + 1)
    later = range(GLITCH_CHUNK + 1, chunks)
    return [{**judge_video(a, p, chunks, cf, [GLITCH_CHUNK]), **judge_video(v, p, chunks, cf, later)}
            for a, v, p in zip(at, after, prompts)]


def severities(run: Run, trim: TrimConfig, grid: tuple[int, int]) -> list[list[float]]:
    """``[sample][chunk]`` severity of each chunk's first candidate under ``trim``'s drift (NaN for chunk 0), from the
    x0s the run recorded: exactly what TokenTrim judges while it has pruned nothing."""
    chunks = sorted(run.first_x0)
    z = [latent_summary(run.first_x0[c], trim.patch_size, trim.summary) for c in chunks]  # [B, N, D] each
    out = [[float("nan")] for _ in range(z[0].shape[0])]
    for c in chunks[1:]:
        drift = drift_score(z[c], z[c - 1], trim.drift, grid, trim.drift_radius)
        sev = unstable_set(drift, trim.p)[1]
        for b, s in enumerate(sev.tolist()):
            out[b].append(s)
    return out


# ------------------------------------------------------------------------------------------------------ (a) AUC
def auc_table(verdicts: list[dict[int, Any]], sev: dict[str, list[list[float]]], first: int) -> dict[str, Any]:
    """Per label (and "any"): onsets, AUC per variant with its interval, and each variant minus "same" (paired:
    the same prompts, the same chunks)."""
    out: dict[str, Any] = {}
    for label in (None, *LABELS):
        # per prompt: the judged chunks that are onsets of ``label`` and those with no artefact in them or before
        split = []
        for v in verdicts:
            starts = onsets(v, label)
            split.append(([c for c, on in starts.items() if c >= first and on],
                          [c for c, on in starts.items() if c >= first and not on and v[c].clean and v[c - 1].clean]))

        def scores(units: list[int], name: str, split: list[tuple[list[int], list[int]]] = split) -> float:
            pos = [sev[name][b][c] for b in units for c in split[b][0]]
            neg = [sev[name][b][c] for b in units for c in split[b][1]]
            return auc(pos, neg)

        row: dict[str, Any] = {"onsets": sum(len(p) for p, _ in split), "clean": sum(len(n) for _, n in split)}
        for name in sev:
            row[name] = bootstrap(partial(scores, name=name), len(verdicts))
            if name != "same":
                row[f"{name} - same"] = bootstrap(partial(_difference, scores, name), len(verdicts))
        out[label or "any"] = row
    return out


def _difference(scores: Callable[[list[int], str], float], name: str, units: list[int]) -> float:
    return scores(units, name) - scores(units, "same")


# ------------------------------------------------------------------------------------------------ (b) persistence
def persistence(verdicts: dict[int, Any], chunks: range) -> dict[str, float]:
    """Each `PERSISTENCE` figure of one video over ``chunks``: the median over the chunks, labels as rates."""
    vs = [verdicts[c] for c in chunks]
    out = {k: median([getattr(v, k) for v in vs]) for k in ("glitch_px", "mass_err", "traj_err")}
    out.update({k: sum(v.labels[k] for v in vs) / len(vs) for k in ("foreign", "vanish", "split")})
    return out


def paired(a: list[dict[str, float]], b: list[dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    """Per figure: the median over prompts of a - b, with its bootstrap interval."""
    def diff(units: list[int], key: str) -> float:
        return median([a[i][key] - b[i][key] for i in units])

    return {k: bootstrap(partial(diff, key=k), len(a)) for k in PERSISTENCE}


# ------------------------------------------------------------------------------------------------- (c) prunes
def prune_decisions(run: Run, verdicts: list[dict[int, Any]], first: int) -> dict[str, float]:
    """Prune rates of a clean TokenTrim run on the chunks the run without TokenTrim labels (until a sample's first
    prune, the two runs are the same)."""
    hits = onset_n = false = clean_n = judged = pruned_all = 0
    for b, v in enumerate(verdicts):
        starts = onsets(v)
        for c in range(first, len(run.rows)):
            pruned = run.rows[c][b]["tokens_pruned"] > 0
            judged += 1
            pruned_all += pruned
            if starts.get(c):
                onset_n += 1
                hits += pruned
            elif v[c].clean and v[c - 1].clean:
                clean_n += 1
                false += pruned
            if pruned:
                break
    return {"false_prunes": false / max(clean_n, 1), "clean_chunks": clean_n, "hits": hits / max(onset_n, 1),
            "onset_chunks": onset_n, "prune_rate": pruned_all / max(judged, 1)}


# ---------------------------------------------------------------------------------------------------- (d) cost
def drift_cost(trim: TrimConfig, shape: tuple[int, int, int], grid: tuple[int, int], repeats: int = 50) -> float:
    """Median seconds of one chunk's drift score + unstable set for summaries of ``shape`` [B, N, D]."""
    g = torch.Generator().manual_seed(0)
    z, zp = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        unstable_set(drift_score(z, zp, trim.drift, grid, trim.drift_radius), trim.p)
        times.append(time.perf_counter() - start)
    return median(times)


# ---------------------------------------------------------------------------------------------------------- main
def measure(backend: Any, n: int, chunks: int, mode: str, log: Any = print) -> dict[str, Any]:
    rows = prompt_rows()[:n]
    prompts = [str(r["prompt"]) for r in rows]
    seeds_a = [int(str(r["seed"])) for r in rows]
    seeds_b = [s + SEED_B_OFFSET for s in seeds_a]
    config = RolloutConfig(mode=mode, num_chunks=chunks)  # type: ignore[arg-type]
    patch = tuple(backend.causal.patch_size)
    grid = (backend.spec.height_px // 8 // patch[1], backend.spec.width_px // 8 // patch[2])  # 8x spatial VAE
    online, offline = variants(patch), offline_only(patch)
    first = TrimConfig().warmup
    cf = config.chunk_frames
    runs = {"clean A": roll_out(backend, prompts, seeds_a, config, None),
            "clean B": roll_out(backend, prompts, seeds_b, config, None)}
    log(f"clean runs: {runs['clean A'].seconds:.0f}s, {runs['clean B'].seconds:.0f}s")
    verdicts = {k: [judge_video(v, p, chunks, cf) for v, p in zip(decode(backend, r), prompts)]
                for k, r in runs.items()}
    allv = {**online, **offline}
    sev = {k: {name: severities(r, t, grid) for name, t in allv.items()} for k, r in runs.items()}
    result: dict[str, Any] = {"model": backend.spec.name, "prompts": prompts, "chunks": chunks, "mode": mode,
                              "grid": grid, "patch": list(patch),
                              "auc": {k: auc_table(verdicts[k], sev[k], first) for k in runs}}
    glitch = torch.stack([glitch_latents(backend, p) for p in prompts])  # [B, 16, 2, 2]
    after = range(GLITCH_CHUNK + 1, GLITCH_CHUNK + 1 + GLITCH_AFTER)
    clean_p = {k: [persistence(v, after) for v in verdicts[k]] for k in runs}
    figures: dict[str, Any] = {"floor (clean A - clean B)": paired(clean_p["clean A"], clean_p["clean B"])}
    # self-forcing's chunks do not depend on the length asked for: the glitch runs stop after chunk G+K
    short = (RolloutConfig(mode=mode, num_chunks=GLITCH_CHUNK + GLITCH_AFTER + 1)  # type: ignore[arg-type]
             if mode == "self-forcing" else config)
    off = roll_out(backend, prompts, seeds_a, short, None, glitch)
    off_v = judge_glitched(backend, off, runs["clean A"], prompts, short.num_chunks, cf)
    at_glitch = {"no TokenTrim": median([v[GLITCH_CHUNK].glitch_px for v in off_v]),
                 "clean": median([v[GLITCH_CHUNK].glitch_px for v in verdicts["clean A"]])}
    if not at_glitch["no TokenTrim"] > at_glitch["clean"] + 20:
        raise RuntimeError(f"the pasted object does not show in chunk {GLITCH_CHUNK}: {at_glitch}")
    off_p = [persistence(v, after) for v in off_v]
    figures["no TokenTrim - clean"] = paired(off_p, clean_p["clean A"])
    persisting = {"clean A": _persisting(clean_p["clean A"]), "clean B": _persisting(clean_p["clean B"]),
                  "no TokenTrim": _persisting(off_p)}
    stopped: dict[str, list[int]] = {}  # variant -> [prompts stopped, prompts started]
    prunes: dict[str, Any] = {}
    for name, trim in online.items():
        on = roll_out(backend, prompts, seeds_a, short, trim, glitch)
        on_v = judge_glitched(backend, on, runs["clean A"], prompts, short.num_chunks, cf)
        at_glitch[name] = median([v[GLITCH_CHUNK].glitch_px for v in on_v])
        on_p = [persistence(v, after) for v in on_v]
        figures[f"no TokenTrim - {name}"] = paired(off_p, on_p)
        persisting[name] = _persisting(on_p)
        stopped[name] = [sum(_drawn(a) and not _drawn(b) for a, b in zip(off_p, on_p)),
                         sum(_drawn(b) and not _drawn(a) for a, b in zip(off_p, on_p))]
        figures[f"{name}: glitch found"] = sum(on.glitch_found) / n
        clean_on = roll_out(backend, prompts, seeds_a, config, trim)
        check_variant(clean_on, sev["clean A"][name], name)
        prunes[name] = prune_decisions(clean_on, verdicts["clean A"], first)
        log(f"{name}: glitch run {on.seconds:.0f}s, clean run {clean_on.seconds:.0f}s")
    dim = 16 * patch[0] * patch[1] * patch[2]
    cost = {name: {"canary": drift_cost(t, (n, grid[0] * grid[1], dim), grid),
                   "wan 480x832": drift_cost(t, (1, 30 * 52, 64), (30, 52))} for name, t in online.items()}
    result.update(glitch_px_at_chunk=at_glitch, persistence=figures, persisting=persisting,
                  stopped=stopped, prunes=prunes, cost_s=cost,
                  seconds={k: r.seconds for k, r in runs.items()})
    return result


def _drawn(figures: dict[str, float]) -> bool:
    """The pasted object is still drawn: glitch-colour px in its corner, median over chunks G+1..G+K, reach
    `FOREIGN_MIN_PX` (a per-prompt reading of (b))."""
    return figures["glitch_px"] >= FOREIGN_MIN_PX


def _persisting(figures: list[dict[str, float]]) -> float:
    """Share of prompts whose pasted object is still drawn (`_drawn`)."""
    return sum(_drawn(f) for f in figures) / len(figures)


def check_variant(run: Run, offline: list[list[float]], name: str) -> None:
    """The run used the drift it names: its chunk-1 and -2 severities (warmup, nothing pruned yet) equal the ones
    computed offline for that variant."""
    for c in (1, 2):
        online = [row["severity"] for row in run.rows[c]]
        # rtol 1e-3: the online and offline summaries differ by float rounding (~5e-5 relative, up to 1.2e-4 on
        # canary-ctx's 64-token grid); the variants' severities differ by 10% and more
        if not torch.allclose(torch.tensor(online), torch.tensor([s[c] for s in offline]), rtol=1e-3, atol=1e-5):
            raise RuntimeError(f"variant {name!r}: chunk {c} severities {online} are not its drift's")


def _ci(t: Any) -> str:
    value, low, high = t
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]" if value == value else "n/a"


def tables(r: dict[str, Any]) -> str:
    patch = r.get("patch", [1, 2, 2])
    dim = 16 * patch[0] * patch[1] * patch[2]
    names = [*VARIANTS, *OFFLINE_ONLY]
    lines = [f"{r.get('model', 'canary')}, {r['mode']}, {len(r['prompts'])} prompts x {r['chunks']} chunks; "
             "judged chunks c >= "
             f"{TrimConfig().warmup}. AUC [95% bootstrap interval over prompts].", "",
             "(a) AUC of the chunk severity, artefact onsets vs artefact-free chunks", "",
             "| seeds | label | onsets | clean | " + " | ".join(names) + " | "
             + " | ".join(f"{n} - same" for n in names[1:]) + " |", "|" + "---|" * (4 + 2 * len(names) - 1)]
    for seeds, table in r["auc"].items():
        for label, row in table.items():
            lines.append(f"| {seeds} | {label} | {row['onsets']} | {row['clean']} | "
                         + " | ".join(_ci(row[n]).lstrip("+") for n in names) + " | "
                         + " | ".join(_ci(row[f"{n} - same"]) for n in names[1:]) + " |")
    lines += ["", f"(b) pasted object at chunk {GLITCH_CHUNK} (first attempt only), chunks {GLITCH_CHUNK + 1}.."
              f"{GLITCH_CHUNK + GLITCH_AFTER}: median over prompts of the paired difference [95% interval]; "
              "decoded after the clean run's chunks", "",
              f"glitch colour px per frame in its corner at chunk {GLITCH_CHUNK}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["glitch_px_at_chunk"].items()), "",
              "| difference | " + " | ".join(PERSISTENCE) + " |", "|---|" + "---|" * len(PERSISTENCE)]
    for name, figs in r["persistence"].items():
        if isinstance(figs, dict):
            lines.append(f"| {name} | " + " | ".join(_ci(figs[k]) for k in PERSISTENCE) + " |")
    lines += ["", f"chunk {GLITCH_CHUNK}'s glitched candidate rejected with the glitch's token in its unstable set "
              "(share of prompts): "
              + ", ".join(f"{k.split(':')[0]} {v:.2f}" for k, v in r["persistence"].items()
                          if not isinstance(v, dict)),
              "", "prompts whose pasted object is still drawn in chunks "
              f"{GLITCH_CHUNK + 1}..{GLITCH_CHUNK + GLITCH_AFTER} (median glitch px >= {FOREIGN_MIN_PX}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in r.get("persisting", {}).items()),
              "", "paired, per variant: prompts where the object is drawn without TokenTrim and not with it "
              "(stopped) / drawn with it and not without (started): "
              + ", ".join(f"{k} {a} / {b}" for k, (a, b) in r.get("stopped", {}).items()),
              "", "(c) clean rollouts with TokenTrim: prune decisions on the chunks the run without it labels", "",
              "| variant | false prunes (artefact-free chunks) | hits (onsets) | prune rate (judged chunks) |",
              "|---|---|---|---|"]
    for name, p in r["prunes"].items():
        lines.append(f"| {name} | {p['false_prunes']:.3f} of {p['clean_chunks']} | {p['hits']:.3f} of "
                     f"{p['onset_chunks']} | {p['prune_rate']:.3f} |")
    lines += ["", "(d) cost per chunk of drift score + unstable set (median seconds, this CPU, one thread)", "",
              f"| variant | {r.get('model', 'canary')} [B, {r['grid'][0] * r['grid'][1]}, {dim}] | Wan2.1 480x832 "
              "[1, 1560, 64] | x same (Wan) |", "|---|---|---|---|"]
    same = r["cost_s"]["same"]["wan 480x832"]
    for name, c in r["cost_s"].items():
        lines.append(f"| {name} | {c['canary'] * 1e6:.0f} us | {c['wan 480x832'] * 1e6:.0f} us | "
                     f"{c['wan 480x832'] / same:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/effect")
    ap.add_argument("--model", default="canary", choices=MODELS)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--mode", default="self-forcing", choices=["self-forcing", "rolling-forcing"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.chunks < GLITCH_CHUNK + GLITCH_AFTER + 1:
        ap.error(f"--chunks must be >= {GLITCH_CHUNK + GLITCH_AFTER + 1}")
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    result = measure(load_backend(args.model), args.prompts, args.chunks, args.mode)
    os.makedirs(args.out, exist_ok=True)
    table = tables(result)
    with open(os.path.join(args.out, f"table-{args.mode}.md"), "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, f"results-{args.mode}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(table)
    cmd = (f"python -m bench.effect --model {args.model} --prompts {args.prompts} --chunks {args.chunks} "
           f"--mode {args.mode}")
    print(f"\nreproduce: {cmd}")
    print("BENCH_JSON " + json.dumps({"effect_seconds": round(time.monotonic() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

