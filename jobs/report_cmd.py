"""`tokentrim report URL`: write the job's ``report.html`` (`jobs.report`) and print where it is."""

from __future__ import annotations

import click

from jobs.job_cmds import parse_storage_options, storage_option
from pipeline.errors import TokentrimError


@click.command()
@click.argument("out_url")
@storage_option
def report(out_url: str, storage_options: str | None) -> None:
    """Write OUT_URL/report.html: one static page with every prompt's video, TokenTrim's severity and threshold per
    chunk, the drift figures (sortable, filterable) and the rows that failed, with their errors.

    The page makes no network request (charts and script inline, videos linked relative to it): open it from the
    job folder in a browser, or copy the folder anywhere (from S3: `aws s3 sync s3://bucket/job1 job1`).

    \b
    Example:
      tokentrim report out/job && xdg-open out/job/report.html
    """
    from jobs.layout import JobOutput
    from jobs.report import job_report

    try:
        click.echo(f"report: {job_report(JobOutput.open(out_url, parse_storage_options(storage_options)))}")
    except TokentrimError as exc:
        raise click.ClickException(str(exc)) from exc
