"""Exactly once when a worker is cut off but alive: fenced commits, strict reads of markers and leases, no idle waits,
one chunk cap, exit status 2 for user errors."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.layout import JobOutput
from jobs.markers import CLOCK_SKEW_S
from jobs.policy import Claims, Heartbeat, fit_result, process_row, result_row, results_schema, row_hash
from jobs.run import submit
from jobs.spec import JobSpec
from jobs.table import PromptRow, read_table, validate_rows
from pipeline.config import MAX_CHUNKS, RolloutConfig
from pipeline.errors import CorruptStateError, LeaseLostError
from pipeline.model.backend import load_backend
from pipeline.store import Store
from tests.store_proxy import StoreProxy


def _table(path: Path, n: int = 2, chunks: int = 2) -> str:
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(n)],
                             "prompt": [f"a lantern number {i}" for i in range(n)], "num_chunks": [chunks] * n}), path)
    return str(path)


def _local(table: str, out: Path, **kw) -> JobSpec:
    kw.setdefault("rollout", RolloutConfig(num_chunks=2))
    kw.setdefault("model", "tiny")
    return JobSpec.from_fields(input_url=table, output_url=str(out), executor="local", **kw)


def _results(out: Path) -> dict[str, dict]:
    return {r["prompt_id"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}


def _leases(store: Store, pid: str) -> list[str]:
    return sorted(store.get_json(k)["state"] for k in store.list(f"claims/{pid}/") if k.endswith(".lease"))


@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny")


# ------------------------------------------------------------------------------------------ 1. fencing
def test_a_holder_cut_off_longer_than_its_lease_stops_before_its_next_commit(backend, s3, tmp_path):
    """Worker A's path to the store freezes (a proxy on 127.0.0.1 holding every byte) for longer than its lease; B
    takes attempt 1 over and finishes; A thaws and must commit nothing more: one render counted, A's result is not
    `ok`, B's done marker stands, the video equals a clean render's."""
    host, port = urlparse(s3.endpoint).hostname, urlparse(s3.endpoint).port
    url = f"{s3.url}/fence/{tmp_path.name}"
    row = PromptRow(0, "p", "a lighthouse in a storm", 5, 8)
    spec = JobSpec.from_fields(input_url="-", output_url=url, rollout=RolloutConfig(num_chunks=8), lease_s=3.0,
                               storage_options=s3.storage_options)
    direct = Store(url, s3.storage_options)
    with StoreProxy((host, port)) as proxy:
        frozen_options = {**s3.storage_options, "client_kwargs": {"endpoint_url": proxy.endpoint}}
        claims_a = Claims(JobOutput.open(url, frozen_options), lease_s=3.0, max_attempts=3)
        results: dict[str, dict] = {}
        worker_a = threading.Thread(target=lambda: results.setdefault(
            "a", process_row(load_backend("tiny"), spec, row, claims_a)))
        worker_a.start()
        deadline = time.monotonic() + 120
        while not direct.exists("rollouts/p/chunk-000001.json"):
            assert worker_a.is_alive() and time.monotonic() < deadline, results
            time.sleep(0.05)
        proxy.freeze()
        time.sleep(3.0 + 0.5)  # A's lease runs out while A is alive but cut off
        results["b"] = process_row(backend, spec, row, Claims(JobOutput(direct), lease_s=3.0, max_attempts=3))
        proxy.thaw()
        worker_a.join(timeout=120)
    assert not worker_a.is_alive()
    assert results["b"]["status"] == "ok" and results["b"]["attempt"] == 1 and results["b"]["resumed_from"] >= 2
    assert results["a"]["status"] == "busy" and "not current" in results["a"]["error"], results["a"]
    assert _leases(direct, "p") == ["done", "lost"]  # one render counted
    assert direct.get_json("done/p.json")["attempt"] == 1
    clean = Store(str(tmp_path / "clean"))
    process_row(backend, JobSpec.from_fields(input_url="-", output_url=clean.url,
                                             rollout=RolloutConfig(num_chunks=8)), row,
                Claims(JobOutput(clean), lease_s=60, max_attempts=3))
    assert direct.get_bytes("videos/p.mp4") == clean.get_bytes("videos/p.mp4")


def test_the_fence_trips_when_the_lease_ran_out_unrenewed_or_a_newer_attempt_exists(tmp_path, monkeypatch):
    from pipeline.errors import TransientStoreError

    now = [1000.0]
    claims = Claims(JobOutput.open(str(tmp_path)), lease_s=60, max_attempts=3, clock=lambda: now[0])
    claim = claims.acquire("p")
    claims.fence(claim)  # fresh: current
    now[0] += 60 - claims.margin_s + 0.01  # too little time left to commit; nobody took over: renewed here
    claims.fence(claim)
    assert claim.expires_at == now[0] + 60
    now[0] += 60

    def cut_off(c):
        raise TransientStoreError("the store path is cut")

    monkeypatch.setattr(claims, "renew", cut_off)
    with pytest.raises(LeaseLostError, match="could not be renewed"):
        claims.fence(claim)
    other = Claims(JobOutput.open(str(tmp_path)), lease_s=60, max_attempts=3, clock=lambda: now[0])
    stale = other.acquire("q")
    now[0] += 61
    assert other.acquire("q").attempt == 1  # taken over
    for expires in (now[0] + 60, now[0] - 1):  # with time left on its own clock, or without
        stale.expires_at, stale.lost = expires, None
        with pytest.raises(LeaseLostError, match="newer attempt"):
            other.fence(stale)


def test_a_heartbeat_that_finds_a_newer_attempt_stops_renewing_and_marks_the_claim_lost(tmp_path):
    store = Store(str(tmp_path))
    claims = Claims(JobOutput(store), lease_s=0.6, max_attempts=3)
    claim = claims.acquire("p")
    store.create_only("claims/p/1.json", json.dumps({"owner": "x", "attempt": 1, "claimed_at": time.time(),
                                                     "lease_s": 0.6}).encode())
    with Heartbeat(claims, claim):
        time.sleep(0.6)
    assert claim.lost == "a newer attempt exists"
    with pytest.raises(LeaseLostError):
        claims.fence(claim)


def test_the_done_marker_is_create_only_a_second_attempt_never_writes_over_the_first(tmp_path):
    claims = Claims(JobOutput.open(str(tmp_path)), lease_s=60, max_attempts=3)
    assert claims.mark_done("p", {"row_hash": "h", "attempt": 1})
    assert not claims.mark_done("p", {"row_hash": "h", "attempt": 0})  # a stale holder: refused
    assert claims.done("p")["attempt"] == 1
    assert claims.mark_done("p", {"row_hash": "other settings", "attempt": 2})  # --force under new settings
    (tmp_path / "done" / "q.json").write_text("[1, 2]")
    assert claims.mark_done("q", {"row_hash": "h", "attempt": 0})  # a corrupt marker is replaced
    assert claims.done("q") == {"row_hash": "h", "attempt": 0}


# ----------------------------------------------------------------------------- 2. strict leases, no hang
@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": Infinity}', '[-Infinity]', '{"a": 1e999}',
                                  '{"a": 1, "a": 2}', '{"b": {"a": 1, "a": 1}}', b'"\xff"'])
def test_json_read_back_from_a_store_is_strict(tmp_path, text):
    store = Store(str(tmp_path))
    store.put_bytes("x.json", text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CorruptStateError, match="x.json"):
        store.get_json("x.json")



def _claim(store: Store, pid: str, lease: str, *, lease_s: float = 60.0) -> None:
    store.put_json(f"claims/{pid}/0.json", {"owner": "w", "attempt": 0, "claimed_at": time.time(), "lease_s": lease_s})
    store.put_bytes(f"claims/{pid}/0.lease", lease.encode())


@pytest.mark.parametrize("lease", [
    '{"owner": "w", "state": "held", "expires_at": Infinity}',
    '{"owner": "w", "state": "held", "expires_at": 1e999}',
    '{"owner": "w", "state": "held", "expires_at": NaN}',
    '{"owner": "w", "state": "held", "expires_at": 1, "expires_at": 99999999999}',
    '{"owner": "w", "state": "held", "expires_at": "soon"}',
    '{"owner": "w", "state": "zombie", "expires_at": 1}',
    '{"owner": "someone else", "state": "held", "expires_at": 1}',
    '["held"]',
])
def test_a_lease_that_does_not_read_back_as_one_is_corrupt_state(tmp_path, lease):
    store = Store(str(tmp_path))
    _claim(store, "p", lease)
    with pytest.raises(CorruptStateError, match="claims/p/0.lease"):
        Claims(JobOutput(store), lease_s=60, max_attempts=3).acquire("p")


def test_a_lease_from_a_clock_far_ahead_is_corrupt_but_a_little_skew_is_not(tmp_path):
    store = Store(str(tmp_path))
    ahead = time.time() + 60 + CLOCK_SKEW_S
    _claim(store, "far", json.dumps({"owner": "w", "state": "held", "expires_at": ahead + 5}))
    _claim(store, "near", json.dumps({"owner": "w", "state": "held", "expires_at": ahead - 5}))
    claims = Claims(JobOutput(store), lease_s=60, max_attempts=3)
    with pytest.raises(CorruptStateError, match="clock far ahead"):
        claims.acquire("far")
    assert claims.acquire("near").until == ahead - 5


def test_a_lease_held_forever_fails_its_row_with_the_key_instead_of_a_silent_hang(tmp_path):
    table = _table(tmp_path / "p.parquet")
    out = tmp_path / "out"
    _claim(Store(str(out)), "p0", '{"owner": "w", "state": "held", "expires_at": Infinity}')
    done: dict = {}
    job = threading.Thread(target=lambda: done.setdefault("report", submit(_local(table, out, lease_s=60))),
                           daemon=True)
    job.start()
    job.join(timeout=90)
    assert not job.is_alive(), "the job hangs on a lease that never ends"
    rows = _results(out)
    assert rows["p1"]["status"] == "ok"
    assert rows["p0"]["status"] == "failed" and "claims/p0/0.lease" in rows["p0"]["error"]
    assert "Infinity" in rows["p0"]["error"] or "strict" in rows["p0"]["error"]


# ------------------------------------------------------------------- 3/4. corrupt done and checkpoint markers
@pytest.mark.parametrize("bad", [
    '{"row_hash": "%s", "chunks": Infinity}', '{"row_hash": "%s", "chunks": 1e999}',
    '{"row_hash": "%s", "flicker": 1e999}', '{"row_hash": "%s", "chunks": 2, "chunks": 3}',
    '{"row_hash": "%s", "chunks": 100000}', '{"row_hash": "%s", "seed": -1}', '["%s"]', '"%s"',
])
def test_a_corrupt_done_marker_means_not_finished(tmp_path, bad):
    store = Store(str(tmp_path))
    store.put_bytes("done/p.json", (bad % "h").encode())
    claims = Claims(JobOutput(store), lease_s=60, max_attempts=3)
    with pytest.raises(CorruptStateError, match="done/p.json"):
        claims.done("p")
    assert claims.done_or_none("p") is None


def test_one_bad_done_marker_never_costs_the_job_its_results(tmp_path):
    """`chunks: Infinity` in one marker and `flicker: 1e999` (inf) in another: `resume` renders both again and
    rewrites results.parquet with every row, all finite."""
    from jobs.run import plan, write_job_json

    table = _table(tmp_path / "p.parquet", n=2)
    out = tmp_path / "out"
    spec, rows, _ = plan(_local(table, out))
    write_job_json(JobOutput.open(str(out)), spec)
    (out / "done").mkdir()
    (out / "done" / "p0.json").write_text(f'{{"row_hash": "{row_hash(spec, rows[0])}", "chunks": Infinity}}')
    (out / "done" / "p1.json").write_text(f'{{"row_hash": "{row_hash(spec, rows[1])}", "flicker": 1e999}}')
    result = CliRunner().invoke(main, ["resume", str(out)])
    assert result.exit_code == 0, result.output
    done = _results(out)
    assert [done[p]["status"] for p in ("p0", "p1")] == ["ok", "ok"]
    assert all(done[p]["chunks"] == 2 and done[p]["attempt"] == 0 for p in done)
    assert json.loads((out / "done" / "p0.json").read_text())["chunks"] == 2  # replaced by the new render


def test_results_parquet_is_written_whatever_one_row_holds():
    row = result_row({"prompt_id": "p", "row": 0}, "ok", None, chunks=float("inf"), steadiness=float("nan"),
                     tokens_pruned=2**70, video=3)
    fitted = fit_result(row)
    assert (fitted["chunks"], fitted["steadiness"], fitted["tokens_pruned"], fitted["video"]) == (None,) * 4
    assert "`chunks` inf" in fitted["error"] and "`steadiness` nan" in fitted["error"]
    assert pa.Table.from_pylist([fitted], schema=results_schema()).num_rows == 1


def test_a_checkpoint_marker_that_is_json_but_not_a_marker_falls_back_to_the_last_good_chunk(backend, tmp_path):
    from pipeline.outputs.checkpoint import RolloutCheckpoints
    from pipeline.outputs.render import render_hash, render_prompts

    config = RolloutConfig(num_chunks=4)

    def run(out: str):
        return render_prompts(backend, ["a harbour at dawn"], ["h"], Store(str(tmp_path / out)), config=config,
                              trim=None, seeds=[3], state=Store(str(tmp_path / "state")))[0]

    first = run("first")
    state = tmp_path / "state"
    shutil.copytree(state, tmp_path / "saved")
    marker = state / "chunk-000002.json"
    meta = json.loads(marker.read_text())
    for bad in ("[1, 2]", '"chunk"', "null", "{}", json.dumps({**meta, "index": "2"}),
                json.dumps({**meta, "rows": "x"}), json.dumps({**meta, "segments": [{"key": 1}]}),
                json.dumps({**meta, "size": -1}), json.dumps({**meta, "prunes": [{"frames": [-1]}]})):
        marker.write_text(bad)
        checkpoints = RolloutCheckpoints(Store(str(state)), render_hash(backend, config, None), ["h"])
        assert [r.index for r in checkpoints.load()] == [0, 1], bad
        assert not marker.exists()  # dropped with everything after the last good chunk
        shutil.rmtree(state)
        shutil.copytree(tmp_path / "saved", state)
    marker.write_text("[1, 2]")
    again = run("again")
    assert first.resumed_from == 0 and again.resumed_from == 2
    assert (tmp_path / "again" / "h.mp4").read_bytes() == (tmp_path / "first" / "h.mp4").read_bytes()


# ------------------------------------------------------------------------------------------ 5. no idle waits
def test_a_busy_row_comes_back_as_soon_as_its_holder_is_done_not_after_its_lease(tmp_path):
    table = _table(tmp_path / "p.parquet", n=2)
    out = tmp_path / "out"
    spec = _local(table, out, lease_s=120.0)
    planned = validate_rows(read_table(table), default_chunks=2)[0]
    holder = Claims(JobOutput.open(str(out)), lease_s=120.0, max_attempts=3)
    claim = holder.acquire("p0")  # another job's worker holds p0 for a 120 s lease ...

    def other_job():
        with Heartbeat(holder, claim):
            while not (out / "done" / "p1.json").exists():
                time.sleep(0.05)
        holder.mark_done("p0", {"row_hash": row_hash(spec, planned[0]), "chunks": 2, "attempt": 0})
        holder.finish(claim, "done")  # ... and is done right after this job rendered p1

    threading.Thread(target=other_job, daemon=True).start()
    began = time.monotonic()
    done: dict = {}
    job = threading.Thread(target=lambda: done.setdefault("report", submit(spec)), daemon=True)
    job.start()
    job.join(timeout=60)
    assert not job.is_alive(), "the job sat idle for the holder's whole lease"
    assert time.monotonic() - began < 60
    rows = _results(out)
    assert (rows["p0"]["status"], rows["p0"]["reused"], rows["p1"]["status"], rows["p1"]["reused"]) == (
        "ok", True, "ok", False)


# ------------------------------------------------------------------------------- 6/7. caps and exit codes
def test_chunk_counts_have_one_cap_everywhere(tmp_path):
    with pytest.raises(ValueError, match=str(MAX_CHUNKS)):
        RolloutConfig(num_chunks=MAX_CHUNKS + 1)
    RolloutConfig(num_chunks=MAX_CHUNKS)
    good, bad = validate_rows([{"prompt_id": "a", "prompt": "x", "num_chunks": MAX_CHUNKS + 1}], default_chunks=2)
    assert not good and str(MAX_CHUNKS) in bad[0].error
    with pytest.raises(ValueError, match=str(MAX_CHUNKS)):  # a table without the column takes the default
        validate_rows([{"prompt_id": "a", "prompt": "x"}], default_chunks=MAX_CHUNKS + 1)
    table = _table(tmp_path / "p.parquet")
    for args in (["submit", table, "--out", str(tmp_path / "o"), "--executor", "local", "--num-chunks", "100000"],
                 ["render", "x", "--model", "tiny", "--chunks", "100000", "--out", str(tmp_path / "r")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and str(MAX_CHUNKS) in result.output, (args, result.output)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_user_errors_exit_2_with_one_line(tmp_path):
    table = _table(tmp_path / "p.parquet", n=1)
    base = ["submit", table, "--executor", "local", "--num-chunks", "2", "--model", "tiny"]
    unknown = CliRunner().invoke(main, [*base[:-2], "--out", str(tmp_path / "o1"), "--model", "wan9"])
    assert unknown.exit_code == 2 and unknown.output.strip().count("\n") == 0 and "wan9" in unknown.output
    from jobs.run import plan, write_job_json

    spec = plan(_local(table, tmp_path / "o2"))[0]
    write_job_json(JobOutput.open(spec.output_url), spec)  # an output holding a job with TokenTrim on
    other = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "o2"), "--no-trim"])
    assert other.exit_code == 2 and other.output.strip().count("\n") == 0 and "--force" in other.output
    missing = CliRunner().invoke(main, ["resume", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "job.json" in missing.output
    no_table = CliRunner().invoke(main, ["submit", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o3")])
    assert no_table.exit_code == 2 and no_table.output.strip().count("\n") == 0
