"""TokenTrim's cost per chunk, measured side by side with the plain rollout (DESIGN.md §6: never-prune <= 1.03x).

Three rollouts of the same prompt and seed step in lockstep, chunk by chunk (the order cycles through all
permutations), so chunk i of each runs on the same context length seconds apart:
  none   ``trim=None``, the plain rollout;
  never  TokenTrim bookkeeping that never prunes (``lam=1e9``; ``warmup=3`` because with one accepted severity
         sigma is 0 and the threshold collapses to mu whatever lam is);
  prune  ``lam=0, warmup=1`` and, from the first judged chunk on (chunk 3: the statistics need two severities),
         the first candidate's x0 shifted by `JUMP` (the rollout's fault-injection hook) so that every judged chunk
         is rejected, pruned and regenerated. (Without the jump the bench model's severities fall chunk after chunk
         and lam=0 never prunes; a jump in a warm-up chunk is accepted and cancels the next chunk's.)
Each variant is checked to have done what it names (never: no chunk pruned; prune: every judged chunk pruned), else
the bench stops with exit status 1. Ratios are medians over chunks 1..N-1 of every repeat of the per-chunk ratio.
Chunk 0 (warm-up) is excluded.

    python -m bench.trim_overhead [--chunks 8] [--repeats 6] [--threads 1]
"""

from __future__ import annotations

from functools import partial

import torch

from bench.common import (
    PROMPT,
    Reporter,
    base_parser,
    build_mid_backend,
    command_line,
    lockstep,
    median,
    require,
    set_threads,
    spread,
    step_seconds,
    verdict_counts,
)
from pipeline.config import RolloutConfig
from pipeline.model.backend import WanBackend
from pipeline.rollout.loop import Rollout
from pipeline.rollout.records import ChunkRecord
from tokentrim import TrimConfig

VARIANTS: dict[str, TrimConfig | None] = {
    "none": None,
    "never": TrimConfig(lam=1e9, warmup=3),
    "prune": TrimConfig(lam=0.0, warmup=1),
}
JUMP = 3.0  # added to x0 of attempt 0: drift ~ JUMP * sqrt(16 channels) = 12, severities are ~2-3
DENOISE_PASSES = 4  # self-forcing: 4 denoise passes + 1 commit pass per candidate chunk


def first_judged(trim: TrimConfig) -> int:
    """The first chunk TokenTrim judges: after ``warmup`` accepted chunks, and once its statistics hold two
    severities (chunk 0 has none, so never before chunk 3; `tokentrim.TrimController.judge`)."""
    return max(trim.warmup, 3)


