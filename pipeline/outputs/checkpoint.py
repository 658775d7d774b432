"""Latent-context checkpoints: a rollout's accepted chunks, committed one by one to a store.

Per chunk ``i``, each object whole: ``chunk-<i>.safetensors`` (clean latents, prune events, TokenTrim state),
``window-<i>.safetensors`` (rolling-forcing's in-flight window, last two chunks only), ``segment-<i>-<b>.mp4`` and
last the marker ``chunk-<i>.json`` (strict JSON: config hash, ids, each object's size and sha256, stats, outputs).
A reader trusts only chunks 0..k-1 whose markers exist and whose objects match; at the first gap it falls back and
deletes what follows. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigMismatchError, CorruptStateError
from pipeline.rollout.chunk_stats import ChunkStats
from pipeline.rollout.records import ChunkRecord, PruneEvent
from pipeline.store import KeyNotFound, Store

logger = logging.getLogger(__name__)

FORMAT = 3  # 2: strict-JSON markers holding `ChunkStats` rows; 3: video segments and the caller's outputs
_MARKER = re.compile(r"^chunk-(\d{6})\.json$")


def _data_key(index: int) -> str:
    return f"chunk-{index:06d}.safetensors"


def _marker_key(index: int) -> str:
    return f"chunk-{index:06d}.json"


def marker_index(name: str) -> int | None:
    """The chunk index a commit marker's name holds (``chunk-000003.json`` -> 3); None for any other name."""
    match = _MARKER.match(name)
    return int(match.group(1)) if match else None


def _window_key(index: int) -> str:
    return f"window-{index:06d}.safetensors"


def _segment_key(index: int, sample: int) -> str:
    return f"segment-{index:06d}-{sample}.mp4"


