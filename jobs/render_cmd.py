"""`tokentrim render`: one prompt, one process, a progress bar."""

from __future__ import annotations

from typing import Any

import click

from jobs.job_cmds import UserError
from jobs.options import build, options
from jobs.spec import JobSpec, OptionError, absolute_url, check_device, check_prompt
from pipeline.config import RolloutConfig
from pipeline.errors import TokentrimError
from tokentrim.config import TrimConfig

_NOT_RENDER = ("input_url", "output_url", "rollout", "trim", "storage_options", "workers", "gpus_per_worker",
               "max_attempts", "lease_s", "seed", "limit", "keep_state", "executor")


@click.command()
@click.argument("prompt")
@click.option("--out", "out_url", required=True, help="Output folder or URL (file://, s3://, memory://).")
@click.option("--seed", type=int, default=0, show_default=True, help="The rollout's seed.")
@click.option("--id", "prompt_id", default=None, help="Output name (default: derived from the prompt).")
@click.option("--state", "state_url", default=None, help="Commit the latent context here; resume when present.")
@click.option("--restart", is_flag=True, help="With --state: discard state written under another config.")
@click.option("--no-trim", is_flag=True, help="Baseline: the same rollout without TokenTrim.")
@click.option("--storage-options", default=None, help="JSON object for fsspec/s3fs (e.g. an endpoint; no credentials: "
              "those come from AWS_* variables, a credentials file or a workload identity).")
@options(JobSpec, "job", exclude=_NOT_RENDER)
@options(RolloutConfig, "rollout")
@options(TrimConfig, "trim")
def render(prompt: str, out_url: str, seed: int, prompt_id: str | None, state_url: str | None, restart: bool,
           no_trim: bool, storage_options: str | None, **groups: Any) -> None:
    """Render one PROMPT to <id>.mp4 and <id>.stats.parquet under --out (no cluster).

    \b
    Example:
      tokentrim render "a red panda in the snow" --model tiny --num-chunks 8 --out out/demo
    """
    from jobs.cli import slug
    from jobs.job_cmds import parse_storage_options

    # the model settings are the job spec's own fields; the rest of a spec does not apply to one render
    spec = build(JobSpec, "job", groups, input_url="-", output_url=out_url, rollout=build(RolloutConfig, "rollout",
                 groups), trim=None if no_trim else build(TrimConfig, "trim", groups),
                 storage_options=parse_storage_options(storage_options))
    run_render(spec, prompt, prompt_id or slug(prompt), seed=seed, state_url=state_url, restart=restart)


def run_render(spec: JobSpec, prompt: str, prompt_id: str, *, seed: int, state_url: str | None,
               restart: bool) -> None:
    import torch

    from jobs.cli_progress import RenderBar, say
    from pipeline.model.backend import load_backend
    from pipeline.outputs.render import render as render_prompts
    from pipeline.store import Store

    out = Store(spec.output_url, spec.storage_options)  # a refused URL fails before the model loads
    state = Store(absolute_url(state_url), spec.storage_options) if state_url else None
    config = spec.rollout
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # before the model loads: a wrong device or prompt is one line, at once
        check_device(device)
        if (refused := check_prompt(spec, prompt)) is not None:
            raise OptionError(refused)
    except OptionError as exc:
        raise UserError(str(exc)) from exc
    say(f"loading model {spec.model} on {device} ...")
    try:
        backend = load_backend(spec.model, device=device, dtype=getattr(torch, spec.dtype), weights=spec.weights,
                               seed=0, compile=spec.compile)
    except (ValueError, TokentrimError) as exc:
        raise click.UsageError(str(exc)) from exc
    bar = RenderBar(prompt_id, config.num_chunks)
    try:
        results = render_prompts(backend, [prompt], [prompt_id], out, config=config, trim=spec.trim, seeds=[seed],
                                 state=state, force_restart=restart, on_chunk=bar.on_chunk)
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
               f"{verdicts.count('pruned')}; seed {seed}; config hash {result.config_hash}")
