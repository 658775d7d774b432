"""Resume: a rollout interrupted anywhere and resumed from its store gives the uninterrupted video and stats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.backend import load_backend
from pipeline.checkpoint import RolloutCheckpoints
from pipeline.config import RolloutConfig
from pipeline.errors import ConfigMismatchError, TransientStoreError
from pipeline.render import render, render_hash
from pipeline.store import Store
from tests.flaky_store import FlakyStore
from tokentrim import TrimConfig

PROMPT, PID, CHUNKS = "a lighthouse in a storm", "lighthouse", 6
TRIM = TrimConfig(warmup=2, lam=0.5)  # seed 1 prunes in both modes on the tiny model, so prune replay is exercised


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny")


def _render(backend, out, state=None, *, mode="self-forcing", trim=TRIM, stop_after=None, restart=False, opts=None):
    def on_chunk(index, rows):
        if stop_after is not None and index == stop_after:
            raise Interrupt(index)

    # rolling-forcing with a window: the adjacent sink is re-rotated as frames are evicted, and must replay exactly
    config = RolloutConfig(mode=mode, num_chunks=CHUNKS, window_frames=6 if mode == "rolling-forcing" else None)
    return render(backend, [PROMPT], [PID], out, config=config, trim=trim, seeds=[1], state_url=state,
                  storage_options=opts, force_restart=restart, on_chunk=on_chunk)[0]


def _outputs(url, opts=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(url, opts)
    stats = pq.read_table(pa.BufferReader(store.get_bytes(f"{PID}.stats.parquet"))).to_pylist()
    stats = [{k: v for k, v in row.items() if not k.startswith("t_")} for row in stats]
    return store.get_bytes(f"{PID}.mp4"), stats


@pytest.fixture(scope="module", params=["self-forcing", "rolling-forcing"])
def reference(request, backend, tmp_path_factory):
    out = f"file://{tmp_path_factory.mktemp('ref')}"
    result = _render(backend, out, mode=request.param)
    assert "pruned" in [r["verdict"] for r in result.rows]
    return request.param, _outputs(out)


def test_resumed_rollout_is_bit_identical_on_every_store(backend, reference, store_url, tmp_path):
    mode, (video, stats) = reference
    state = store_url.url + "/state"
    with pytest.raises(Interrupt):
        _render(backend, f"file://{tmp_path}/a", state, mode=mode, stop_after=2, opts=store_url.storage_options)
    result = _render(backend, f"file://{tmp_path}/b", state, mode=mode, opts=store_url.storage_options)
    # chunk 2 is reported once chunk 3 is committed (its encoding overlaps the next chunk)
    assert result.resumed_from == 4
    assert _outputs(f"file://{tmp_path}/b") == (video, stats)


def test_checkpoint_objects_are_small_and_never_pickled(backend, tmp_path):
    _render(backend, f"file://{tmp_path}/out", f"file://{tmp_path}/state")
    names = sorted(os.listdir(tmp_path / "state"))
    assert names == sorted([f"chunk-{i:06d}.{ext}" for i in range(CHUNKS) for ext in ("json", "safetensors")])
    data = (tmp_path / "state" / "chunk-000003.safetensors").read_bytes()
    assert b"pickle" not in data and not data.startswith(b"\x80")
    assert len(data) < 64 * 1024
    _render(backend, f"file://{tmp_path}/out2", f"file://{tmp_path}/rolling", mode="rolling-forcing")
    windows = sorted(n for n in os.listdir(tmp_path / "rolling") if n.startswith("window-"))
    # the last chunk leaves nothing in flight; the two before it keep their windows
    assert windows == [f"window-{CHUNKS - 3:06d}.safetensors", f"window-{CHUNKS - 2:06d}.safetensors"]


@pytest.mark.parametrize("truncated", [2, 4])
def test_truncated_chunk_falls_back_to_the_last_good_one(backend, reference, tmp_path, truncated):
    mode, (video, stats) = reference
    state = tmp_path / "state"
    with pytest.raises(Interrupt):
        _render(backend, f"file://{tmp_path}/a", f"file://{state}", mode=mode, stop_after=3)
    assert (state / "chunk-000004.json").exists() and not (state / "chunk-000005.json").exists()
    blob = state / f"chunk-{truncated:06d}.safetensors"
    blob.write_bytes(blob.read_bytes()[:-100])
    result = _render(backend, f"file://{tmp_path}/b", f"file://{state}", mode=mode)
    if mode == "rolling-forcing" and truncated == 2:
        # the in-flight windows of the last two chunks only are kept: nothing older is a resume point
        assert result.resumed_from == 0
    else:
        assert result.resumed_from == truncated
    assert _outputs(f"file://{tmp_path}/b") == (video, stats)


def test_flaky_store_is_retried_and_changes_nothing(backend, reference, tmp_path):
    mode, (video, stats) = reference
    flaky = FlakyStore(f"file://{tmp_path}/state", failure_rate=0.3, seed=3, retries=8)
    with pytest.raises(Interrupt):
        _render(backend, f"file://{tmp_path}/a", flaky, mode=mode, stop_after=1)
    _render(backend, f"file://{tmp_path}/b", flaky, mode=mode)
    assert flaky.failures > 0
    assert _outputs(f"file://{tmp_path}/b") == (video, stats)


def test_dead_store_fails_with_a_clear_error(backend, tmp_path):
    dead = FlakyStore(f"file://{tmp_path}/state", failure_rate=1.0, retries=2)
    with pytest.raises(TransientStoreError, match="state.*failed after 3 attempts"):
        _render(backend, f"file://{tmp_path}/a", dead)


def test_another_config_refuses_to_resume_unless_restarted(backend, tmp_path):
    state = f"file://{tmp_path}/state"
    with pytest.raises(Interrupt):
        _render(backend, f"file://{tmp_path}/a", state, stop_after=1)
    other = TrimConfig(p=0.2)
    with pytest.raises(ConfigMismatchError, match="config hash"):
        _render(backend, f"file://{tmp_path}/b", state, trim=other)
    result = _render(backend, f"file://{tmp_path}/b", state, trim=other, restart=True)
    assert result.resumed_from == 0
    digest = render_hash(backend, RolloutConfig(num_chunks=CHUNKS), other)
    assert len(RolloutCheckpoints(Store(state), digest, [PID]).load()) == CHUNKS


def test_sigkilled_render_process_resumes_to_the_same_video(tmp_path):
    """A real `tokentrim render` process killed with SIGKILL mid-rollout, then run again."""
    state, out_a, out_b = tmp_path / "state", tmp_path / "a", tmp_path / "b"
    base = [sys.executable, "-m", "jobs.cli", "render", PROMPT, "--id", PID, "--model", "tiny", "--chunks", "8",
            "--seed", "7", "--lam", "0.5"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    root = Path(__file__).resolve().parents[1]
    subprocess.run([*base, "--out", str(out_a)], check=True, cwd=root, env=env, capture_output=True)
    proc = subprocess.Popen([*base, "--out", str(out_b), "--state", str(state)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (state / "chunk-000003.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "render ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out_b / f"{PID}.mp4").exists()
    done = subprocess.run([*base, "--out", str(out_b), "--state", str(state)], cwd=root, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed after" in done.stdout and "resumed after 0)" not in done.stdout
    assert _outputs(str(out_b)) == _outputs(str(out_a))
