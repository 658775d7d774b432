"""A render job in three parts: which model (`ModelChoice`), what is rendered (`RenderSettings`), how the job runs
(`Execution`); each part is one group of command-line options (`jobs.options`). Written as ``job.json``.

Only `RenderSettings` and the model's identity change what is rendered (`JobSpec.render_settings`, the config hash);
a ``job.json`` of format 2 (one flat spec) is read into the parts by field name.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pipeline.config import RolloutConfig, check_int
from pipeline.errors import InputError
from pipeline.hashing import canonical, digest, job_settings
from pipeline.outputs.video import VideoSettings
from pipeline.rollout.probe import Probe
from tokentrim import TrimConfig

JOB_FORMAT = 3  # 3: the spec in parts (model, render, execution); 2: one flat spec
DEFAULT_MODEL = "canary"  # the one place the default model is named (CLI, jobs, regress)
Dtype = Literal["float32", "bfloat16", "float16"]
Executor = Literal["ray", "local"]
DTYPES: tuple[str, ...] = get_args(Dtype)
EXECUTORS: tuple[str, ...] = get_args(Executor)


@dataclass(frozen=True)
class ModelChoice:
    """Which model renders, and on what.

    model: a preset ('canary', 'canary-ctx', 'tiny', 'wan2.1-1.3b') or a diffusers Wan2.1 folder.
    weights: a causal generator checkpoint (Self/Rolling Forcing or Wan keys).
    device: cpu, cuda, cuda:N; auto: cuda when the job asks for GPUs (render: when one is available).
    dtype: the model's dtype.
    compile: compile the transformer blocks (torch.compile on the static KV path); paid once per worker.
    allow_any_prompt: with the canary model, render prompts outside its grammar too (the detector cannot judge them;
        by default such a prompt is refused, a table row outside it is invalid).
    """

    model: str = DEFAULT_MODEL
    weights: str | None = None
    device: str = "auto"
    dtype: Dtype = "float32"
    compile: bool = False
    allow_any_prompt: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"`{name}` must be a non-empty string, got {getattr(self, name)!r}")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ValueError(f"`weights` must be a non-empty string or None, got {self.weights!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("compile", "allow_any_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")

    def resolve_device(self, gpus_per_worker: float | None) -> str:
        """The device to load the model on (the one place ``auto`` is resolved): ``cuda`` when the job's workers
        claim GPUs, ``cpu`` when they claim none; a render in this process (``gpus_per_worker`` None) takes
        ``cuda`` when this machine has it."""
        if self.device != "auto":
            return self.device
        if gpus_per_worker is None:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cuda" if gpus_per_worker > 0 else "cpu"


@dataclass(frozen=True)
class RenderSettings:
    """What is rendered: with the model's identity, these name the outputs (the config hash).

    seed: the rollout's seed; in a job, the base of the per-prompt seeds of rows without one.
    """

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trim: TrimConfig | None = field(default_factory=TrimConfig)
    probe: Probe | None = None
    video: VideoSettings = field(default_factory=VideoSettings)
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0)
        for name, kind, optional in (("rollout", RolloutConfig, False), ("trim", TrimConfig, True),
                                     ("probe", Probe, True), ("video", VideoSettings, False)):
            value = getattr(self, name)
            if not isinstance(value, kind) and not (optional and value is None):
                raise TypeError(f"`{name}` must be a {kind.__name__}{' or None' if optional else ''}, got "
                                f"{type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {"rollout": self.rollout.to_dict(), "trim": self.trim.to_dict() if self.trim else None,
                "probe": self.probe.to_dict() if self.probe else None, "video": dataclasses.asdict(self.video),
                "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RenderSettings:
        _known(cls, d)
        return cls(rollout=RolloutConfig.from_dict(d.get("rollout") or {}),
                   trim=TrimConfig.from_dict(d["trim"]) if d.get("trim") is not None else None,
                   probe=Probe.from_dict(d["probe"]) if d.get("probe") is not None else None,
                   video=VideoSettings(**_known(VideoSettings, d.get("video") or {})), seed=d.get("seed", 0))


@dataclass(frozen=True)
class Execution:
    """How a job runs: where, how wide, how it retries and what it keeps.

    executor: 'ray' (RAY_ADDRESS or a local Ray) or 'local' (serial, in this process, no Ray).
    workers: workers, each holding one model.
    gpus_per_worker: GPUs each Ray worker claims.
    max_attempts: failed attempts per prompt before it is poison.
    lease_s: seconds a claim's lease lasts without a heartbeat (renewed every third of it).
    limit: render only the first N valid rows (the rest are reported as excluded).
    keep_state: keep rollouts/<id>/ after a prompt's outputs are committed (default: delete it).
    results_every_rows: rewrite results.parquet once this many rows finished since it was last written.
    results_every_s: rewrite results.parquet (and the done-index) at least this often while rows finish, in seconds.
    """

    executor: Executor = "ray"
    workers: int = 1
    gpus_per_worker: float = 0.0
    max_attempts: int = 3
    lease_s: float = 120.0
    limit: int | None = None
    keep_state: bool = False
    results_every_rows: int = 1000
    results_every_s: float = 60.0

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"`executor` must be one of {EXECUTORS}, got {self.executor!r}")
        for name, low in (("workers", 1), ("max_attempts", 1), ("results_every_rows", 1)):
            check_int(name, getattr(self, name), low)
        if self.limit is not None:
            check_int("limit", self.limit, 1)
        if not isinstance(self.keep_state, bool):
            raise ValueError(f"`keep_state` must be a bool, got {self.keep_state!r}")
        limits: tuple[tuple[str, float, float], ...] = (("gpus_per_worker", 0.0, 64.0), ("lease_s", 0.1, 86400.0),
                                                        ("results_every_s", 0.01, 86400.0))
        for name, lowest, high in limits:
            number = getattr(self, name)
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not lowest <= number <= high:
                raise ValueError(f"`{name}` must be a number in [{lowest}, {high}], got {number!r}")


PARTS: dict[str, type] = {"model": ModelChoice, "render": RenderSettings, "execution": Execution}


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to render any row of the job's prompt table: where (``input_url``, ``output_url``)
    and the three parts. ``render.rollout.num_chunks`` is the default for rows without ``num_chunks``.
    ``storage_options`` are never written nor shown in a repr."""

    input_url: str
    output_url: str
    model: ModelChoice = field(default_factory=ModelChoice)
    render: RenderSettings = field(default_factory=RenderSettings)
    execution: Execution = field(default_factory=Execution)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("input_url", "output_url"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"`{name}` must be a non-empty string, got {getattr(self, name)!r}")
        for name, kind in PARTS.items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"`{name}` must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")

    @classmethod
    def from_fields(cls, input_url: str, output_url: str, *, storage_options: dict[str, Any] | None = None,
                    **fields: Any) -> JobSpec:
        """A spec from the parts' own field names (``model="tiny", lease_s=2.0, rollout=...``), each routed to the
        part that declares it; an unknown name raises ValueError."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in PARTS}
        owner = {f.name: part for part, kind in PARTS.items() for f in dataclasses.fields(kind)}
        unknown = sorted(set(fields) - set(owner))
        if unknown:
            raise ValueError(f"unknown JobSpec fields {unknown}")
        for name, value in fields.items():
            parts[owner[name]][name] = value
        return cls(input_url, output_url, **{name: PARTS[name](**values) for name, values in parts.items()},
                   storage_options=storage_options or {})

    @property
    def resolved_device(self) -> str:
        return self.model.resolve_device(self.execution.gpus_per_worker)

    def render_settings(self) -> dict[str, Any]:
        """The settings that change what is rendered (not where or how fast): their hash names the job's outputs."""
        r = self.render
        return job_settings(self.model.model, self.model.weights, r.rollout, r.trim, self.model.dtype, r.seed,
                            video=r.video, compile=self.model.compile, probe=r.probe)

    @functools.cached_property
    def render_settings_json(self) -> str:
        """`render_settings` as canonical JSON, computed once per spec (part of every row's done-marker hash)."""
        return canonical(self.render_settings())

    def config_hash(self) -> str:
        return digest(self.render_settings())

    def to_dict(self) -> dict[str, Any]:
        """The spec as ``job.json`` holds it (format `JOB_FORMAT`); credentials never go into it."""
        return {"input_url": self.input_url, "output_url": self.output_url,
                "model": dataclasses.asdict(self.model), "render": self.render.to_dict(),
                "execution": dataclasses.asdict(self.execution)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], storage_options: dict[str, Any] | None = None) -> JobSpec:
        """A spec as `to_dict` wrote it, or a format-2 flat one (its fields routed to the parts by name)."""
        if not isinstance(d, dict):
            raise ValueError(f"a job spec must be a JSON object, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k != "storage_options"}  # format 1 wrote an empty one
        if not isinstance(d.get("model", {}), dict):  # format 2: one flat spec
            flat = {k: v for k, v in d.items() if k not in ("input_url", "output_url")}
            nested = RenderSettings.from_dict({k: flat.pop(k) for k in ("rollout", "trim", "probe") if k in flat})
            flat.update(rollout=nested.rollout, trim=nested.trim, probe=nested.probe)
            return cls.from_fields(d.get("input_url"), d.get("output_url"),  # type: ignore[arg-type]
                                   storage_options=storage_options, **flat)
        _known(cls, d)
        return cls(d.get("input_url"), d.get("output_url"),  # type: ignore[arg-type]
                   model=ModelChoice(**_known(ModelChoice, d.get("model") or {})),
                   render=RenderSettings.from_dict(d.get("render") or {}),
                   execution=Execution(**_known(Execution, d.get("execution") or {})),
                   storage_options=storage_options or {})


def _known(cls: type, d: Any) -> dict[str, Any]:
    """``d`` when it is an object holding only fields of ``cls``; else ValueError naming the others."""
    if not isinstance(d, dict):
        raise ValueError(f"a {cls.__name__} must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return d


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


def check_prompt(model: ModelChoice, prompt: str) -> str | None:
    """Why ``prompt`` cannot be rendered by ``model`` (None when it can): the canary model draws only captions of
    its grammar, unless ``allow_any_prompt``."""
    if model.model not in ("canary", "canary-ctx") or model.allow_any_prompt:
        return None
    from canary.grammar import grammar_text, parse_caption

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


def absolute_url(url: str) -> str:
    """A URL that means the same from any working directory: local paths made absolute, others unchanged."""
    if "://" in url:
        if url.startswith("file://"):
            return "file://" + os.path.abspath(url[len("file://"):])
        return url.rstrip("/")
    return os.path.abspath(url)
