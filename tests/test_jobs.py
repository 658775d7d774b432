"""Jobs: prompt tables, claims, per-prompt policy, and a real Ray job over a fake S3 output."""

from __future__ import annotations

import io
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.claims import Claims
from jobs.run import load_spec, status, submit
from jobs.spec import JobSpec
from jobs.table import read_table, validate_rows
from jobs.worker import render_row
from pipeline.backend import load_backend
from pipeline.config import RolloutConfig
from pipeline.errors import ConfigMismatchError, InputError
from pipeline.store import Store
from pipeline.video import decode_mp4
from tokentrim import TrimConfig


def _table(path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------------ tables
def test_bad_rows_are_named_and_the_rest_kept(tmp_path):
    url = _table(tmp_path / "p.parquet", prompt_id=["ok", "../x", "dup", "dup", "nochunks", "s", ""],
                 prompt=["a cat", "evil", "one", "two", "x", "y", "z"], num_chunks=[2, 2, 2, 2, 0, 2, 2],
                 seed=[1, 2, 3, 4, 5, -1, 7])
    good, bad = validate_rows(read_table(url), default_chunks=3)
    assert [r.prompt_id for r in good] == ["ok", "dup"]
    errors = {b.row: b.error for b in bad}
    assert "prompt_id" in errors[1] and "'../x'" in errors[1]
    assert "repeats" in errors[3]
    assert "num_chunks" in errors[4] and "row 4" in errors[4]
    assert "seed" in errors[5]
    assert "prompt_id" in errors[6]


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


def test_the_shared_vbench_table_validates():
    good, bad = validate_rows(read_table("jobs/data/vbench_prompts.parquet"), default_chunks=7)
    assert len(good) + len(bad) == 946 and len(good) > 900


# ------------------------------------------------------------------------------------------------ claims
def test_claims_are_exclusive_leased_and_counted(tmp_path):
    clock = Clock()
    claims = Claims(Store(str(tmp_path)), lease_s=60, max_attempts=2, clock=clock)
    first = claims.acquire("p")
    assert first.attempt == 0
    assert claims.acquire("p") == "busy"  # a live lease
    clock.now += 61  # the holder died: its lease runs out
    second = claims.acquire("p")
    assert second.attempt == 1
    claims.release(second)
    assert claims.acquire("p") == "poison"


def test_concurrent_workers_get_one_claim(tmp_path):
    claims = Claims(Store(str(tmp_path)), lease_s=60, max_attempts=3)
    won = []
    threads = [threading.Thread(target=lambda: won.append(claims.acquire("p"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(w, str) for w in won) == 1


# ------------------------------------------------------------------------------------------ one prompt
@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny")


def _spec(tmp_path, **kw) -> JobSpec:
    kw.setdefault("rollout", RolloutConfig(num_chunks=3))
    return JobSpec(input_url=str(tmp_path / "p.parquet"), output_url=str(tmp_path / "out"), **kw)


def test_an_interrupted_prompt_resumes_and_matches_an_uninterrupted_one(backend, tmp_path):
    from jobs.table import PromptRow
    from pipeline.render import render

    row = PromptRow(0, "p0", "a harbour at dawn", 11, 4)
    spec = _spec(tmp_path, trim=TrimConfig(lam=0.5))
    out = Store(spec.output_url)
    claims = Claims(out, lease_s=60, max_attempts=3)

    class Stop(Exception):
        pass

    def stop(index, rows):
        if index == 1:
            raise Stop

    with pytest.raises(Stop):  # a worker died after committing some chunks
        render(backend, [row.prompt], [row.prompt_id], spec.output_url, config=RolloutConfig(num_chunks=4),
               trim=spec.trim, seeds=[row.seed], state_url=out.join("rollouts/p0"), on_chunk=stop)
    result = render_row(backend, spec, row, claims)
    assert result["status"] == "ok" and result["resumed_from"] >= 2 and result["chunks"] == 4
    reference = _spec(tmp_path / "ref", trim=TrimConfig(lam=0.5))
    fresh = render_row(backend, reference, row, Claims(Store(reference.output_url), lease_s=60, max_attempts=3))
    assert fresh["resumed_from"] == 0
    assert out.get_bytes("videos/p0.mp4") == Store(reference.output_url).get_bytes("videos/p0.mp4")
    assert render_row(backend, spec, row, claims)["status"] == "skipped"


def test_a_poison_prompt_is_not_tried_again(backend, tmp_path):
    from jobs.table import PromptRow

    spec = _spec(tmp_path, max_attempts=2)
    claims = Claims(Store(spec.output_url), lease_s=60, max_attempts=2)
    for _ in range(2):
        claims.release(claims.acquire("p1"))  # two earlier attempts that failed
    result = render_row(backend, spec, PromptRow(0, "p1", "x", 1, 2), claims)
    assert result["status"] == "poison" and "2 attempts" in result["error"]


# -------------------------------------------------------------------------------------------- a Ray job
def test_ray_job_renders_a_table_to_s3_and_a_rerun_skips_finished_prompts(ray_cluster, s3, tmp_path):
    url = _table(tmp_path / "p.parquet", prompt_id=["cat", "dog", "../escape", "owl"],
                 prompt=["a cat", "a dog", "hostile", "an owl at night"], num_chunks=[2, 3, 2, 2])
    out = f"{s3.url}/jobs/{tmp_path.name}"
    spec = JobSpec(input_url=url, output_url=out, rollout=RolloutConfig(num_chunks=2), workers=2,
                   storage_options=s3.storage_options)
    report = submit(spec)
    assert report.counts == {"ok": 3, "invalid": 1}
    store = Store(out, s3.storage_options)
    table = pq.read_table(io.BytesIO(store.get_bytes("results.parquet"))).to_pylist()
    assert [r["status"] for r in table] == ["ok", "ok", "invalid", "ok"]
    assert "'../escape'" in table[2]["error"]
    frames = decode_mp4(store.get_bytes("videos/dog.mp4"))
    assert frames.shape[0] == 1 + 4 * (3 * 3 - 1)
    stats = pq.read_table(io.BytesIO(store.get_bytes("stats/dog.parquet")))
    assert stats.num_rows == 3
    assert not any(k.startswith("../") or "escape" in k for k in store.list())
    again = submit(load_spec(out, s3.storage_options))
    assert again.counts == {"skipped": 3, "invalid": 1}
    assert status(out, s3.storage_options)["done"] == 3
    other = JobSpec(input_url=url, output_url=out, rollout=RolloutConfig(num_chunks=2), trim=None,
                    storage_options=s3.storage_options)
    with pytest.raises(ConfigMismatchError, match="--force"):
        submit(other)


# -------------------------------------------------------------------------------------------- regression
def test_regression_passes_against_its_own_baseline_and_fails_on_worse_drift(ray_cluster, tmp_path):
    import json

    from click.testing import CliRunner

    from jobs.cli import main
    from jobs.regress import compare

    args = ["regress", "--out", str(tmp_path / "night"), "--prompts", "2", "--chunks", "4"]
    first = CliRunner().invoke(main, [*args, "--update-baseline"])
    assert first.exit_code == 0, first.output
    assert "PASS" in first.output
    report = (tmp_path / "night" / "report.md").read_text()
    assert "PASS" in report and "plots/flicker.svg" in report
    assert (tmp_path / "night" / "plots" / "luma.svg").read_text().startswith("<svg")
    baseline = json.loads((tmp_path / "night" / "baseline.json").read_text())
    assert set(baseline) == {"tokentrim", "baseline"}
    # a baseline with half the drift: tonight's run is a regression, named by variant and metric
    halved = {v: {m: x / 2 for m, x in ms.items()} for v, ms in baseline.items()}
    (tmp_path / "halved.json").write_text(json.dumps(halved))
    second = CliRunner().invoke(main, [*args, "--baseline", str(tmp_path / "halved.json")])
    assert second.exit_code == 1
    assert "tokentrim/latent_dist_first" in second.output
    assert compare(baseline, baseline, tolerance=0.0, slack=0.0) == []


def test_a_dead_workers_claim_is_waited_out_and_a_live_one_reported_busy(backend, tmp_path):
    from jobs.table import PromptRow

    spec = _spec(tmp_path, lease_s=1.5)
    row = PromptRow(0, "p2", "a red kite", 3, 2)
    claims = Claims(Store(spec.output_url), lease_s=1.5, max_attempts=3)
    claims.acquire("p2")  # a worker that died right after claiming: its lease is never renewed
    result = render_row(backend, spec, row, claims)
    assert result["status"] == "ok" and result["attempt"] == 1

    live = Claims(Store(str(tmp_path / "live")), lease_s=1.5, max_attempts=3)
    holder = live.acquire("p3")
    stop = threading.Event()

    def keep_renewing():
        while not stop.wait(0.3):
            live.renew(holder)

    thread = threading.Thread(target=keep_renewing)
    thread.start()
    try:
        spec_live = JobSpec(input_url=spec.input_url, output_url=str(tmp_path / "live"), lease_s=1.5,
                            rollout=RolloutConfig(num_chunks=2))
        busy = render_row(backend, spec_live, PromptRow(0, "p3", "x", 1, 2), live)
    finally:
        stop.set()
        thread.join()
    assert busy["status"] == "busy"


def test_a_worker_killed_mid_rollout_is_retried_and_resumes(ray_cluster, tmp_path):
    """SIGKILL the actor rendering a prompt once it has committed chunks: Ray restarts it, the row is retried,
    the retry waits out the dead lease, resumes from the checkpoint, and the video equals an uninterrupted job's."""
    import json
    import os
    import signal
    import time

    url = _table(tmp_path / "p.parquet", prompt_id=["long"], prompt=["a lighthouse in a storm"], num_chunks=[6])

    def spec(out):
        return JobSpec(input_url=url, output_url=str(tmp_path / out), rollout=RolloutConfig(num_chunks=6),
                       lease_s=2.0, workers=1)

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
