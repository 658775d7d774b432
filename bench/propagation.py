"""Does TokenTrim limit how far a corrupted committed chunk propagates? Measured against a resampling noise floor.

    python -m bench.propagation                       # 24 seeds, tiny preset, self-forcing, 8 chunks, chunk 4
    python -m bench.propagation --seeds 40 --mode rolling-forcing

Per seed, five rollouts of the same prompt (one batch, one sample per seed):

- `clean` and `clean+trim`: no corruption, without and with TokenTrim;
- `hit` and `hit+trim`: chunk `--at` gets `--amount` added to `--tokens` patch tokens at every denoising step of every
  attempt, so the chunk that is committed to the cache is corrupted whatever TokenTrim does;
- `redraw`: no corruption, no TokenTrim, but chunk `--at` is drawn from other noise (the attempt-1 draw): the same
  run with only the random draw changed. Its distance to `clean` is the noise floor: how far later chunks move when
  chunk `--at` merely changes.

Distances are RMS latent differences over chunks `at+1 .. end` (and, on a second line, over `at+2 .. end`: chunk
`at+1` is the one TokenTrim regenerates from other noise, a new draw that is far from the clean run by itself):
`with` = d(hit+trim, clean+trim), `without` =
d(hit, clean), `floor` = d(redraw, clean). The script prints the median, quartiles and range over seeds of
with / without, without / floor and with / floor, how often TokenTrim pruned chunk `at+1` at the corrupted positions
(the mechanism), and the command that reproduces it. It makes no claim: it reports what it measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import torch

from pipeline.config import RolloutConfig
from pipeline.model.backend import load_backend
from pipeline.rollout.loop import Rollout
from pipeline.rollout.probe import add_to_tokens
from pipeline.rollout.records import ChunkRecord
from pipeline.rollout.sampler import ChunkNoise
from tokentrim import TrimConfig

PATCH = TrimConfig().patch_size  # the Wan patch grid of the tiny and canary models (one token: 1x2x2)

PROMPT = "a red panda walking through a snowy bamboo forest"


class _Redraw:
    """A rollout's noise in which chunk `chunk` takes the draw of the next attempt: only that random draw changes."""

    def __init__(self, noise: ChunkNoise, chunk: int) -> None:
        self.noise, self.chunk = noise, chunk

    def __call__(self, chunk: int, step: int, attempt: int) -> torch.Tensor:
        return self.noise(chunk, step, attempt + (1 if chunk == self.chunk else 0))


def corrupt_tokens(chunk: int, positions: Sequence[int], amount: float):
    """A perturb hook adding `amount` to the 2x2 patches of `positions` of `chunk`, at every step and attempt."""

    def perturb(c: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
        return add_to_tokens(x0, positions, amount, PATCH) if c == chunk else x0

    return perturb


def _run(backend, config: RolloutConfig, seeds: list[int], trim: TrimConfig | None, perturb=None,
         redraw: int | None = None) -> list[ChunkRecord]:
    rollout = Rollout(backend, config, [PROMPT] * len(seeds), seeds, trim)
    if redraw is not None:
        rollout.noise = _Redraw(rollout.noise, redraw)  # type: ignore[assignment]
        if rollout.window is not None:
            rollout.window.noise = rollout.noise  # type: ignore[assignment]
    rollout.perturb = perturb
    return list(rollout)


def _distance(a: list[ChunkRecord], b: list[ChunkRecord], after: int) -> torch.Tensor:
    """[B] RMS latent difference over chunks after `after`."""
    pairs = zip(a[after + 1:], b[after + 1:], strict=True)
    diff = torch.cat([(x.latents - y.latents).flatten(1) for x, y in pairs], dim=1)  # [B, everything after]
    return diff.double().pow(2).mean(dim=1).sqrt()


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return (f"median {statistics.median(values):.3f}  IQR {q[0]:.3f}-{q[2]:.3f}  "
            f"range {min(values):.3f}-{max(values):.3f}")


def measure(seeds: list[int], mode: str = "self-forcing", chunks: int = 8, at: int = 4,
            positions: Sequence[int] = (3, 10, 17), amount: float = 8.0, trim: TrimConfig | None = None
            ) -> dict[str, list[float]]:
    """Per-seed with / without / floor distances and whether chunk `at+1` pruned the corrupted positions."""
    backend = load_backend("tiny", with_vae=False)
    config = RolloutConfig(mode=mode, num_chunks=chunks)  # type: ignore[arg-type]
    trim = trim or TrimConfig()
    hit = corrupt_tokens(at, positions, amount)
    clean_t, hit_t = _run(backend, config, seeds, trim), _run(backend, config, seeds, trim, hit)
    clean_n, hit_n = _run(backend, config, seeds, None), _run(backend, config, seeds, None, hit)
    redraw_n = _run(backend, config, seeds, None, redraw=at)
    found = []
    for i in range(len(seeds)):
        pruned = {p for event in hit_t[at + 1].prunes if bool(event.samples[i])
                  for p in event.positions[i].tolist()}
        found.append(float(set(positions) <= pruned))
    return {
        "with": _distance(hit_t, clean_t, at).tolist(),
        "without": _distance(hit_n, clean_n, at).tolist(),
        "floor": _distance(redraw_n, clean_n, at).tolist(),
        # past chunk at+1, which TokenTrim regenerates from other noise (a new draw, far from the clean run by itself)
        "with_later": _distance(hit_t, clean_t, at + 1).tolist(),
        "without_later": _distance(hit_n, clean_n, at + 1).tolist(),
        "floor_later": _distance(redraw_n, clean_n, at + 1).tolist(),
        "found": found,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=24, help="seeds (>= 20 for the recorded figure)")
    parser.add_argument("--mode", choices=("self-forcing", "rolling-forcing"), default="self-forcing")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--at", type=int, default=4, help="the corrupted (and committed) chunk")
    parser.add_argument("--amount", type=float, default=8.0, help="added to every value of the corrupted tokens")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    r = measure(seeds, args.mode, args.chunks, args.at, amount=args.amount)
    print(f"{'seed':>4} {'with':>8} {'without':>8} {'floor':>8} {'with/without':>12} {'found':>5}")
    for i, s in enumerate(seeds):
        print(f"{s:>4} {r['with'][i]:>8.4f} {r['without'][i]:>8.4f} {r['floor'][i]:>8.4f} "
              f"{r['with'][i] / r['without'][i]:>12.3f} {'yes' if r['found'][i] else 'no':>5}")
    ratio = [w / n for w, n in zip(r["with"], r["without"], strict=True)]
    print(f"\nwith / without TokenTrim   : {_spread(ratio)}")
    print(f"without / noise floor      : {_spread([n / f for n, f in zip(r['without'], r['floor'], strict=True)])}")
    print(f"with / noise floor         : {_spread([w / f for w, f in zip(r['with'], r['floor'], strict=True)])}")
    later = [w / n for w, n in zip(r["with_later"], r["without_later"], strict=True)]
    print(f"chunks {args.at + 2}..: with / without: {_spread(later)}; without / floor: "
          f"{_spread([n / f for n, f in zip(r['without_later'], r['floor_later'], strict=True)])}")
    print(f"chunk {args.at + 1} pruned the corrupted positions: {int(sum(r['found']))} of {len(seeds)} seeds")
    print(f"\nreproduce: python -m bench.propagation {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
