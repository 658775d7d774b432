"""Stream synthetic latents through the TokenTrim controller and print the per-chunk verdicts.

    python -m tokentrim.demo --chunks 24 --seed 0 --corrupt-at 8 16

Each chunk is a latent [1, C, F, H, W] = [1, 16, 3, H, W] drawn from a smoothly drifting stationary process: a
per-element AR(1) state s_t = rho * s_{t-1} + sqrt(1 - rho^2) * eps_t (unit variance for every t) plus a little
per-frame jitter. At each chunk in `corrupt_at` the first candidate (attempt 0) has `corrupt_tokens` whole patches
shifted by `corrupt_scale` in every channel and frame (`corrupt_kind="offset"`), or given a zero-mean checkerboard
of +-`corrupt_scale` inside each patch (`"checkerboard"`, which only the patch summary sees); regenerating the chunk
(attempt >= 1) draws a clean candidate. Every draw uses its own torch.Generator seeded from (seed, purpose, chunk,
attempt); no global RNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from tokentrim.config import TrimConfig
from tokentrim.controller import Judgement, TrimController
from tokentrim.summary import latent_summary

CHANNELS = 16
FRAMES = 3
CorruptKind = Literal["offset", "checkerboard"]


@dataclass(frozen=True)
class DemoConfig:
    """The synthetic stream of the demo (`run_demo`'s arguments; `tokentrim demo` makes its options from them).

    chunks: number of chunks to stream.
    seed: seed of every random draw.
    corrupt_at: chunks whose first candidate is corrupted.
    corrupt_tokens: tokens corrupted per corrupted chunk.
    corrupt_kind: 'offset' shifts whole patches, 'checkerboard' puts a zero-mean checkerboard inside them.
    corrupt_scale: size of the corruption, in units of the latents' standard deviation.
    height, width: latent size of each chunk.
    rho: per-chunk AR(1) correlation of the drifting state.
    jitter: per-frame noise on top of the state.
    """

    chunks: int = 24
    seed: int = 0
    corrupt_at: tuple[int, ...] = (12,)
    corrupt_tokens: int = 4
    corrupt_kind: CorruptKind = "offset"
    corrupt_scale: float = 3.0
    height: int = 16
    width: int = 16
    rho: float = 0.95
    jitter: float = 0.05


def report(demo: DemoConfig, config: TrimConfig) -> str:
    """What the demo prints: the TokenTrim config, then the per-chunk table."""
    rows = run_demo(**dataclasses.asdict(demo), config=config)
    return f"TokenTrim demo, config {config.to_dict()}\n{format_table(rows)}"


def _generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded from (seed, *parts) through sha256, stable across processes and platforms."""
    key = ":".join(str(x) for x in (seed, *parts)).encode("utf-8")
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def _corruption(
    seed: int, chunk: int, shape: tuple[int, int], patch: tuple[int, int], k: int
) -> tuple[Tensor, Tensor]:
    """Pick k token positions of the (H / p_h, W / p_w) grid and return (positions [k] sorted, pixel mask [H, W])."""
    h, w = shape
    p_h, p_w = patch
    num_tokens = (h // p_h) * (w // p_w)
    positions = torch.randperm(num_tokens, generator=_generator(seed, "corrupt", chunk))[:k].sort().values  # [k]
    token_mask = torch.zeros(num_tokens, dtype=torch.bool)
    token_mask[positions] = True
    # [N] -> [H/p_h, W/p_w] (row-major tokens) -> [H, W] by repeating each token over its patch
    grid = token_mask.reshape(h // p_h, w // p_w)
    return positions, grid.repeat_interleave(p_h, dim=0).repeat_interleave(p_w, dim=1)


def _pattern(pixel_mask: Tensor, patch: tuple[int, int], kind: str) -> Tensor:
    """[H, W] float: 1 on the masked pixels ("offset"), or +-1 alternating inside each patch ("checkerboard")."""
    mask = pixel_mask.float()
    if kind == "offset":
        return mask
    h, w = mask.shape
    rows = torch.arange(h)[:, None] % patch[0]
    cols = torch.arange(w)[None, :] % patch[1]
    return mask * (1.0 - 2.0 * ((rows + cols) % 2).float())  # zero mean in every even-sized patch


def _row(chunk: int, corrupted_positions: list[int], judgements: Sequence[Judgement]) -> dict[str, Any]:
    """One table row from the judgements of a chunk's candidates (the last one was accepted)."""
    first, last = judgements[0], judgements[-1]
    pruned = sorted({pos for j in judgements if bool(j.prune[0]) for pos in j.positions[0].tolist()})
    return {
        "chunk": chunk,
        "corrupted": bool(corrupted_positions),
        "corrupted_positions": corrupted_positions,
        "severity": float(first.severity[0]),
        "mu": float(first.mu[0]),
        "sigma": float(first.sigma[0]),
        "threshold": float(first.threshold[0]),
        "verdict": "pruned" if pruned else first.kinds[0],
        "attempts": len(judgements),
        "pruned": len(pruned),
        "pruned_positions": pruned,
        "accepted_severity": float(last.severity[0]),
    }


_STREAM = DemoConfig()  # run_demo's defaults


def run_demo(
    chunks: int = _STREAM.chunks,
    seed: int = _STREAM.seed,
    corrupt_at: Sequence[int] = _STREAM.corrupt_at,
    config: TrimConfig | None = None,
    *,
    height: int = _STREAM.height,
    width: int = _STREAM.width,
    corrupt_tokens: int = _STREAM.corrupt_tokens,
    corrupt_scale: float = _STREAM.corrupt_scale,
    corrupt_kind: CorruptKind = _STREAM.corrupt_kind,
    rho: float = _STREAM.rho,
    jitter: float = _STREAM.jitter,
) -> list[dict[str, Any]]:
    """Run the controller over `chunks` synthetic chunks and return one row per chunk.

    Row keys: chunk, corrupted, corrupted_positions, severity / mu / sigma / threshold (of the first candidate),
    verdict ("warmup" | "accepted" | "pruned"), attempts, pruned (positions pruned over all attempts),
    pruned_positions (sorted union), accepted_severity.
    """
    config = TrimConfig() if config is None else config
    _, p_h, p_w = config.patch_size
    if chunks < 1 or height % p_h or width % p_w:
        raise ValueError(f"need `chunks` >= 1 and a patch-divisible size, got {chunks}, {height}x{width}")
    num_tokens = (height // p_h) * (width // p_w)
    if not 1 <= corrupt_tokens <= num_tokens:
        raise ValueError(f"`corrupt_tokens` must be in [1, {num_tokens}], got {corrupt_tokens}")
    if corrupt_kind not in get_args(CorruptKind):
        raise ValueError(f"`corrupt_kind` must be one of {get_args(CorruptKind)}, got {corrupt_kind!r}")
    controller = TrimController(config, batch_size=1)
    state = torch.randn(CHANNELS, height, width, generator=_generator(seed, "init"))  # [C, H, W]
    rows: list[dict[str, Any]] = []
    for chunk in range(chunks):
        if chunk > 0:
            eps = torch.randn(CHANNELS, height, width, generator=_generator(seed, "drift", chunk))
            state = rho * state + math.sqrt(1.0 - rho * rho) * eps
        corrupted = chunk in set(corrupt_at)
        positions, pixel_mask = _corruption(seed, chunk, (height, width), (p_h, p_w), corrupt_tokens)
        judgements: list[Judgement] = []
        for attempt in range(config.max_retries + 1):
            noise = torch.randn(
                1, CHANNELS, FRAMES, height, width, generator=_generator(seed, "frames", chunk, attempt)
            )
            latents = state[None, :, None] + jitter * noise  # [1, C, F, H, W]
            if corrupted and attempt == 0:
                latents = latents + corrupt_scale * _pattern(pixel_mask, (p_h, p_w), corrupt_kind)  # over [1, C, F]
            summary = latent_summary(latents, config.patch_size, config.summary)  # [1, N, D]
            judgements.append(controller.judge(summary, attempt))
            if not bool(judgements[-1].prune[0]):
                controller.accept(summary, judgements[-1])
                break
        rows.append(_row(chunk, positions.tolist() if corrupted else [], judgements))
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-chunk table printed by the demo."""
    header = f"{'chunk':>5} {'severity':>9} {'mu':>9} {'sigma':>9} {'threshold':>9} {'verdict':>9} {'attempts':>8} "
    lines = [header + f"{'pruned':>6} corrupted"]
    for r in rows:
        lines.append(
            f"{r['chunk']:>5} {r['severity']:>9.4f} {r['mu']:>9.4f} {r['sigma']:>9.4f} {r['threshold']:>9.4f} "
            f"{r['verdict']:>9} {r['attempts']:>8} {r['pruned']:>6} {'yes' if r['corrupted'] else ''}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the demo and print its table; returns the exit status. (`tokentrim demo` takes every field
    of `DemoConfig` and `TrimConfig` as an option; this entry point, which may not import click, a few of them.)"""
    defaults, stream = TrimConfig(), DemoConfig()
    parser = argparse.ArgumentParser(prog="python -m tokentrim.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=stream.chunks, help="number of chunks to stream")
    parser.add_argument("--seed", type=int, default=stream.seed, help="seed of every random draw")
    parser.add_argument("--corrupt-at", type=int, nargs="*", default=list(stream.corrupt_at),
                        help="chunks whose first candidate is corrupted")
    parser.add_argument("--corrupt-tokens", type=int, default=stream.corrupt_tokens,
                        help="tokens corrupted per corrupted chunk")
    parser.add_argument("--corrupt-kind", choices=get_args(CorruptKind), default=stream.corrupt_kind,
                        help="shift whole patches, or a zero-mean checkerboard inside them")
    parser.add_argument("--summary", choices=("patch", "mean"), default=defaults.summary,
                        help="flattened patch per token, or the patch mean")
    parser.add_argument("--p", type=float, default=defaults.p, help="fraction of tokens in the unstable set")
    parser.add_argument("--lam", type=float, default=defaults.lam, help="threshold mu + lam * sigma")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="chunks that only feed the statistics")
    args = parser.parse_args(argv)
    config = TrimConfig(p=args.p, lam=args.lam, warmup=args.warmup, summary=args.summary)
    demo = dataclasses.replace(stream, chunks=args.chunks, seed=args.seed, corrupt_at=tuple(args.corrupt_at),
                               corrupt_tokens=args.corrupt_tokens, corrupt_kind=args.corrupt_kind)
    print(report(demo, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
