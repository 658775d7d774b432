"""The `tokentrim` command line. Commands stay thin: parse options, call one function."""

from __future__ import annotations

import logging
import re
import sys

import click

from pipeline.config import MODES

TRIM_OPTIONS = [
    click.option("--no-trim", is_flag=True, help="Baseline: the same rollout without TokenTrim."),
    click.option("--p", "trim_p", type=float, default=None, help="Fraction of tokens in the unstable set (0.1)."),
    click.option("--lam", "trim_lam", type=float, default=None, help="Threshold width in sigmas (2.0)."),
    click.option("--warmup", "trim_warmup", type=int, default=None, help="Chunks that only feed statistics (2)."),
    click.option("--max-retries", "trim_retries", type=int, default=None, help="Regenerations per chunk (1)."),
    click.option("--prune-scope", "trim_scope", type=click.Choice(["last", "window"]), default=None,
                 help="Prune the previous chunk's frames (last) or every cached frame (window)."),
]


MODEL_OPTIONS = [
    click.option("--model", default="tiny", show_default=True,
                 help="'tiny', 'wan2.1-1.3b' (random weights) or a diffusers Wan2.1 folder."),
    click.option("--weights", default=None, help="Causal generator checkpoint (Self/Rolling Forcing or Wan keys)."),
    click.option("--mode", type=click.Choice(MODES), default="self-forcing", show_default=True),
    click.option("--window", "window_frames", type=int, default=None, help="Local attention window, latent frames."),
    click.option("--sink", "sink_frames", type=int, default=None, help="Sink frames kept forever."),
    click.option("--sink-rope", type=click.Choice(["absolute", "adjacent"]), default=None,
                 help="Sink at frame 0, or re-rotated next to the window (default: adjacent for rolling-forcing)."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32"),
]


def _apply(options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


trim_options = _apply(TRIM_OPTIONS)
model_options = _apply(MODEL_OPTIONS)


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """tokentrim: long AR video rendering with TokenTrim drift pruning.

    \b
    Examples:
      tokentrim render "a cat surfing a wave" --model tiny --chunks 8 --out out/
      tokentrim render "a cat surfing a wave" --model tiny --out s3://bucket/videos --state s3://bucket/state/cat
      tokentrim demo --chunks 12 --corrupt-at 6
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("prompt")
@click.option("--out", "out_url", required=True, help="Output folder or URL (file://, s3://, memory://).")
@model_options
@click.option("--chunks", type=int, default=7, show_default=True, help="AR chunks (3 latent frames each).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--id", "prompt_id", default=None, help="Output name (default: derived from the prompt).")
@click.option("--height", type=int, default=None, help="Output height in pixels (default: the model's).")
@click.option("--width", type=int, default=None, help="Output width in pixels (default: the model's).")
@click.option("--state", "state_url", default=None, help="Commit the latent context here; resume when present.")
@click.option("--restart", is_flag=True, help="With --state: discard state written under another config.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N; auto: cuda when available.")
@trim_options
def render(prompt: str, out_url: str, model: str, weights: str | None, mode: str, chunks: int, seed: int,
           prompt_id: str | None, window_frames: int | None, sink_frames: int | None, sink_rope: str | None,
           height: int | None,
           width: int | None, state_url: str | None, restart: bool, device: str, dtype: str, **trim: object) -> None:
    """Render one PROMPT to <id>.mp4 and <id>.stats.parquet under --out (no cluster).

    \b
    Example:
      tokentrim render "a red panda in the snow" --model tiny --chunks 8 --out out/demo
    """
    from jobs.render_cmd import run_render

    run_render(prompt=prompt, out_url=out_url, model=model, weights=weights, mode=mode, chunks=chunks, seed=seed,
               prompt_id=prompt_id or slug(prompt), window_frames=window_frames, sink_frames=sink_frames,
               sink_rope=sink_rope, height=height, width=width, state_url=state_url, restart=restart, device=device,
               dtype=dtype, trim_args=trim)


@main.command()
@click.argument("table")
@click.option("--out", "out_url", required=True, help="Job output URL (file://, s3://, ...).")
@model_options
@click.option("--chunks", type=int, default=7, show_default=True, help="Chunks for rows without num_chunks.")
@click.option("--workers", type=int, default=1, show_default=True, help="Actors, each holding one model.")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True)
@click.option("--max-attempts", type=int, default=3, show_default=True, help="Claims per prompt before poison.")
@click.option("--limit", type=int, default=None, help="Render only the first N valid rows.")
@click.option("--force", is_flag=True, help="Re-render an output written under other settings.")
@trim_options
def submit(table: str, out_url: str, model: str, weights: str | None, mode: str, chunks: int,
           window_frames: int | None, sink_frames: int | None, sink_rope: str | None, workers: int,
           gpus_per_worker: float, dtype: str,
           max_attempts: int, limit: int | None, force: bool, **trim: object) -> None:
    """Render every prompt of a Parquet TABLE (prompt_id, prompt[, seed, num_chunks]) on Ray.

    Connects to RAY_ADDRESS when set, else starts a local Ray. Rerunning skips finished prompts and continues
    unfinished rollouts from their last committed chunk.

    \b
    Examples:
      tokentrim submit prompts.parquet --out s3://bucket/job1 --model /models/wan --weights sf.pt \\
          --workers 8 --gpus-per-worker 1 --dtype bfloat16
      tokentrim submit ../shared/data/vbench_prompts.parquet --out out/job --model tiny --chunks 3 --limit 4
    """
    from jobs.job_cmds import run_submit

    run_submit(table=table, out_url=out_url, model=model, weights=weights, mode=mode, chunks=chunks,
               window_frames=window_frames, sink_frames=sink_frames, sink_rope=sink_rope, workers=workers,
               gpus_per_worker=gpus_per_worker, dtype=dtype, max_attempts=max_attempts, limit=limit, force=force,
               trim_args=trim)


@main.command()
@click.argument("out_url")
@click.option("--workers", type=int, default=None, help="Override the recorded number of actors.")
def resume(out_url: str, workers: int | None) -> None:
    """Run the job recorded in OUT_URL/job.json again: finished prompts are skipped, the rest continue."""
    from jobs.job_cmds import run_resume

    run_resume(out_url, workers)


@main.command()
@click.argument("out_url")
def status(out_url: str) -> None:
    """Progress of the job under OUT_URL: finished and claimed prompts, last results by status."""
    from jobs.job_cmds import run_status

    run_status(out_url)


@main.command()
@click.option("--out", "out_url", required=True, help="Where tonight's renders, report.md and plots go.")
@click.option("--baseline", "baseline_url", default=None, help="Baseline metrics JSON (default: OUT/baseline.json).")
@click.option("--model", default="tiny", show_default=True)
@click.option("--prompts", type=int, default=8, show_default=True, help="First N prompts of the fixed set.")
@click.option("--chunks", type=int, default=8, show_default=True)
@click.option("--table", default=None, help="Prompt table (default: the shipped VBench set).")
@click.option("--tolerance", type=float, default=0.10, show_default=True, help="Relative growth allowed.")
@click.option("--update-baseline", is_flag=True, help="Store this run's metrics as the baseline.")
@click.option("--workers", type=int, default=1, show_default=True)
def regress(out_url: str, baseline_url: str | None, model: str, prompts: int, chunks: int, table: str | None,
            tolerance: float, update_baseline: bool, workers: int) -> None:
    """Nightly regression: the fixed prompt set with and without TokenTrim, drift vs a baseline.

    Exits 1 when a drift metric grew beyond the tolerance or a prompt failed.

    \b
    Example:
      tokentrim regress --out s3://bucket/nightly/2026-11-26 --baseline s3://bucket/nightly/baseline.json
    """
    from jobs.job_cmds import run_regress

    run_regress(out_url=out_url, baseline_url=baseline_url, model=model, prompts=prompts, chunks=chunks,
                table=table, tolerance=tolerance, update_baseline=update_baseline, workers=workers)


@main.command()
@click.option("--chunks", type=int, default=12, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--corrupt-at", type=int, multiple=True, default=(6,), show_default=True)
def demo(chunks: int, seed: int, corrupt_at: tuple[int, ...]) -> None:
    """TokenTrim alone on synthetic latents with injected corruption: a per-chunk table."""
    from tokentrim.demo import main as demo_main

    argv = ["--chunks", str(chunks), "--seed", str(seed)]
    for k in corrupt_at:
        argv += ["--corrupt-at", str(k)]
    sys.exit(demo_main(argv))


def slug(prompt: str) -> str:
    """A file-safe id from a prompt: lowercase words joined by '-', at most 60 characters."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:60].rstrip("-") or "prompt"


if __name__ == "__main__":
    main()
