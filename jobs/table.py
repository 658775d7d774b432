"""Prompt tables: read a Parquet file from any fsspec URL and validate every row up front.

Columns: ``prompt_id`` (str), ``prompt`` (str), optional ``seed`` (int), ``num_chunks`` (int), ``negative_prompt``
(str; recorded, unused by the few-step distilled models). A bad row is reported with its row number and field; the
other rows go on.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

from pipeline.config import MAX_CHUNKS, check_chunks
from pipeline.errors import CorruptStateError, InputError, UsageError
from pipeline.store import KeyNotFound, split_url

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched whole (fullmatch): no trailing newline
MAX_PROMPT_CHARS = 10_000
REQUIRED = ("prompt_id", "prompt")
OPTIONAL = ("seed", "num_chunks", "negative_prompt")


@dataclass(frozen=True)
class PromptRow:
    """One valid prompt to render."""

    row: int
    prompt_id: str
    prompt: str
    seed: int
    num_chunks: int
    negative_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))  # the fields, all plain values: `asdict`'s deep copy costs ~0.1 ms a row


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be rendered, and why (naming the field)."""

    row: int
    prompt_id: str | None
    error: str


def default_seed(base: int, prompt_id: str) -> int:
    """A stable per-prompt seed for rows without one."""
    digest = hashlib.sha256(f"{base}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def read_table(url: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """All rows of a Parquet file as dicts; InputError naming the URL when it is not a readable table."""
    store, name = split_url(url, storage_options)
    try:
        table = store.get_table(name)
    except KeyNotFound as exc:
        raise UsageError(f"no prompt table at {url!r}") from exc
    except CorruptStateError as exc:
        raise UsageError(f"prompt table {url!r} is not readable Parquet: {exc}") from exc
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise UsageError(f"prompt table {url!r} lacks the column(s) {missing}; it has {table.column_names}")
    return table.select([c for c in (*REQUIRED, *OPTIONAL) if c in table.column_names]).to_pylist()


def validate_rows(rows: list[dict[str, Any]], *, default_chunks: int, base_seed: int = 0
                  ) -> tuple[list[PromptRow], list[BadRow]]:
    """Split rows into renderable ones and bad ones. Duplicate ids: the first wins, later ones are bad.
    ``default_chunks`` (for rows without ``num_chunks``) is checked like a row's own: ValueError when out of range."""
    check_chunks(default_chunks, "num_chunks")
    good: list[PromptRow] = []
    bad: list[BadRow] = []
    seen: set[str] = set()
    for i, raw in enumerate(rows):
        pid = raw.get("prompt_id")
        try:
            row = _validate(i, raw, default_chunks, base_seed)
            if row.prompt_id in seen:
                raise InputError(f"row {i}: `prompt_id` {row.prompt_id!r} repeats an earlier row")
            seen.add(row.prompt_id)
            good.append(row)
        except InputError as exc:
            bad.append(BadRow(i, pid if isinstance(pid, str) else None, str(exc)))
    return good, bad


def _validate(i: int, raw: dict[str, Any], default_chunks: int, base_seed: int) -> PromptRow:
    pid, prompt = raw.get("prompt_id"), raw.get("prompt")
    if not isinstance(pid, str) or not ID_PATTERN.fullmatch(pid):
        raise InputError(f"row {i}: `prompt_id` must be 1-128 characters of [A-Za-z0-9._-] starting with a letter "
                         f"or digit, got {pid!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"row {i}: `prompt` must be a non-empty string, got {prompt!r}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"row {i}: `prompt` has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}")
    seed = _integral(raw.get("seed"))
    if seed is None:
        seed = default_seed(base_seed, pid)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"row {i}: `seed` must be an integer in [0, 2**63), got {raw.get('seed')!r}")
    chunks = _integral(raw.get("num_chunks"))
    if chunks is None:
        chunks = default_chunks
    else:
        try:
            check_chunks(chunks)
        except ValueError:
            raise InputError(f"row {i}: `num_chunks` must be an integer in [1, {MAX_CHUNKS}], "
                             f"got {raw.get('num_chunks')!r}") from None
    negative = raw.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise InputError(f"row {i}: `negative_prompt` must be a string or null, got {negative!r}")
    return PromptRow(i, pid, prompt, int(seed), int(chunks), negative)


def _integral(value: Any) -> Any:
    """An integral float (a pandas integer column with a null turns float64) as an int; NaN as missing."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value
