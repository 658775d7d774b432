"""The driver at scale: the first pass over done markers (concurrent reads, the done-index as a cache only), results
written as rows finish, and a driver killed mid-job leaving a results table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.done_index import name_prefixes
from jobs.layout import INDEX_KEY, JobOutput
from jobs.policy import Claims, finished_rows, from_marker, result_row, row_hash
from jobs.run import plan, status, submit
from jobs.spec import JobSpec
from jobs.table import ID_PATTERN
from pipeline.errors import TokentrimError
from pipeline.hashing import digest
from pipeline.store import Store

ROOT = Path(__file__).resolve().parents[1]


class CountingStore(Store):
    """Counts the reads of done markers that reach the backend."""

    marker_reads = 0

    def _invoke(self, op, key, fn):
        if op == "get" and key.startswith("done/"):
            type(self).marker_reads += 1
        return super()._invoke(op, key, fn)


def serial_first_pass(spec, rows, out):
    """The first pass as it was: one marker read after another through `Claims.done_or_none` (the oracle: a corrupt
    marker means the prompt is not finished)."""
    claims = Claims(JobOutput(out), lease_s=spec.execution.lease_s, max_attempts=spec.execution.max_attempts)
    results, todo = [], []
    for row in rows:
        try:
            skipped = from_marker(row, spec, claims.done_or_none(row.prompt_id))
        except TokentrimError as exc:
            results.append(result_row(row, "failed", f"{type(exc).__name__}: {exc}"))
            continue
        (todo.append(row) if skipped is None else results.append(skipped))
    return results, todo


def _job(tmp_path, url, options, n):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt_id": [f"q{i:03d}" for i in range(n)], "prompt": [f"p {i}" for i in range(n)]}),
                   table)
    return plan(JobSpec.from_fields(input_url=str(table), output_url=url, executor="local", model="tiny",
                                    storage_options=options))


def _plant(out, spec, rows):
    """Markers of every kind: valid, another row's hash, not JSON, not an object, none."""
    for i, row in enumerate(rows):
        kind = i % 5
        if kind in (0, 1):
            marker = {"row_hash": row_hash(spec, row), "attempt": i, "seed": row.seed}
            out.put_json(JobOutput.done_key(row.prompt_id), marker)
        elif kind == 2:
            out.put_json(JobOutput.done_key(row.prompt_id), {"row_hash": "other", "attempt": i})
        elif kind == 3:
            out.put_bytes(JobOutput.done_key(row.prompt_id), b'{"trunc' if i % 2 else b"[1, 2]")


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_the_concurrent_first_pass_and_the_index_answer_as_the_serial_one_did(backend, tmp_path, request):
    if backend == "s3":
        s3 = request.getfixturevalue("s3")
        url, options = f"{s3.url}/{tmp_path.name}-{time.monotonic_ns()}", dict(s3.storage_options)
    else:
        url, options = f"file://{tmp_path}/out", {}
    spec, rows, _ = _job(tmp_path, url, options, 40)
    out = CountingStore(spec.output_url, options)
    _plant(out, spec, rows)
    expected = serial_first_pass(spec, rows, out)
    assert Counter(r["status"] for r in expected[0]) == {"ok": 16} and len(expected[1]) == 24
    assert all(r["reused"] for r in expected[0])

    CountingStore.marker_reads = 0
    # cold: every marker read (concurrently), the index written
    assert finished_rows(spec, rows, JobOutput(out)) == expected
    assert CountingStore.marker_reads == 32 and out.exists(INDEX_KEY)
    CountingStore.marker_reads = 0
    assert finished_rows(spec, rows, JobOutput(out)) == expected  # warm: the index answers, parsed by the same reader
    assert CountingStore.marker_reads == 0  # even an unreadable marker's bytes: the reader refuses them again

    # the index is a cache: a rewritten or deleted marker wins over it
    out.put_json(JobOutput.done_key(rows[0].prompt_id), {"row_hash": "re-rendered under other settings"})
    out.delete(JobOutput.done_key(rows[1].prompt_id))
    out.put_json(JobOutput.done_key(rows[2].prompt_id), {"row_hash": row_hash(spec, rows[2]), "attempt": 7})
    changed = serial_first_pass(spec, rows, out)
    CountingStore.marker_reads = 0
    assert finished_rows(spec, rows, JobOutput(out)) == changed != expected
    assert CountingStore.marker_reads == 2  # the two rewritten markers read again, the deleted one not at all


def test_a_corrupt_index_is_dropped_and_rebuilt_from_the_markers(tmp_path):
    spec, rows, _ = _job(tmp_path, f"file://{tmp_path}/out", {}, 6)
    out = Store(spec.output_url)
    _plant(out, spec, rows)
    expected = serial_first_pass(spec, rows, out)
    out.put_table(INDEX_KEY, pa.table({"prompt_id": [rows[2].prompt_id], "version": ["x"], "marker": ["forged"]}))
    assert finished_rows(spec, rows, JobOutput(out)) == expected
    assert finished_rows(spec, rows, JobOutput(out)) == expected


