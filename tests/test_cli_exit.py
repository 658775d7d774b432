"""Every README command, run as a user runs it (its own process, the installed `tokentrim` entry point): exit 0,
no native abort at interpreter exit, and the outputs it promises (files there, decoded frame counts right)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.model.backend import PRESETS
from pipeline.outputs.video import decode_mp4
from pipeline.store import Store

ROOT = Path(__file__).resolve().parents[1]
TABLE = "jobs/data/vbench_prompts.parquet"


def frames_for(chunks: int) -> int:
    return 1 + 4 * (3 * chunks - 1)  # Wan VAE: 1 + 4 (F_lat - 1), 3 latent frames per chunk


def tokentrim(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `tokentrim ARGS` in a fresh process (a local Ray without token auth, as `make demo` sets it up)."""
    script = Path(sys.executable).parent / "tokentrim"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"tokentrim {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "terminate called" not in done.stderr, done.stderr
    return done


def assert_video(data: bytes, chunks: int) -> None:
    spec = PRESETS["tiny"]
    assert decode_mp4(data).shape == (frames_for(chunks), spec.height_px, spec.width_px, 3)


@pytest.mark.slow
def test_render_with_and_without_trim_and_resume_from_state(tmp_path: Path) -> None:
    chunks = 4
    trim = tokentrim("render", "a fox in the snow", "--model", "tiny", "--chunks", str(chunks), "--lam", "0",
                     "--out", str(tmp_path / "trim"), "--id", "fox", "--state", str(tmp_path / "state"))
    none = tokentrim("render", "a fox in the snow", "--model", "tiny", "--chunks", str(chunks), "--no-trim",
                     "--out", str(tmp_path / "none"), "--id", "fox")
    for done, variant in ((trim, "trim"), (none, "none")):
        store = Store(str(tmp_path / variant))
        assert f"video: {store.join('fox.mp4')}" in done.stdout.splitlines()
        assert_video(store.get_bytes("fox.mp4"), chunks)
        stats = store.get_table("fox.stats.parquet")
        assert stats.column("chunk").to_pylist() == list(range(chunks))
    verdicts = Store(str(tmp_path / "trim")).get_table("fox.stats.parquet").column("verdict").to_pylist()
    assert verdicts[:3] == ["warmup"] * 3 and verdicts[3] in ("accepted", "pruned")  # judged from 2 severities
    baseline = Store(str(tmp_path / "none")).get_table("fox.stats.parquet").to_pylist()
    assert [r["verdict"] for r in baseline] == ["accepted"] * chunks
    assert [r["tokens_pruned"] for r in baseline] == [0] * chunks and all(r["severity"] is None for r in baseline)
    # the same command again finds every chunk committed: it resumes after all of them and rewrites the same video
    again = tokentrim("render", "a fox in the snow", "--model", "tiny", "--chunks", str(chunks), "--lam", "0",
                      "--out", str(tmp_path / "again"), "--id", "fox", "--state", str(tmp_path / "state"))
    assert f"resumed after {chunks})" in again.stdout
    assert (tmp_path / "again" / "fox.mp4").read_bytes() == (tmp_path / "trim" / "fox.mp4").read_bytes()


@pytest.mark.slow
def test_submit_status_resume_exit_0_with_every_video(tmp_path: Path) -> None:
    """`make demo` in small: submit on a local Ray, then status, then resume (which finds everything done)."""
    import pyarrow as pa

    out, chunks, limit = tmp_path / "job", 2, 2  # limit: rows in the table
    Store(str(tmp_path)).put_table("p.parquet", pa.table({"prompt_id": ["cat", "owl"], "prompt": ["a cat", "an owl"]}))
    tokentrim("submit", str(tmp_path / "p.parquet"), "--out", str(out), "--model", "tiny", "--chunks", str(chunks),
              "--workers", "1")
    store = Store(str(out))
    results = store.get_table("results.parquet").to_pylist()
    ok = [r for r in results if r["status"] == "ok"]
    assert len(ok) == limit and {r["chunks"] for r in ok} == {chunks}
    for row in ok:
        assert_video(store.get_bytes(f"videos/{row['prompt_id']}.mp4"), chunks)
        assert store.get_table(f"stats/{row['prompt_id']}.parquet").num_rows == chunks
    report = json.loads(tokentrim("status", str(out), "--json").stdout)
    assert report["rows"] == {"to_render": limit, "done": limit, "remaining": 0, "invalid": 0, "excluded": 0}
    assert report["results"] == {"ok": limit} and report["in_progress"] == []
    assert report["stored_bytes"]["videos"] > 0 and "rollouts" not in report["stored_bytes"]  # state deleted
    videos = {r["prompt_id"]: store.get_bytes(f"videos/{r['prompt_id']}.mp4") for r in ok}
    tokentrim("resume", str(out))
    again = store.get_table("results.parquet").to_pylist()
    assert [(r["status"], r["reused"]) for r in again if r["prompt_id"] in videos] == [("ok", True)] * limit
    assert {pid: store.get_bytes(f"videos/{pid}.mp4") for pid in videos} == videos


@pytest.mark.slow
def test_regress_passes_against_its_own_baseline(tmp_path: Path) -> None:
    """Two nights with the same code: the second compares with the first's baseline and passes (exit 0)."""
    args = ["regress", "--prompts", "1", "--chunks", "4", "--executor", "local"]  # Ray: tests/test_jobs.py
    tokentrim(*args, "--out", str(tmp_path / "night1"), "--update-baseline")
    second = tokentrim(*args, "--out", str(tmp_path / "night2"), "--baseline", str(tmp_path / "night1/baseline.json"))
    assert second.stdout.splitlines()[-1].strip() == "PASS"
    metrics = json.loads((tmp_path / "night2" / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "night1" / "metrics.json").read_text())


def test_demo_exits_0_and_prints_one_row_per_chunk() -> None:
    done = tokentrim("demo", "--chunks", "8", "--corrupt-at", "5")
    rows = [line for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(line.split()[0]) for line in rows] == list(range(8))
    verdicts = [line.split()[5] for line in rows]
    assert verdicts[5] == "pruned" and "pruned" not in verdicts[:5] + verdicts[6:]  # the injected chunk only


@pytest.mark.slow
def test_reading_parquet_then_exiting_never_aborts(tmp_path: Path) -> None:
    """`Store.get_table` in a process that imported torch first (as every command does), then exits: before the
    fix about half such processes aborted at exit (`terminate called without an active exception`, 134)."""
    import pyarrow as pa

    Store(str(tmp_path)).put_table("t.parquet", pa.table({"status": ["ok"] * 100}))
    code = ("import torch\nfrom pipeline.store import Store\n"
            f"assert Store({str(tmp_path)!r}).get_table('t.parquet').num_rows == 100\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    outcomes = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    assert [rc for rc, _ in outcomes] == [0] * 8, outcomes
