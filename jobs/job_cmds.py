"""`tokentrim submit | resume | status | regress`: parse, call one function, print the outcome.

Exit status: 0 when every row that could be rendered was (invalid and excluded rows are reported, not fatal), 1
when a prompt failed or is poison, when nothing could be rendered, or (regress) on a regression; 2 on a user error
(a bad option or argument: an unknown model, a missing table, an output holding another job) and when the Ray
cluster cannot place one worker with the resources asked for (`jobs.resources`), with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import click

from jobs.options import build, options
from jobs.spec import Execution, Executor, JobSpec, ModelChoice, OptionError, RenderSettings
from pipeline.config import RolloutConfig
from pipeline.errors import TokentrimError, UsageError
from pipeline.storage_options import secret_option_names
from tokentrim.config import TrimConfig

F = TypeVar("F", bound=Callable[..., Any])


class UserError(click.ClickException):
    """A user error: one ``Error: ...`` line and exit status 2."""

    exit_code = 2


def click_error(exc: TokentrimError) -> click.ClickException:
    """The CLI's answer to a project error: exit 2 for a usage error, 1 for anything else; one line either way."""
    return UserError(str(exc)) if isinstance(exc, UsageError) else click.ClickException(str(exc))


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` as a dict (a JSON object), or a usage error naming the option. Credentials are refused
    (a command line is seen by every process on the machine and recorded as a Ray job's entrypoint); no error
    repeats the text."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON ({exc.__class__.__name__} at character {getattr(exc, 'pos', '?')})",
                                 param_hint="--storage-options") from None
    if not isinstance(value, dict):
        raise click.BadParameter(f"must be a JSON object, got a {type(value).__name__}",
                                 param_hint="--storage-options")
    secrets = secret_option_names(value)
    if secrets:
        raise click.BadParameter(
            f"holds credentials ({', '.join(secrets)}); a command line is visible to other processes and to Ray: "
            "give them as AWS_* environment variables, a credentials file (AWS_PROFILE) or a workload identity",
            param_hint="--storage-options")
    return value


storage_option = click.option(
    "--storage-options", default=None,
    help='JSON object for fsspec/s3fs without credentials, e.g. \'{"client_kwargs": {"endpoint_url": '
         '"http://minio:9000"}}\'; credentials come from AWS_* variables, a credentials file or a workload identity.')


def model_and_render_options(fn: F) -> F:
    """The model choice's options and the render settings' (the rollout's, TokenTrim's, the seed; ``--no-trim``),
    each built from its config's own fields: `render` and the job commands share them."""
    fn = options(TrimConfig, "trim")(fn)
    fn = options(RolloutConfig, "rollout")(fn)
    fn = options(RenderSettings, "render")(fn)
    fn = options(ModelChoice, "model")(fn)
    return click.option("--no-trim", is_flag=True, help="Baseline: the same rollout without TokenTrim.")(fn)


def render_settings_from(groups: dict[str, Any], *, no_trim: bool) -> RenderSettings:
    """The render settings of a command's options. TokenTrim's token grid is the model's: a preset whose patch is
    not Wan's 1x2x2 (``canary-ctx``) gets its own unless ``--patch-size`` says otherwise."""
    trim = None if no_trim else build(TrimConfig, "trim", groups)
    if trim is not None and trim.patch_size == TrimConfig().patch_size:
        from pipeline.model.backend import preset_patch_size

        patch = preset_patch_size(str(groups.get("model__model")))
        if patch is not None:
            trim = dataclasses.replace(trim, patch_size=patch)
    return build(RenderSettings, "render", groups, rollout=build(RolloutConfig, "rollout", groups), trim=trim)


def job_options(exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """The model choice's, the render settings' and the execution's options (``exclude``: execution fields set by
    the command itself)."""
    def decorate(fn: F) -> F:
        fn = options(Execution, "execution", exclude=exclude)(fn)
        return storage_option(model_and_render_options(fn))

    return decorate


def spec_from(groups: dict[str, Any], *, input_url: str, output_url: str, no_trim: bool,
              storage_options: str | None, **execution: Any) -> JobSpec:
    """The job spec of a command's parsed options (``execution``: fields the command fixes itself)."""
    return JobSpec(input_url, output_url, model=build(ModelChoice, "model", groups),
                   render=render_settings_from(groups, no_trim=no_trim),
                   execution=build(Execution, "execution", groups, **execution),
                   storage_options=parse_storage_options(storage_options))


def require_cluster(spec: JobSpec) -> None:
    """Exit 2 with one line when the Ray cluster cannot place one worker of ``spec`` (`jobs.resources`)."""
    from jobs.resources import ClusterResourceError, check_cluster

    try:
        check_cluster(spec)
    except ClusterResourceError as exc:
        raise UserError(str(exc)) from exc


@contextlib.contextmanager
def job_progress(spec: JobSpec) -> Iterator[Any]:
    """The progress display of a job (`jobs.cli_progress.JobBar`); under Ray on a terminal without ``-v``, Ray's own
    log lines go to a file meanwhile, whose path is printed first."""
    import logging

    from jobs.cli_progress import JobBar, is_tty, native_stderr_diverted

    if spec.execution.executor != "ray" or not is_tty() or logging.getLogger().isEnabledFor(logging.INFO):
        yield JobBar(spec.model.model)
        return
    with native_stderr_diverted() as (path, terminal):
        click.echo(f"Ray's own log lines: {path} (tokentrim -v shows them here)", file=terminal)
        yield JobBar(spec.model.model, terminal)


def _report(report: Any) -> None:
    click.echo(f"results: {report.results_url}")
    click.echo("  " + ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items())) + f" ({report.seconds:.1f} s)")
    for row in report.results:
        if row["status"] in ("failed", "invalid", "poison"):
            click.echo(f"  {row['status']}: row {row['row']} {row['prompt_id']!r}: {row['error']}")
    if not report.succeeded:
        raise SystemExit(1)


@click.command()
@click.argument("table")
@click.option("--out", "out_url", required=True, help="Job output URL (file://, s3://, ...).")
@click.option("--force", is_flag=True, help="Re-render an output written under other settings.")
@job_options()
def submit(table: str, out_url: str, force: bool, no_trim: bool, storage_options: str | None,
           **groups: Any) -> None:
    """Render every prompt of a Parquet TABLE (prompt_id, prompt[, seed, num_chunks]).

    With --executor ray (default) it connects to RAY_ADDRESS when set, else starts a local Ray; --executor local
    renders in this process. Rerunning skips finished prompts and continues unfinished rollouts from their last
    committed chunk.

    \b
    Examples:
      tokentrim submit prompts.parquet --out s3://bucket/job1 --model /models/wan --weights sf.pt \\
          --workers 8 --gpus-per-worker 1 --dtype bfloat16
      tokentrim submit jobs/data/vbench_prompts.parquet --out out/job --model tiny --num-chunks 3 --limit 4
    """
    from jobs.run import submit as run_submit

    spec = spec_from(groups, input_url=table, output_url=out_url, no_trim=no_trim, storage_options=storage_options)
    require_cluster(spec)
    try:
        with job_progress(spec) as bar:
            report = run_submit(spec, force=force, progress=bar)
        _report(report)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    except TokentrimError as exc:
        raise click_error(exc) from exc


@click.command()
@click.argument("out_url")
@click.option("--workers", type=int, default=None, help="Override the recorded number of workers.")
@click.option("--executor", type=click.Choice(["ray", "local"]), default=None, help="Override the recorded one.")
@storage_option
def resume(out_url: str, workers: int | None, executor: str | None, storage_options: str | None) -> None:
    """Run the job recorded in OUT_URL/job.json again, writing under OUT_URL (wherever the job was first written):
    finished prompts are skipped, the rest continue."""
    from jobs.layout import JobOutput
    from jobs.run import load_spec
    from jobs.run import submit as run_submit
    from jobs.spec import absolute_url

    try:  # absolute, as the spec's URLs: the results name every output by it
        out = JobOutput.open(absolute_url(out_url), parse_storage_options(storage_options))
        spec = load_spec(out)
    except TokentrimError as exc:
        raise click_error(exc) from exc
    except ValueError as exc:  # a job.json whose spec does not validate
        raise click.ClickException(f"job.json under {out_url!r}: {exc}") from exc
    try:
        if workers is not None:
            spec = dataclasses.replace(spec, execution=dataclasses.replace(spec.execution, workers=workers))
        if executor is not None:
            spec = dataclasses.replace(spec, execution=dataclasses.replace(spec.execution,
                                                                           executor=cast(Executor, executor)))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--workers") from exc
    try:
        require_cluster(spec)
        with job_progress(spec) as bar:
            report = run_submit(spec, progress=bar, output=out)
        _report(report)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    except TokentrimError as exc:
        raise click_error(exc) from exc


@click.command()
@click.argument("out_url")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for scripts).")
@storage_option
def status(out_url: str, as_json: bool, storage_options: str | None) -> None:
    """Progress of the job under OUT_URL: rows by status, live and stale leases with their chunk, last results,
    stored bytes, an ETA."""
    from jobs.layout import JobOutput
    from jobs.run import status as job_status

    try:
        report = job_status(JobOutput.open(out_url, parse_storage_options(storage_options)))
    except TokentrimError as exc:
        raise click_error(exc) from exc
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else status_text(report))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(abs(seconds) + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def status_text(report: dict[str, Any]) -> str:
    """`status` for people: rows, leases (live and stale), last results, stored bytes, ETA."""
    rows = report["rows"]
    lines = [f"job     {report['output']}  (config {report['config_hash']})",
             "rows    " + ("  ".join(f"{k} {v}" for k, v in rows.items()) if "error" not in rows else rows["error"])]
    results = report.get("results")
    lines.append("results " + ("  ".join(f"{k} {v}" for k, v in sorted(results.items())) if results
                               else "none yet (written when a run ends)"))
    leases = report.get("leases") or []
    lines.append(f"leases  {sum(x['state'] == 'live' for x in leases)} live, "
                 f"{sum(x['state'] == 'stale' for x in leases)} stale")
    if leases:
        lines.append(f"  {'prompt':24} {'attempt':>7} {'state':6} {'chunk':>9} {'age':>9}  lease")
        for x in leases:
            chunk = f"{x['chunk']}/{x['num_chunks'] if x['num_chunks'] is not None else '?'}"
            lease = (f"ends in {_span(x['expires_in_s'])}" if x["state"] == "live"
                     else f"STALE: ran out {_span(x['expires_in_s'])} ago")
            lines.append(f"  {x['prompt_id'][:24]:24} {x['attempt']:>7} {x['state']:6} {chunk:>9} "
                         f"{_span(x['age_s']):>9}  {lease}")
    stored = report["stored_bytes"]
    lines.append("stored  " + "  ".join(f"{k} {_size(v)}" for k, v in sorted(stored.items()) if k != "total")
                 + f"  (total {_size(stored['total'])})")
    eta = report.get("eta_s")
    lines.append("ETA     " + ("done" if eta == 0 else _span(eta) + " (mean time of finished prompts x remaining "
                               "/ workers)" if eta is not None else "unknown (no finished prompt yet)"))
    return "\n".join(lines)


@click.command()
@click.option("--out", "out_url", required=True, help="Where tonight's renders, report.md and plots go.")
@click.option("--baseline", "baseline_url", default=None, help="Baseline JSON (default: OUT/baseline.json).")
@click.option("--prompts", type=click.IntRange(min=1), default=8, show_default=True,
              help="First N prompts of the fixed set.")
@click.option("--table", default=None, help="Prompt table (default: the canary grammar's for --model canary, else the "
              "shipped VBench set).")
@click.option("--no-probe", is_flag=True, help="Skip the probe variant (a known corruption TokenTrim must contain).")
@click.option("--tolerance", type=click.FloatRange(min=0.0), default=0.10, show_default=True,
              help="Relative growth allowed.")
@click.option("--update-baseline", is_flag=True, help="Store this run's metrics and settings as the baseline.")
@job_options(exclude=("limit",))
def regress(out_url: str, baseline_url: str | None, prompts: int, table: str | None, no_probe: bool, tolerance: float,
            update_baseline: bool, no_trim: bool, storage_options: str | None, **groups: Any) -> None:
    """Nightly regression: the fixed prompt set with and without TokenTrim (and with a known corruption injected),
    drift and, on the canary, what the detector sees, vs a baseline.

    Exits 1 when a metric grew beyond the tolerance, a prompt failed, nothing rendered, or the baseline was
    made under other settings. Takes the job options of `submit` (model, weights, dtype, GPUs, mode, ...).

    \b
    Example:
      tokentrim regress --out s3://bucket/nightly/2026-11-26 --baseline s3://bucket/nightly/baseline.json \\
          --model /models/wan --weights /models/sf.pt --dtype bfloat16 --gpus-per-worker 1 --workers 4
    """
    from jobs.regress import default_table, run_regression

    if no_trim:
        raise click.BadParameter("regress renders both variants itself", param_hint="--no-trim")
    spec = spec_from(groups, input_url=table or default_table(groups.get("model__model")), output_url=out_url,
                     no_trim=False, storage_options=storage_options, limit=prompts)
    require_cluster(spec)
    try:
        with job_progress(spec) as bar:
            result = run_regression(spec, baseline_url=baseline_url, tolerance=tolerance,
                                    update_baseline=update_baseline, probe_on=not no_probe, progress=bar)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    except TokentrimError as exc:
        raise click_error(exc) from exc
    click.echo(f"report: {result.report_url}")
    for variant, metrics in result.metrics.items():
        click.echo(f"  {variant}: " + ", ".join(f"{k} {v:.5f}" for k, v in metrics.items()))
    if not result.passed:
        for failure in result.failures:
            click.echo(f"  REGRESSION {failure}", err=True)
        raise SystemExit(1)
    click.echo("  PASS")
