"""The hashes recorded with outputs: `digest` of canonical JSON (first 16 hex digits of its SHA-256).

`job_settings` is what a job renders with (it guards ``job.json``); `output_hash` what one video and its stats were
rendered with (the stats' ``render_hash``; it guards checkpoints). No torch import here.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pipeline.config import RolloutConfig
    from pipeline.model.backend import ModelSpec
    from pipeline.outputs.video import VideoSettings
    from pipeline.rollout.probe import Probe
    from tokentrim import TrimConfig


def digest(*parts: dict[str, Any]) -> str:
    """Stable short hash of JSON-able dicts (sorted keys)."""
    return digest_canonical(*(canonical(p) for p in parts))


def canonical(part: dict[str, Any]) -> str:
    """The canonical JSON of one part of a `digest`: sorted keys, no spaces."""
    return json.dumps(part, sort_keys=True, separators=(",", ":"))


def digest_canonical(*texts: str) -> str:
    """`digest` of parts already made `canonical` (a part shared by many hashes is serialised once)."""
    return hashlib.sha256(f"[{','.join(texts)}]".encode()).hexdigest()[:16]


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def job_settings(model: str, weights: str | None, rollout: RolloutConfig, trim: TrimConfig | None,
                 dtype: torch.dtype | str, seed: int, *, video: VideoSettings | None = None,
                 compile: bool = False, probe: Probe | None = None) -> dict[str, Any]:
    """A job's render settings as JSON (``compile`` only when on: compiled kernels round differently; ``probe``
    only when set)."""
    return {"model": model, "weights": weights, "rollout": rollout.hashed_dict(),
            "trim": trim.to_dict() if trim else None, "dtype": dtype_name(dtype), "seed": seed,
            **({"video": video.to_dict()} if video is not None else {}),
            **({"compile": True} if compile else {}), **({"probe": probe.to_dict()} if probe is not None else {})}


def output_hash(spec: ModelSpec, rollout: RolloutConfig, trim: TrimConfig | None, dtype: torch.dtype | str, *,
                video: VideoSettings | None = None, compiled: bool = False, probe: Probe | None = None) -> str:
    """The hash of what one output was rendered with: model, rollout, TokenTrim and video encoder settings, the
    dtype, whether the transformer was compiled, and an injected fault (`pipeline.rollout.probe`) if any."""
    return digest(spec.to_dict(), rollout.hashed_dict(), trim.to_dict() if trim else {"trim": None},
                  {"dtype": dtype_name(dtype)}, *([{"video": video.to_dict()}] if video is not None else []),
                  *([{"compiled": True}] if compiled else []), *([{"probe": probe.to_dict()}] if probe else []))
