"""TrimConfig validation, dict round trip and hash; the package's import layering."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrim import TrimConfig


def config_hash(cfg: TrimConfig) -> str:
    """The first 16 hex digits of the SHA-256 of ``cfg.to_dict()`` as canonical JSON: what the configs' hashes were
    pinned with before `pipeline.hashing` took them over (the pins below keep `to_dict` stable)."""
    canonical = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

REPO = Path(__file__).resolve().parents[1]

configs = st.builds(
    TrimConfig,
    p=st.floats(min_value=1e-6, max_value=1.0, allow_nan=False),
    lam=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    warmup=st.integers(1, 100),
    max_retries=st.integers(0, 10),
    stats=st.sampled_from(["welford", "ema"]),
    ema_decay=st.floats(min_value=1e-6, max_value=1 - 1e-6),
    measure_step=st.integers(0, 50),
    sigma_floor=st.floats(min_value=0.0, max_value=10.0, allow_nan=False),
    summary=st.sampled_from(["patch", "mean"]),
    prune_scope=st.sampled_from(["last", "window"]),
    protect_sink=st.booleans(),
    patch_size=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    drift=st.sampled_from(["same", "motion", "relative"]),
    drift_radius=st.integers(0, 5),
)

# (field, bad value, expected exception); each message must name the field and show the value.
INVALID: list[tuple[str, Any, type[Exception]]] = [
    ("p", 0.0, ValueError),
    ("p", 1.5, ValueError),
    ("p", -0.1, ValueError),
    ("p", float("nan"), ValueError),
    ("p", "0.1", TypeError),
    ("p", True, TypeError),
    ("lam", -1.0, ValueError),
    ("lam", float("inf"), ValueError),
    ("lam", None, TypeError),
    ("warmup", 0, ValueError),
    ("warmup", 2.0, TypeError),
    ("warmup", True, TypeError),
    ("max_retries", -1, ValueError),
    ("max_retries", False, TypeError),
    ("stats", "mean", ValueError),
    ("stats", 1, TypeError),
    ("ema_decay", 0.0, ValueError),
    ("ema_decay", 1.0, ValueError),
    ("measure_step", -3, ValueError),
    ("measure_step", 1.5, TypeError),
    ("prune_scope", "all", ValueError),
    ("protect_sink", 1, TypeError),
    ("patch_size", (1, 2), ValueError),
    ("patch_size", (1, 0, 2), ValueError),
    ("patch_size", (1, 2.0, 2), TypeError),
    ("patch_size", (1, True, 2), TypeError),
    ("patch_size", "122", TypeError),
    ("drift", "flow", ValueError),
    ("drift", None, TypeError),
    ("drift_radius", -1, ValueError),
    ("drift_radius", 1.0, TypeError),
]


@pytest.mark.parametrize(("field", "value", "exc"), INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_field_raises_naming_field_and_value(field: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        TrimConfig(**{field: value})
    message = str(info.value)
    assert f"`{field}`" in message
    assert repr(value) in message or str(value) in message


def test_defaults_match_design() -> None:
    cfg = TrimConfig()
    assert (cfg.p, cfg.lam, cfg.warmup, cfg.max_retries, cfg.stats) == (0.1, 3.0, 3, 1, "welford")
    assert (cfg.sigma_floor, cfg.summary) == (0.05, "patch")  # bench/threshold_sweep.py, bench/RESULTS.md
    assert (cfg.measure_step, cfg.prune_scope, cfg.protect_sink, cfg.patch_size) == (0, "last", True, (1, 2, 2))


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrimConfig().p = 0.5  # type: ignore[misc]


def test_list_patch_size_and_int_floats_are_normalised() -> None:
    a = TrimConfig(patch_size=[1, 2, 2], lam=2, p=1)  # type: ignore[arg-type]
    b = TrimConfig(patch_size=(1, 2, 2), lam=2.0, p=1.0)
    assert isinstance(a.patch_size, tuple) and isinstance(a.lam, float) and isinstance(a.p, float)
    assert a == b and config_hash(a) == config_hash(b)


@settings(max_examples=40, deadline=None)
@given(configs)
def test_dict_round_trip_through_json(cfg: TrimConfig) -> None:
    d = json.loads(json.dumps(cfg.to_dict()))
    again = TrimConfig.from_dict(d)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_from_dict_rejects_unknown_keys_by_name() -> None:
    d = TrimConfig().to_dict() | {"lambda_": 3.0, "zeta": 1}
    with pytest.raises(ValueError, match="lambda_") as info:
        TrimConfig.from_dict(d)
    assert "zeta" in str(info.value)


def test_from_dict_missing_keys_take_defaults() -> None:
    assert TrimConfig.from_dict({"p": 0.25}) == TrimConfig(p=0.25)


def test_the_papers_rule_keeps_its_hash_and_keys() -> None:
    """The drift fields came later: at their defaults they are not in the dict, so hashes made before stay valid
    (these two values were computed before the fields existed)."""
    assert config_hash(TrimConfig()) == "1e898762a24740f7"
    assert config_hash(HASHED) == "566ac6df7fd47e43"
    assert not {"drift", "drift_radius"} & set(TrimConfig().to_dict())
    assert TrimConfig(drift="motion").to_dict()["drift"] == "motion"


def test_hash_is_16_hex_chars() -> None:
    h = config_hash(TrimConfig())
    assert len(h) == 16
    int(h, 16)


def _changed(cfg: TrimConfig, name: str) -> TrimConfig:
    """`cfg` with field `name` set to another valid value."""
    value = getattr(cfg, name)
    other: Any
    if name in ("p", "ema_decay"):
        other = value / 2
    elif name in ("lam", "sigma_floor"):
        other = value + 0.5
    elif name in ("warmup", "max_retries", "measure_step"):
        other = value + 1
    elif name == "stats":
        other = "ema" if value == "welford" else "welford"
    elif name == "prune_scope":
        other = "window" if value == "last" else "last"
    elif name == "protect_sink":
        other = not value
    elif name == "summary":
        other = "mean" if value == "patch" else "patch"
    elif name == "drift":
        other = "motion" if value == "same" else "same"
    elif name == "drift_radius":
        other = value + 1
    else:
        other = (value[0], value[1] + 1, value[2])
    return dataclasses.replace(cfg, **{name: other})


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrimConfig)])
def test_hash_changes_with_every_field(name: str) -> None:
    cfg = TrimConfig()
    changed = _changed(cfg, name)
    assert changed != cfg
    assert config_hash(changed) != config_hash(cfg)


HASHED = TrimConfig(p=0.3, lam=1.7, stats="ema", patch_size=(1, 4, 2))
FORBIDDEN_MODULES = ("pipeline", "jobs", "bench", "ray", "pyarrow", "av", "diffusers", "transformers", "s3fs")
FORBIDDEN_MODULES += ("fsspec", "safetensors", "click", "tokentrim.demo")


@pytest.fixture(scope="module")
def fresh_process() -> dict[str, Any]:
    """`import tokentrim` in a fresh interpreter (another hash seed): the modules it loaded and HASHED's hash."""
    code = (
        "import json, sys; import tokentrim; "
        "cfg = tokentrim.TrimConfig.from_dict(json.loads(sys.argv[1])); "
        "import hashlib; text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(',', ':')); "
        "h = hashlib.sha256(text.encode()); "
        "print(json.dumps({'modules': sorted(sys.modules), 'hash': h.hexdigest()[:16]}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(HASHED.to_dict())],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_hash_is_stable_across_processes(fresh_process: dict[str, Any]) -> None:
    assert fresh_process["hash"] == config_hash(HASHED)


def test_import_tokentrim_loads_only_torch(fresh_process: dict[str, Any]) -> None:
    loaded = fresh_process["modules"]
    assert "torch" in loaded and "tokentrim.controller" in loaded
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_MODULES)]
    assert bad == []


def test_package_modules_import_only_torch_and_stdlib() -> None:
    """Static check: no tokentrim module imports numpy or any third-party package but torch, even lazily."""
    allowed = set(sys.stdlib_module_names) | {"torch", "tokentrim", "__future__"}
    offenders = []
    for path in sorted((REPO / "tokentrim").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [(path.name, n) for n in names if n.split(".")[0] not in allowed]
    assert offenders == []
