"""The stats and results tables explain themselves: one fixed, fully typed schema (tables of any run union in
pyarrow), units in the names, a description per column in the Parquet field metadata; and the README's code blocks
marked runnable run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs.policy import RESULT_FIELDS, results_schema
from jobs.run import submit
from jobs.spec import JobSpec
from pipeline.config import RolloutConfig
from pipeline.model.backend import load_backend
from pipeline.outputs.render import render_prompts
from pipeline.rollout.chunk_stats import STATS_FIELDS, stats_schema
from pipeline.store import Store
from tokentrim import TrimConfig

ROOT = Path(__file__).resolve().parents[1]


def _described(schema: pa.Schema) -> None:
    for f in schema:
        assert not pa.types.is_null(f.type), f"{f.name} is null-typed"
        assert f.metadata and len(f.metadata[b"description"]) > 10, f"{f.name} has no description"


def test_stats_tables_of_any_run_share_one_typed_described_schema(tmp_path):
    """An all-warm-up render (no severity anywhere) and a judged one union in pyarrow, with each column's
    description in the Parquet field metadata and units in the timing columns' names."""
    backend = load_backend("tiny")
    warm = render_prompts(backend, ["a cat"], ["warm"], Store(str(tmp_path)), config=RolloutConfig(num_chunks=2),
                          trim=TrimConfig(warmup=3), seeds=[1])[0]
    judged = render_prompts(backend, ["a dog"], ["judged"], Store(str(tmp_path)), config=RolloutConfig(num_chunks=4),
                            trim=TrimConfig(warmup=2), seeds=[2])[0]
    assert {r["verdict"] for r in warm.rows} == {"warmup"}
    assert {r["verdict"] for r in judged.rows} - {"warmup"}
    tables = [pq.read_table(tmp_path / f"{pid}.stats.parquet") for pid in ("warm", "judged")]
    assert tables[0].schema.equals(tables[1].schema, check_metadata=True)
    _described(tables[0].schema)
    both = pa.concat_tables(tables)  # fails when a column is null-typed in one file and float64 in the other
    assert both.num_rows == 6 and both.column_names == list(STATS_FIELDS)
    files = [str(tmp_path / f"{pid}.stats.parquet") for pid in ("warm", "judged")]
    assert ds.dataset(files, format="parquet").to_table().num_rows == 6
    import duckdb  # the other reader users point at a folder of stats files

    [(count, kinds)] = duckdb.sql(
        f"select count(*), list_distinct(list(typeof(severity))) from read_parquet({files!r})").fetchall()
    assert (count, kinds) == (6, ["DOUBLE"])
    assert {"t_denoise_s", "t_decode_s", "t_encode_s", "latent_frames", "pixel_frames", "steadiness",
            "render_hash"} <= set(both.column_names)
    assert not {"flicker", "frames", "t_denoise", "config_hash"} & set(both.column_names)
    assert both.column("pixel_frames").to_pylist() == [9, 12, 9, 12, 12, 12]  # 1 + 4 * (3 - 1), then 4 * 3
    assert stats_schema().equals(tables[0].schema, check_metadata=True)


def test_results_tables_share_one_typed_described_schema(tmp_path):
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "../bad"], "prompt": ["a cat", "x"]}), table)
    spec = JobSpec.from_fields(input_url=str(table), output_url=str(tmp_path / "out"), model="tiny", executor="local",
                               rollout=RolloutConfig(num_chunks=2))
    submit(spec)
    first = pq.read_table(tmp_path / "out" / "results.parquet")
    assert first.schema.equals(results_schema(), check_metadata=True)
    _described(first.schema)
    invalid_only = pa.Table.from_pylist([{"prompt_id": "x", "row": 0, "status": "invalid"}], schema=results_schema())
    assert pa.concat_tables([first, invalid_only]).num_rows == 3
    assert {"steadiness", "render_hash", "reused"} <= set(RESULT_FIELDS)


def _runnable_blocks(text: str) -> list[str]:
    """The README's fenced python blocks that follow a ``<!-- runnable -->`` line."""
    return re.findall(r"<!-- runnable -->\n```python\n(.*?)```", text, flags=re.S)


def test_the_readmes_runnable_code_blocks_run_as_written(tmp_path):
    blocks = _runnable_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2, "README.md should mark its python examples <!-- runnable -->"
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, f"README block failed:\n{block}\n{done.stderr[-2000:]}"


@pytest.mark.parametrize("block", ["x = 1\n", "raise SystemExit(3)\n"])
def test_the_runnable_block_finder_reads_marked_blocks_only(block):
    text = f"```python\nignored\n```\n<!-- runnable -->\n```python\n{block}```\n"
    assert _runnable_blocks(text) == [block]