def _describe(key: str, data: bytes) -> dict[str, Any]:
    return {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def encode_record(record: ChunkRecord) -> bytes:
    """The tensors of a record as safetensors bytes."""
    from safetensors.torch import save

    tensors = {"latents": record.latents}
    for i, event in enumerate(record.prunes):
        tensors[f"prune.{i}.positions"] = event.positions
        tensors[f"prune.{i}.samples"] = event.samples
    tensors.update({f"trim.{k}": v for k, v in record.trim_state.items()})
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def encode_window(record: ChunkRecord) -> bytes:
    """The in-flight window of a rolling-forcing record as safetensors bytes."""
    from safetensors.torch import save

    return save({f"window.{j}": x.detach().contiguous().cpu() for j, x in record.window.items()})


def decode_record(meta: dict[str, Any], data: bytes) -> ChunkRecord:
    """Rebuild a record from its marker and safetensors bytes."""
    from safetensors.torch import load

    tensors = load(data)
    prunes = [PruneEvent(meta["index"], list(p["frames"]), tensors[f"prune.{i}.positions"],
                         tensors[f"prune.{i}.samples"]) for i, p in enumerate(meta["prunes"])]
    trim = {k[len("trim."):]: v for k, v in tensors.items() if k.startswith("trim.")}
    stats = [ChunkStats.from_json(row) for row in meta["rows"]]
    return ChunkRecord(meta["index"], tensors["latents"], prunes, trim, {}, stats)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_marker(meta: dict[str, Any], index: int, samples: int) -> None:
    """`CorruptStateError` unless chunk ``index``'s marker has every field with its type and range (a reader trusts
    nothing else a marker says)."""
    def bad(what: str) -> CorruptStateError:
        return CorruptStateError(f"chunk {index}: marker {_marker_key(index)} {what}")

    def describes(desc: Any, key: str) -> bool:
        return (isinstance(desc, dict) and desc.get("key") == key and _count(desc.get("size"))
                and isinstance(desc.get("sha256"), str) and bool(_SHA256.match(desc["sha256"])))

    if meta.get("format") != FORMAT or not _count(meta.get("index")) or meta["index"] != index:
        raise bad(f"has format {meta.get('format')!r} / index {meta.get('index')!r}, not {FORMAT} / {index}")
    if not describes({"key": meta.get("data"), "size": meta.get("size"), "sha256": meta.get("sha256")},
                     _data_key(index)):
        raise bad("does not describe its data object (key, size, sha256)")
    prunes = meta.get("prunes")
    if not isinstance(prunes, list) or not all(
            isinstance(p, dict) and isinstance(p.get("frames"), list) and all(_count(f) for f in p["frames"])
            for p in prunes):
        raise bad("has no list of prunes with frame indices")
    rows = meta.get("rows")
    if not isinstance(rows, list) or len(rows) != samples or not all(isinstance(r, dict) for r in rows):
        raise bad(f"does not hold one stats row per sample ({samples})")
    if meta.get("window") is not None and not describes(meta["window"], _window_key(index)):
        raise bad("does not describe its window object")
    segments = meta.get("segments")
    if not isinstance(segments, list) or len(segments) not in (0, samples) or not all(
            describes(d, _segment_key(index, b)) for b, d in enumerate(segments)):
        raise bad("does not describe one segment per sample")
    if meta.get("outputs") is not None and not isinstance(meta["outputs"], dict):
        raise bad("holds outputs that are not a JSON object")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class PreparedChunk:
    """One accepted chunk serialised for `RolloutCheckpoints.commit`."""

    index: int
    data: bytes
    window: bytes | None
    prunes: list[dict[str, Any]]
    rows: list[dict[str, Any]]


class RolloutCheckpoints:
    """Commit and load the latent context of one rollout under a store root."""

    def __init__(self, store: Store, config_hash: str, prompt_ids: list[str], *, force_restart: bool = False) -> None:
        self.store, self.config_hash, self.prompt_ids = store, config_hash, list(prompt_ids)
        self.force_restart = force_restart
        self._metas: dict[int, dict[str, Any]] = {}
        self._segments: dict[int, list[bytes]] = {}

    def prepare(self, record: ChunkRecord) -> PreparedChunk:
        """Serialise one accepted chunk now (its tensors may change after the rollout moves on); `commit` writes it."""
        return PreparedChunk(record.index, encode_record(record), encode_window(record) if record.window else None,
                             [{"frames": e.frames} for e in record.prunes], [s.to_json() for s in record.stats])

    def save(self, record: ChunkRecord, segments: Sequence[bytes] = (), outputs: dict[str, Any] | None = None
             ) -> None:
        """`prepare` and `commit` in one call."""
        self.commit(self.prepare(record), segments, outputs)

    def commit(self, chunk: PreparedChunk, segments: Sequence[bytes] = (), outputs: dict[str, Any] | None = None,
               fence: Callable[[], None] | None = None) -> None:
        """Commit one chunk: the data, window and segment objects (one per sample), then its marker; then drop the
        window of the chunk before the previous one (only the last two chunks can be resume points of a rolling
        window). ``outputs``: JSON the caller gets back from `outputs` after a resume. ``fence()`` runs right before
        the marker is written (it raises to stop there: objects without their marker are never trusted)."""
        i = chunk.index
        if segments and len(segments) != len(self.prompt_ids):
            raise ValueError(f"`segments` must hold one segment per prompt ({len(self.prompt_ids)}), got "
                             f"{len(segments)}")
        meta = {
            "format": FORMAT, "index": i, "config_hash": self.config_hash, "prompt_ids": self.prompt_ids,
            "data": _data_key(i), "size": len(chunk.data), "sha256": hashlib.sha256(chunk.data).hexdigest(),
            "prunes": chunk.prunes, "rows": chunk.rows, "window": None,
            "segments": [_describe(_segment_key(i, b), seg) for b, seg in enumerate(segments)],
            "outputs": outputs,
        }
        self.store.put_bytes(_data_key(i), chunk.data)
        if chunk.window is not None:
            meta["window"] = _describe(_window_key(i), chunk.window)
            self.store.put_bytes(_window_key(i), chunk.window)
        for b, seg in enumerate(segments):
            self.store.put_bytes(_segment_key(i, b), seg)
        if fence is not None:
            fence()
        self.store.put_json(_marker_key(i), meta)
        if chunk.window is not None and i >= 2:
            self.store.delete(_window_key(i - 2))

    def segments(self, index: int) -> list[bytes]:
        """The verified segments (one per sample) of a chunk `load` returned."""
        return self._segments[index]

    def outputs(self, index: int) -> Any:
        """The ``outputs`` JSON committed with a chunk `load` returned."""
        return self._metas[index].get("outputs")

    def committed(self) -> list[int]:
        """Indices of the chunk markers present (not yet verified)."""
        return sorted(i for key in self.store.list() if (i := marker_index(key.rsplit("/", 1)[-1])) is not None)

    def load(self) -> list[ChunkRecord]:
        """The verified records 0..k-1; refuses another config's state unless ``force_restart`` (then clears it)."""
        indices = self.committed()
        records: list[ChunkRecord] = []
        for expected, index in enumerate(indices):
            if index != expected:
                logger.warning("chunk %d is missing; resuming after chunk %d", expected, expected - 1)
                break
            try:
                records.append(self._read(index))
            except ConfigMismatchError:
                if not self.force_restart:
                    raise
                logger.warning("state under %s has another config; starting afresh (force_restart)", self.store.url)
                records = []
                break
            except CorruptStateError as exc:
                logger.warning("%s; resuming after chunk %d", exc, index - 1)
                break
        records = self._attach_window(records)
        self._drop_after(len(records), indices)
        return records

    def _attach_window(self, records: list[ChunkRecord]) -> list[ChunkRecord]:
        """Give the last record its in-flight window; without a good one, fall back a chunk (the window of the chunk
        before is kept), and to a fresh start when none is left."""
        while records:
            meta = self._metas[records[-1].index]
            if meta.get("window") is None:
                return records
            try:
                records[-1].window = self._read_window(meta["window"])
                return records
            except CorruptStateError as exc:
                logger.warning("%s; resuming after chunk %d", exc, records[-1].index - 1)
                records = records[:-1]
        return records

    def _read_window(self, desc: dict[str, Any]) -> dict[int, Any]:
        from safetensors.torch import load

        try:
            data = self.store.get_bytes(desc["key"])
        except KeyNotFound as exc:
            raise CorruptStateError(f"window object {desc['key']} is missing") from exc
        if len(data) != desc["size"] or hashlib.sha256(data).hexdigest() != desc["sha256"]:
            raise CorruptStateError(f"window object {desc['key']} does not match its marker")
        try:
            return {int(k[len("window."):]): v for k, v in load(data).items()}
        except Exception as exc:  # a malformed safetensors header: report as corrupt state
            raise CorruptStateError(f"cannot decode {desc['key']}: {exc}") from exc

    def _read(self, index: int) -> ChunkRecord:
        meta = self.store.get_json(_marker_key(index))
        if not isinstance(meta, dict) or not isinstance(meta.get("config_hash"), str) or not isinstance(
                meta.get("prompt_ids"), list):
            raise CorruptStateError(f"chunk {index}: marker {_marker_key(index)} is not a JSON object with a "
                                    "config hash and prompt ids")
        if meta.get("config_hash") != self.config_hash:
            raise ConfigMismatchError(
                f"state under {self.store.url} was written with config hash {meta.get('config_hash')!r}, this run "
                f"has {self.config_hash!r}; use another state URL or force a fresh start (--restart)")
        if meta.get("prompt_ids") != self.prompt_ids:
            raise ConfigMismatchError(f"state under {self.store.url} is for prompts {meta.get('prompt_ids')}, "
                                      f"not {self.prompt_ids}")
        check_marker(meta, index, len(self.prompt_ids))
        self._metas[index] = meta
        data = self._read_verified(index, "data object", meta["data"], meta["size"], meta["sha256"])
        self._segments[index] = [self._read_verified(index, "segment", d["key"], d["size"], d["sha256"])
                                 for d in meta.get("segments") or []]
        try:
            return decode_record(meta, data)
        except Exception as exc:  # a malformed safetensors header or missing tensor: report as corrupt state
            raise CorruptStateError(f"chunk {index}: cannot decode {meta['data']}: {exc}") from exc

    def _read_verified(self, index: int, what: str, key: str, size: int, sha256: str) -> bytes:
        """The object at ``key``, which chunk ``index``'s marker names with ``size`` and ``sha256``."""
        try:
            data = self.store.get_bytes(key)
        except KeyNotFound as exc:
            raise CorruptStateError(f"chunk {index}: {what} {key} is missing") from exc
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptStateError(f"chunk {index}: {what} {key} has {len(data)} bytes / another hash than its "
                                    f"marker names ({size} bytes)")
        return data

    def _drop_after(self, good: int, indices: list[int]) -> None:
        """Delete chunks >= ``good`` (markers first, so no reader ever trusts a stale one)."""
        stale = [i for i in indices if i >= good]
        for i in stale:
            self.store.delete(_marker_key(i))
        for i in stale:
            self.store.delete(_data_key(i))
            self.store.delete(_window_key(i))
            for b in range(len(self.prompt_ids)):
                self.store.delete(_segment_key(i, b))
        if stale:
            logger.info("removed %d stale chunk(s) from %s", len(stale), self.store.url)

