"""``results.parquet`` as the job goes: rewritten whole every ``every_rows`` finished rows or ``every_s`` seconds.

A driver that dies loses at most one interval (its done markers hold the rest); the done-index is refreshed on the
same clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from jobs.done_index import Entries, load_index, refresh_index
from jobs.layout import RESULTS_KEY, JobOutput
from jobs.policy import fit_result, results_schema
from pipeline.errors import TokentrimError

logger = logging.getLogger(__name__)

RENDERED = "ok"  # the status of a row whose done marker this job wrote


def write_results(out: JobOutput, results: list[dict[str, Any]]) -> None:
    """The results table, one row per row of the prompt table (sorted by row), as one whole object."""
    import pyarrow as pa

    ordered = [fit_result(r) for r in sorted(results, key=lambda r: r["row"])]  # one bad value never stops it
    out.store.put_table(RESULTS_KEY, pa.Table.from_pylist(ordered, schema=results_schema()))


class ResultsWriter:
    """Collects result rows and writes ``results.parquet`` (and the done-index) as they come.

    Args:
        out: the job output.
        rows: result rows known before any work (invalid and excluded rows).
        every_rows: rewrite the table once this many rows finished since the last write.
        every_s: rewrite it once this many seconds passed since the last write (if any row finished meanwhile).
    """

    def __init__(self, out: JobOutput, rows: Iterable[dict[str, Any]] = (), *, every_rows: int = 1000,
                 every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if every_rows < 1:
            raise ValueError(f"`every_rows` must be >= 1, got {every_rows!r}")
        if not every_s > 0:
            raise ValueError(f"`every_s` must be > 0, got {every_s!r}")
        self.out, self.every_rows, self.every_s, self.clock = out, every_rows, float(every_s), clock
        self.rows: list[dict[str, Any]] = list(rows)
        self.pending, self.written = 0, False
        self.written_at = self.indexed_at = clock()
        self._index: Entries | None = None
        self._unindexed: list[str] = []  # rows rendered here whose markers the index may not hold yet

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        """Record finished rows; write the table when an interval is over."""
        before = len(self.rows)
        self.rows.extend(rows)
        self.pending += len(self.rows) - before
        # rows answered from a marker (``reused``) are left out: the first pass put theirs in the index already, and
        # one a worker found is read by the next start (refreshing the index for them would list and read it again)
        self._unindexed += [r["prompt_id"] for r in self.rows[before:]
                            if r["status"] == RENDERED and not r.get("reused")]
        if self.pending >= self.every_rows or (self.pending and self.clock() - self.written_at >= self.every_s):
            self.write()

    def write(self, *, index: bool = False) -> None:
        """Write the table now (and the done-index when ``index`` or its interval is over)."""
        write_results(self.out, self.rows)
        self.pending, self.written, self.written_at = 0, True, self.clock()
        if index or self.written_at - self.indexed_at >= self.every_s:
            self._refresh_index()

    def close(self) -> list[dict[str, Any]]:
        """The final write (unless nothing changed since the last one); returns every row collected."""
        if self.pending or not self.written:
            self.write(index=True)
        else:
            self._refresh_index()
        return self.rows

    def _refresh_index(self) -> None:
        """Add the markers of the rows rendered since the last refresh (those answered from markers are in it)."""
        if self._unindexed:
            try:
                if self._index is None:
                    self._index = load_index(self.out)
                refresh_index(self.out, self._index, self._unindexed)
                self._unindexed = []
            except TokentrimError as exc:  # only a cache: the next start reads those markers itself
                logger.warning("could not update the done-index: %s", exc)
        self.indexed_at = self.clock()


__all__ = ["ResultsWriter", "write_results"]
