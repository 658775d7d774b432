"""`tokentrim submit | resume | status`: parse, call one function, print the outcome."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, cast

import click

from jobs.render_cmd import trim_config
from jobs.run import load_spec, status, submit
from jobs.spec import JobSpec
from pipeline.config import Mode, RolloutConfig, SinkRope
from pipeline.errors import TokentrimError


def _report(report) -> None:
    click.echo(f"results: {report.results_url}")
    click.echo("  " + ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items())) + f" ({report.seconds:.1f} s)")
    for row in report.results:
        if row["status"] in ("failed", "invalid", "poison", "busy"):
            click.echo(f"  {row['status']}: row {row['row']} {row['prompt_id']!r}: {row['error']}")


def run_submit(*, table: str, out_url: str, model: str, weights: str | None, mode: str, chunks: int,
               window_frames: int | None, sink_frames: int | None, sink_rope: str | None, workers: int,
               gpus_per_worker: float,
               dtype: str, max_attempts: int, limit: int | None, force: bool, trim_args: dict[str, Any]) -> None:
    try:
        rollout = RolloutConfig(mode=cast(Mode, mode), num_chunks=chunks, window_frames=window_frames,
                                sink_frames=sink_frames, sink_rope=cast(SinkRope | None, sink_rope))
        spec = JobSpec(input_url=table, output_url=out_url, model=model, weights=weights, rollout=rollout,
                       trim=trim_config(trim_args), dtype=dtype, workers=workers, gpus_per_worker=gpus_per_worker,
                       max_attempts=max_attempts)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        _report(submit(spec, force=force, limit=limit))
    except TokentrimError as exc:
        raise click.ClickException(str(exc)) from exc


def run_resume(out_url: str, workers: int | None) -> None:
    try:
        spec = load_spec(out_url)
        if workers is not None:
            spec = dataclasses.replace(spec, workers=workers)
        _report(submit(spec))
    except TokentrimError as exc:
        raise click.ClickException(str(exc)) from exc


def run_status(out_url: str) -> None:
    try:
        click.echo(json.dumps(status(out_url), indent=2, sort_keys=True))
    except TokentrimError as exc:
        raise click.ClickException(str(exc)) from exc


def run_regress(*, out_url: str, baseline_url: str | None, model: str, prompts: int, chunks: int,
                table: str | None, tolerance: float, update_baseline: bool, workers: int) -> None:
    from jobs.regress import run_regression

    try:
        result = run_regression(out_url, baseline_url=baseline_url, model=model, prompts=prompts, chunks=chunks,
                                table=table, tolerance=tolerance, update_baseline=update_baseline, workers=workers)
    except TokentrimError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"report: {result.report_url}")
    for variant, metrics in result.metrics.items():
        click.echo(f"  {variant}: " + ", ".join(f"{k} {v:.5f}" for k, v in metrics.items()))
    if not result.passed:
        for failure in result.failures:
            click.echo(f"  REGRESSION {failure}", err=True)
        raise SystemExit(1)
    click.echo("  PASS")
