"""What long commands show while they run: a live bar on a terminal (driven here under a pseudo-terminal), one line
per finished prompt without one, and `status` as a table; the bar is fed from what the job commits to its store."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.layout import JobOutput
from jobs.policy import Claims
from jobs.progress import JobSnapshot, JobWatcher
from jobs.run import plan, write_job_json
from jobs.spec import JobSpec
from jobs.table import PromptRow
from pipeline.store import Store

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT),
       "COLUMNS": "160"}


def _table(path: Path, n: int = 1) -> str:
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(n)], "prompt": [f"a cat {i}" for i in range(n)]}),
                   path)
    return str(path)


def _in_pty(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run ``tokentrim ARGS`` with stdout and stderr on a pseudo-terminal; its exit status and what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal 160 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env or ENV,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def _piped(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env or ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_render_submit_and_resume_show_a_bar_on_a_terminal_and_lines_without_one(tmp_path):
    rc, shown = _in_pty("render", "a cat", "--model", "tiny", "--num-chunks", "2", "--out", str(tmp_path / "r"))
    assert rc == 0, shown
    assert "loading model tiny on cpu ..." in shown
    assert "\r" in shown and "2/2" in shown and "chunk 2/2, pruned 0" in shown  # tqdm redraws one line

    table = _table(tmp_path / "p.parquet", n=2)
    job = ["--out", str(tmp_path / "job"), "--executor", "local", "--model", "tiny", "--num-chunks", "2"]
    piped = _piped("submit", table, *job, "--limit", "1")
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr.splitlines()[:2] == ["job: 1 of 1 prompts to render; loading model tiny ...",
                                             piped.stderr.splitlines()[1]]
    assert piped.stderr.splitlines()[1].startswith("[1/1] p0: 2 chunks, 0 pruned, ")
    assert "\r" not in piped.stderr and "results:" in piped.stdout

    rc, shown = _in_pty("submit", table, *job)  # p0 is done: the bar starts at its chunks and renders p1
    assert rc == 0, shown
    assert "job: loading model tiny ..." in shown and "\r" in shown
    assert "prompts 1/2" in shown and "prompts 2/2" in shown and "4/4" in shown and "pruned 0" in shown
    rc, shown = _in_pty("resume", str(tmp_path / "job"))
    assert rc == 0 and "prompts 2/2" in shown and "loading model" not in shown, shown


@pytest.mark.slow
def test_a_ray_job_shows_the_drivers_bar_and_keeps_rays_own_log_lines_out(ray_cluster, tmp_path):
    import ray

    env = {**ENV, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    table = _table(tmp_path / "p.parquet", n=1)
    rc, shown = _in_pty("submit", table, "--out", str(tmp_path / "job"), "--model", "tiny", "--num-chunks", "2",
                        env=env)
    assert rc == 0, shown
    assert "prompts 1/1" in shown and "2/2" in shown
    for noise in (" INFO ", "RenderWorker", "Running Dataset", "MapBatches", "pid="):
        assert noise not in shown, (noise, shown)


def test_the_watcher_reads_done_and_chunk_markers_into_snapshots(tmp_path):
    out = Store(str(tmp_path))
    out.put_json("done/a.json", {"chunks": 2, "pruned_chunks": 1, "seconds": 3.0})
    seen: list[tuple[str, JobSnapshot]] = []

    class Record:
        def begin(self, snap):
            seen.append(("begin", snap))

        def update(self, snap):
            seen.append(("update", snap))

        def end(self, snap):
            seen.append(("end", snap))

    rows = [PromptRow(0, "a", "x", 1, 2), PromptRow(1, "b", "y", 2, 4), PromptRow(2, "c", "z", 3, 4)]
    watcher = JobWatcher(JobOutput(out), rows, Record(), label="job", interval_s=60)
    watcher.start()
    snap = watcher.snapshot
    assert (snap.total_prompts, snap.total_chunks, snap.done_prompts, snap.done_chunks) == (3, 10, 1, 2)
    assert snap.pruned_chunks == 1 and snap.finished == [] and not snap.started  # done before: counted, not news
    out.put_json("rollouts/b/chunk-000000.json", {"rows": [{"verdict": "warmup"}]})
    out.put_json("rollouts/b/chunk-000001.json", {"rows": [{"verdict": "pruned"}]})
    out.put_bytes("rollouts/b/chunk-000001.safetensors", b"x")
    out.put_json("rollouts/other/chunk-000005.json", {"rows": []})  # not a row of this run
    watcher.poll()
    assert snap.running == {"b": (2, 4)} and snap.pruned_chunks == 2 and snap.started
    out.put_json("done/b.json", {"chunks": 4, "pruned_chunks": 1, "seconds": 9.5})
    out.put_json("rollouts/c/chunk-000000.json", {"rows": [{"verdict": "warmup"}]})
    watcher.poll()
    assert [(f.prompt_id, f.chunks, f.pruned_chunks, f.seconds) for f in snap.finished] == [("b", 4, 1, 9.5)]
    assert (snap.done_prompts, snap.done_chunks, snap.running, snap.pruned_chunks) == (2, 6, {"c": (1, 4)}, 2)
    watcher.stop()
    assert [kind for kind, _ in seen][0] == "begin" and seen[-1][0] == "end"


def test_status_prints_a_table_with_live_and_stale_leases_and_json_for_scripts(tmp_path):
    table = _table(tmp_path / "p.parquet", n=3)
    spec, rows, _ = plan(JobSpec.from_fields(input_url=table, output_url=str(tmp_path / "out"), executor="local",
                                             model="tiny",
                                             lease_s=30))
    out = Store(spec.output_url)
    write_job_json(JobOutput(out), spec)
    out.put_json("done/p0.json", {"chunks": 2, "seconds": 20.0})
    now = [time.time()]
    claims = Claims(JobOutput(out), lease_s=30, max_attempts=3, clock=lambda: now[0])
    now[0] -= 100  # p1's worker claimed 100 s ago and died: its lease ran out 70 s ago
    claims.acquire("p1")
    now[0] += 95
    claims.acquire("p2")
    out.put_json("rollouts/p2/chunk-000000.json", {"rows": []})
    result = CliRunner().invoke(main, ["status", spec.output_url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "rows    to_render 3  done 1  remaining 2  invalid 0  excluded 0" in lines
    assert "leases  1 live, 1 stale" in lines
    p1 = next(line for line in lines if line.lstrip().startswith("p1 "))
    p2 = next(line for line in lines if line.lstrip().startswith("p2 "))
    assert "stale" in p1 and "STALE: ran out 0:01:1" in p1 and "0/7" in p1
    assert "live" in p2 and "1/7" in p2 and "ends in 0:00:2" in p2
    assert any(line.startswith("ETA     0:00:40") for line in lines)  # 20 s per prompt x 2 left / 1 worker
    report = json.loads(CliRunner().invoke(main, ["status", spec.output_url, "--json"]).output)
    assert [(x["prompt_id"], x["state"], x["chunk"]) for x in report["leases"]] == [("p1", "stale", 0),
                                                                                    ("p2", "live", 1)]
    assert report["in_progress"] == ["p2"] and report["eta_s"] == pytest.approx(40.0)
