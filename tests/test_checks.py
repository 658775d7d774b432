"""Checks before work, not after: a CUDA device this machine lacks, a prompt outside the canary grammar and an output
made under other settings are refused at once, in one line that says why, before any model loads or renders."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import jobs.regress
import jobs.render_cmd  # noqa: F401 - imported here so that the timed commands pay no import
from canary.grammar import BACKGROUNDS, COLOURS, SHAPES
from jobs.cli import main
from jobs.layout import JobOutput
from jobs.run import plan, submit, write_job_json
from jobs.spec import JobSpec
from pipeline.config import RolloutConfig
from pipeline.errors import ConfigMismatchError
from tokentrim import TrimConfig

GOOD = "a red circle moving left on a plain background"


def _table(path, prompts: list[str]) -> str:
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts}), path)
    return str(path)


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("command", ["render", "submit"])
def test_a_cuda_device_this_machine_lacks_is_one_line_exit_2_within_a_second(no_cuda, tmp_path, command):
    table = _table(tmp_path / "p.parquet", [GOOD])
    args = {"render": ["render", GOOD, "--model", "tiny"], "submit": ["submit", table, "--executor", "local"]}[command]
    began = time.perf_counter()
    result = CliRunner().invoke(main, [*args, "--device", "cuda", "--out", str(tmp_path / "out")])
    seconds = time.perf_counter() - began
    assert result.exit_code == 2, result.output
    assert "no CUDA device" in _one_line(result.output) and "--device cpu" in result.output
    assert seconds < 1.0 and not (tmp_path / "out").exists()


def test_render_refuses_a_prompt_outside_the_canary_grammar_in_one_line_that_states_it(tmp_path):
    began = time.perf_counter()
    result = CliRunner().invoke(main, ["render", "a cat surfing a wave", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and time.perf_counter() - began < 1.0
    line = _one_line(result.output)
    assert "'a cat surfing a wave'" in line and "--allow-any-prompt" in line
    for word in (*COLOURS, *SHAPES, *BACKGROUNDS, "moving left", "bouncing"):
        assert word in line
    assert not (tmp_path / "out").exists()


def test_a_table_row_outside_the_canary_grammar_is_invalid_unless_allowed(tmp_path):
    table = _table(tmp_path / "p.parquet", [GOOD, "a cat surfing a wave"])
    spec = JobSpec.from_fields(input_url=table, output_url=str(tmp_path / "out"), executor="local")
    _, rows, other = plan(spec)
    assert [r.prompt_id for r in rows] == ["p0"]
    assert [(r["prompt_id"], r["status"]) for r in other] == [("p1", "invalid")]
    assert other[0]["error"].startswith("row 1: `prompt` 'a cat surfing a wave' is outside the canary grammar (a ")
    assert [r.prompt_id for r in plan(JobSpec.from_fields(input_url=table, output_url="x",
                                                          allow_any_prompt=True))[1]] == \
        ["p0", "p1"]
    assert [r.prompt_id for r in plan(JobSpec.from_fields(input_url=table, output_url="x",
                                                          model="tiny"))[1]] == ["p0", "p1"]


def test_regress_refuses_a_table_outside_the_canary_grammar_before_rendering(tmp_path, monkeypatch):
    def rendered(*args, **kwargs):
        raise AssertionError("the regression rendered before refusing its table")

    monkeypatch.setattr(jobs.regress, "submit", rendered)
    table = _table(tmp_path / "p.parquet", [GOOD, "a cat surfing a wave"])
    result = CliRunner().invoke(main, ["regress", "--out", str(tmp_path / "night"), "--table", table, "--prompts",
                                       "2", "--executor", "local"])
    assert result.exit_code == 2, result.output
    assert "outside the canary grammar" in _one_line(result.output)


def test_resubmitting_under_other_settings_names_the_settings_that_differ(tmp_path):
    table = _table(tmp_path / "p.parquet", [GOOD])
    first = JobSpec.from_fields(input_url=table, output_url=str(tmp_path / "out"), executor="local")
    write_job_json(JobOutput.open(str(tmp_path / "out")), plan(first)[0])  # a job written under the first settings

    class NoWork:
        def run(self, rows):
            raise AssertionError("rendered under other settings")

    other = JobSpec.from_fields(input_url=table, output_url=str(tmp_path / "out"), executor="local",
                                rollout=RolloutConfig(num_chunks=5), trim=TrimConfig(lam=2.0))
    with pytest.raises(ConfigMismatchError) as caught:
        submit(other, executor=NoWork())
    assert "rollout.num_chunks, trim.lam differ" in str(caught.value) and "--force" in str(caught.value)
