"""`tokentrim regress` on the canary against the baseline committed in the repo: tonight's engine passes, and three
deliberately broken engines fail it (RoPE off by one frame in the cache, a pruned token still attended, perturbed
weights). The broken engines are patched into this process; the regression renders with the local executor."""

from __future__ import annotations

import json
import os
from importlib.resources import files

import pytest
import torch

from jobs.regress import run_regression
from jobs.spec import JobSpec
from pipeline.canary.models import WEIGHTS_DIR
from pipeline.config import RolloutConfig
from pipeline.model.causal_wan import CausalWan
from pipeline.model.kv_cache import KVCache

BASELINE = str(files("jobs") / "data" / "canary_baseline.json")
needs_baseline = pytest.mark.skipif(not (os.path.isfile(BASELINE) and os.path.isfile(
    os.path.join(WEIGHTS_DIR, "card.json"))), reason="no committed canary baseline")


def _spec(tmp_path, name: str) -> JobSpec:
    """The settings the committed baseline was made with (README: "Nightly regression")."""
    with open(BASELINE, encoding="utf-8") as fh:
        settings = json.load(fh)["settings"]
    chunks = settings["render"]["rollout"]["num_chunks"]
    return JobSpec(input_url=str(files("jobs") / "data" / "canary_prompts.parquet"),
                   output_url=str(tmp_path / name), model="canary", rollout=RolloutConfig(num_chunks=chunks),
                   limit=len(settings["prompt_ids"]), executor="local")


def _rope_off_by_one(monkeypatch) -> None:
    """The commit pass writes the chunk's keys one frame later than its denoising passes saw them."""
    forward = CausalWan.forward

    def shifted(self, latents, timestep, text, cache, first_frame):
        commit = bool((timestep == 0).all())
        return forward(self, latents, timestep, text, cache, first_frame + 1 if commit else first_frame)

    monkeypatch.setattr(CausalWan, "forward", shifted)


def _pruned_still_attended(monkeypatch) -> None:
    """`KVCache.apply_prune` counts the rows it should drop but keeps them in the cache."""
    monkeypatch.setattr(KVCache, "_compact", lambda self, *args, **kwargs: None)


def _perturbed_weights(monkeypatch) -> None:
    """Every transformer weight scaled by 1 + N(0, 0.1^2) after loading."""
    import jobs.executors

    load = jobs.executors.load_model

    def perturbed(spec):
        backend = load(spec)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in backend.causal.transformer.parameters():
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=generator).to(p))
        return backend

    monkeypatch.setattr(jobs.executors, "load_model", perturbed)


@needs_baseline
@pytest.mark.slow
def test_canary_regression_passes_against_the_committed_baseline(tmp_path):
    result = run_regression(_spec(tmp_path, "tonight"), baseline_url=BASELINE)
    assert result.passed, result.failures
    assert set(result.metrics) == {"tokentrim", "no-trim", "probe"}
    assert result.metrics["tokentrim"]["canary_miss"] <= 0.25


@needs_baseline
@pytest.mark.slow
@pytest.mark.parametrize("breakage", [_rope_off_by_one, _pruned_still_attended, _perturbed_weights],
                         ids=["rope-off-by-one", "pruned-token-attended", "perturbed-weights"])
def test_canary_regression_catches_a_broken_engine(tmp_path, monkeypatch, breakage):
    breakage(monkeypatch)
    result = run_regression(_spec(tmp_path, "broken"), baseline_url=BASELINE)
    assert not result.passed
    assert all(not f.startswith(("no baseline", "nothing rendered")) for f in result.failures), result.failures
