"""Shared pieces of the benchmarks: a mid-size CPU backend, interleaved timing, and the ratio printer.

Every benchmark prints each ratio next to its target (DESIGN.md §6) and the exact command that reproduces it, and
ends with one machine-readable line ``BENCH_JSON {...}`` that `bench.run_all` collects. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from pipeline.model.backend import TINY_TRANSFORMER, ModelSpec, WanBackend, seeded_transformer
from pipeline.model.causal_wan import CausalWan
from pipeline.model.text import build_tiny_text_encoder
from pipeline.model.vae import build_tiny_vae
from pipeline.rollout.loop import Rollout
from pipeline.rollout.records import ChunkRecord

JSON_PREFIX = "BENCH_JSON "
PROMPT = "a red panda walking through a snowy bamboo forest, cinematic"

# A transformer where the model dominates a chunk's time on a CPU (the tiny preset is dominated by Python overhead):
# 4 layers, 4 heads x 32, ffn 512. With a 16x24 latent (96 tokens per frame, 288 per chunk) one self-forcing chunk
# (4 denoise passes + 1 commit pass) takes ~0.15-0.35 s on one core.
MID_TRANSFORMER: dict[str, Any] = {
    **TINY_TRANSFORMER, "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512, "num_layers": 4,
    "text_dim": 32, "freq_dim": 32,
}
MID_LATENT_HW = (16, 24)
MID_TEXT_LEN = 32
SPATIAL_SCALE = 8


def set_threads(threads: int) -> None:
    """Pin torch's intra-op (and, when still possible, inter-op) thread counts for the whole run."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started: keep what is there
        pass


