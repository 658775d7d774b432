"""A render job: what to render, where, with which model and settings. Written as ``job.json`` under the output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RolloutConfig, config_hash
from pipeline.video import VideoSettings
from tokentrim import TrimConfig

JOB_FORMAT = 1
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to render any row of the job's prompt table.

    ``rollout.num_chunks`` is the default for rows without ``num_chunks``; ``seed`` the base for rows without one.
    """

    input_url: str
    output_url: str
    model: str = "tiny"
    weights: str | None = None
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trim: TrimConfig | None = field(default_factory=TrimConfig)
    device: str = "auto"
    dtype: str = "float32"
    workers: int = 1
    gpus_per_worker: float = 0.0
    max_attempts: int = 3
    lease_s: float = 120.0
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("input_url", "output_url", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"`{name}` must be a non-empty string, got {getattr(self, name)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {DTYPES}, got {self.dtype!r}")
        for name, low in (("workers", 1), ("max_attempts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if not 0 <= self.gpus_per_worker <= 64:
            raise ValueError(f"`gpus_per_worker` must be in [0, 64], got {self.gpus_per_worker!r}")
        if not self.lease_s > 0:
            raise ValueError(f"`lease_s` must be > 0, got {self.lease_s!r}")

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    def render_settings(self) -> dict[str, Any]:
        """The settings that change what is rendered (not where or how fast): their hash names the job's outputs."""
        return {"model": self.model, "weights": self.weights, "rollout": self.rollout.to_dict(),
                "trim": self.trim.to_dict() if self.trim else None, "dtype": self.dtype, "seed": self.seed,
                "video": VideoSettings().to_dict()}

    def config_hash(self) -> str:
        return config_hash(self.render_settings())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rollout"] = self.rollout.to_dict()
        d["trim"] = self.trim.to_dict() if self.trim else None
        d["storage_options"] = {}  # credentials never go into job.json
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], storage_options: dict[str, Any] | None = None) -> JobSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown JobSpec fields {unknown}")
        d = dict(d)
        d["rollout"] = RolloutConfig.from_dict(d.get("rollout") or {})
        d["trim"] = TrimConfig.from_dict(d["trim"]) if d.get("trim") is not None else None
        d["storage_options"] = storage_options or {}
        return cls(**d)

    def with_storage(self, storage_options: dict[str, Any] | None) -> JobSpec:
        return dataclasses.replace(self, storage_options=storage_options or {})
