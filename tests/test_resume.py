"""Resume: a rollout interrupted anywhere and resumed from its store gives the uninterrupted render exactly: the same
committed latents, stats, decoded frames and mp4 bytes (`tests/render_compare.py` says where a difference begins),
and the committed video segments are reused untouched. The decoder warm-up of a resume deep into a long rollout is
checked in tests/test_segments.py (these rollouts are shorter than the VAE's receptive field)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import RolloutConfig
from pipeline.errors import ConfigMismatchError, TransientStoreError
from pipeline.model.backend import load_backend
from pipeline.outputs.checkpoint import RolloutCheckpoints
from pipeline.outputs.render import render_hash, render_prompts
from pipeline.store import Store
from tests.flaky_store import FlakyStore
from tests.render_compare import Rendered, assert_same_render, read_render
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
    if isinstance(state, str):
        state = Store(state, opts)
    return render_prompts(backend, [PROMPT], [PID], Store(out, opts), config=config, trim=trim, seeds=[1], state=state,
                          force_restart=restart, on_chunk=on_chunk)[0]


def _config(mode):
    return RolloutConfig(mode=mode, num_chunks=CHUNKS, window_frames=6 if mode == "rolling-forcing" else None)


def _outputs(backend, url, state=None, opts=None, *, mode="self-forcing", chunks=CHUNKS) -> Rendered:
    """The render under ``url``, with the latents committed under ``state`` when given."""
    digest = None
    if state is not None:
        config = RolloutConfig(mode=mode, num_chunks=chunks, window_frames=6 if mode == "rolling-forcing" else None)
        digest = render_hash(backend, config, TRIM)
        state = state if isinstance(state, Store) else Store(state, opts)
    return read_render(Store(url), f"{PID}.mp4", f"{PID}.stats.parquet", state, digest, [PID])


@pytest.fixture(scope="module", params=["self-forcing", "rolling-forcing"])
def reference(request, backend, tmp_path_factory):
    """The uninterrupted render of each mode (with its committed latents), rendered twice: both must agree."""
    renders = []
    for attempt in range(2):
        root = tmp_path_factory.mktemp(f"ref{attempt}")
        result = _render(backend, f"file://{root}/out", f"file://{root}/state", mode=request.param)
        assert [r["verdict"] for r in result.rows].count("pruned") >= 1  # prune replay is exercised
        renders.append(_outputs(backend, f"file://{root}/out", f"file://{root}/state", mode=request.param))
    assert_same_render(renders[1], renders[0])
    return request.param, renders[0]


@pytest.mark.parametrize("stop_after", [1, 3])
def test_resumed_rollout_is_bit_identical_on_every_store(backend, reference, store_url, tmp_path, stop_after):
    mode, want = reference
    state, opts = store_url.url + "/state", store_url.storage_options
    with pytest.raises(Interrupt):
        _render(backend, f"file://{tmp_path}/a", state, mode=mode, stop_after=stop_after, opts=opts)
    before = _segments(Store(state, opts))
    assert sorted(before) == [f"segment-{i:06d}-0.mp4" for i in range(stop_after + 1)]
    result = _render(backend, f"file://{tmp_path}/b", state, mode=mode, opts=opts)
    # chunk k is reported once it is committed (with its segments, whose encoding overlapped the next chunk)
    assert result.resumed_from == stop_after + 1
    after = _segments(Store(state, opts))
    assert {k: after[k] for k in before} == before, "a resume rewrote a committed segment"
    assert len(after) == CHUNKS
    assert_same_render(_outputs(backend, f"file://{tmp_path}/b", state, opts, mode=mode), want)


def _segments(store: Store) -> dict[str, tuple[bytes, object]]:
    """The segment objects under ``store``: their bytes and, on a local store, their inode and mtime (a rewrite of
    the same bytes is a new file, renamed into place)."""
    found = {}
    for key in store.list("segment-"):
        path = store.url.removeprefix("file://") + "/" + key
        stat = os.stat(path) if store.url.startswith("file://") else None
        found[key] = (store.get_bytes(key), (stat.st_ino, stat.st_mtime_ns) if stat else None)
    return found


def test_checkpoint_objects_are_small_and_never_pickled(backend, tmp_path):
    _render(backend, f"file://{tmp_path}/out", f"file://{tmp_path}/state")
    names = sorted(os.listdir(tmp_path / "state"))
    assert names == sorted([f"chunk-{i:06d}.{ext}" for i in range(CHUNKS) for ext in ("json", "safetensors")]
                           + [f"segment-{i:06d}-0.mp4" for i in range(CHUNKS)])
    for i in range(CHUNKS):
        data = (tmp_path / "state" / f"chunk-{i:06d}.safetensors").read_bytes()
        names = _safetensors_names(data)
        assert "latents" in names and all(n == "latents" or n.startswith(("prune.", "trim.")) for n in names)
        assert len(data) < 64 * 1024
        marker = json.loads((tmp_path / "state" / f"chunk-{i:06d}.json").read_text())
        assert marker["size"] == len(data) and marker["sha256"] == hashlib.sha256(data).hexdigest()
    _render(backend, f"file://{tmp_path}/out2", f"file://{tmp_path}/rolling", mode="rolling-forcing")
    windows = sorted(n for n in os.listdir(tmp_path / "rolling") if n.startswith("window-"))
    # the last chunk leaves nothing in flight; the two before it keep their windows
    assert windows == [f"window-{CHUNKS - 3:06d}.safetensors", f"window-{CHUNKS - 2:06d}.safetensors"]


def _safetensors_names(data: bytes) -> set[str]:
    """The tensor names of safetensors ``data``, after checking that the file is nothing but a JSON header and
    those tensors, packed end to end (no other payload, no pickle), and that it loads."""
    from safetensors.torch import load

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + length])
    header.pop("__metadata__", None)
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 8 + length + spans[-1][1] == len(data), "bytes after the last tensor"
    tensors = load(data)
    assert set(tensors) == set(header)
    return set(header)


@pytest.mark.parametrize("truncated", [2, 4])
def test_truncated_chunk_falls_back_to_the_last_good_one(backend, reference, tmp_path, truncated):
    mode, want = reference
    state = tmp_path / "state"
    with pytest.raises(Interrupt):
        _render(backend, f"file://{tmp_path}/a", f"file://{state}", mode=mode, stop_after=4)
    assert (state / "chunk-000004.json").exists() and not (state / "chunk-000005.json").exists()
    blob = state / f"chunk-{truncated:06d}.safetensors"
    blob.write_bytes(blob.read_bytes()[:-100])
    result = _render(backend, f"file://{tmp_path}/b", f"file://{state}", mode=mode)
    if mode == "rolling-forcing" and truncated == 2:
        # the in-flight windows of the last two chunks only are kept: nothing older is a resume point
        assert result.resumed_from == 0
    else:
        assert result.resumed_from == truncated
    assert_same_render(_outputs(backend, f"file://{tmp_path}/b", f"file://{state}", mode=mode), want)


def test_flaky_store_is_retried_and_changes_nothing(backend, reference, tmp_path):
    mode, want = reference
    flaky = FlakyStore(f"file://{tmp_path}/state", failure_rate=0.3, seed=3, retries=8)
    with pytest.raises(Interrupt):
        _render(backend, f"file://{tmp_path}/a", flaky, mode=mode, stop_after=1)
    _render(backend, f"file://{tmp_path}/b", flaky, mode=mode)
    assert flaky.failures > 0
    assert_same_render(_outputs(backend, f"file://{tmp_path}/b", f"file://{tmp_path}/state", mode=mode), want)


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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["self-forcing", "rolling-forcing"])
def test_sigkilled_render_process_resumes_to_the_same_video(tmp_path, mode):
    """A real `tokentrim render` process killed with SIGKILL mid-rollout, then run again: the same latents, stats,
    frames and bytes as an uninterrupted process."""
    state, out_a, out_b = tmp_path / "state", tmp_path / "a", tmp_path / "b"
    base = [sys.executable, "-m", "jobs.cli", "render", PROMPT, "--id", PID, "--model", "tiny", "--chunks", "8",
            "--seed", "7", "--lam", "0.5", "--mode", mode]
    if mode == "rolling-forcing":
        base += ["--window", "6"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    root = Path(__file__).resolve().parents[1]
    subprocess.run([*base, "--out", str(out_a), "--state", str(tmp_path / "ref")], check=True, cwd=root, env=env,
                   capture_output=True)
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
    resumed = int(done.stdout.split("resumed after ")[1].split(")")[0])
    assert 4 <= resumed < 8
    want = read_render(Store(str(out_a)), f"{PID}.mp4", f"{PID}.stats.parquet", Store(str(tmp_path / "ref")))
    got = read_render(Store(str(out_b)), f"{PID}.mp4", f"{PID}.stats.parquet", Store(str(state)))
    assert_same_render(got, want)
