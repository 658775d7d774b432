"""Latent-context checkpoints: a rollout's accepted chunks, committed one by one to a store.

Per chunk ``i`` two objects, each written whole:
  ``chunk-<i>.safetensors``  the clean latents, prune events, TokenTrim state and (rolling) in-flight window;
  ``chunk-<i>.json``         the commit marker, written last: config hash, prompt ids, the data object's size and
                              sha256, prune frames and the chunk's stats rows.
A reader trusts only chunks 0..k-1 whose markers exist and whose data matches size and hash; at the first gap or
mismatch it falls back to the last good chunk and deletes everything after it (a later rerun rewrites it). Nothing
is pickled: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from pipeline.errors import ConfigMismatchError, CorruptStateError
from pipeline.rollout import ChunkRecord, PruneEvent
from pipeline.store import KeyNotFound, Store

logger = logging.getLogger(__name__)

FORMAT = 1
_MARKER = re.compile(r"^chunk-(\d{6})\.json$")


def _data_key(index: int) -> str:
    return f"chunk-{index:06d}.safetensors"


def _marker_key(index: int) -> str:
    return f"chunk-{index:06d}.json"


def encode_record(record: ChunkRecord) -> bytes:
    """The tensors of a record as safetensors bytes."""
    from safetensors.torch import save

    tensors = {"latents": record.latents}
    for i, event in enumerate(record.prunes):
        tensors[f"prune.{i}.positions"] = event.positions
        tensors[f"prune.{i}.samples"] = event.samples
    tensors.update({f"trim.{k}": v for k, v in record.trim_state.items()})
    tensors.update({f"window.{j}": x for j, x in record.window.items()})
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def decode_record(meta: dict[str, Any], data: bytes) -> ChunkRecord:
    """Rebuild a record from its marker and safetensors bytes."""
    from safetensors.torch import load

    tensors = load(data)
    prunes = [PruneEvent(meta["index"], list(p["frames"]), tensors[f"prune.{i}.positions"],
                         tensors[f"prune.{i}.samples"]) for i, p in enumerate(meta["prunes"])]
    trim = {k[len("trim."):]: v for k, v in tensors.items() if k.startswith("trim.")}
    window = {int(k[len("window."):]): v for k, v in tensors.items() if k.startswith("window.")}
    return ChunkRecord(meta["index"], tensors["latents"], prunes, trim, window, list(meta["rows"]))


class RolloutCheckpoints:
    """Commit and load the latent context of one rollout under a store root."""

    def __init__(self, store: Store, config_hash: str, prompt_ids: list[str], *, force_restart: bool = False) -> None:
        self.store, self.config_hash, self.prompt_ids = store, config_hash, list(prompt_ids)
        self.force_restart = force_restart

    def save(self, record: ChunkRecord) -> None:
        """Commit one accepted chunk: the data object, then its marker."""
        data = encode_record(record)
        meta = {
            "format": FORMAT, "index": record.index, "config_hash": self.config_hash, "prompt_ids": self.prompt_ids,
            "data": _data_key(record.index), "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "prunes": [{"frames": e.frames} for e in record.prunes], "rows": record.rows,
        }
        self.store.put_bytes(_data_key(record.index), data)
        self.store.put_bytes(_marker_key(record.index), json.dumps(meta, sort_keys=True).encode())

    def committed(self) -> list[int]:
        """Indices of the chunk markers present (not yet verified)."""
        return sorted(int(m.group(1)) for key in self.store.list() if (m := _MARKER.match(key.rsplit("/", 1)[-1])))

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
        self._drop_after(len(records), indices)
        return records

    def _read(self, index: int) -> ChunkRecord:
        try:
            meta = json.loads(self.store.get_bytes(_marker_key(index)))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptStateError(f"marker {_marker_key(index)} under {self.store.url} is not JSON: {exc}") from exc
        if meta.get("config_hash") != self.config_hash:
            raise ConfigMismatchError(
                f"state under {self.store.url} was written with config hash {meta.get('config_hash')!r}, this run "
                f"has {self.config_hash!r}; use another state URL or force a fresh start (--restart)")
        if meta.get("prompt_ids") != self.prompt_ids:
            raise ConfigMismatchError(f"state under {self.store.url} is for prompts {meta.get('prompt_ids')}, "
                                      f"not {self.prompt_ids}")
        try:
            data = self.store.get_bytes(meta["data"])
        except KeyNotFound as exc:
            raise CorruptStateError(f"chunk {index}: data object {meta['data']} is missing") from exc
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CorruptStateError(f"chunk {index}: data object {meta['data']} has {len(data)} bytes / another "
                                    f"hash than its marker names ({meta['size']} bytes)")
        try:
            return decode_record(meta, data)
        except Exception as exc:  # a malformed safetensors header or missing tensor: report as corrupt state
            raise CorruptStateError(f"chunk {index}: cannot decode {meta['data']}: {exc}") from exc

    def _drop_after(self, good: int, indices: list[int]) -> None:
        """Delete chunks >= ``good`` (markers first, so no reader ever trusts a stale one)."""
        stale = [i for i in indices if i >= good]
        for i in stale:
            self.store.delete(_marker_key(i))
        for i in stale:
            self.store.delete(_data_key(i))
        if stale:
            logger.info("removed %d stale chunk(s) from %s", len(stale), self.store.url)

