"""Hashes of what a seeded set of renders writes: committed latents, stats rows without timings, mp4 bytes.

Run it on two checkouts and diff the JSON files: a refactor that keeps behaviour leaves every hash equal.

    PYTHONPATH=/path/to/checkout python tests/identity_check.py --out DIR

The set: the canary and the tiny model; self-forcing and rolling-forcing; TokenTrim off and on with low
thresholds (so it prunes and regenerates); a probe; a resume after a partial rollout. It uses the library only
(feature-detecting the renamed render entry point), so the same file runs against older checkouts. Not collected
by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RolloutConfig
from pipeline.model.backend import load_backend
from pipeline.rollout.probe import Probe
from pipeline.store import Store
from tokentrim import TrimConfig

try:  # renamed from `render` (three functions shared the name)
    from pipeline.outputs.render import render_prompts
except ImportError:  # an older checkout
    from pipeline.outputs.render import render as render_prompts  # type: ignore[no-redef]
# stores passed down (`out: Store, state: Store`) since the job-output step; URL strings before it
TAKES_STORES = "state" in inspect.signature(render_prompts).parameters

PROMPTS = {"canary": ["a red circle moving right on a plain background", "a blue square moving left"],
           "tiny": ["a cat", "a dog in the snow"]}
SEEDS = [3, 11]
LOW = TrimConfig(warmup=2, lam=0.0, sigma_floor=0.0, max_retries=2)  # prunes every judged chunk


class Stop(Exception):
    """Raised by the fence to cut a render after some checkpoint commits."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _rows_hash(rows: list[dict[str, Any]]) -> str:
    kept = [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]
    return _sha(json.dumps(kept, sort_keys=True, default=repr).encode())


def _latents_hash(state: Path) -> str:
    """The hash of every committed chunk's stored objects under a state folder (latents, prune events, window)."""
    digest = hashlib.sha256()
    for path in sorted(state.rglob("*")):
        if path.is_file() and path.suffix == ".safetensors":
            digest.update(path.relative_to(state).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _case(backend: Any, name: str, config: RolloutConfig, trim: TrimConfig | None, probe: Probe | None,
          work: Path, cut: int | None = None) -> dict[str, Any]:
    out, state = work / name / "out", work / name / "state"
    prompts = PROMPTS[backend.spec.name]
    ids = [f"p{i}" for i in range(len(prompts))]
    kwargs: dict[str, Any] = {"config": config, "trim": trim, "seeds": SEEDS, "probe": probe}
    kwargs.update({"state": Store(str(state))} if TAKES_STORES else {"state_url": str(state)})
    target = Store(str(out)) if TAKES_STORES else str(out)
    if cut is not None:  # a partial rollout: stop before the commit of chunk ``cut``
        calls = {"n": 0}

        def fence() -> None:
            calls["n"] += 1
            if calls["n"] > cut:
                raise Stop

        try:
            render_prompts(backend, prompts, ids, target, fence=fence, **kwargs)
        except Stop:
            pass
        else:
            raise RuntimeError(f"{name}: the render was not cut")
    results = render_prompts(backend, prompts, ids, target, **kwargs)
    return {"resumed_from": [r.resumed_from for r in results], "config_hash": results[0].config_hash,
            "verdicts": [[row["verdict"] for row in r.rows] for r in results],
            "latents": _latents_hash(state),
            "rows": [_rows_hash(r.rows) for r in results],
            "mp4": [_sha((out / f"{pid}.mp4").read_bytes()) for pid in ids],
            "stats_parquet_rows": [_rows_hash(_read_stats(out / f"{pid}.stats.parquet")) for pid in ids]}


def _read_stats(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for identity.json")
    parser.add_argument("--models", default="canary,tiny")
    args = parser.parse_args()
    torch.manual_seed(0)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            backend = load_backend(model, seed=0)
            sf = RolloutConfig(mode="self-forcing", num_chunks=6, window_frames=6)
            rf = RolloutConfig(mode="rolling-forcing", num_chunks=6)
            cases = {
                "sf-off": (sf, None, None, None),
                "sf-low": (sf, LOW, None, None),
                "sf-default-probe": (sf, TrimConfig(), Probe(3), None),
                "sf-low-nostop": (RolloutConfig(num_chunks=6, window_frames=6, early_stop=False), LOW, None, None),
                "sf-low-resume": (sf, LOW, Probe(3), 8),
                "rf-off": (rf, None, None, None),
                "rf-low": (rf, LOW, None, None),
                "rf-low-probe-resume": (rf, LOW, Probe(2), 10),
            }
            for case, (config, trim, probe, cut) in cases.items():
                key = f"{model}/{case}"
                report[key] = _case(backend, key, config, trim, probe, work, cut)
                print(key, json.dumps(report[key]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "identity.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
