"""The command line's progress display (tqdm), fed by hooks from the layers below, which never print.

Under Ray on a terminal, without ``-v``, `native_stderr_diverted` keeps Ray's own output (its C++ logs, its loggers)
in a log file.

On a terminal: a live bar of chunks committed with prompts done / total, the chunk position of the prompts being
rendered, chunks pruned so far and tqdm's ETA; "loading model ..." until the first chunk lands. Without a terminal
(CI, logs): one line per prompt finished.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import click
from tqdm import tqdm

from jobs.progress import JobSnapshot, eta_seconds


@contextmanager
def native_stderr_diverted() -> Iterator[tuple[str, TextIO]]:
    """While the block runs, whatever writes to stderr (Ray's C++ core worker, the handlers of its loggers, this
    process's loggers) goes to a log file; yields its path and a stream on the terminal for the bar. Afterwards
    ``sys.stderr`` is that terminal stream, so errors and the report are seen; Ray's handlers keep the log file."""
    fd, path = tempfile.mkstemp(prefix="tokentrim-ray-", suffix=".log")
    sys.stderr.flush()
    old = sys.stderr
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                         errors="replace")
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield path, terminal
    finally:
        sys.stderr = terminal
        for handler in logging.getLogger().handlers:  # `tokentrim`'s own handler: back on the terminal
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(terminal)


def is_tty(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def say(text: str) -> None:
    """One status line on stderr (stdout keeps the results)."""
    click.echo(text, err=True)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class JobBar:
    """A `jobs.progress.JobProgress` for `submit`, `resume` and `regress`."""

    def __init__(self, model: str, stream: TextIO | None = None) -> None:
        self.model, self.stream = model, stream
        self.tty = is_tty(self.stream or sys.stderr)
        self.bar: Any = None
        self.began = time.monotonic()
        self.chunks_at_start = 0

    def _label(self, snap: JobSnapshot) -> str:
        return snap.label or "job"

    def begin(self, snap: JobSnapshot) -> None:
        self.began, self.chunks_at_start = time.monotonic(), snap.done_chunks + _running(snap)
        todo = snap.total_prompts - snap.done_prompts
        if self.tty:
            self.bar = tqdm(total=snap.total_chunks, initial=self.chunks_at_start, unit="chunk",
                            file=self.stream or sys.stderr,
                            dynamic_ncols=True, desc=self._label(snap))
            self.update(snap)
        else:
            say(f"{self._label(snap)}: {todo} of {snap.total_prompts} prompts to render"
                + (f"; loading model {self.model} ..." if todo else ""))

    def update(self, snap: JobSnapshot) -> None:
        if self.bar is None:
            for f in snap.finished:
                eta = eta_seconds(snap, time.monotonic() - self.began, self.chunks_at_start)
                seconds = f"{f.seconds:.1f} s" if f.seconds is not None else "? s"
                say(f"[{snap.done_prompts}/{snap.total_prompts}] {f.prompt_id}: {f.chunks} chunks, "
                    f"{f.pruned_chunks} pruned, {seconds}; ETA {_clock(eta)}")
            return
        self.bar.n = snap.done_chunks + _running(snap)
        where = ", ".join(f"{pid} chunk {k}/{n}" for pid, (k, n) in list(snap.running.items())[:3])
        loading = not snap.started and snap.done_prompts < snap.total_prompts
        self.bar.set_description_str(f"{self._label(snap)}: loading model {self.model} ..." if loading
                                     else self._label(snap), refresh=False)
        self.bar.set_postfix_str(f"prompts {snap.done_prompts}/{snap.total_prompts}"
                                 + (f", {where}" if where else "") + f", pruned {snap.pruned_chunks}", refresh=False)
        self.bar.refresh()

    def end(self, snap: JobSnapshot) -> None:
        self.update(snap)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _running(snap: JobSnapshot) -> int:
    return sum(k for k, _ in snap.running.values())


class RenderBar:
    """`tokentrim render`'s display: a chunk bar on a terminal (nothing per chunk without one)."""

    def __init__(self, label: str, num_chunks: int, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self.pruned = 0
        self.bar = tqdm(total=num_chunks, unit="chunk", desc=label, file=stream, dynamic_ncols=True) \
            if is_tty(stream) else None

    def on_chunk(self, index: int, rows: list[dict[str, Any]]) -> None:
        """`pipeline.outputs.render.render_prompts`'s ``on_chunk`` hook."""
        self.pruned += any(r.get("verdict") == "pruned" for r in rows)
        if self.bar is not None:
            self.bar.set_postfix_str(f"chunk {index + 1}/{self.bar.total}, pruned {self.pruned}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
