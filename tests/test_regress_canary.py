"""`tokentrim regress` on the canary against the baseline committed in the repo: tonight's engine passes, and
deliberately broken engines fail it (RoPE off by one frame in the cache, perturbed weights). The broken engines are
patched into this process; the regression renders with the local executor. A pruned token still attended changes
nothing the regression's quality measures see on the canary (measured, bench/RESULTS.md); its guard is
`tests/test_causal_wan.py::test_a_cache_that_keeps_pruned_rows_fails_the_masked_reference`."""

from __future__ import annotations

import json
import os
from importlib.resources import files

import pytest
import torch

from jobs.regress import run_regression
from jobs.spec import JobSpec
from pipeline.config import RolloutConfig
from pipeline.model.canary import WEIGHTS_DIR
from pipeline.model.causal_wan import CausalWan
from tokentrim import unstable_set

BASELINE = str(files("jobs") / "data" / "canary_baseline.json")
needs_baseline = pytest.mark.skipif(not (os.path.isfile(BASELINE) and os.path.isfile(
    os.path.join(WEIGHTS_DIR, "card.json"))), reason="no committed canary baseline")


def _spec(tmp_path, name: str) -> JobSpec:
    """The settings the committed baseline was made with (README: "Nightly regression")."""
    with open(BASELINE, encoding="utf-8") as fh:
        settings = json.load(fh)["settings"]
    chunks = settings["render"]["rollout"]["num_chunks"]
    return JobSpec.from_fields(input_url=str(files("jobs") / "data" / "canary_prompts.parquet"),
                               output_url=str(tmp_path / name), model="canary",
                               rollout=RolloutConfig(num_chunks=chunks), limit=len(settings["prompt_ids"]),
                               executor="local")


def _rope_off_by_one(monkeypatch) -> None:
    """The commit pass writes the chunk's keys one frame later than its denoising passes saw them."""
    forward = CausalWan.forward

    def shifted(self, latents, timestep, text, cache, first_frame):
        commit = bool((timestep == 0).all())
        return forward(self, latents, timestep, text, cache, first_frame + 1 if commit else first_frame)

    monkeypatch.setattr(CausalWan, "forward", shifted)


def _perturbed_weights(monkeypatch) -> None:
    """Every transformer weight scaled by 1 + N(0, 0.1^2) after loading."""
    import jobs.executors

    load = jobs.executors.load_model

    def perturbed(*args, **kwargs):
        backend = load(*args, **kwargs)
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
    # the probe is judged by its effect: TokenTrim finds some of its tokens, and the detector reads the chunks after it
    assert set(result.metrics["probe"]) == {"probe_missed", "probe_artefacts", "probe_mass_err", "probe_traj_err"}
    assert result.metrics["probe"]["probe_missed"] < 1.0


@needs_baseline
@pytest.mark.slow
def test_canary_regression_fails_when_tokentrim_no_longer_finds_the_probe(tmp_path, monkeypatch):
    """An unstable set that never holds the probe's tokens (the positions TokenTrim picks moved to the far corner)."""
    import tokentrim.controller

    def corner(drift, p):
        positions, severity = unstable_set(drift, p)
        return torch.zeros_like(positions) + torch.arange(positions.shape[1]), severity

    monkeypatch.setattr(tokentrim.controller, "unstable_set", corner)
    result = run_regression(_spec(tmp_path, "blind"), baseline_url=BASELINE)
    assert any(f.startswith("probe/probe_missed") for f in result.failures), result.failures


@needs_baseline
@pytest.mark.slow
@pytest.mark.parametrize("breakage", [_rope_off_by_one, _perturbed_weights],
                         ids=["rope-off-by-one", "perturbed-weights"])
def test_canary_regression_catches_a_broken_engine(tmp_path, monkeypatch, breakage):
    breakage(monkeypatch)
    result = run_regression(_spec(tmp_path, "broken"), baseline_url=BASELINE)
    assert not result.passed
    assert all(not f.startswith(("no baseline", "nothing rendered")) for f in result.failures), result.failures