def test_the_row_hash_is_the_digest_of_the_settings_and_the_rows_values(tmp_path):
    spec, rows, _ = _job(tmp_path, f"file://{tmp_path}/out", {}, 2)
    own = {"prompt": rows[1].prompt, "seed": rows[1].seed, "num_chunks": rows[1].num_chunks}
    assert row_hash(spec, rows[1]) == digest(spec.render_settings(), own)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.from_regex(ID_PATTERN, fullmatch=True), max_size=150), st.integers(1, 20))
def test_listing_prefixes_cover_every_marker_in_small_groups(ids, limit):
    prefixes = name_prefixes(ids, limit)
    names = {JobOutput.done_key(i)[len("done/"):] for i in ids}
    for name in names:
        assert any(name.startswith(p) for p in prefixes), name
    for p in prefixes:
        group = [n for n in names if n.startswith(p)]
        assert len(group) <= limit or all(len(n) <= len(p) + 1 for n in group)


def test_results_are_written_as_rows_finish(tmp_path):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b", "c", "../bad"], "prompt": ["x", "y", "z", "w"]}), table)
    spec = JobSpec.from_fields(input_url=str(table), output_url=str(tmp_path / "out"), executor="local", model="tiny",
                               results_every_rows=1)
    seen = []

    class Executor:
        def run(self, rows):
            for row in rows:
                seen.append(status(JobOutput.open(str(tmp_path / "out")))["results"])
                yield {**result_row(row, "ok", None, attempt=0), "retry_at": None}

    report = submit(spec, executor=Executor())
    assert seen == [{"invalid": 1}, {"invalid": 1, "ok": 1}, {"invalid": 1, "ok": 2}]
    assert report.counts == {"ok": 3, "invalid": 1}
    assert [r["status"] for r in pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()] == \
        ["ok", "ok", "ok", "invalid"]


def test_a_driver_killed_mid_job_leaves_a_results_table(tmp_path):
    n = 6
    table = tmp_path / "t.parquet"
    ids = [f"p{i}" for i in range(n)]
    pq.write_table(pa.table({"prompt_id": ids, "prompt": [f"a lantern {i}" for i in ids]}), table)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jobs.cli", "submit", str(table), "--out", str(out), "--executor", "local",
            "--model", "tiny", "--num-chunks", "3", "--results-every-rows", "1"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "results.parquet").exists() or not pq.read_table(out / "results.parquet").num_rows:
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert 1 <= len(rows) < n and {r["status"] for r in rows} == {"ok"}
    for r in rows:  # every row it reports is committed
        assert json.loads((out / "done" / f"{r['prompt_id']}.json").read_text())["attempt"] == r["attempt"]


def test_the_index_learns_the_rows_rendered_in_a_run_at_its_end(tmp_path):
    from jobs.done_index import load_index, marker_versions
    from jobs.results import ResultsWriter

    out = Store(f"file://{tmp_path}/out")
    for pid in ("a", "b"):
        out.put_json(JobOutput.done_key(pid), {"row_hash": pid})
    writer = ResultsWriter(JobOutput(out), every_rows=10)
    writer.add([{**result_row({"prompt_id": pid, "row": i}, "ok"), "retry_at": None} for i, pid in enumerate("ab")])
    writer.close()
    versions = marker_versions(JobOutput(out), ["a", "b"])
    assert load_index(JobOutput(out)) == {pid: (versions[pid], out.get_bytes(JobOutput.done_key(pid))) for pid in "ab"}


def test_a_resume_of_a_done_job_lists_the_markers_and_reads_the_index_once(tmp_path, monkeypatch):
    spec, rows, _ = _job(tmp_path, f"file://{tmp_path}/out", {}, 5)
    out = Store(spec.output_url)
    for row in rows:
        out.put_json(JobOutput.done_key(row.prompt_id),
                     {"row_hash": row_hash(spec, row), "attempt": 0, "seed": row.seed})

    class NoWork:
        def run(self, todo):
            assert not todo, "a done row was dispatched"
            yield from ()

    assert submit(spec, executor=NoWork()).counts == {"ok": 5}  # reads the markers, saves the index
    calls: Counter[str] = Counter()
    invoke = Store._invoke

    def counting(self, op, key, fn):
        calls[f"{op}:{key.split('/', 1)[0]}"] += 1
        return invoke(self, op, key, fn)

    monkeypatch.setattr(Store, "_invoke", counting)
    assert submit(spec, executor=NoWork()).counts == {"ok": 5}
    assert (calls["versions:done"], calls["get:done_index.parquet"], calls["get:done"]) == (1, 1, 0)


@pytest.mark.slow
def test_the_driver_bench_runs_every_variant_and_each_checks_itself(tmp_path):
    """`bench.driver_scale` at a small size (its figures are not asserted): every variant runs the real driver and
    passes the check of what it names (a resume lists and reads no marker, a cold one reads each, ...)."""
    done = subprocess.run([sys.executable, "-m", "bench.driver_scale", "--sizes", "120", "--backends",
                           "latency-file", "--latency-ms", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("latency-file ")]
    assert len(lines) == 3 and all(line.endswith("check: ok") for line in lines), done.stdout
