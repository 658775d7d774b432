"""Store calls as an object store charges them, for `bench.driver_scale`: counted and timed at the `Store._invoke`
seam, and (``latency-file``) each delayed by a latency per request it stands for, with prefix listings of a local
folder costing O(page) as on S3 rather than O(folder). Everything here patches `pipeline.store.Store` in the bench's
own child process only."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, defaultdict
from typing import Any

LATENCY_FS: list[Any] = []  # the child's latency-file filesystem, for its ``server_s``


class StoreCalls:
    """Counts and times store calls by operation and first key segment (the `Store._invoke` seam, one attempt each).

    With ``latency_s`` (the ``latency-file`` backend) every call also sleeps that long per request it stands for:
    one, or for a listing one per page of `LIST_PAGE` keys (an S3 listing pages sequentially)."""

    def __init__(self, latency_s: float = 0.0) -> None:
        from pipeline.store import Store

        self.counts: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.requests = 0
        self.latency_s = latency_s
        self._lock = threading.Lock()
        real = Store._invoke
        calls = self

        def invoke(store: Store, op: str, key: str, fn: Any) -> Any:
            began = time.perf_counter()
            value = real(store, op, key, fn)
            calls.record(f"{op}:{key.split('/', 1)[0]}", _requests(op, value), time.perf_counter() - began)
            return value

        Store._invoke = invoke  # type: ignore[method-assign,assignment]

    def record(self, name: str, requests: int, seconds: float) -> None:
        if self.latency_s:
            time.sleep(self.latency_s * requests)
            seconds += self.latency_s * requests
        with self._lock:
            self.counts[name] += 1
            self.seconds[name] += seconds
            self.requests += requests


def _requests(op: str, value: Any) -> int:
    """Round trips an S3 server would take for one store call: a listing pages by `LIST_PAGE` keys."""
    from jobs.done_index import LIST_PAGE

    if op in ("list", "sizes", "versions"):
        return max(1, -(-len(value) // LIST_PAGE))
    return 1


def _indexed_local_fs() -> Any:
    """A local filesystem whose prefix listing costs what an object store's does, O(page) not O(folder): it keeps a
    sorted snapshot (name -> fsspec info) of a folder while the folder's mtime stays the same (a `Store` write renames
    a new file into place, which changes it; so does any entry added or removed), built once under a lock and timed
    (``server_s``: the store's own work, which a real object store does on its side). Everything else is fsspec's
    own LocalFileSystem."""
    import bisect

    from fsspec.implementations.local import LocalFileSystem

    class IndexedLocalFileSystem(LocalFileSystem):
        cachable = False

        def __init__(self) -> None:
            super().__init__()
            self.server_s = 0.0
            self._snapshots: dict[str, tuple[int, list[str], dict[str, dict]]] = {}
            self._snapshot_lock = threading.Lock()

        def _snapshot(self, path: str) -> tuple[list[str], dict[str, dict]] | None:
            with self._snapshot_lock:
                try:
                    stamp = os.stat(path).st_mtime_ns
                except FileNotFoundError:
                    return None
                held = self._snapshots.get(path)
                if held is None or held[0] != stamp:
                    began = time.perf_counter()
                    infos = {e.name: self.info(e) for e in os.scandir(path)}
                    held = self._snapshots[path] = (stamp, sorted(infos), infos)
                    self.server_s += time.perf_counter() - began
            return held[1], held[2]

        def find(self, path: str, maxdepth: Any = None, withdirs: bool = False, detail: bool = False,
                 **kwargs: Any) -> Any:
            prefix = kwargs.pop("prefix", "")
            path = self._strip_protocol(path)
            if not prefix or maxdepth is not None or withdirs:
                return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
            snapshot = self._snapshot(path)
            if snapshot is None:
                return {} if detail else []
            names, infos = snapshot
            page = names[bisect.bisect_left(names, prefix):bisect.bisect_left(names, prefix + "\U0010ffff")]
            found = {infos[n]["name"]: infos[n] for n in page if infos[n]["type"] == "file"}
            return found if detail else sorted(found)

    return IndexedLocalFileSystem()


def latency_file(latency_s: float) -> StoreCalls:
    """The real driver over file://, with each store call costing the round trips an object store would take (the
    listing split by key prefix as on S3, each prefix page O(page))."""
    from pipeline.store import Store

    fs = _indexed_local_fs()
    LATENCY_FS.append(fs)
    real = Store._make_fs

    def make_fs(store: Store) -> Any:
        made, protocol = real(store)
        return (fs, protocol) if protocol == "local" else (made, protocol)

    Store._make_fs = make_fs  # type: ignore[method-assign,assignment]
    Store.pages_listings = property(lambda store: True)  # type: ignore[method-assign,assignment]
    return StoreCalls(latency_s)
