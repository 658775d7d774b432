"""The AR rollout: determinism, batch independence, TokenTrim in the loop, both modes, bad latents; its stats
rows, strict-JSON checkpoint markers and the output hash."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import RolloutConfig
from pipeline.errors import InputError, NonFiniteLatentError
from pipeline.hashing import digest, job_settings, output_hash
from pipeline.model.backend import load_backend
from pipeline.outputs.checkpoint import RolloutCheckpoints
from pipeline.rollout.chunk_stats import TIMED_PHASES, ChunkStats, stats_row
from pipeline.rollout.loop import Rollout
from pipeline.rollout.probe import add_to_tokens
from pipeline.store import Store
from tokentrim import TrimConfig

TIMING = ("t_denoise_s", "t_trim_s", "t_commit_s")


@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny", with_vae=False)


def _run(backend, config, prompts=("a cat",), seeds=(1,), trim=None, perturb=None):
    rollout = Rollout(backend, config, list(prompts), list(seeds), trim)
    rollout.perturb = perturb
    return list(rollout)


def _rows(records, b=0):
    return [{k: v for k, v in r.rows[b].items() if k not in TIMING} for r in records]


def _corrupt_tokens(chunk: int, positions: list[int], amount: float = 8.0):
    """Add ``amount`` to every latent pixel of the given patch-grid tokens of ``chunk`` (attempt 0 only)."""

    def perturb(c: int, attempt: int, x0: torch.Tensor) -> torch.Tensor:
        return add_to_tokens(x0, positions, amount, TrimConfig().patch_size) if c == chunk and attempt == 0 else x0

    return perturb


def test_chunks_have_the_configured_shape(backend):
    records = _run(backend, RolloutConfig(num_chunks=3))
    assert [r.index for r in records] == [0, 1, 2]
    assert records[0].latents.shape == (1, 16, 3, 8, 12)
    assert [r.rows[0]["cache_tokens"] for r in records] == [3 * 24, 6 * 24, 9 * 24]


def test_local_window_bounds_the_cache(backend):
    records = _run(backend, RolloutConfig(num_chunks=6, window_frames=6, sink_frames=3))
    tokens = [r.rows[0]["cache_tokens"] for r in records]
    assert max(tokens) == (6 + 3) * 24
    assert tokens[-1] == tokens[-2]


@pytest.mark.parametrize("mode", ["self-forcing", "rolling-forcing"])
def test_batch_of_two_gives_each_prompt_its_own_rollout(backend, mode):
    config = RolloutConfig(mode=mode, num_chunks=6)  # chunks after the pruned one are in flight when it prunes
    trim = TrimConfig(warmup=2)
    corrupt = _corrupt_tokens(3, [2, 9])

    def only_first(c, attempt, x0):  # corrupt sample 0 only, so the batch prunes raggedly
        out = corrupt(c, attempt, x0)
        return torch.cat([out[:1], x0[1:]])

    both = _run(backend, config, ("a cat", "a dog"), (1, 2), trim, perturb=only_first)
    alone0 = _run(backend, config, ("a cat",), (1,), trim, perturb=corrupt)
    alone1 = _run(backend, config, ("a dog",), (2,), trim)
    assert both[3].rows[0]["verdict"] == "pruned" and both[3].rows[1]["verdict"] != "pruned"
    for k in range(6):
        torch.testing.assert_close(both[k].latents[:1], alone0[k].latents, rtol=0, atol=1e-4)
        torch.testing.assert_close(both[k].latents[1:], alone1[k].latents, rtol=0, atol=1e-4)


def test_tokentrim_finds_injected_drift_and_regenerates_the_chunk(backend):
    """The mechanism: corrupt 3 tokens of chunk 4's first candidate; TokenTrim names exactly those positions, prunes
    them from the previous chunk's cached frames and regenerates the chunk. Whether that helps later chunks is a
    quality question, measured against a noise floor over many seeds in bench/propagation.py, not asserted here."""
    config, positions = RolloutConfig(num_chunks=6), [3, 10, 17]
    trim = TrimConfig(warmup=3)
    hit_t = _run(backend, config, trim=trim, perturb=_corrupt_tokens(4, positions))
    clean_t, clean_n = _run(backend, config, trim=trim), _run(backend, config)
    assert [r.rows[0]["verdict"] for r in hit_t[:4]] == ["warmup"] * 3 + ["accepted"]
    assert hit_t[4].rows[0]["verdict"] == "pruned" and hit_t[4].rows[0]["attempts"] == 2
    found = set(hit_t[4].prunes[0].positions[0].tolist())
    assert set(positions) <= found
    assert hit_t[4].prunes[0].frames == [9, 10, 11]  # the previous chunk's frames
    assert hit_t[4].rows[0]["tokens_pruned"] == 3 * len(found)
    # without the injection TokenTrim changes nothing here
    assert all(torch.equal(x.latents, y.latents) for x, y in zip(clean_t, clean_n))


def test_no_trim_never_prunes_and_records_no_severity(backend):
    records = _run(backend, RolloutConfig(num_chunks=6), perturb=_corrupt_tokens(4, [1, 2, 3]))
    assert all(r.rows[0]["verdict"] == "accepted" and r.rows[0]["attempts"] == 1 for r in records)
    assert all(r.prunes == [] for r in records)


def test_retries_are_bounded(backend):
    """A chunk corrupted at every attempt is regenerated max_retries times, then accepted."""

    def always(c, attempt, x0):
        return _corrupt_tokens(4, [0, 1, 2])(c, 0, x0)

    records = _run(backend, RolloutConfig(num_chunks=5), trim=TrimConfig(warmup=3, max_retries=2), perturb=always)
    assert records[4].rows[0]["attempts"] == 3
    assert len(records[4].prunes) == 2


def test_nan_latents_stop_the_rollout_with_a_clear_error(backend):
    def poison(c, attempt, x0):
        return x0 * float("nan") if c == 1 else x0

    with pytest.raises(NonFiniteLatentError, match="chunk 1"):
        _run(backend, RolloutConfig(num_chunks=3), perturb=poison)


def test_bad_arguments_are_named(backend):
    with pytest.raises(InputError, match="seed"):
        Rollout(backend, RolloutConfig(), ["a", "b"], [1])
    with pytest.raises(InputError, match="measure_step"):
        Rollout(backend, RolloutConfig(), ["a"], [1], TrimConfig(measure_step=4))
    with pytest.raises(InputError, match="width_px"):
        Rollout(backend, RolloutConfig(width_px=100), ["a"], [1])
    with pytest.raises(ValueError, match="mode"):
        RolloutConfig(mode="fast")


def test_rolling_forcing_finds_injected_drift_in_the_finished_chunk(backend):
    config, positions = RolloutConfig(mode="rolling-forcing", num_chunks=6), [4, 11, 20]
    records = _run(backend, config, trim=TrimConfig(warmup=3), perturb=_corrupt_tokens(4, positions))
    assert records[4].rows[0]["verdict"] == "pruned" and records[4].rows[0]["attempts"] == 2
    assert set(positions) <= set(records[4].prunes[0].positions[0].tolist())
    assert all(r.rows[0]["verdict"] != "pruned" for r in records[:4])


def _strict_json(data: bytes):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(data, parse_constant=refuse)


def test_checkpoint_markers_are_strict_json_and_give_back_the_stats(backend, tmp_path):
    """The first chunk has no severity (NaN): the marker holds null, the loaded record NaN again."""
    records = _run(backend, RolloutConfig(num_chunks=3), trim=TrimConfig())
    store = Store(f"file://{tmp_path}")
    checkpoints = RolloutCheckpoints(store, "0" * 16, ["p"])
    for record in records:
        checkpoints.save(record)
    markers = [_strict_json((tmp_path / f"chunk-{i:06d}.json").read_bytes()) for i in range(3)]
    assert markers[0]["rows"][0]["severity"] is None
    loaded = RolloutCheckpoints(store, "0" * 16, ["p"]).load()
    assert math.isnan(loaded[0].stats[0].severity)
    assert [r.stats for r in loaded] != [] and all(
        a.to_json() == b.to_json() for x, y in zip(records, loaded) for a, b in zip(x.stats, y.stats))
    assert all(v is None for k, v in loaded[0].rows[0].items() if k.startswith("t_"))  # not measured here
    assert all(isinstance(v, float) for k, v in records[0].rows[0].items() if k.startswith("t_"))


def test_a_stats_row_is_the_chunk_stats_then_timings_then_pixels(backend):
    record = _run(backend, RolloutConfig(num_chunks=1))[0]
    row = stats_row(record.stats[0], {"denoise": 1.5}, {"luma": 0.25, "t_encode_s": 0.5})
    names = [f.name for f in dataclasses.fields(ChunkStats)]
    assert list(row) == names + [f"t_{p}_s" for p in TIMED_PHASES] + ["luma", "t_encode_s"]
    assert row["t_denoise_s"] == 1.5 and row["t_trim_s"] == 0.0 and row["luma"] == 0.25
    assert [row[n] for n in names] == list(dataclasses.astuple(record.stats[0]))


def test_output_hash_covers_model_rollout_trim_and_dtype(backend):
    spec, config, trim = backend.spec, RolloutConfig(), TrimConfig()
    base = output_hash(spec, config, trim, torch.float32)
    assert output_hash(spec, config, trim, "float32") == base
    others = {output_hash(spec, config, trim, torch.bfloat16), output_hash(spec, config, None, torch.float32),
              output_hash(spec, RolloutConfig(num_chunks=8), trim, torch.float32),
              output_hash(dataclasses.replace(spec, seed=1), config, trim, torch.float32)}
    assert base not in others and len(others) == 4
    assert digest(job_settings("tiny", None, config, trim, "float32", 0)) != base


def test_hashes_are_the_same_in_a_fresh_process(backend):
    code = ("from pipeline.hashing import digest, job_settings; from pipeline.config import RolloutConfig; "
            "from tokentrim import TrimConfig; "
            "print(digest(job_settings('tiny', None, RolloutConfig(), TrimConfig(), 'float32', 3)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == digest(job_settings("tiny", None, RolloutConfig(), TrimConfig(), "float32", 3))


def test_a_chunk_verdict_is_in_tokentrims_vocabulary():
    from pipeline.rollout.chunk_stats import VERDICTS, chunk_verdict
    from tokentrim import VERDICT_KINDS

    assert VERDICTS is VERDICT_KINDS
    assert [chunk_verdict(code, 0) for code in (-1, 0, 1)] == ["accepted", "warmup", "accepted"]
    assert {chunk_verdict(code, 3) for code in (-1, 0, 1)} == {"pruned"}  # regenerated on a pruned cache
