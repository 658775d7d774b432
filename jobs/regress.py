"""Nightly quality regression: a fixed prompt set rendered as three jobs (``tokentrim``, ``no-trim``, ``probe``),
drift metrics compared with a stored baseline, a report, and a failing exit on regression.

A metric's drift over a video is ``mean(last quarter of chunks) - mean(first quarter)``; "baseline" only ever means
the stored figures a run is compared with, never the TokenTrim-off variant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from jobs.layout import JobOutput
from jobs.progress import JobProgress
from jobs.quality import (
    CANARY_METRICS,
    PROBE_CANARY_METRICS,
    canary_measures,
    failed_rows,
    mean_measures,
    ok_ids,
    probe_missed,
    probe_quality,
    probe_records,
    video_frames,
)
from jobs.run import plan, submit
from jobs.spec import JobSpec, OptionError, absolute_url
from pipeline.errors import InputError
from pipeline.hashing import digest as config_hash
from pipeline.rollout.probe import Probe
from pipeline.store import KeyNotFound, Store, split_url

logger = logging.getLogger(__name__)

METRICS = ("latent_dist_first", "hist_dist_first", "luma", "steadiness")
VARIANTS = ("tokentrim", "no-trim")
# the y axis of each curve on the report
METRIC_UNITS = {"latent_dist_first": "latent RMS distance to chunk 0",
                "hist_dist_first": "colour-histogram TV distance to chunk 0 (0-1)", "luma": "mean luma (0-255)",
                "steadiness": "VBench temporal-flickering score (higher = steadier)"}
PROBE_VARIANT = "probe"  # TokenTrim on, a known corruption injected (`pipeline.rollout.probe`)
BASELINE_FORMAT = 4  # 4: the probe judged by its effect (`jobs.quality`), not by `probe_leak`
# absolute slack per metric beyond `tolerance` (relative); others use `run_regression`'s `slack`
SLACKS = {"canary_miss": 0.2, "traj_err": 0.1, "mass_err": 0.05, "background_err": 0.5, "probe_missed": 0.07,
          "probe_artefacts": 0.2, "probe_mass_err": 0.05, "probe_traj_err": 0.1}
# metrics judged both ways, with their own relative tolerance (none today: every metric is a quality or a miss)
TWO_SIDED: dict[str, float] = {}


def default_table(model: str | None = None) -> str:
    """The prompt table a regression renders by default: the canary grammar's for ``canary``, else VBench's."""
    name = "canary_prompts.parquet" if model == "canary" else "vbench_prompts.parquet"
    return str(files("jobs") / "data" / name)


def default_probe(num_chunks: int) -> Probe | None:
    """The regression's probe: the middle chunk's centre tokens, when at least one chunk follows it."""
    chunk = num_chunks // 2
    return Probe(chunk) if 0 < chunk < num_chunks - 1 else None


@dataclass
class Regression:
    """Outcome of one regression run."""

    metrics: dict[str, dict[str, float]]  # variant -> metric -> mean |delta|
    curves: dict[str, dict[str, list[float]]]  # variant -> metric -> mean value per chunk
    failures: list[str] = field(default_factory=list)
    report_url: str = ""
    checks: list[Check] = field(default_factory=list)  # per baseline metric: tonight's value against its limit
    settings: dict[str, Any] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)  # prompt id -> prompt
    variants: tuple[str, ...] = (*VARIANTS, PROBE_VARIANT)
    baseline_url: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures


def drift_delta(values: list[float]) -> float:
    """mean(last quarter) - mean(first quarter) of a per-chunk curve (at least one chunk each)."""
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k - sum(values[:k]) / k


def _stats(out: JobOutput, prompt_id: str) -> dict[str, list[float]]:
    table = out.store.get_table(out.stats_key(prompt_id))
    return {m: [float(v) for v in table.column(m).to_pylist()] for m in METRICS}


def measure(out: JobOutput, results: list[dict[str, Any]]
            ) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """Mean |delta| per metric over the rendered prompts, mean curves, and the prompts that did not render."""
    ok, failed = ok_ids(results), failed_rows(results)
    if not ok:
        failed.append("nothing rendered: no prompt to measure")
    per_prompt = [_stats(out, pid) for pid in ok]
    metrics = {m: sum(abs(drift_delta(s[m])) for s in per_prompt) / max(1, len(per_prompt)) for m in METRICS}
    length = min((len(s[METRICS[0]]) for s in per_prompt), default=0)
    curves = {m: [sum(s[m][i] for s in per_prompt) / len(per_prompt) for i in range(length)] for m in METRICS}
    return metrics, curves, failed


@dataclass(frozen=True)
class Check:
    """One baseline metric judged: tonight's value (None: missing), the allowed range, and why it failed."""

    variant: str
    metric: str
    baseline: float
    now: float | None
    allowed: str  # the limit in words, e.g. "<= 0.11 (10% + 0.0001)"
    failure: str = ""  # empty when it passed

    @property
    def passed(self) -> bool:
        return not self.failure


