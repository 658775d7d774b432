"""The driver's reads of done markers at any scale: one listing, a done-index, concurrent reads of the rest.

``done_index.parquet`` caches marker bytes with the version tag the listing showed: a cache, never a source (a marker
counts only while a fresh listing shows it at that tag, and its bytes go through the same strict reader).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from jobs.layout import DONE_PREFIX, INDEX_KEY, JobOutput
from pipeline.errors import CorruptStateError, TokentrimError
from pipeline.store import KeyNotFound, Store

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

READ_WORKERS = 32
LIST_PAGE = 1000  # keys per page of an S3 listing

Entries = dict[str, tuple[str, bytes]]  # prompt id -> (version tag, marker bytes)
Reader = Callable[[JobOutput], Callable[[str], "dict | None"]]  # output -> prompt id -> marker (Claims(out).done)


def concurrent_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int = READ_WORKERS) -> list[R]:
    """``[fn(x) for x in items]`` on a bounded thread pool, in order; the first exception is raised."""
    items = list(items)
    if len(items) <= 1 or workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="marker-read") as pool:
        return list(pool.map(fn, items))


def marker_versions(out: JobOutput, ids: Iterable[str], *, workers: int = READ_WORKERS) -> dict[str, str]:
    """Prompt id -> version tag of the done markers of ``ids``, from a fresh listing: one per key prefix of
    `name_prefixes`, concurrently (a listing pages sequentially, so one of a large folder is many round trips)."""
    wanted = set(ids)
    found: dict[str, str] = {}
    prefixes = name_prefixes(wanted) if out.store.pages_listings else [""]
    for tags in concurrent_map(out.store.versions, [DONE_PREFIX + p for p in prefixes], workers=workers):
        found.update((pid, v) for k, v in tags.items() if (pid := out.done_id(k)) is not None)
    return {pid: tag for pid, tag in found.items() if pid in wanted}


def name_prefixes(ids: Iterable[str], limit: int = LIST_PAGE) -> list[str]:
    """Key prefixes that together cover the marker names of ``ids``, each shared by at most ``limit`` of them where
    the names allow (one listing page each)."""
    prefixes: list[str] = []
    stack = [("", sorted(JobOutput.done_key(pid)[len(DONE_PREFIX):] for pid in set(ids)))]
    while stack:
        prefix, names = stack.pop()
        if len(names) <= limit or all(len(n) <= len(prefix) + 1 for n in names):
            prefixes.append(prefix)
            continue
        depth = len(prefix) + 1
        stack += [(key, list(group)) for key, group in itertools.groupby(names, key=lambda n: n[:depth])]
    return sorted(prefixes)


def index_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("prompt_id", pa.string()), ("version", pa.string()), ("marker", pa.binary())])


def load_index(out: JobOutput) -> Entries:
    """The done-index of a job output; empty when there is none or it is not exactly the index's schema (a cache
    that cannot be trusted is dropped and rebuilt from the markers, never repaired)."""
    try:
        table = out.store.get_table(INDEX_KEY)
    except KeyNotFound:
        return {}
    except CorruptStateError as exc:
        logger.warning("ignoring the done-index: %s", exc)
        return {}
    if not table.schema.equals(index_schema()) or any(table.column(i).null_count for i in range(3)):
        logger.warning("ignoring the done-index %s: schema %s", out.store.join(INDEX_KEY), table.schema)
        return {}
    ids, tags, blobs = (table.column(i).to_pylist() for i in range(3))
    del table
    return {pid: (tag, blob) for pid, tag, blob in zip(ids, tags, blobs)}


def save_index(out: JobOutput, entries: Mapping[str, tuple[str, bytes]]) -> None:
    """Write the done-index as one whole object."""
    import pyarrow as pa

    ids = sorted(entries)
    out.store.put_table(INDEX_KEY, pa.table([ids, [entries[i][0] for i in ids], [entries[i][1] for i in ids]],
                                            schema=index_schema()))


def sync_index(out: JobOutput, entries: Entries, versions: Mapping[str, str], ids: Iterable[str],
               *, workers: int = READ_WORKERS) -> bool:
    """Bring the entries of ``ids`` in line with a listing of their markers (``versions``): drop those whose marker
    is gone, read (concurrently) those not held at the listed tag. Entries of other ids are left as they are. A
    marker that cannot be read now is left out (its reader reads it again). Returns whether ``entries`` changed."""
    ids = list(dict.fromkeys(ids))
    gone = [pid for pid in ids if pid in entries and pid not in versions]
    for pid in gone:
        del entries[pid]
    stale = [pid for pid in ids if pid in versions and entries.get(pid, ("",))[0] != versions[pid]]

    def fetch(pid: str) -> bytes | None:
        try:
            return out.store.get_bytes(out.done_key(pid))
        except TokentrimError as exc:  # gone since the listing, or a store failure: its reader reads it again
            logger.debug("done marker of %s not cached: %s", pid, exc)
            return None

    for pid, data in zip(stale, concurrent_map(fetch, stale, workers=workers)):
        if data is not None:
            entries[pid] = (versions[pid], data)  # a marker rewritten after the listing: a newer tag next time
    return bool(gone or stale)


class PrefetchedStore(Store):
    """A view of a store whose reads of some keys are answered from bytes already fetched; everything else goes
    to the store itself (the same filesystem object, not a copy)."""

    def __init__(self, store: Store, cached: Mapping[str, bytes]) -> None:  # noqa: D107 - no super().__init__:
        self.__dict__.update(store.__dict__)  # same root, options, retries and filesystem as `store`
        self._cached = cached

    def get_bytes(self, key: str) -> bytes:
        data = self._cached.get(key)
        return data if data is not None else super().get_bytes(key)


def done_markers(out: JobOutput, read: Reader, ids: list[str], *, workers: int = READ_WORKERS
                 ) -> dict[str, dict | None | TokentrimError]:
    """The done marker (parsed by ``read``) of every id in ``ids`` that has one now, or the error reading it.

    One listing; markers the done-index holds at the listed tag come from it, the others are read concurrently and
    the index is rewritten when it changed. Ids without a marker are left out."""
    versions = marker_versions(out, ids, workers=workers)
    entries = load_index(out)
    if sync_index(out, entries, versions, ids, workers=workers):
        try:
            save_index(out, entries)
        except TokentrimError as exc:  # only a cache: the next start reads those markers again
            logger.warning("could not write the done-index: %s", exc)
    cache = {out.done_key(pid): entry[1] for pid, entry in entries.items()}
    reader = read(JobOutput(PrefetchedStore(out.store, cache)))
    cached = [pid for pid in ids if pid in versions and pid in entries]
    uncached = [pid for pid in ids if pid in versions and pid not in entries]  # their reads failed just now
    del entries, cache

    def parse(pid: str) -> dict | None | TokentrimError:
        try:
            return reader(pid)
        except TokentrimError as exc:
            return exc

    found = {pid: parse(pid) for pid in cached}  # no round trip: parsed here, in order
    found.update(zip(uncached, concurrent_map(parse, uncached, workers=workers)))
    return found


def refresh_index(out: JobOutput, entries: Entries, ids: Iterable[str], *, workers: int = READ_WORKERS) -> None:
    """Add the markers of ``ids`` written since ``entries`` was last synced (a fresh listing, concurrent reads) and
    save the index; entries of other ids are kept as they are."""
    ids = list(ids)
    if sync_index(out, entries, marker_versions(out, ids, workers=workers), ids, workers=workers):
        save_index(out, entries)


__all__ = ["concurrent_map", "done_markers", "load_index", "refresh_index", "save_index",
           "sync_index"]
