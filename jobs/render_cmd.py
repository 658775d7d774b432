"""`tokentrim render`: one prompt, one process, a progress bar."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from jobs.job_cmds import UserError, model_and_render_options, render_settings_from
from jobs.options import build
from jobs.spec import ModelChoice, OptionError, RenderSettings, absolute_url, check_device, check_prompt
from pipeline.errors import TokentrimError

if TYPE_CHECKING:
    from pipeline.store import Store


@click.command()
@click.argument("prompt")
@click.option("--out", "out_url", required=True, help="Output folder or URL (file://, s3://, memory://).")
@click.option("--id", "prompt_id", default=None, help="Output name (default: derived from the prompt).")
@click.option("--state", "state_url", default=None, help="Commit the latent context here; resume when present.")
@click.option("--restart", is_flag=True, help="With --state: discard state written under another config.")
@click.option("--storage-options", default=None, help="JSON object for fsspec/s3fs (e.g. an endpoint; no credentials: "
              "those come from AWS_* variables, a credentials file or a workload identity).")
@model_and_render_options
def render(prompt: str, out_url: str, prompt_id: str | None, state_url: str | None, restart: bool,
           no_trim: bool, storage_options: str | None, **groups: Any) -> None:
    """Render one PROMPT to <id>.mp4 and <id>.stats.parquet under --out (no cluster).

    \b
    Example:
      tokentrim render "a red panda in the snow" --model tiny --num-chunks 8 --out out/demo
    """
    from jobs.cli import slug
    from jobs.job_cmds import parse_storage_options
    from pipeline.store import Store

    options = parse_storage_options(storage_options)
    out = Store(out_url, options)  # a refused URL fails here, before the model loads
    state = Store(absolute_url(state_url), options) if state_url else None
    run_render(build(ModelChoice, "model", groups), render_settings_from(groups, no_trim=no_trim), prompt,
               prompt_id or slug(prompt), out=out, state=state, restart=restart)


def run_render(model: ModelChoice, settings: RenderSettings, prompt: str, prompt_id: str, *, out: Store,
               state: Store | None, restart: bool) -> None:
    """Render ``prompt`` to ``out`` (checkpointing to ``state``), with a progress bar; one line per user error."""
    from jobs.cli_progress import RenderBar, say
    from jobs.executors import load_model
    from pipeline.outputs.render import render_prompts

    device = model.resolve_device(None)
    try:  # before the model loads: a wrong device or prompt is one line, at once
        check_device(device)
        if (refused := check_prompt(model, prompt)) is not None:
            raise OptionError(refused)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    say(f"loading model {model.model} on {device} ...")
    try:
        backend = load_model(model, device)
    except (ValueError, TokentrimError) as exc:
        raise click.UsageError(str(exc)) from exc
    config = settings.rollout
    bar = RenderBar(prompt_id, config.num_chunks)
    try:
        results = render_prompts(backend, [prompt], [prompt_id], out, config=config, trim=settings.trim,
                                 seeds=[settings.seed], state=state, force_restart=restart, video=settings.video,
                                 probe=settings.probe, on_chunk=bar.on_chunk)
    except TokentrimError as exc:
        from jobs.job_cmds import click_error

        raise click_error(exc) from exc
    finally:
        bar.close()
    result = results[0]
    verdicts = [r["verdict"] for r in result.rows]
    click.echo(f"video: {result.video_url}")
    click.echo(f"stats: {result.stats_url}")
    click.echo(f"chunks: {len(result.rows)} (resumed after {result.resumed_from}); pruned: "
               f"{verdicts.count('pruned')}; seed {settings.seed}; config hash {result.config_hash}")