def jump_first_attempt(start: int, chunk: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
    """`Rollout.perturb` hook (with ``start`` bound): a corrupted first candidate from chunk ``start`` on."""
    return x0 + JUMP if attempt == 0 and chunk >= start else x0


def check_variants(records: dict[str, list[list[ChunkRecord]]], variants: dict[str, TrimConfig | None]) -> None:
    """Every variant did what it names, or the bench stops (exit 1): ``never`` pruned no chunk, ``prune`` pruned
    every judged chunk (and there was one)."""
    if "never" in records:
        counts = verdict_counts([r for run in records["never"] for r in run])
        require(not counts.get("pruned"), f"the never-prune variant pruned ({counts})")
    trim = variants.get("prune")
    if "prune" in records and trim is not None:
        start = first_judged(trim)
        verdicts = [rec.rows[0]["verdict"] for run in records["prune"] for rec in run[start:]]
        require(bool(verdicts), f"the prune variant judged no chunk: use more than {start} chunks")
        require(all(v == "pruned" for v in verdicts),
                f"the prune variant pruned {verdicts.count('pruned')} of {len(verdicts)} judged chunks, not all")


def measure(backend: WanBackend, config: RolloutConfig, seed: int, repeats: int,
            variants: dict[str, TrimConfig | None] = VARIANTS, check: bool = True,
            ) -> tuple[dict[str, list[list[float]]], dict[str, list[list[ChunkRecord]]]]:
    """Per repeat and variant: step seconds and records of a lockstep run (fresh rollouts each repeat), each variant
    checked to have done what it names (`check_variants`; ``check=False`` only for a warm-up too short to judge)."""
    seconds: dict[str, list[list[float]]] = {n: [] for n in variants}
    records: dict[str, list[list[ChunkRecord]]] = {n: [] for n in variants}
    for r in range(repeats):
        rollouts = {n: Rollout(backend, config, [PROMPT], [seed], trim) for n, trim in variants.items()}
        trim = variants.get("prune")
        if "prune" in rollouts and trim is not None:
            rollouts["prune"].perturb = partial(jump_first_attempt, first_judged(trim))
        sec, rec = lockstep(rollouts, backend.device, first=r * config.num_chunks)
        for n in variants:
            seconds[n].append(sec[n])
            records[n].append(rec[n])
    if check:
        check_variants(records, variants)
    return seconds, records


def chunk_ratios(seconds: dict[str, list[list[float]]], num: str, den: str,
                 only: list[list[bool]] | None = None) -> list[float]:
    """Per-chunk ratios ``num/den`` over all repeats, chunk 0 excluded (``only``: a chunk filter per repeat)."""
    out = []
    for r, (a, b) in enumerate(zip(seconds[num], seconds[den])):
        for i in range(1, len(a)):
            if only is None or only[r][i]:
                out.append(a[i] / b[i])
    return out


def pruned_mask(records: list[list[ChunkRecord]]) -> list[list[bool]]:
    return [[rec.rows[0]["verdict"] == "pruned" for rec in run] for run in records]


def report_overhead(rep: Reporter, seconds: dict[str, list[list[float]]], records: dict[str, list[list[ChunkRecord]]],
                    target: float = 1.03) -> None:
    """Print the never-prune ratio against ``target`` and the prune-every-chunk figures as information."""
    ratios = chunk_ratios(seconds, "never", "none")
    rep.report("TokenTrim never-prune / no-trim, per chunk", median(ratios), target,
               note=f"median of per-chunk ratios, {spread(ratios)}")
    rep.report("TokenTrim never-prune, bookkeeping-only estimate", bookkeeping_ratio(seconds, records), None,
               note="1 + (step wall - model passes) difference / no-trim step: the same cost without forward noise")
    if "prune" not in seconds:
        return
    mask = pruned_mask(records["prune"])
    counts = verdict_counts([r for run in records["prune"] for r in run])
    judged = sum(v for k, v in counts.items() if k != "warmup")
    share = counts.get("pruned", 0) / max(1, judged)
    rep.report("TokenTrim prune-every-chunk / no-trim, all chunks", median(chunk_ratios(seconds, "prune", "none")),
               None, note=f"verdicts {counts}; pruned {share:.0%} of judged chunks")
    plain, pruned = DENOISE_PASSES + 1, 2 * DENOISE_PASSES + 1  # `Rollout.early_stop` off (the default)
    per_pruned = median(chunk_ratios(seconds, "prune", "none", mask))
    rep.report("TokenTrim prune-every-chunk / no-trim, pruned chunks", per_pruned, None,
               note=f"a rejected candidate is denoised to the end, then regenerated: {pruned} forwards instead "
                    f"of {plain}, expect ~{pruned / plain:.2f}x")


def bookkeeping_ratio(seconds: dict[str, list[list[float]]], records: dict[str, list[list[ChunkRecord]]]) -> float:
    """``1 + (extra_never - extra_none) / step_none`` where extra = step wall seconds minus the timed model passes
    (t_denoise + t_commit): everything TokenTrim adds outside the forwards, without the forwards' noise."""
    def extras(name: str) -> list[float]:
        return [sec[i] - float(run[i].rows[0]["t_denoise_s"]) - float(run[i].rows[0]["t_commit_s"])
                for sec, run in zip(seconds[name], records[name]) for i in range(1, len(sec))]

    base = median(s for run in seconds["none"] for s in run[1:])
    return 1.0 + (median(extras("never")) - median(extras("none"))) / base


def report_phases(records: dict[str, list[list[ChunkRecord]]]) -> None:
    """Median per-phase seconds of each variant (chunks 1..N-1), to see where time goes."""
    for name, runs in records.items():
        rows = [rec.rows[0] for run in runs for rec in run[1:]]
        phases = {k: median(float(r[f"t_{k}_s"]) for r in rows) for k in ("denoise", "trim", "commit")}
        total = median(step_seconds(r) for r in rows)
        parts = "  ".join(f"t_{k} {v * 1e3:7.1f} ms" for k, v in phases.items())
        print(f"    {name:<6} per chunk {total * 1e3:7.1f} ms   {parts}")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8, help="chunks per rollout (chunk 0 is excluded)")
    parser.add_argument("--repeats", type=int, default=6, help="lockstep runs (fresh rollouts each)")
    args = parser.parse_args()
    set_threads(args.threads)
    rep = Reporter("trim_overhead", command_line("bench.trim_overhead"))
    backend = build_mid_backend(seed=args.seed)
    config = RolloutConfig(num_chunks=args.chunks)
    print(f"trim_overhead: bench-mid model, latent {backend.spec.height_px // 8}x{backend.spec.width_px // 8}, "
          f"{args.chunks} chunks x {args.repeats} repeats, {torch.get_num_threads()} thread(s)", flush=True)
    seconds, records = measure(backend, config, args.seed, args.repeats)
    report_phases(records)
    report_overhead(rep, seconds, records)
    rep.finish()


if __name__ == "__main__":
    main()
