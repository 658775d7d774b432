"""The job policy, in one place: claims and leases, attempts and poison, done markers, retention, the results schema.

Executors (`jobs.executors`: a serial local one and the Ray one) only dispatch rows to `process_row`; every decision
about a prompt is taken here. Under the job's output, per prompt id:

  ``claims/<id>/<n>.json``   attempt n's claim, created create-only (two workers cannot both create n)
  ``claims/<id>/<n>.lease``  its lease: ``state`` (held, failed, done, yielded) and ``expires_at``; a heartbeat
                             thread renews a held lease every ``lease_s / 3`` while the prompt is restored and rendered
  ``done/<id>.json``         written after the video and stats: the prompt is finished (its result values, the seed)

A worker takes attempt n+1 only when attempt n is not held by a live lease. Attempts that failed, or whose holder died
(a held lease that ran out), count towards ``max_attempts``; an attempt given back because the prompt turned out to be
finished (``yielded``) does not. A worker that finds a live lease does not wait: the row comes back as ``busy`` with
the lease's expiry, and the driver hands it out again later, after the other rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jobs.spec import JobSpec
from jobs.table import PromptRow
from pipeline.errors import CorruptStateError, TokentrimError, TransientError
from pipeline.hashing import digest as config_hash
from pipeline.store import KeyNotFound, Store

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.model.backend import WanBackend
    from pipeline.outputs.render import RenderResult

logger = logging.getLogger(__name__)

VIDEO_KEY, STATS_KEY = "videos/{id}.mp4", "stats/{id}.parquet"

# The one definition of a results row: name, Arrow type and what it holds (the Parquet field's "description").
# `result_row` and `results_schema` are built from it.
RESULT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("prompt_id", "string", "the row's id in the prompt table (names videos/<id>.mp4, stats/<id>.parquet)"),
    ("row", "int64", "0-based row number in the prompt table"),
    ("status", "string", "ok (rendered, now or by an earlier run: see reused), failed, poison (max attempts spent), "
                         "invalid (bad row, see error), excluded (beyond --limit)"),
    ("error", "string", "why the row is not ok (null when ok)"),
    ("attempt", "int64", "0-based claim attempt that rendered the prompt"),
    ("seed", "int64", "the rollout's seed"),
    ("num_chunks", "int64", "chunks asked for (the row's own, else --num-chunks)"),
    ("video", "string", "URL of the mp4"),
    ("stats", "string", "URL of the per-chunk stats table"),
    ("chunks", "int64", "chunks rendered"),
    ("resumed_from", "int64", "chunks restored from a checkpoint instead of rendered (0: rendered from the start)"),
    ("pruned_chunks", "int64", "chunks TokenTrim regenerated on a pruned cache (verdict pruned)"),
    ("tokens_pruned", "int64", "KV-cache token positions TokenTrim removed, over all chunks"),
    ("mean_severity", "float64", "mean TokenTrim severity over the judged chunks (null: none judged)"),
    ("latent_dist_first", "float64", "RMS distance of the last chunk's frame-averaged latents to the first chunk's"),
    ("hist_dist_first", "float64", "colour-histogram total-variation distance of the last chunk to the first, [0, 1]"),
    ("steadiness", "float64", "mean over chunks of VBench's temporal-flickering score (255 - mean |frame_t - "
                              "frame_t-1|) / 255, [0, 1]: higher = steadier, 1 = static"),
    ("seconds", "float64", "wall seconds the render of this prompt took (claim to done marker)"),
    ("render_hash", "string", "hash of what was rendered (model spec, dtype, rollout, TokenTrim, video settings, "
                              "probe): the stats rows' and checkpoints' render_hash; job.json's config_hash is the "
                              "job's, a different hash"),
    ("reused", "bool_", "true when this run answered the row from its done marker (rendered by an earlier run or "
                       "another job) instead of rendering it; the numbers are that render's"),
)
RESULT_FIELDS: tuple[str, ...] = tuple(name for name, _, _ in RESULT_COLUMNS)
# what an executor hands back per row: the result fields and, for a busy row, when to try it again
WORK_FIELDS: tuple[str, ...] = (*RESULT_FIELDS, "retry_at")
# final statuses; "busy" is never final (the driver hands such a row out again)
STATUSES = ("ok", "failed", "poison", "invalid", "excluded")
# what a done marker keeps of a render, so that a rerun answers the row with the same numbers
_DONE_VALUES = ("attempt", "seed", "num_chunks", "video", "stats", "chunks", "resumed_from", "pruned_chunks",
                "tokens_pruned", "mean_severity", "latent_dist_first", "hist_dist_first", "steadiness", "seconds",
                "render_hash")

# done markers written before the columns were renamed
_RENAMED = {"config_hash": "render_hash", "flicker": "steadiness"}


def results_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([pa.field(name, getattr(pa, kind)(), metadata={"description": text})
                      for name, kind, text in RESULT_COLUMNS])


def result_row(row: PromptRow | dict, status: str, error: str | None = None, **values: Any) -> dict[str, Any]:
    """One line of ``results.parquet``; every field present (None where unknown), plus ``retry_at`` when busy."""
    base = row.to_dict() if isinstance(row, PromptRow) else row
    out: dict[str, Any] = {name: None for name in WORK_FIELDS}
    out.update({"prompt_id": base.get("prompt_id"), "row": base.get("row"), "seed": base.get("seed"),
                "num_chunks": base.get("num_chunks"), "status": status, "error": error})
    unknown = set(values) - set(WORK_FIELDS)
    if unknown:
        raise ValueError(f"unknown result fields {sorted(unknown)}")
    out.update(values)
    return out


def row_hash(spec: JobSpec, row: PromptRow) -> str:
    """What a done marker must match for a row to count as finished: the job's render settings and the row's own."""
    return config_hash(spec.render_settings(), {"prompt": row.prompt, "seed": row.seed, "num_chunks": row.num_chunks})


# ------------------------------------------------------------------------------------------------ claims
@dataclass
class Claim:
    """An attempt this worker holds on a prompt."""

    prompt_id: str
    attempt: int
    token: str


@dataclass(frozen=True)
class Busy:
    """Another worker holds a live lease on the prompt until ``until`` (a clock time)."""

    until: float


def owner_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Claims:
    """Claims, leases and done markers of one job output."""

    def __init__(self, store: Store, *, lease_s: float, max_attempts: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.lease_s, self.max_attempts, self.clock = store, lease_s, max_attempts, clock

    def done(self, prompt_id: str) -> dict | None:
        """The done marker of a prompt, or None; `CorruptStateError` when it is not a JSON object."""
        try:
            marker = self.store.get_json(f"done/{prompt_id}.json")
        except KeyNotFound:
            return None
        if not isinstance(marker, dict):
            raise CorruptStateError(f"done marker done/{prompt_id}.json is not a JSON object: {marker!r}")
        return marker

    def mark_done(self, prompt_id: str, summary: dict) -> None:
        self.store.put_json(f"done/{prompt_id}.json", summary)

    def attempts(self, prompt_id: str) -> list[int]:
        keys = self.store.list(f"claims/{prompt_id}/")
        names = (k.rsplit("/", 1)[1][:-5] for k in keys if k.endswith(".json"))
        return sorted(int(n) for n in names if n.isdigit())

    def acquire(self, prompt_id: str) -> Claim | Busy | str:
        """A new claim, `Busy` (a live lease exists) or ``"poison"`` (failed attempts used up)."""
        attempts = self.attempts(prompt_id)
        leases = {n: self._lease(prompt_id, n) for n in attempts}
        if attempts and self._live(leases[attempts[-1]]):
            return Busy(float(leases[attempts[-1]]["expires_at"]))
        spent = sum(lease.get("state") not in ("done", "yielded") for lease in leases.values())
        if spent >= self.max_attempts:
            return "poison"
        n = attempts[-1] + 1 if attempts else 0
        token = owner_token()
        body = json.dumps({"owner": token, "attempt": n, "claimed_at": self.clock(), "lease_s": self.lease_s})
        if not self.store.create_only(f"claims/{prompt_id}/{n}.json", body.encode()):
            return Busy(self.clock())  # another worker created attempt n just now: its lease tells how long
        claim = Claim(prompt_id, n, token)
        self.renew(claim)
        logger.info("claimed %s (attempt %d)", prompt_id, n)
        return claim

    def renew(self, claim: Claim) -> None:
        self._put_lease(claim, "held", self.clock() + self.lease_s)

    def finish(self, claim: Claim, state: str) -> None:
        """Give the lease up at once: ``done``, ``failed`` (counts towards poison) or ``yielded`` (does not)."""
        self._put_lease(claim, state, 0.0)

    def _put_lease(self, claim: Claim, state: str, expires_at: float) -> None:
        self.store.put_json(f"claims/{claim.prompt_id}/{claim.attempt}.lease",
                            {"owner": claim.token, "state": state, "expires_at": expires_at})

    def _lease(self, prompt_id: str, attempt: int) -> dict[str, Any]:
        """Attempt n's lease; a claim whose lease is not written yet (or unreadable) is held for ``lease_s``."""
        try:
            lease = self.store.get_json(f"claims/{prompt_id}/{attempt}.lease")
            if isinstance(lease, dict) and isinstance(lease.get("expires_at"), (int, float)):
                return lease
        except (KeyNotFound, CorruptStateError):
            pass
        try:
            claim = self.store.get_json(f"claims/{prompt_id}/{attempt}.json")
            claimed_at = float(claim["claimed_at"]) + float(claim.get("lease_s", self.lease_s))
        except (KeyNotFound, CorruptStateError, KeyError, TypeError, ValueError):
            claimed_at = 0.0
        return {"state": "held", "expires_at": claimed_at}

    def last_lease(self, prompt_id: str) -> tuple[int, dict[str, Any], float | None] | None:
        """The latest attempt on a prompt: its number, its lease and when it was claimed (None: never claimed)."""
        attempts = self.attempts(prompt_id)
        if not attempts:
            return None
        try:
            claim = self.store.get_json(f"claims/{prompt_id}/{attempts[-1]}.json")
            claimed_at = float(claim["claimed_at"]) if isinstance(claim, dict) else None
        except (KeyNotFound, CorruptStateError, KeyError, TypeError, ValueError):
            claimed_at = None
        return attempts[-1], self._lease(prompt_id, attempts[-1]), claimed_at

    def held(self, prompt_id: str) -> bool:
        """Whether a live lease holds the prompt now."""
        attempts = self.attempts(prompt_id)
        return bool(attempts) and self._live(self._lease(prompt_id, attempts[-1]))

    def _live(self, lease: dict[str, Any]) -> bool:
        return lease.get("state") == "held" and float(lease["expires_at"]) > self.clock()


