"""DESIGN §1 layering: each layer imports only the ones below it and the packages DESIGN §1 gives it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# DESIGN §1's "may import" column, as written there.
DESIGN = {
    "tokentrim": {"torch"},
    "pipeline": {"tokentrim", "torch", "diffusers", "transformers", "av", "safetensors", "fsspec", "pyarrow"},
    # the canary's development package (grammar, clip renderer, training, detector): above the pipeline it trains
    # and renders with, below the jobs that check prompts against its grammar and judge videos with its detector
    "canary": {"pipeline", "tokentrim", "torch", "diffusers", "safetensors", "pyarrow", "matplotlib"},
    "jobs": {"pipeline", "canary", "tokentrim", "torch", "ray", "pyarrow", "fsspec", "s3fs", "click",
             "tqdm", "matplotlib", "jinja2"},  # progress bars, the report pages' plots and templates (STYLE §2.20)
}
# Packages that come with one DESIGN names and are its API: torch's and PyAV's arrays are numpy; transformers'
# tokenizers are `tokenizers`; fsspec's S3 backend is s3fs (on botocore).
PART_OF = {"torch": {"numpy"}, "av": {"numpy"}, "transformers": {"tokenizers"}, "fsspec": {"s3fs", "botocore"}}


def _allowed(layer: str) -> set[str]:
    names = DESIGN[layer] | {layer}
    return names | {part for name in names for part in PART_OF.get(name, set())}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


def _layer_imports(layer: str) -> dict[Path, set[str]]:
    return {path: _imports(path) for path in sorted((ROOT / layer).rglob("*.py"))}


def test_each_layer_imports_only_what_design_allows():
    for layer in DESIGN:
        for path, names in _layer_imports(layer).items():
            extra = names - _allowed(layer)
            assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}, which DESIGN §1 does not allow"


def _loaded(modules: str, candidates: tuple[str, ...]) -> list[str]:
    code = f"import json, sys, {modules}; print(json.dumps(sorted(m for m in {candidates!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_pipeline_loads_no_cluster_code():
    modules = ("pipeline.outputs.render, pipeline.rollout.loop, pipeline.outputs.checkpoint, "
               "pipeline.rollout.records, pipeline.hashing")
    assert _loaded(modules, ("ray", "jobs", "click", "s3fs", "av")) == []


def test_checkpointing_does_not_load_the_engine():
    engine = ("pipeline.rollout.loop", "pipeline.model.backend", "diffusers")
    assert _loaded("pipeline.outputs.checkpoint", engine) == []


def test_hashing_loads_no_torch():
    assert _loaded("pipeline.hashing", ("torch", "pipeline.config")) == []
