"""The `tokentrim` command line. Commands stay thin: parse options, call one function.

Commands live in `jobs.render_cmd` and `jobs.job_cmds` and are imported only when one runs, so that
``tokentrim --help`` loads no torch.
"""

from __future__ import annotations

import importlib
import logging
import re

import click

from pipeline.errors import UnsupportedURLError

# name -> (module:attribute, one-line summary for `tokentrim --help`)
LAZY_COMMANDS = {
    "render": ("jobs.render_cmd:render", "Render one prompt to an mp4 and a stats table (no cluster)."),
    "submit": ("jobs.job_cmds:submit", "Render every prompt of a Parquet table (Ray, or --executor local)."),
    "resume": ("jobs.job_cmds:resume", "Run the job recorded under an output again; finished prompts skipped."),
    "status": ("jobs.job_cmds:status", "Progress of a job output, also while it runs."),
    "regress": ("jobs.job_cmds:regress", "Nightly regression: drift with and without TokenTrim vs a baseline."),
    "report": ("jobs.report_cmd:report", "Write a job's report.html: videos, drift per chunk, errors (static)."),
    "demo": ("jobs.demo_cmd:demo", "TokenTrim alone on synthetic latents with an injected corruption, per chunk."),
}


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module, _, attr = LAZY_COMMANDS[cmd_name][0].partition(":")
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> object:
        """A URL with a refused protocol is a usage error: exit 2 with one line, wherever the command raised it."""
        try:
            return super().invoke(ctx)
        except UnsupportedURLError as exc:
            raise _usage_line(exc) from None
        except click.ClickException as exc:
            if isinstance(exc.__cause__, UnsupportedURLError):
                raise _usage_line(exc.__cause__) from None
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, LAZY_COMMANDS[name][1] if name in LAZY_COMMANDS else self.commands[name].get_short_help_str(80))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class RefusedURL(click.ClickException):
    """A usage error printed as one line (``Error: ...``), exit 2."""

    exit_code = 2


def _usage_line(exc: Exception) -> click.ClickException:
    return RefusedURL(str(exc))


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """tokentrim: long AR video rendering with TokenTrim drift pruning.

    \b
    Examples:
      tokentrim render "a cat surfing a wave" --model tiny --num-chunks 8 --out out/
      tokentrim render "a cat surfing a wave" --model tiny --out s3://bucket/videos --state s3://bucket/state/cat
      tokentrim submit prompts.parquet --out out/job --executor local --limit 4
      tokentrim demo --chunks 12 --corrupt-at 6
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def slug(prompt: str) -> str:
    """A file-safe id from a prompt: lowercase words joined by '-', at most 60 characters."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:60].rstrip("-") or "prompt"


if __name__ == "__main__":
    main()
