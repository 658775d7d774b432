"""Node loss on a real multi-node Ray cluster (``ray.cluster_utils.Cluster`` on 127.0.0.1): a job survives two node
kills, one after the other, with every prompt rendered exactly once and each interrupted rollout resumed elsewhere.

The cluster runs in a separate process (`tests/multinode_scenario.py`): this session's shared Ray (the
`ray_cluster` fixture) stays untouched, whatever the test order, and the cluster's address file goes to a private
``RAY_TMPDIR`` so no other ``ray.init()`` on the machine joins it. About 90 s on an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPTS, CHUNKS, KILLS, KILL_AFTER = 4, 5, 2, 2


def _run_scenario(out: Path, report: Path, timeout_s: float = 480.0) -> subprocess.CompletedProcess:
    # a short private temp dir: Ray's socket paths must stay under the AF_UNIX limit
    ray_tmp = tempfile.mkdtemp(prefix="ttmn")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tests.multinode_scenario", "--out", str(out), "--report", str(report),
           "--prompts", str(PROMPTS), "--chunks", str(CHUNKS), "--nodes", "3", "--kills", str(KILLS),
           "--kill-after", str(KILL_AFTER), "--timeout-s", str(timeout_s - 60)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario's own process group: its cluster goes with it
        output, _ = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    done = _run_scenario(root / "job" / "out", root / "report.json")
    assert (root / "report.json").exists(), done.stdout[-5000:]
    report = json.loads((root / "report.json").read_text())
    return done, report, root / "job" / "out"


def test_a_job_survives_two_node_kills_with_exit_0_and_every_row_ok(scenario):
    done, report, _ = scenario
    assert report["error"] is None, (report["error"], done.stdout[-5000:])
    assert done.returncode == 0
    assert report["counts"] == {"ok": PROMPTS}
    assert len(report["kills"]) == KILLS, report["kills"]
    assert len({k["node_id"] for k in report["kills"]}) == KILLS  # two different nodes died
    assert report["live_worker_nodes"] == 3 - KILLS


def test_every_prompt_and_every_chunk_is_rendered_exactly_once(scenario):
    """Renders counted from the files written, not from statuses: each done marker and each chunk's commit marker
    was written once (a second render of a prompt or a chunk would write a new file), and all were written."""
    _, report, _ = scenario
    writes = report["writes"]
    expected = {f"done/p{i}.json" for i in range(PROMPTS)}
    expected |= {f"rollouts/p{i}/chunk-{c:06d}.json" for i in range(PROMPTS) for c in range(CHUNKS)}
    assert set(writes) == expected
    assert set(writes.values()) == {1}, {k: n for k, n in writes.items() if n != 1}


def test_each_interrupted_rollout_continued_from_its_last_committed_chunk(scenario):
    _, report, out = scenario
    rows = {r["prompt_id"]: r for r in report["results"]}
    killed = {k["prompt_id"]: k for k in report["kills"]}
    assert len(killed) == KILLS
    for pid, row in rows.items():
        if pid in killed:
            # the claim of the dead node's attempt counts; the next attempt resumed where that one had committed
            assert row["attempt"] == killed[pid]["attempt"] + 1, (row, killed[pid])
            assert row["resumed_from"] >= killed[pid]["committed_at_kill"] >= KILL_AFTER, (row, killed[pid])
        else:
            assert (row["attempt"], row["resumed_from"]) == (0, 0), row
        assert row["chunks"] == CHUNKS


def test_a_resumed_video_equals_an_uninterrupted_render(scenario):
    """Oracle: the same rows rendered in one go without Ray, by the scenario process (whose thread settings are the
    actors': a CPU render is bit-identical only at the same ``OMP_NUM_THREADS``)."""
    _, report, out = scenario
    for kill in report["kills"]:
        pid = kill["prompt_id"]
        oracle = out.parent / "oracle" / pid
        assert json.loads((oracle / "done" / f"{pid}.json").read_text())["resumed_from"] == 0
        assert (out / "videos" / f"{pid}.mp4").read_bytes() == (oracle / "videos" / f"{pid}.mp4").read_bytes()
