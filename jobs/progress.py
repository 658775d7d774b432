"""What a running job has committed, read back from its output while it runs: the feed of the progress bar.

`JobWatcher` polls the done markers and the rollouts' chunk markers from a thread of its own; it only reads, so it
works the same for the local and the Ray executor.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from jobs.layout import JobOutput
from jobs.table import PromptRow
from pipeline.errors import TokentrimError

logger = logging.getLogger(__name__)


@dataclass
class Finished:
    """A prompt whose done marker appeared: its numbers as the marker records them."""

    prompt_id: str
    chunks: int
    pruned_chunks: int
    seconds: float | None


@dataclass
class JobSnapshot:
    """The job as its store shows it now. ``running``: prompt id -> (chunks committed, chunks asked for)."""

    label: str
    total_prompts: int
    total_chunks: int
    done_prompts: int = 0
    done_chunks: int = 0
    pruned_chunks: int = 0
    running: dict[str, tuple[int, int]] = field(default_factory=dict)
    finished: list[Finished] = field(default_factory=list)  # since the previous snapshot

    @property
    def started(self) -> bool:
        """Whether any chunk of this run was committed yet (before that, workers are starting and loading models)."""
        return bool(self.running) or bool(self.finished)


class JobProgress(Protocol):
    """What the command line shows; `JobWatcher` calls it from its thread."""

    def begin(self, snapshot: JobSnapshot) -> None: ...

    def update(self, snapshot: JobSnapshot) -> None: ...

    def end(self, snapshot: JobSnapshot) -> None: ...


class JobWatcher:
    """Polls ``out`` every ``interval_s`` for the rows being rendered and reports to ``progress``."""

    def __init__(self, out: JobOutput, rows: list[PromptRow], progress: JobProgress, *, label: str = "",
                 interval_s: float = 1.0) -> None:
        self.out, self.progress, self.interval_s = out, progress, interval_s
        self.chunks = {r.prompt_id: r.num_chunks for r in rows}
        self.snapshot = JobSnapshot(label, len(rows), sum(self.chunks.values()))
        self._seen_done: set[str] = set()
        self._pruned_finished = 0  # pruned chunks of the finished prompts, from their done markers
        self._pruned_live: dict[str, dict[int, int]] = {}  # unfinished prompt -> chunk -> 1 when pruned
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokentrim-progress", daemon=True)

    def start(self) -> None:
        self.poll(first=True)
        self.progress.begin(self.snapshot)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.progress.end(self.snapshot)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()
            self.progress.update(self.snapshot)

    def poll(self, first: bool = False) -> None:
        """Read what changed in the store into ``self.snapshot`` (a store error skips this poll)."""
        snap = self.snapshot
        snap.finished = []
        try:
            done = self.out.done_ids()
            for pid in sorted((done & set(self.chunks)) - self._seen_done):
                self._seen_done.add(pid)
                finished = self._finished(pid)
                snap.done_prompts += 1
                snap.done_chunks += self.chunks[pid]
                self._pruned_finished += finished.pruned_chunks
                self._pruned_live.pop(pid, None)
                if not first:  # prompts finished before this run are counted, not announced
                    snap.finished.append(finished)
            snap.running = self._running()
            snap.pruned_chunks = self._pruned_finished + sum(sum(v.values()) for v in self._pruned_live.values())
        except (TokentrimError, OSError) as exc:
            logger.debug("progress poll of %s failed: %s", self.out.url, exc)

    def _finished(self, prompt_id: str) -> Finished:
        try:
            marker = self.out.store.get_json(self.out.done_key(prompt_id))
        except (TokentrimError, OSError):
            marker = None
        marker = marker if isinstance(marker, dict) else {}
        return Finished(prompt_id, _int(marker.get("chunks"), self.chunks[prompt_id]),
                        _int(marker.get("pruned_chunks"), 0), _float(marker.get("seconds")))

    def _running(self) -> dict[str, tuple[int, int]]:
        committed: dict[str, int] = {}
        for pid, index, key in self.out.chunk_markers():
            if pid not in self.chunks or pid in self._seen_done:
                continue
            committed[pid] = max(committed.get(pid, 0), index + 1)
            pruned = self._pruned_live.setdefault(pid, {})
            if index not in pruned:
                pruned[index] = self._pruned_in(key)
        for pid in [p for p in self._pruned_live if p not in committed]:  # state dropped without a done marker yet
            committed[pid] = len(self._pruned_live[pid])
        return {pid: (k, self.chunks[pid]) for pid, k in sorted(committed.items())}

    def _pruned_in(self, key: str) -> int:
        try:
            marker = self.out.store.get_json(key)
        except (TokentrimError, OSError):
            return 0
        rows = marker.get("rows") if isinstance(marker, dict) else None
        return int(isinstance(rows, list) and any(isinstance(r, dict) and r.get("verdict") == "pruned" for r in rows))


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@contextmanager
def watching(out: JobOutput, rows: list[PromptRow], progress: JobProgress | None, *, label: str = "",
             interval_s: float = 1.0) -> Iterator[None]:
    """Report the job's progress to ``progress`` (when given) while the block runs."""
    if progress is None:
        yield
        return
    watcher = JobWatcher(out, rows, progress, label=label, interval_s=interval_s)
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()


def eta_seconds(snapshot: JobSnapshot, elapsed_s: float, chunks_at_start: int) -> float | None:
    """Seconds left at the rate chunks were committed so far in this run (None before any was)."""
    progressed = snapshot.done_chunks + sum(k for k, _ in snapshot.running.values()) - chunks_at_start
    if progressed <= 0 or elapsed_s <= 0:
        return None
    left = snapshot.total_chunks - snapshot.done_chunks - sum(k for k, _ in snapshot.running.values())
    return max(left, 0) * elapsed_s / progressed


__all__ = ["Finished", "JobProgress", "JobSnapshot", "JobWatcher", "eta_seconds", "watching"]