class Heartbeat:
    """Renews a claim's lease every ``lease_s / 3`` from its own thread, whatever the main thread is doing."""

    def __init__(self, claims: Claims, claim: Claim) -> None:
        self.claims, self.claim = claims, claim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.prompt_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.claims.lease_s / 3):
            try:
                self.claims.renew(self.claim)
            except (TokentrimError, OSError) as exc:  # a flaky store: the next beat tries again, inside the lease
                logger.warning("lease renewal of %s failed: %s", self.claim.prompt_id, exc)


# ------------------------------------------------------------------------------------------- one prompt
def from_marker(row: PromptRow, spec: JobSpec, marker: dict | None) -> dict[str, Any] | None:
    """The result of a row whose done marker matches this job: ``ok`` with the numbers of the render the marker
    records (``reused``), or None."""
    if marker is None or marker.get("row_hash") != row_hash(spec, row):
        return None
    marker = {_RENAMED.get(k, k): v for k, v in marker.items()}
    return result_row(row, "ok", None, reused=True, **{k: marker.get(k) for k in _DONE_VALUES if k in marker})


def process_row(backend: WanBackend, spec: JobSpec, row: PromptRow, claims: Claims, *, force: bool = False
                ) -> dict[str, Any]:
    """Render one prompt unless it is finished, held by a live lease (``busy``, come back later) or poison.

    Every failure of this prompt, in the render or in the bookkeeping around it, becomes its result row.
    """
    try:
        return _process(backend, spec, row, claims, force)
    except Exception as exc:  # noqa: BLE001 - recorded for this row; the job goes on with the others
        logger.exception("prompt %s failed", row.prompt_id)
        return result_row(row, "failed", f"{type(exc).__name__}: {exc}")


