"""`tokentrim render`: one prompt, one process, a progress bar."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import click
import torch

from pipeline.backend import load_backend
from pipeline.config import Mode, RolloutConfig, SinkRope
from pipeline.errors import TokentrimError
from pipeline.render import render
from tokentrim import TrimConfig

_TRIM_FIELDS = {"trim_p": "p", "trim_lam": "lam", "trim_warmup": "warmup", "trim_retries": "max_retries",
                "trim_scope": "prune_scope"}


def trim_config(args: dict[str, Any]) -> TrimConfig | None:
    """The TrimConfig from CLI options (None with --no-trim)."""
    if args.get("no_trim"):
        return None
    given = {_TRIM_FIELDS[k]: v for k, v in args.items() if k in _TRIM_FIELDS and v is not None}
    return dataclasses.replace(TrimConfig(), **given)


def run_render(*, prompt: str, out_url: str, model: str, weights: str | None, mode: str, chunks: int, seed: int,
               prompt_id: str, window_frames: int | None, sink_frames: int | None, sink_rope: str | None,
               height: int | None,
               width: int | None, state_url: str | None, restart: bool, device: str, dtype: str,
               trim_args: dict[str, Any]) -> None:
    try:
        trim = trim_config(trim_args)
        config = RolloutConfig(mode=cast(Mode, mode), num_chunks=chunks, window_frames=window_frames,
                               sink_frames=sink_frames, sink_rope=cast(SinkRope | None, sink_rope), height_px=height,
                               width_px=width)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = load_backend(model, device=device, dtype=getattr(torch, dtype), weights=weights, seed=0)
    except (ValueError, TokentrimError) as exc:
        raise click.UsageError(str(exc)) from exc
    with click.progressbar(length=chunks, label=f"rendering {prompt_id}", file=None) as bar:
        def on_chunk(index: int, rows: list[dict[str, Any]]) -> None:
            bar.update(1)

        try:
            results = render(backend, [prompt], [prompt_id], out_url, config=config, trim=trim, seeds=[seed],
                             state_url=state_url, force_restart=restart, on_chunk=on_chunk)
        except TokentrimError as exc:
            raise click.ClickException(str(exc)) from exc
    result = results[0]
    verdicts = [r["verdict"] for r in result.rows]
    click.echo(f"video: {result.video_url}")
    click.echo(f"stats: {result.stats_url}")
    click.echo(f"chunks: {len(result.rows)} (resumed after {result.resumed_from}); pruned: "
               f"{verdicts.count('pruned')}; config hash {result.config_hash}")
