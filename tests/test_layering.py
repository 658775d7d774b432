"""DESIGN §1 layering: each layer imports only the ones below it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "tokentrim": {"tokentrim", "torch"},
    "pipeline": {"pipeline", "tokentrim", "torch", "diffusers", "transformers", "av", "safetensors", "fsspec",
                 "numpy", "pyarrow", "s3fs", "botocore", "aiobotocore", "tokenizers"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


def test_each_layer_imports_only_the_layers_below_it():
    for layer, allowed in ALLOWED.items():
        for path in sorted((ROOT / layer).glob("*.py")):
            extra = _imports(path) - allowed
            assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"


def test_the_pipeline_loads_no_cluster_code():
    code = ("import sys, pipeline.render, pipeline.rollout, pipeline.checkpoint; "
            "print(sorted(m for m in ('ray', 'jobs', 'click', 's3fs', 'av') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