def build_mid_backend(latent_hw: tuple[int, int] = MID_LATENT_HW, *, seed: int = 0, with_vae: bool = True,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> WanBackend:
    """The bench backend: `MID_TRANSFORMER` (seeded random weights), the tiny text encoder, the tiny VAE."""
    transformer = seeded_transformer(MID_TRANSFORMER, seed, device, dtype)
    text = build_tiny_text_encoder(text_dim=MID_TRANSFORMER["text_dim"], text_len=MID_TEXT_LEN, seed=seed)
    text.encoder.to(device)
    spec = ModelSpec("bench-mid", height_px=latent_hw[0] * SPATIAL_SCALE, width_px=latent_hw[1] * SPATIAL_SCALE,
                     text_len=MID_TEXT_LEN, seed=seed)
    vae = build_tiny_vae(seed).to(device) if with_vae else None
    return WanBackend(spec, CausalWan(transformer), text, vae)


# ------------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device | str) -> None:
    """Wait for queued device work (a no-op on a CPU), so a wall clock measures what ran."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """``(seconds, result)`` of one call, synchronised on both sides."""
    sync(device)
    began = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - began, out


def orders(names: list[str], rounds: int, first: int = 0) -> list[tuple[str, ...]]:
    """The order of the variants in each round: all permutations in turn (A B, B A; A B C, A C B, ...), so that every
    variant runs first, last and after every other one equally often, and slow drift of the load falls on all alike."""
    perms = list(itertools.permutations(names))
    return [perms[(first + r) % len(perms)] for r in range(rounds)]


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each variant, interleaved in the `orders` of the rounds."""
    out: dict[str, list[float]] = {n: [] for n in variants}
    for order in orders(list(variants), repeats):
        for name in order:
            out[name].append(timed(variants[name], device)[0])
    return out


def spread(values: Iterable[float]) -> str:
    """``"IQR a-b, n=N"``: the middle half of a sample, to show how noisy a median is."""
    values = sorted(values)
    if len(values) < 4:
        return f"n={len(values)}"
    q = statistics.quantiles(values, n=4)
    return f"IQR {q[0]:.3f}-{q[2]:.3f}, n={len(values)}"


def chunk_gaps(stamps: list[float]) -> list[float]:
    """Seconds per chunk from the times `render` reported chunks 0..N-1 done (``on_chunk``): the gaps between
    consecutive reports, the last one left out. `render` finishes chunk i's mp4 encode while chunk i+1 is generated
    and reports chunk i then, so the gap before the last report only waits for the final encode."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return gaps[:-1]


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios ``numerator[i] / denominator[i]`` (rounds measured side by side)."""
    return median(a / b for a, b in zip(numerator, denominator) if b > 0)


def lockstep(rollouts: dict[str, Rollout], device: torch.device | str = "cpu", first: int = 0
             ) -> tuple[dict[str, list[float]], dict[str, list[ChunkRecord]]]:
    """Step rollouts of the same length chunk by chunk in the `orders` of the rounds, timing each `Rollout.step`.

    Chunk i of every variant then runs on the same context length, seconds apart: the tightest pairing there is.
    ``first``: where in the cycle of orders to start (to continue it across repeats).
    Returns per-variant step seconds and records, index = chunk.
    """
    names = list(rollouts)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    records: dict[str, list[ChunkRecord]] = {n: [] for n in names}
    chunks = max(r.config.num_chunks - r.next_chunk for r in rollouts.values())
    for order in orders(names, chunks, first):
        for name in order:
            dt, record = timed(rollouts[name].step, device)
            seconds[name].append(dt)
            records[name].append(record)
    return seconds, records


# ------------------------------------------------------------------------------------------------------ report
@dataclass
class Result:
    """One printed figure: a ratio (or size) with its target, or information (``target`` None)."""

    bench: str
    name: str
    value: float
    unit: str
    target: float | None
    op: Literal["<=", ">="] = "<="
    command: str = ""
    note: str = ""

    @property
    def status(self) -> str:
        if self.target is None:
            return "info"
        if self.value != self.value:  # NaN
            return "n/a"
        ok = self.value <= self.target if self.op == "<=" else self.value >= self.target
        return "ok" if ok else "MISSED"


@dataclass
class Reporter:
    """Prints results as they come and the final JSON line."""

    bench: str
    command: str
    results: list[Result] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self, name: str, value: float, target: float | None, *, unit: str = "x", op: Literal["<=", ">="] = "<=",
               note: str = "") -> Result:
        result = Result(self.bench, name, value, unit, target, op, self.command, note)
        self.results.append(result)
        print(format_result(result), flush=True)
        return result

    def finish(self) -> None:
        payload = {"bench": self.bench, "command": self.command, "results": [asdict(r) for r in self.results],
                   **self.extra}
        print(JSON_PREFIX + json.dumps(payload, default=_jsonable), flush=True)


def format_result(r: Result) -> str:
    target = "information" if r.target is None else f"target {r.op} {r.target:g}{r.unit}"
    line = f"  {r.name:<66} {r.value:9.3f}{r.unit:<3} ({target}) [{r.status}]"
    if r.note:
        line += f"  -- {r.note}"
    return line + f"\n      reproduce: {r.command}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def command_line(module: str) -> str:
    """The command that reproduces this run, from the repo root (arguments as given)."""
    return " ".join(["python", "-m", module, *map(shlex.quote, sys.argv[1:])])


def base_parser(description: str, threads: int = 1,
                threads_help: str = "torch intra-op threads (1 keeps timings steady on a shared 2-core machine)",
                ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def step_seconds(row: dict[str, Any]) -> float:
    """Rollout seconds of a chunk from its stats row (denoise + trim + commit)."""
    return sum(float(row.get(f"t_{k}_s", 0.0)) for k in ("denoise", "trim", "commit"))


class BenchCheckError(SystemExit):
    """A variant did not do what it names (a prune variant that never pruned): its figures would measure nothing.
    Raised as SystemExit so the bench exits non-zero with this one line."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bench check failed: {message}")


def require(condition: bool, message: str) -> None:
    """Stop the bench (`BenchCheckError`, exit status 1) unless ``condition``: a variant must do what it names."""
    if not condition:
        raise BenchCheckError(message)


def verdict_counts(records: list[ChunkRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        for row in record.rows:
            counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    return counts
