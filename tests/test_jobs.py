"""Jobs: prompt tables, the job policy (claims, leases, poison, done markers, retention), the serial local executor,
validation before anything is written, and real Ray jobs over a fake S3 output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.layout import JobOutput
from jobs.policy import RESULT_FIELDS, Busy, Claims, Heartbeat, process_row, results_schema, row_hash
from jobs.run import load_spec, status, submit
from jobs.spec import JobSpec
from jobs.table import PromptRow, read_table, validate_rows
from pipeline.config import RolloutConfig
from pipeline.errors import ConfigMismatchError, InputError
from pipeline.model.backend import load_backend
from pipeline.outputs.video import decode_mp4
from pipeline.store import Store
from tokentrim import TrimConfig

ROOT = Path(__file__).resolve().parents[1]


def _table(path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def _prompts(path, n: int = 3, chunks: int = 2) -> str:
    return _table(path, prompt_id=[f"p{i}" for i in range(n)], prompt=[f"a lantern number {i}" for i in range(n)],
                  num_chunks=[chunks] * n)


def _local(table: str, out, **kw) -> JobSpec:
    kw.setdefault("rollout", RolloutConfig(num_chunks=2))
    kw.setdefault("allow_any_prompt", True)  # prompts outside the canary grammar
    return JobSpec.from_fields(input_url=table, output_url=str(out), executor="local", **kw)


def _results(out) -> list[dict]:
    return pq.read_table(Path(out) / "results.parquet").to_pylist()


def _leases(out, pid: str) -> list[str]:
    folder = Path(out) / "claims" / pid
    return sorted(json.loads(p.read_text())["state"] for p in folder.glob("*.lease"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------------ tables
def test_bad_rows_are_named_and_the_rest_kept(tmp_path):
    url = _table(tmp_path / "p.parquet", prompt_id=["ok", "../x", "dup", "dup", "nochunks", "s", "", "x\n"],
                 prompt=["a cat", "evil", "one", "two", "x", "y", "z", "newline"],
                 num_chunks=[2, 2, 2, 2, 0, 2, 2, 2], seed=[1, 2, 3, 4, 5, -1, 7, 8])
    good, bad = validate_rows(read_table(url), default_chunks=3)
    assert [r.prompt_id for r in good] == ["ok", "dup"]
    errors = {b.row: b.error for b in bad}
    assert sorted(errors) == [1, 3, 4, 5, 6, 7]
    assert "prompt_id" in errors[1] and "'../x'" in errors[1]
    assert "repeats" in errors[3]
    assert "num_chunks" in errors[4] and "row 4" in errors[4]
    assert "seed" in errors[5]
    assert "prompt_id" in errors[6]
    assert "prompt_id" in errors[7] and "'x\\n'" in errors[7]  # `$` would have matched before the newline


def test_integral_floats_are_integers_and_a_null_seed_takes_the_default(tmp_path):
    import pandas as pd

    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "seed": [5, None, 7],
                  "num_chunks": [2.0, 3.0, 2.5]}).to_parquet(path)
    good, bad = validate_rows(read_table(str(path)), default_chunks=4, base_seed=0)
    assert [(r.prompt_id, r.seed, r.num_chunks) for r in good[:1]] == [("a", 5, 2)]
    assert good[1].prompt_id == "b" and good[1].num_chunks == 3 and isinstance(good[1].seed, int)
    assert [b.row for b in bad] == [2] and "2.5" in bad[0].error


def test_defaults_fill_missing_seed_and_chunks_stably(tmp_path):
    url = _table(tmp_path / "p.parquet", prompt_id=["a", "b"], prompt=["x", "y"])
    good, bad = validate_rows(read_table(url), default_chunks=5, base_seed=1)
    again, _ = validate_rows(read_table(url), default_chunks=5, base_seed=1)
    assert not bad and [r.num_chunks for r in good] == [5, 5]
    assert good == again and good[0].seed != good[1].seed


def test_a_table_without_prompts_or_not_parquet_is_refused(tmp_path):
    with pytest.raises(InputError, match="prompt"):
        read_table(_table(tmp_path / "p.parquet", prompt_id=["a"]))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="bad.parquet"):
        read_table(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match="no prompt table"):
        read_table(str(tmp_path / "missing.parquet"))


def test_the_shared_vbench_table_validates():
    good, bad = validate_rows(read_table("jobs/data/vbench_prompts.parquet"), default_chunks=7)
    assert len(good) + len(bad) == 946 and len(good) > 900


def test_results_rows_and_the_arrow_schema_have_one_definition():
    assert tuple(results_schema().names) == RESULT_FIELDS
    table = pa.Table.from_pylist([{k: None for k in RESULT_FIELDS}], schema=results_schema())
    assert table.num_rows == 1


# ------------------------------------------------------------------------------------------------ claims
def test_claims_are_exclusive_leased_and_only_failures_count(tmp_path):
    clock = Clock()
    claims = Claims(JobOutput.open(str(tmp_path)), lease_s=60, max_attempts=2, clock=clock)
    first = claims.acquire("p")
    assert first.attempt == 0
    assert claims.acquire("p") == Busy(clock.now + 60)  # a live lease, and until when
    clock.now += 61  # the holder died: its lease runs out (counts as a failed attempt)
    second = claims.acquire("p")
    assert second.attempt == 1
    claims.finish(second, "yielded")  # given back unspent: the prompt was finished elsewhere
    third = claims.acquire("p")
    assert third.attempt == 2
    claims.finish(third, "failed")
    assert claims.acquire("p") == "poison"


def test_concurrent_workers_get_one_claim(tmp_path):
    claims = Claims(JobOutput.open(str(tmp_path)), lease_s=60, max_attempts=3)
    won = []
    threads = [threading.Thread(target=lambda: won.append(claims.acquire("p"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(w, (str, Busy)) for w in won) == 1


def test_a_heartbeat_keeps_a_lease_alive_whatever_the_main_thread_does(tmp_path):
    claims = Claims(JobOutput.open(str(tmp_path)), lease_s=0.6, max_attempts=3)
    claim = claims.acquire("p")
    with Heartbeat(claims, claim):
        time.sleep(1.5)  # a restore or a chunk slower than the lease: no renewal from the main thread
        assert isinstance(claims.acquire("p"), Busy)
    time.sleep(0.7)
    assert claims.acquire("p").attempt == 1  # no heartbeat any more: the lease ran out


# ------------------------------------------------------------------------------------------ one prompt
@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny")


def _spec(tmp_path, **kw) -> JobSpec:
    kw.setdefault("rollout", RolloutConfig(num_chunks=3))
    kw.setdefault("allow_any_prompt", True)
    return JobSpec.from_fields(input_url=str(tmp_path / "p.parquet"), output_url=str(tmp_path / "out"), **kw)


def test_the_job_output_names_and_parses_every_key_of_its_layout(tmp_path):
    out = JobOutput.open(str(tmp_path))
    for key in (out.done_key("a"), "done/nested/b.json", "done/c.txt", out.claim_key("p", 0), out.lease_key("p", 0),
                out.claim_key("p", 10), out.claim_key("q", 1)):
        out.store.put_json(key, {})
    state = out.rollout("p")
    state.put_json("chunk-000002.json", {})
    state.put_bytes("chunk-000002.safetensors", b"")
    assert out.done_ids() == {"a"} and out.done_id("done/a.json") == "a" and out.done_id("done/.json") is None
    assert out.chunk_markers() == [("p", 2, "rollouts/p/chunk-000002.json")]
    assert out.attempts("p") == [0, 10] and out.claimed_ids() == {"p", "q"}
    assert (out.video_key("a"), out.stats_key("a")) == ("videos/a.mp4", "stats/a.parquet")
    assert out.variant("probe").url == out.store.join("probe") and state.url == out.store.join("rollouts/p")


def test_an_interrupted_prompt_resumes_and_matches_an_uninterrupted_one(backend, tmp_path):
    from pipeline.outputs.render import render_prompts

    row = PromptRow(0, "p0", "a harbour at dawn", 11, 4)
    spec = _spec(tmp_path, trim=TrimConfig(lam=0.5))
    out = Store(spec.output_url)
    claims = Claims(JobOutput(out), lease_s=60, max_attempts=3)

    class Stop(Exception):
        pass

    def stop(index, rows):
        if index == 1:
            raise Stop

    with pytest.raises(Stop):  # a worker died after committing some chunks
        render_prompts(backend, [row.prompt], [row.prompt_id], out, config=RolloutConfig(num_chunks=4),
                       trim=spec.render.trim, seeds=[row.seed], state=JobOutput(out).rollout("p0"), on_chunk=stop)
    result = process_row(backend, spec, row, claims)
    assert result["status"] == "ok" and result["resumed_from"] >= 2 and result["chunks"] == 4
    reference = _spec(tmp_path / "ref", trim=TrimConfig(lam=0.5))
    fresh = process_row(backend, reference, row,
                        Claims(JobOutput.open(reference.output_url), lease_s=60, max_attempts=3))
    assert fresh["resumed_from"] == 0
    assert out.get_bytes("videos/p0.mp4") == Store(reference.output_url).get_bytes("videos/p0.mp4")
    again = process_row(backend, spec, row, claims)
    assert again["status"] == "ok" and again["reused"] and again["chunks"] == 4
    assert again["resumed_from"] == result["resumed_from"]


def test_a_poison_prompt_is_not_tried_again(backend, tmp_path):
    spec = _spec(tmp_path, max_attempts=2)
    claims = Claims(JobOutput.open(spec.output_url), lease_s=60, max_attempts=2)
    for _ in range(2):
        claims.finish(claims.acquire("p1"), "failed")  # two earlier attempts that failed
    result = process_row(backend, spec, PromptRow(0, "p1", "x", 1, 2), claims)
    assert result["status"] == "poison" and "2 attempts" in result["error"]


def test_a_prompt_finished_while_it_was_claimed_is_given_back_unspent(backend, tmp_path):
    spec = _spec(tmp_path, max_attempts=1)
    row = PromptRow(0, "p", "x", 1, 2)

    class Racy(Claims):
        calls = 0

        def done(self, prompt_id):  # another job's worker commits the prompt between our check and our claim
            self.calls += 1
            return None if self.calls == 1 else {"row_hash": row_hash(spec, row), "chunks": 2, "attempt": 0}

    result = process_row(backend, spec, row, Racy(JobOutput.open(spec.output_url), lease_s=60, max_attempts=1))
    assert (result["status"], result["reused"], result["chunks"], result["attempt"]) == ("ok", True, 2, 0)
    assert _leases(spec.output_url, "p") == ["yielded"]
    again = Claims(JobOutput.open(spec.output_url), lease_s=60, max_attempts=1).acquire("p")
    assert not isinstance(again, (str, Busy)) and again.attempt == 1  # max_attempts 1, and still not poison


def test_a_failure_in_the_bookkeeping_is_the_rows_result_not_a_crash(backend, tmp_path):
    spec = _spec(tmp_path)

    class Broken(Claims):
        def done(self, prompt_id):
            raise RuntimeError(f"listing {prompt_id} failed")

    claims = Broken(JobOutput.open(spec.output_url), lease_s=60, max_attempts=3)
    result = process_row(backend, spec, PromptRow(0, "p", "x", 1, 2), claims)
    assert result["status"] == "failed" and result["error"] == "RuntimeError: listing p failed"
    hostile = process_row(backend, spec, PromptRow(1, "x\n", "y", 1, 2),
                          Claims(JobOutput.open(spec.output_url), lease_s=60, max_attempts=3))
    assert hostile["status"] == "failed" and "'done/x\\n.json'" in hostile["error"]


# ------------------------------------------------------------------------------------ a local job, end to end
def test_a_local_job_records_seeds_keeps_numbers_on_rerun_and_skips_in_the_driver(tmp_path):
    table = _prompts(tmp_path / "p.parquet", n=2)
    spec = _local(table, tmp_path / "out")
    first = submit(spec)
    assert first.counts == {"ok": 2} and first.succeeded
    rows = _results(tmp_path / "out")
    stats = pq.read_table(tmp_path / "out" / "stats" / "p1.parquet").to_pylist()
    done = json.loads((tmp_path / "out" / "done" / "p1.json").read_text())
    assert rows[1]["seed"] == done["seed"] == stats[0]["seed"] == validate_rows(
        read_table(table), default_chunks=2)[0][1].seed

    class NoWork:
        def run(self, rows):
            raise AssertionError(f"the driver should have skipped {rows}")

    again = submit(spec, executor=NoWork())  # finished prompts are decided from done/ before any worker starts
    assert again.counts == {"ok": 2}
    rerun = _results(tmp_path / "out")
    for before, after in zip(rows, rerun):
        assert (before["reused"], after["reused"]) == (False, True)
        assert {k: after[k] for k in RESULT_FIELDS if k != "reused"} == \
            {k: before[k] for k in RESULT_FIELDS if k != "reused"}


def test_a_corrupt_done_marker_renders_again_and_a_failing_claim_is_one_rows_result(tmp_path, monkeypatch):
    table = _prompts(tmp_path / "p.parquet", n=3)
    out = tmp_path / "out"
    (out / "done").mkdir(parents=True)
    (out / "done" / "p0.json").write_text('{"trunc')
    real = Claims.acquire

    def acquire(self, prompt_id):
        if prompt_id == "p2":
            raise OSError("store went away")
        return real(self, prompt_id)

    monkeypatch.setattr(Claims, "acquire", acquire)
    report = submit(_local(table, out))
    statuses = {r["prompt_id"]: (r["status"], r["error"]) for r in _results(out)}
    assert statuses["p1"] == ("ok", None)
    assert statuses["p0"] == ("ok", None)  # a corrupt done marker: not finished, rendered again and replaced
    assert json.loads((out / "done" / "p0.json").read_text())["chunks"] == 2
    assert statuses["p2"] == ("failed", "OSError: store went away")
    assert not report.succeeded


def test_retention_deletes_rollout_state_unless_kept_and_status_counts_bytes(tmp_path):
    table = _prompts(tmp_path / "p.parquet", n=1)
    submit(_local(table, tmp_path / "drop"))
    submit(_local(table, tmp_path / "keep", keep_state=True))
    assert not list((tmp_path / "drop").glob("rollouts/**/*.*"))
    assert len(list((tmp_path / "keep" / "rollouts" / "p0").glob("chunk-*.json"))) == 2
    report = status(JobOutput.open(str(tmp_path / "keep")))
    files = [p for p in (tmp_path / "keep").rglob("*") if p.is_file()]
    assert report["stored_bytes"]["total"] == sum(p.stat().st_size for p in files)
    assert report["stored_bytes"]["rollouts"] == sum(p.stat().st_size for p in files if "rollouts" in p.parts)
    assert report["rows"] == {"to_render": 1, "done": 1, "remaining": 0, "invalid": 0, "excluded": 0}


def test_status_mid_job_counts_rows_from_the_table_and_the_markers(tmp_path):
    from jobs.run import plan, write_job_json

    table = _table(tmp_path / "p.parquet", prompt_id=["a", "b", "c", "../bad"], prompt=["x", "y", "z", "w"])
    spec, rows, _ = plan(_local(table, tmp_path / "out", limit=2))
    out = Store(spec.output_url)
    write_job_json(JobOutput(out), spec)
    out.put_json("done/a.json", {"row_hash": row_hash(spec, rows[0])})
    Claims(JobOutput(out), lease_s=60, max_attempts=3).acquire("b")
    report = status(JobOutput.open(str(tmp_path / "out")))
    assert report["rows"] == {"to_render": 2, "done": 1, "remaining": 1, "invalid": 1, "excluded": 1}
    assert report["in_progress"] == ["b"] and report["results"] is None
    assert report["stored_bytes"]["done"] == (tmp_path / "out" / "done" / "a.json").stat().st_size


def test_a_dead_workers_lease_is_outwaited_while_a_live_one_is_left_for_other_rows(tmp_path):
    table = _prompts(tmp_path / "p.parquet", n=2)
    out = tmp_path / "out"
    spec = _local(table, out, lease_s=1.0)
    planned = validate_rows(read_table(table), default_chunks=2)[0]
    store = Store(str(out))
    Claims(JobOutput(store), lease_s=1.0, max_attempts=3).acquire("p1")  # a worker that died right after claiming p1
    holder = Claims(JobOutput(store), lease_s=1.0, max_attempts=3)
    claim = holder.acquire("p0")  # another job's live worker renders p0 ...
    order = []

    def other_job():
        with Heartbeat(holder, claim):
            while not (out / "done" / "p1.json").exists():  # ... until this job has rendered p1 meanwhile
                time.sleep(0.05)
            order.append("p1 done while p0 was held")
            time.sleep(1.5)  # longer than the lease: only the heartbeat keeps it
        holder.mark_done("p0", {"row_hash": row_hash(spec, planned[0]), "chunks": 2, "attempt": 0})
        holder.finish(claim, "done")

    thread = threading.Thread(target=other_job)
    thread.start()
    report = submit(spec)
    thread.join()
    assert order == ["p1 done while p0 was held"]
    rows = {r["prompt_id"]: r for r in _results(out)}
    # rendered once, by the other job
    assert rows["p0"]["status"] == "ok" and rows["p0"]["reused"] and rows["p0"]["chunks"] == 2
    assert rows["p1"]["status"] == "ok" and rows["p1"]["attempt"] == 1 and report.succeeded
    assert _leases(out, "p0") == ["done"]


def test_a_killed_job_and_two_concurrent_submits_render_every_prompt_exactly_once(tmp_path):
    """A table with planted bad rows; a `submit` process SIGKILLed mid-rollout; then two `submit` processes at once
    on the same output with a short lease. Every valid prompt is rendered exactly once (counted by the leases that
    ended in a render: one `done` each; nothing failed; the only other attempt is the killed worker's), the killed
    rollout continues from its checkpoint, and both reports account for every row."""
    import signal

    n = 3
    table = _table(tmp_path / "p.parquet", prompt_id=[*(f"p{i}" for i in range(n)), "../x", "y\n"],
                   prompt=[*(f"a lantern number {i}" for i in range(n)), "evil", "newline"])
    out = tmp_path / "out"
    # 8 chunks: chunk 1's marker (written once its segment is encoded, during chunk 2) lives for 6 more chunks
    # before retention deletes the rollout; with 3 a fast model could finish p0 between two polls
    argv = [sys.executable, "-m", "jobs.cli", "submit", table, "--out", str(out), "--executor", "local",
            "--lease-s", "1", "--num-chunks", "8", "--allow-any-prompt"]
    killed = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "rollouts" / "p0" / "chunk-000001.json").exists():
        assert killed.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for stdout, _ in outputs:  # both jobs answer every prompt ok: rendered there, or reused from the other's marker
        line = stdout.splitlines()[1]
        counts = {k: int(v) for k, v in (part.split(": ") for part in line.split(" (")[0].strip().split(", "))}
        assert counts.get("ok", 0) == n and counts["invalid"] == 2, counts
    for i in range(n):
        states = _leases(out, f"p{i}")
        assert states.count("done") == 1 and "failed" not in states, (i, states)
        assert states.count("held") == (1 if i == 0 else 0), (i, states)  # only the killed worker's lapsed lease
    assert json.loads((out / "done" / "p0.json").read_text())["resumed_from"] >= 2
    rows = _results(out)
    assert [r["row"] for r in rows] == list(range(n + 2))
    assert [r["status"] == "ok" for r in rows] == [True] * n + [False, False]


# -------------------------------------------------------------------------------- validation before writing
def test_failed_starts_write_nothing(tmp_path):
    good = _prompts(tmp_path / "p.parquet", n=1)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 no")
    cases = {
        "missing": _local(str(tmp_path / "none.parquet"), tmp_path / "o1"),
        "not parquet": _local(str(tmp_path / "bad.parquet"), tmp_path / "o2"),
        "column": _local(_table(tmp_path / "c.parquet", prompt_id=["a"]), tmp_path / "o3"),
        "model": _local(good, tmp_path / "o4", model="wan9"),
        "weights": _local(good, tmp_path / "o5", weights=str(tmp_path / "nope.safetensors")),
        "all invalid": _local(_table(tmp_path / "i.parquet", prompt_id=["../a"], prompt=["x"]), tmp_path / "o6"),
    }
    for name, spec in cases.items():
        with pytest.raises(InputError):
            submit(spec)
        assert not Path(spec.output_url).exists(), name


def test_cli_exit_codes_limit_and_its_record(tmp_path):
    table = _table(tmp_path / "p.parquet", prompt_id=["a", "b", "c"], prompt=["x", "y", "z"], num_chunks=[2, 2, 2])
    invalid = _table(tmp_path / "i.parquet", prompt_id=["../a"], prompt=["x"])
    base = ["submit", "--executor", "local", "--num-chunks", "2", "--allow-any-prompt"]
    assert CliRunner().invoke(main, [*base, invalid, "--out", str(tmp_path / "o1")]).exit_code == 1
    result = CliRunner().invoke(main, [*base, table, "--out", str(tmp_path / "o2"), "--limit", "-1"])
    assert result.exit_code == 2 and "limit" in result.output
    assert not (tmp_path / "o2").exists()
    for bad in (["--lease-s", "0"], ["--storage-options", "{"], ["--storage-options", "[1]"], ["--dtype", "int8"]):
        result = CliRunner().invoke(main, [*base, table, "--out", str(tmp_path / "o2"), *bad])
        assert result.exit_code == 2 and bad[0] in result.output + str(result.exception), (bad, result.output)
    assert not (tmp_path / "o2").exists()
    result = CliRunner().invoke(main, [*base, table, "--out", str(tmp_path / "o3"), "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert [(r["prompt_id"], r["status"]) for r in _results(tmp_path / "o3")] == \
        [("a", "ok"), ("b", "excluded"), ("c", "excluded")]
    assert load_spec(JobOutput.open(str(tmp_path / "o3"))).execution.limit == 1
    resumed = CliRunner().invoke(main, ["resume", str(tmp_path / "o3")])
    assert resumed.exit_code == 0 and not (tmp_path / "o3" / "videos" / "b.mp4").exists()


# `job.json`'s spec as format 2 wrote it (one flat object; tokentrim 41731eb), for a tiny-model local job
FORMAT_2_SPEC = {
    "allow_any_prompt": False, "compile": False, "device": "auto", "dtype": "float32", "executor": "local",
    "gpus_per_worker": 0.0, "keep_state": False, "lease_s": 120.0, "limit": None, "max_attempts": 3, "model": "tiny",
    "probe": None, "results_every_rows": 1000, "results_every_s": 60.0, "seed": 0, "weights": None, "workers": 1,
    "rollout": {"chunk_frames": 3, "early_stop": True, "fps": 16, "height_px": None, "mode": "self-forcing",
                "num_chunks": 2, "shift": 5.0, "sink_frames": None, "sink_rope": None, "steps": None, "width_px": None,
                "window_frames": None},
    "trim": {"ema_decay": 0.9, "lam": 3.0, "max_retries": 1, "measure_step": 0, "p": 0.1, "patch_size": [1, 2, 2],
             "protect_sink": True, "prune_scope": "last", "sigma_floor": 0.05, "stats": "welford", "summary": "patch",
             "warmup": 3},
}


def test_a_job_json_of_format_2_resumes_and_a_spec_of_neither_format_is_one_line(tmp_path):
    table, out = _prompts(tmp_path / "p.parquet", n=2), tmp_path / "out"
    first = submit(_local(table, out, model="tiny", allow_any_prompt=False, limit=1))
    assert first.counts == {"ok": 1, "excluded": 1}
    old, recorded = {**FORMAT_2_SPEC, "input_url": table,
                     "output_url": str(out)}, json.loads((out / "job.json").read_text())
    assert JobSpec.from_dict(old).config_hash() == recorded["config_hash"]  # the same render settings
    (out / "job.json").write_text(json.dumps({"format": 2, "config_hash": recorded["config_hash"], "spec": old}))
    result = CliRunner().invoke(main, ["resume", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["prompt_id"]: r for r in _results(out)}
    assert (rows["p0"]["status"], rows["p0"]["reused"], rows["p1"]["status"]) == ("ok", True, "ok")
    doc = json.loads((out / "job.json").read_text())
    assert doc["format"] == 3 and doc["spec"]["model"]["model"] == "tiny" and doc["spec"]["execution"]["limit"] is None
    (out / "job.json").write_text(json.dumps({"format": 2, "spec": {**old, "colour": "red"}}))
    bad = CliRunner().invoke(main, ["resume", str(out)])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "unknown JobSpec fields ['colour']" in bad.output


def test_resume_writes_only_under_the_given_url(tmp_path, monkeypatch):
    first = tmp_path / "first"
    first.mkdir()
    _prompts(first / "p.parquet", n=2)
    monkeypatch.chdir(first)
    result = CliRunner().invoke(main, ["submit", "p.parquet", "--out", "out", "--executor", "local",
                                       "--num-chunks", "2", "--allow-any-prompt"])
    assert result.exit_code == 0, result.output
    shutil.copytree(first / "out", tmp_path / "copy")
    for key in ("done/p1.json", "videos/p1.mp4", "stats/p1.parquet"):
        (tmp_path / "copy" / key).unlink()
    before = {str(p): p.stat().st_mtime_ns for p in (first / "out").rglob("*")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(main, ["resume", "../copy"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "copy" / "videos" / "p1.mp4").exists()
    assert {str(p): p.stat().st_mtime_ns for p in (first / "out").rglob("*")} == before
    assert list(elsewhere.iterdir()) == []
    assert load_spec(JobOutput.open(str(tmp_path / "copy"))).output_url == str(tmp_path / "copy")


def test_a_killed_workers_temp_folder_is_removed_by_the_next_worker(tmp_path):
    import socket

    from jobs.executors import TEMP_PREFIX, worker_tempdir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{TEMP_PREFIX}{socket.gethostname()}-{dead.pid}"
    stale.mkdir()
    (stale / "tokentrim-x.mp4").write_bytes(b"half")
    live = tmp_path / f"{TEMP_PREFIX}{socket.gethostname()}-{os.getppid()}"
    live.mkdir()
    mine = worker_tempdir(str(tmp_path))
    assert not stale.exists() and live.exists() and Path(mine).is_dir()


# ------------------------------------------------------------------------------------------------ the CLI
def test_help_loads_no_torch():
    code = ("import sys; from click.testing import CliRunner; from jobs.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'submit' in r.output; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_options_are_the_configs_own_fields_with_their_defaults():
    import dataclasses

    from jobs.cli import main as group

    ctx = __import__("click").Context(group)
    for name in ("render", "submit", "regress"):
        params = {p.name: p for p in group.get_command(ctx, name).params}
        for cls, prefix in ((RolloutConfig, "rollout"), (TrimConfig, "trim")):
            for f in dataclasses.fields(cls):
                option = params[f"{prefix}__{f.name}"]
                assert option.opts[0].split("/")[0] == "--" + f.name.replace("_", "-"), (name, f.name)
                default = f.default if f.default is not dataclasses.MISSING else None
                assert option.default == (default if default is not None else (() if option.multiple else None))


def test_regress_takes_the_job_options_and_validates_its_own(monkeypatch, tmp_path):
    import jobs.regress

    seen = {}

    def fake(spec, **kw):
        seen["spec"], seen["kw"] = spec, kw
        return jobs.regress.Regression({}, {}, [])

    monkeypatch.setattr(jobs.regress, "run_regression", fake)
    monkeypatch.setattr("jobs.resources.check_cluster", lambda spec: None)  # a GPU cluster, as far as regress knows
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    args = ["regress", "--out", str(tmp_path / "n"), "--gpus-per-worker", "1", "--dtype", "bfloat16", "--weights",
            str(weights), "--mode", "rolling-forcing", "--num-chunks", "5", "--prompts", "3", "--workers", "2"]
    assert CliRunner().invoke(main, args).exit_code == 0
    spec = seen["spec"]
    run, render = spec.execution, spec.render
    assert (run.gpus_per_worker, spec.model.dtype, spec.model.weights, render.rollout.mode, render.rollout.num_chunks,
            run.limit, run.workers) == (1.0, "bfloat16", str(weights), "rolling-forcing", 5, 3, 2)
    for bad in (["--prompts", "0"], ["--tolerance", "-0.5"], ["--p", "2"]):
        assert CliRunner().invoke(main, ["regress", "--out", str(tmp_path / "n"), *bad]).exit_code == 2, bad


def test_regression_passes_against_its_own_baseline_and_refuses_other_settings(tmp_path):
    from jobs.regress import measure

    night = tmp_path / "night"
    args = ["regress", "--out", str(night), "--prompts", "2", "--executor", "local"]
    first = CliRunner().invoke(main, [*args, "--num-chunks", "4", "--update-baseline"])
    assert first.exit_code == 0, first.output
    assert first.output.rstrip().endswith("PASS")
    report = (night / "report.md").read_text()
    assert "**PASS**" in report and "plots/steadiness.svg" in report
    assert (night / "plots" / "luma.svg").read_text().startswith("<svg") and (night / "report.html").is_file()
    baseline = json.loads((night / "baseline.json").read_text())
    assert set(baseline["metrics"]) == {"tokentrim", "no-trim", "probe"}
    assert baseline["settings"]["render"]["rollout"]["num_chunks"] == 4
    # a baseline with half the drift: tonight's run is a regression, named by variant and metric
    halved = dict(baseline, metrics={v: {m: x / 2 for m, x in ms.items()} for v, ms in baseline["metrics"].items()})
    (tmp_path / "halved.json").write_text(json.dumps(halved))
    second = CliRunner().invoke(main, [*args, "--num-chunks", "4", "--baseline", str(tmp_path / "halved.json")])
    assert second.exit_code == 1
    assert "tokentrim/latent_dist_first" in second.output
    # the 4-chunk baseline cannot judge a 6-chunk run
    other = CliRunner().invoke(main, [*args, "--num-chunks", "6", "--out", str(tmp_path / "six"), "--baseline",
                                      str(night / "baseline.json")])
    assert other.exit_code == 1 and "rollout.num_chunks" in other.output
    assert measure(JobOutput.open(str(night)), [])[2] == ["nothing rendered: no prompt to measure"]


# -------------------------------------------------------------------------------------------- Ray jobs
def test_ray_job_renders_a_table_to_s3_and_a_rerun_skips_finished_prompts(ray_cluster, s3, tmp_path):
    url = _table(tmp_path / "p.parquet", prompt_id=["cat", "dog", "../escape", "owl"],
                 prompt=["a cat", "a dog", "hostile", "an owl at night"], num_chunks=[2, 3, 2, 2])
    out = f"{s3.url}/jobs/{tmp_path.name}"
    spec = JobSpec.from_fields(input_url=url, output_url=out, rollout=RolloutConfig(num_chunks=2), workers=2,
                               storage_options=s3.storage_options, allow_any_prompt=True)
    report = submit(spec)
    assert report.counts == {"ok": 3, "invalid": 1}
    store = Store(out, s3.storage_options)
    table = store.get_table("results.parquet").to_pylist()
    assert [r["status"] for r in table] == ["ok", "ok", "invalid", "ok"]
    assert "'../escape'" in table[2]["error"]
    frames = decode_mp4(store.get_bytes("videos/dog.mp4"))
    assert frames.shape[0] == 1 + 4 * (3 * 3 - 1)
    assert store.get_table("stats/dog.parquet").num_rows == 3
    assert not any(k.startswith("../") or "escape" in k for k in store.list())
    assert not store.list("rollouts/")  # retention: state deleted once each prompt was committed
    result = CliRunner().invoke(main, ["status", out, "--json", "--storage-options", json.dumps(s3.storage_options)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"]["done"] == 3
    again = submit(load_spec(JobOutput.open(out, s3.storage_options)))
    assert again.counts == {"ok": 3, "invalid": 1}
    other = JobSpec.from_fields(input_url=url, output_url=out, rollout=RolloutConfig(num_chunks=2), trim=None,
                                storage_options=s3.storage_options, allow_any_prompt=True)
    with pytest.raises(ConfigMismatchError, match="--force"):
        submit(other)


def test_a_worker_killed_mid_rollout_is_retried_and_resumes(ray_cluster, tmp_path):
    """SIGKILL the actor rendering a prompt once it has committed chunks: Ray restarts it and retries the row (no
    retry cap), the row comes back busy while the dead lease runs, is handed out again, resumes from the checkpoint,
    and the video equals an uninterrupted job's."""
    import signal

    # 10 chunks: chunk 2's marker (written during chunk 3) stays for 7 more chunks, so a fast model cannot finish
    # between two polls
    url = _table(tmp_path / "p.parquet", prompt_id=["long"], prompt=["a lighthouse in a storm"], num_chunks=[10])

    def spec(out):
        return JobSpec.from_fields(input_url=url, output_url=str(tmp_path / out), rollout=RolloutConfig(num_chunks=10),
                                   lease_s=2.0, workers=1, allow_any_prompt=True)

    reports = {}
    job = threading.Thread(target=lambda: reports.setdefault("killed", submit(spec("killed"))))
    job.start()
    marker = tmp_path / "killed" / "rollouts" / "long" / "chunk-000002.json"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert job.is_alive() and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    owner = json.loads((tmp_path / "killed" / "claims" / "long" / "0.json").read_text())["owner"]
    os.kill(int(owner.split(":")[1]), signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive()
    row = reports["killed"].results[0]
    assert row["status"] == "ok", row
    assert row["attempt"] == 1 and row["resumed_from"] >= 3
    clean = submit(spec("clean")).results[0]
    assert clean["resumed_from"] == 0
    assert (tmp_path / "killed" / "videos" / "long.mp4").read_bytes() == \
        (tmp_path / "clean" / "videos" / "long.mp4").read_bytes()