def _check(variant: str, metric: str, base: float, now: float | None, tolerance: float, allowed: float) -> Check:
    name, upper = f"{variant}/{metric}", base * (1.0 + tolerance) + allowed
    limit = f"<= {upper:.5g} ({tolerance:.0%} + {allowed})"
    within = abs(base) * TWO_SIDED.get(metric, 0.0) + allowed
    if metric in TWO_SIDED:
        limit = f"|change| <= {within:.5g} ({TWO_SIDED[metric]:.0%} + {allowed})" + (
            f" and {limit}" if upper < base + within else "")
    failure = ""
    if now is None:
        failure = f"{name}: missing from this run"
    elif metric in TWO_SIDED and abs(now - base) > within:
        failure = (f"{name}: {now:.5f} differs from baseline {base:.5f} "
                   f"(by more than {TWO_SIDED[metric]:.0%} + {allowed})")
    elif now > upper:
        failure = f"{name}: {now:.5f} > baseline {base:.5f} (tolerance {tolerance:.0%} + {allowed})"
    return Check(variant, metric, base, now, limit, failure)


def checks(current: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]], *, tolerance: float,
           slack: float, slacks: dict[str, float] | None = None) -> list[Check]:
    """Every metric of ``baseline`` judged against ``current``: it regresses above ``base * (1 + tolerance) + slack``
    (``slacks[metric]`` where given); `TWO_SIDED` metrics when they move either way beyond their own tolerance."""
    return [_check(variant, metric, base, current.get(variant, {}).get(metric), tolerance,
                   (slacks or {}).get(metric, slack))
            for variant, metrics in baseline.items() for metric, base in metrics.items()]


def compare(current: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]], *, tolerance: float,
            slack: float, slacks: dict[str, float] | None = None) -> list[str]:
    """The regressions of ``current`` against ``baseline`` (`checks`), each naming variant, metric and both values."""
    return [c.failure for c in checks(current, baseline, tolerance=tolerance, slack=slack, slacks=slacks)
            if not c.passed]


def settings_of(spec: JobSpec, prompt_ids: list[str], probe: Probe | None = None) -> dict[str, Any]:
    """What a baseline is only comparable under: the render settings (model, weights, dtype, rollout incl. chunks,
    TokenTrim), the prompts rendered and the probe."""
    return {"render": spec.render_settings(), "prompt_ids": prompt_ids,
            "probe": probe.to_dict() if probe is not None else None}


