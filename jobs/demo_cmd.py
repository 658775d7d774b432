"""`tokentrim demo`: TokenTrim alone on synthetic latents, its options made from `DemoConfig` and `TrimConfig`."""

from __future__ import annotations

from typing import Any

import click

from jobs.options import build, options
from tokentrim.config import TrimConfig
from tokentrim.demo import DemoConfig


@click.command()
@options(DemoConfig, "demo")
@options(TrimConfig, "trim")
def demo(**groups: Any) -> None:
    """TokenTrim alone on synthetic latents with injected corruption: a per-chunk table.

    \b
    Example:
      tokentrim demo --chunks 12 --corrupt-at 6
    """
    from tokentrim.demo import report

    click.echo(report(build(DemoConfig, "demo", groups), build(TrimConfig, "trim", groups)))
