"""A render job: what to render, where, with which model and settings. Written as ``job.json`` under the output."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pipeline.config import RolloutConfig
from pipeline.errors import InputError
from pipeline.hashing import canonical, digest, job_settings
from pipeline.outputs.video import VideoSettings
from pipeline.rollout.probe import Probe
from tokentrim import TrimConfig

JOB_FORMAT = 2
DEFAULT_MODEL = "canary"  # the one place the default model is named (CLI, jobs, regress)
Dtype = Literal["float32", "bfloat16", "float16"]
Executor = Literal["ray", "local"]
DTYPES: tuple[str, ...] = get_args(Dtype)
EXECUTORS: tuple[str, ...] = get_args(Executor)


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to render any row of the job's prompt table.

    model: a preset ('canary', 'canary-ctx', 'tiny', 'wan2.1-1.3b') or a diffusers Wan2.1 folder.
    weights: a causal generator checkpoint (Self/Rolling Forcing or Wan keys).
    device: cpu, cuda, cuda:N; auto: cuda when the job asks for GPUs (render: when one is available).
    dtype: the model's dtype.
    compile: compile the transformer blocks (torch.compile on the static KV path); paid once per worker.
    workers: workers, each holding one model.
    gpus_per_worker: GPUs each Ray worker claims.
    max_attempts: failed attempts per prompt before it is poison.
    lease_s: seconds a claim's lease lasts without a heartbeat (renewed every third of it).
    seed: base of the per-prompt seeds of rows without one.
    limit: render only the first N valid rows (the rest are reported as excluded).
    keep_state: keep rollouts/<id>/ after a prompt's outputs are committed (default: delete it).
    executor: 'ray' (RAY_ADDRESS or a local Ray) or 'local' (serial, in this process, no Ray).
    probe: a known fault injected into every rollout (`pipeline.rollout.probe`); the regression's probe variant.
    results_every_rows: rewrite results.parquet once this many rows finished since it was last written.
    results_every_s: rewrite results.parquet (and the done-index) at least this often while rows finish, in seconds.
    allow_any_prompt: with the canary model, render prompts outside its grammar too (the detector cannot judge them;
        by default such a prompt is refused, a table row outside it is invalid).

    ``rollout.num_chunks`` is the default for rows without ``num_chunks``. ``storage_options`` are never written
    nor shown in a repr.
    """

    input_url: str
    output_url: str
    model: str = DEFAULT_MODEL
    weights: str | None = None
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trim: TrimConfig | None = field(default_factory=TrimConfig)
    device: str = "auto"
    dtype: Dtype = "float32"
    compile: bool = False
    workers: int = 1
    gpus_per_worker: float = 0.0
    max_attempts: int = 3
    lease_s: float = 120.0
    seed: int = 0
    limit: int | None = None
    keep_state: bool = False
    executor: Executor = "ray"
    probe: Probe | None = None
    results_every_rows: int = 1000
    results_every_s: float = 60.0
    allow_any_prompt: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("input_url", "output_url", "model", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"`{name}` must be a non-empty string, got {getattr(self, name)!r}")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ValueError(f"`weights` must be a non-empty string or None, got {self.weights!r}")
        for name, choices in (("dtype", DTYPES), ("executor", EXECUTORS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {getattr(self, name)!r}")
        for name, low in (("workers", 1), ("max_attempts", 1), ("seed", 0), ("results_every_rows", 1)):
            _check_int(name, getattr(self, name), low)
        if self.limit is not None:
            _check_int("limit", self.limit, 1)
        for name in ("keep_state", "allow_any_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        limits: tuple[tuple[str, float, float], ...] = (("gpus_per_worker", 0.0, 64.0), ("lease_s", 0.1, 86400.0),
                                                    ("results_every_s", 0.01, 86400.0))
        for name, lowest, high in limits:
            number = getattr(self, name)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not lowest <= number <= high:
                raise ValueError(f"`{name}` must be a number in [{lowest}, {high}], got {number!r}")
        if not isinstance(self.rollout, RolloutConfig):
            raise TypeError(f"`rollout` must be a RolloutConfig, got {type(self.rollout).__name__}")
        if self.probe is not None and not isinstance(self.probe, Probe):
            raise TypeError(f"`probe` must be a Probe or None, got {type(self.probe).__name__}")
        if self.trim is not None and not isinstance(self.trim, TrimConfig):
            raise TypeError(f"`trim` must be a TrimConfig or None, got {type(self.trim).__name__}")

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    def render_settings(self) -> dict[str, Any]:
        """The settings that change what is rendered (not where or how fast): their hash names the job's outputs."""
        return job_settings(self.model, self.weights, self.rollout, self.trim, self.dtype, self.seed,
                            video=VideoSettings(), compile=self.compile, probe=self.probe)

    @functools.cached_property
    def render_settings_json(self) -> str:
        """`render_settings` as canonical JSON, computed once per spec (part of every row's done-marker hash)."""
        return canonical(self.render_settings())

    def config_hash(self) -> str:
        return digest(self.render_settings())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rollout"] = self.rollout.to_dict()
        d["trim"] = self.trim.to_dict() if self.trim else None
        d["probe"] = self.probe.to_dict() if self.probe else None
        del d["storage_options"]  # credentials never go into job.json
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], storage_options: dict[str, Any] | None = None) -> JobSpec:
        if not isinstance(d, dict):
            raise ValueError(f"a job spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown JobSpec fields {unknown}")
        d = {k: v for k, v in d.items() if k != "storage_options"}  # format 1 wrote an empty one
        d["rollout"] = RolloutConfig.from_dict(d.get("rollout") or {})
        d["trim"] = TrimConfig.from_dict(d["trim"]) if d.get("trim") is not None else None
        d["probe"] = Probe.from_dict(d["probe"]) if d.get("probe") is not None else None
        return cls(**d, storage_options=storage_options or {})


class OptionError(InputError):
    """An option this machine or model cannot honour, found before any work: the command line exits 2."""


def check_device(device: str) -> None:
    """Refuse a CUDA device this machine does not have, in well under a second (before any model loads)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise OptionError(f"`device` {device!r}: this machine has no CUDA device (torch {torch.__version__}, CUDA "
                          f"build {torch.version.cuda}); use --device cpu")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise OptionError(f"`device` {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_prompt(spec: JobSpec, prompt: str) -> str | None:
    """Why ``prompt`` cannot be rendered under ``spec`` (None when it can): the canary model draws only captions of
    its grammar, unless ``allow_any_prompt``."""
    if spec.model not in ("canary", "canary-ctx") or spec.allow_any_prompt:
        return None
    from pipeline.canary.grammar import grammar_text, parse_caption

    try:
        parse_caption(prompt)
    except ValueError:
        return (f"`prompt` {prompt!r} is outside the canary grammar ({grammar_text()}); --allow-any-prompt renders "
                "it anyway")
    return None


def settings_differ(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted names of the settings whose values differ between two nested settings dicts."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in {*a, *b} if a.get(k) != b.get(k))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")


def absolute_url(url: str) -> str:
    """A URL that means the same from any working directory: local paths made absolute, others unchanged."""
    if "://" in url:
        if url.startswith("file://"):
            return "file://" + os.path.abspath(url[len("file://"):])
        return url.rstrip("/")
    return os.path.abspath(url)