def check_baseline(doc: Any, settings: dict[str, Any], where: str) -> list[str]:
    """Why a stored baseline cannot judge this run (empty when it can)."""
    if not isinstance(doc, dict) or doc.get("format") != BASELINE_FORMAT or not isinstance(doc.get("metrics"), dict):
        return [f"{where} is not a baseline of format {BASELINE_FORMAT} (run once with --update-baseline)"]
    if doc.get("config_hash") != config_hash(settings):
        old = doc.get("settings") or {}
        differ = sorted(k for k in {*_flat(old), *_flat(settings)} if _flat(old).get(k) != _flat(settings).get(k))
        return [f"{where} was made under other settings ({', '.join(differ) or 'unknown'} differ): "
                "rerun with the baseline's settings or --update-baseline"]
    return []


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _probe_variant(spec: JobSpec, out: Store, probe: Probe, clean: JobOutput, clean_rows: list[dict[str, Any]],
                   metrics: dict[str, dict[str, float]], progress: JobProgress | None = None) -> list[str]:
    """Render the probe variant (TokenTrim on, `probe` injected); ``metrics["probe"]``: ``probe_missed`` and, on the
    canary, the detector's figures after the probed chunk (`jobs.quality`), decoded after the clean run's chunks."""
    probed = JobOutput(out.child(PROBE_VARIANT))
    vspec = dataclasses.replace(spec, output_url=probed.url, render=dataclasses.replace(spec.render, probe=probe),
                                execution=dataclasses.replace(spec.execution, keep_state=True))
    report = submit(vspec, progress=progress, output=probed)
    clean_by_id = {r["prompt_id"]: r for r in clean_rows if r["status"] == "ok"}
    rows = [r for r in report.results if r["status"] == "ok" and r["prompt_id"] in clean_by_id]
    per_prompt: list[dict[str, float]] = []
    backend = None
    if spec.model.model == "canary" and rows:
        from jobs.executors import load_model

        backend = load_model(spec.model, spec.resolved_device)
    prompts = {row.prompt_id: row.prompt for row in plan(spec)[1]}
    for row in rows:
        records = probe_records(probed, row)
        figures = {"probe_missed": probe_missed(records, probe)}
        if backend is not None:
            clean_records = probe_records(clean, clean_by_id[row["prompt_id"]])
            figures.update(probe_quality(backend, clean_records, records, probe, prompts[row["prompt_id"]],
                                         spec.render.rollout.chunk_frames))
        per_prompt.append(figures)
    names = ("probe_missed", *(PROBE_CANARY_METRICS if backend is not None else ()))
    metrics[PROBE_VARIANT] = (mean_measures(per_prompt, names) if per_prompt
                              else {n: float("inf") for n in names})
    return [f"{PROBE_VARIANT}: {f}" for f in failed_rows(report.results)]