def _process(backend: WanBackend, spec: JobSpec, row: PromptRow, claims: Claims, force: bool) -> dict[str, Any]:
    while True:
        if (skipped := from_marker(row, spec, claims.done(row.prompt_id))) is not None:
            return skipped
        claim = claims.acquire(row.prompt_id)
        if isinstance(claim, Busy):
            return result_row(row, "busy", "another worker holds a live lease", retry_at=claim.until)
        if isinstance(claim, str):
            return result_row(row, "poison", f"failed {spec.max_attempts} attempts; not tried again")
        try:
            with Heartbeat(claims, claim):  # stopped before the lease is given up below: no renewal after that
                # finished while we claimed (a concurrent job's worker): the claim is given back unspent
                skipped = from_marker(row, spec, claims.done(row.prompt_id))
                result = skipped if skipped is not None else _render_claimed(backend, spec, row, claims, claim, force)
            claims.finish(claim, "yielded" if skipped is not None else "done")
        except TransientError as exc:  # a flaky store or device: the next attempt resumes from the checkpoint
            logger.warning("prompt %s attempt %d: %s; retrying", row.prompt_id, claim.attempt, exc)
            claims.finish(claim, "failed")
            continue
        except Exception as exc:  # noqa: BLE001 - final for this prompt: recorded, the attempt counted
            logger.exception("prompt %s attempt %d failed", row.prompt_id, claim.attempt)
            claims.finish(claim, "failed")
            return result_row(row, "failed", f"{type(exc).__name__}: {exc}", attempt=claim.attempt)
        if skipped is None:
            drop_state(claims.store, row.prompt_id, keep=spec.keep_state)
        return result


