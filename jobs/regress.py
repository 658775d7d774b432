"""Nightly quality regression: a fixed prompt set rendered with and without TokenTrim, drift metrics per video
compared with a stored baseline, a markdown report with SVG curves, and a failing exit on regression.

Drift of a metric over a video: ``delta = mean(last quarter of chunks) - mean(first quarter)``. The metrics are
model-free (REFERENCE: drift proxies): latent distance to the first chunk, colour-histogram distance to the first
chunk, luma, and VBench's flicker score. A run regresses when a variant's mean |delta| of a metric grows beyond
``tolerance`` (relative) + ``slack`` (absolute) over the baseline, or when any prompt fails to render.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from jobs.run import submit
from jobs.spec import JobSpec
from pipeline.config import RolloutConfig
from pipeline.store import KeyNotFound, Store
from tokentrim import TrimConfig

logger = logging.getLogger(__name__)

METRICS = ("latent_dist_first", "hist_dist_first", "luma", "flicker")
VARIANTS = ("tokentrim", "baseline")


def default_table() -> str:
    return str(files("jobs") / "data" / "vbench_prompts.parquet")


@dataclass
class Regression:
    """Outcome of one regression run."""

    metrics: dict[str, dict[str, float]]  # variant -> metric -> mean |delta|
    curves: dict[str, dict[str, list[float]]]  # variant -> metric -> mean value per chunk
    failures: list[str] = field(default_factory=list)
    report_url: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures


def drift_delta(values: list[float]) -> float:
    """mean(last quarter) - mean(first quarter) of a per-chunk curve (at least one chunk each)."""
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k - sum(values[:k]) / k


def _stats(out: Store, prompt_id: str) -> dict[str, list[float]]:

    table = out.get_table(f"stats/{prompt_id}.parquet")
    return {m: [float(v) for v in table.column(m).to_pylist()] for m in METRICS}


def measure(out_url: str, results: list[dict[str, Any]], storage_options: dict | None = None
            ) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """Mean |delta| per metric over the rendered prompts, mean curves, and the prompts that did not render."""
    out = Store(out_url, storage_options)
    ok = [r["prompt_id"] for r in results if r["status"] in ("ok", "skipped")]
    failed = [f"{r['prompt_id']}: {r['status']} {r['error'] or ''}".strip() for r in results
              if r["status"] not in ("ok", "skipped")]
    per_prompt = [_stats(out, pid) for pid in ok]
    metrics = {m: sum(abs(drift_delta(s[m])) for s in per_prompt) / max(1, len(per_prompt)) for m in METRICS}
    length = min((len(s[METRICS[0]]) for s in per_prompt), default=0)
    curves = {m: [sum(s[m][i] for s in per_prompt) / len(per_prompt) for i in range(length)] for m in METRICS}
    return metrics, curves, failed


def compare(current: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]], *, tolerance: float,
            slack: float) -> list[str]:
    """The regressions of ``current`` against ``baseline``, each naming variant, metric and both values."""
    failures = []
    for variant, metrics in baseline.items():
        for metric, base in metrics.items():
            now = current.get(variant, {}).get(metric)
            if now is None:
                failures.append(f"{variant}/{metric}: missing from this run")
            elif now > base * (1.0 + tolerance) + slack:
                failures.append(f"{variant}/{metric}: drift {now:.5f} > baseline {base:.5f} "
                                f"(tolerance {tolerance:.0%} + {slack})")
    return failures


def run_regression(out_url: str, *, baseline_url: str | None = None, model: str = "tiny", prompts: int = 8,
                   chunks: int = 8, table: str | None = None, tolerance: float = 0.10, slack: float = 1e-4,
                   update_baseline: bool = False, workers: int = 1, storage_options: dict | None = None
                   ) -> Regression:
    """Render the fixed set twice (TokenTrim on / off) under ``out_url``, compare, write ``report.md``."""
    metrics, curves, failures = {}, {}, []
    for variant in VARIANTS:
        spec = JobSpec(input_url=table or default_table(), output_url=f"{out_url.rstrip('/')}/{variant}",
                       model=model, rollout=RolloutConfig(num_chunks=chunks),
                       trim=TrimConfig() if variant == "tokentrim" else None, workers=workers,
                       storage_options=storage_options or {})
        report = submit(spec, limit=prompts)
        metrics[variant], curves[variant], failed = measure(spec.output_url, report.results, storage_options)
        failures += [f"{variant}: {f}" for f in failed]
    out = Store(out_url, storage_options)
    base_store, key = _baseline_location(out, baseline_url, storage_options)
    if update_baseline:
        base_store.put_json(key, metrics)
    try:
        baseline = base_store.get_json(key)
        failures += compare(metrics, baseline, tolerance=tolerance, slack=slack)
    except KeyNotFound:
        failures.append(f"no baseline at {base_store.join(key)} (run once with --update-baseline)")
    result = Regression(metrics, curves, failures)
    result.report_url = write_report(out, result)
    return result


def _baseline_location(out: Store, baseline_url: str | None, storage_options: dict | None) -> tuple[Store, str]:
    if baseline_url is None:
        return out, "baseline.json"
    root, _, key = baseline_url.rpartition("/")
    return Store(root or ".", storage_options), key


def write_report(out: Store, result: Regression) -> str:
    """``report.md`` with the metrics table, the verdict and one SVG of curves per metric."""
    lines = ["# tokentrim nightly regression", "", f"**{'PASS' if result.passed else 'REGRESSION'}**", "",
             "| metric (mean abs drift) | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for metric in METRICS:
        lines.append(f"| {metric} | " + " | ".join(f"{result.metrics[v][metric]:.5f}" for v in VARIANTS) + " |")
    lines += ["", *[f"- {f}" for f in result.failures], ""]
    for metric in METRICS:
        out.put_bytes(f"plots/{metric}.svg", svg_curves(metric, {v: result.curves[v][metric] for v in VARIANTS}))
        lines.append(f"![{metric}](plots/{metric}.svg)")
    out.put_bytes("report.md", "\n".join(lines).encode())
    out.put_bytes("metrics.json", json.dumps(result.metrics, sort_keys=True, indent=1).encode())
    return out.join("report.md")


def svg_curves(title: str, curves: dict[str, list[float]], width: int = 480, height: int = 240) -> bytes:
    """A small line chart (one polyline per curve, x = chunk) as SVG bytes; no plotting library needed."""
    values = [v for c in curves.values() for v in c] or [0.0]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    colours = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             f'<text x="8" y="16" font-size="13">{title} per chunk ({low:.4g} .. {high:.4g})</text>']
    for i, (name, curve) in enumerate(curves.items()):
        step = (width - 20) / max(1, len(curve) - 1)
        points = " ".join(f"{10 + j * step:.1f},{height - 10 - (v - low) / span * (height - 40):.1f}"
                          for j, v in enumerate(curve))
        colour = colours[i % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{width - 120}" y="{20 + 14 * (i + 1)}" font-size="12" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts).encode()