def run_regression(spec: JobSpec, *, baseline_url: str | None = None, tolerance: float = 0.10, slack: float = 1e-4,
                   update_baseline: bool = False, probe_on: bool = True,
                   progress: JobProgress | None = None) -> Regression:
    """Render the spec's first ``limit`` prompts with TokenTrim, without it, and (``probe_on``) with TokenTrim and
    a known corruption (`default_probe`) under ``spec.output_url``; compare with the baseline (refused when made
    under other settings); write ``report.html`` and ``report.md``. On the canary, the videos are also judged by the
    detector (`jobs.quality`)."""
    if not tolerance >= 0 or not slack >= 0:
        raise InputError(f"`tolerance` and `slack` must be >= 0, got {tolerance!r} and {slack!r}")
    if spec.render.trim is None:
        raise InputError("`trim` must be set: the regression renders with and without TokenTrim itself")
    out = Store(absolute_url(spec.output_url), spec.storage_options)  # the variants' jobs record absolute URLs
    base_store, key = ((out, "baseline.json") if baseline_url is None
                       else split_url(baseline_url, spec.storage_options))
    rows, refused = plan(spec)[1:]
    if invalid := [r for r in refused if r["status"] == "invalid"]:  # a regression judges every prompt it names
        raise OptionError(f"the regression's prompt table has invalid rows: {invalid[0]['error']}")
    probe = default_probe(spec.render.rollout.num_chunks) if probe_on else None
    settings = settings_of(spec, [row.prompt_id for row in rows], probe)
    try:
        baseline = None if update_baseline else base_store.get_json(key)
    except KeyNotFound:
        baseline = None
    if baseline is None and not update_baseline:  # refused before hours of rendering, like a mismatch below
        raise InputError(f"no baseline at {base_store.join(key)}: seed it once with --update-baseline under "
                         "tonight's settings (infra/README.md shows how for the nightly)")
    if baseline is not None and (problems := check_baseline(baseline, settings, base_store.join(key))):
        raise InputError(problems[0])  # refused before hours of rendering
    metrics, curves, failures = {}, {}, []
    prompts = {row.prompt_id: row.prompt for row in rows}
    stores, results = {}, {}
    for variant in VARIANTS:
        stores[variant] = JobOutput(out.child(variant))
        keep = spec.execution.keep_state or (variant == "tokentrim" and probe is not None)
        vspec = dataclasses.replace(
            spec, output_url=stores[variant].url,
            render=dataclasses.replace(spec.render, trim=spec.render.trim if variant == "tokentrim" else None),
            execution=dataclasses.replace(spec.execution, keep_state=keep))
        report = submit(vspec, progress=progress, output=stores[variant])
        results[variant] = report.results
        metrics[variant], curves[variant], failed = measure(stores[variant], report.results)
        failures += [f"{variant}: {f}" for f in failed]
        if spec.model.model == "canary":
            per_video = [canary_measures(video_frames(stores[variant].store, JobOutput.video_key(pid)), prompts[pid])
                         for pid in ok_ids(report.results)]
            metrics[variant].update(mean_measures(per_video, CANARY_METRICS))
    if probe is not None:
        failures += _probe_variant(spec, out, probe, stores["tokentrim"], results["tokentrim"], metrics, progress)
    if update_baseline and not failures:
        baseline = {"format": BASELINE_FORMAT, "settings": settings, "config_hash": config_hash(settings),
                    "metrics": metrics}
        base_store.put_json(key, baseline)
    judged: list[Check] = []
    if baseline is None:
        failures.append(f"no baseline at {base_store.join(key)} (run once with --update-baseline)")
    else:
        judged = checks(metrics, baseline["metrics"], tolerance=tolerance, slack=slack, slacks=SLACKS)
        failures += [c.failure for c in judged if not c.passed]
    result = Regression(metrics, curves, failures, checks=judged, settings=settings,
                        prompts=prompts, baseline_url=base_store.join(key))
    result.report_url = write_report(out, result)
    return result


def write_report(out: Store, result: Regression) -> str:
    """``report.html`` (`jobs.report.regression_page`), and ``report.md`` with the metrics table, the verdict and
    one SVG of curves per metric; returns the page's URL."""
    from jobs.plots import curves_chart
    from jobs.report import regression_page

    variants = list(result.metrics)
    names = list(dict.fromkeys(m for v in variants for m in result.metrics[v]))
    lines = ["# tokentrim nightly regression", "", f"**{'PASS' if result.passed else 'REGRESSION'}**", "",
             "Drift metrics: mean |drift| per video; the others: mean per video (higher is worse).", "",
             "| metric | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for metric in names:
        cells = [f"{result.metrics[v][metric]:.5f}" if metric in result.metrics[v] else "" for v in variants]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {f}" for f in result.failures], ""]
    for metric in METRICS:
        curves = {v: result.curves[v][metric] for v in VARIANTS if v in result.curves}
        out.put_bytes(f"plots/{metric}.svg", curves_chart(metric, METRIC_UNITS[metric], curves).encode())
        lines.append(f"![{metric}](plots/{metric}.svg)")
    out.put_bytes("report.md", "\n".join(lines).encode())
    out.put_bytes("metrics.json", json.dumps(result.metrics, sort_keys=True, indent=1).encode())
    return regression_page(out, result)