def _render_claimed(backend: WanBackend, spec: JobSpec, row: PromptRow, claims: Claims, claim: Claim,
                    force: bool) -> dict[str, Any]:
    from pipeline.outputs.render import render

    began = time.perf_counter()
    out = claims.store
    config = dataclasses.replace(spec.rollout, num_chunks=row.num_chunks)
    result = render(backend, [row.prompt], [row.prompt_id], out.url, config=config, trim=spec.trim,
                    seeds=[row.seed], state_url=Store(out.join(f"rollouts/{row.prompt_id}"), out.storage_options),
                    storage_options=out.storage_options, force_restart=force, names=(VIDEO_KEY, STATS_KEY),
                    probe=spec.probe)[0]
    values = {**drift_summary(result), "video": result.video_url, "stats": result.stats_url,
              "attempt": claim.attempt, "seed": row.seed, "num_chunks": row.num_chunks,
              "render_hash": result.config_hash, "seconds": time.perf_counter() - began}
    claims.mark_done(row.prompt_id, {**values, "row_hash": row_hash(spec, row)})
    return result_row(row, "ok", None, reused=False, **values)


def drift_summary(result: RenderResult) -> dict[str, Any]:
    """Per-prompt summary of the per-chunk stats: what the results table and the regression compare."""
    rows = result.rows
    severities = [s for r in rows if isinstance(s := r.get("severity"), float) and not math.isnan(s)]
    return {
        "chunks": len(rows), "resumed_from": result.resumed_from,
        "pruned_chunks": sum(r["verdict"] == "pruned" for r in rows),
        "tokens_pruned": sum(int(r["tokens_pruned"]) for r in rows),
        "mean_severity": sum(severities) / len(severities) if severities else None,
        "latent_dist_first": _finite(rows[-1]["latent_dist_first"]),
        "hist_dist_first": _finite(rows[-1]["hist_dist_first"]),
        "steadiness": _finite(sum(r["steadiness"] for r in rows) / len(rows)),
    }


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def drop_state(out: Store, prompt_id: str, *, keep: bool) -> int:
    """Retention: delete ``rollouts/<id>/`` once the prompt's outputs are committed (unless ``keep``).

    Returns the number of objects deleted. A failure is logged, never fatal: the prompt is finished either way.
    """
    if keep:
        return 0
    try:
        keys = out.list(f"rollouts/{prompt_id}/")
        for key in keys:
            out.delete(key)
    except TokentrimError as exc:
        logger.warning("could not delete the rollout state of %s: %s", prompt_id, exc)
        return 0
    return len(keys)


def finished_rows(spec: JobSpec, rows: list[PromptRow], out: Store) -> tuple[list[dict[str, Any]], list[PromptRow]]:
    """The driver's first pass, before any worker starts: rows already done (or with an unreadable marker) get their
    result row here; the others are returned to be rendered."""
    present = {k[len("done/"):-len(".json")] for k in out.list("done/") if k.endswith(".json")}
    claims = Claims(out, lease_s=spec.lease_s, max_attempts=spec.max_attempts)
    results: list[dict[str, Any]] = []
    todo: list[PromptRow] = []
    for row in rows:
        if row.prompt_id not in present:
            todo.append(row)
            continue
        try:
            skipped = from_marker(row, spec, claims.done(row.prompt_id))
        except TokentrimError as exc:
            results.append(result_row(row, "failed", f"{type(exc).__name__}: {exc}"))
            continue
        if skipped is None:
            todo.append(row)
        else:
            results.append(skipped)
    return results, todo
