"""The job policy, in one place: claims and leases, attempts and poison, done markers, retention, the results schema.

Executors only dispatch rows to `process_row`. Per prompt, attempt n is claimed create-only (``claims/<id>/<n>.json``)
with a lease renewed by a heartbeat; ``done/<id>.json`` is created create-only after the video and stats, so at most
one attempt ever finishes a prompt. The non-obvious part: every other commit is fenced (`Claims.fence`), so a holder
whose lease ran out or was taken over stops before its next commit, and a live lease elsewhere sends the row back
``busy`` instead of waiting.
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

from jobs.done_index import done_markers
from jobs.layout import STATS_KEY, VIDEO_KEY, JobOutput
from jobs.markers import check_claim, check_done, check_lease
from jobs.spec import JobSpec
from jobs.table import PromptRow
from pipeline.errors import CorruptStateError, LeaseLostError, StoreError, TokentrimError, TransientError
from pipeline.hashing import canonical, digest_canonical
from pipeline.store import KeyNotFound

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.model.backend import WanBackend
    from pipeline.outputs.render import RenderResult

logger = logging.getLogger(__name__)

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
    from pipeline.rollout.chunk_stats import described_schema

    return described_schema(RESULT_COLUMNS)


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


def fit_result(row: dict[str, Any]) -> dict[str, Any]:
    """A results row whose every value fits its column (`RESULT_COLUMNS`): a value that does not (a non-finite
    float, an int beyond int64, a wrong type) becomes null and is named in ``error``, so one bad row never stops
    ``results.parquet`` from being written."""
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for name, kind, _ in RESULT_COLUMNS:
        value = row.get(name)
        fits = value is None or (
            (kind == "string" and isinstance(value, str))
            or (kind == "bool_" and isinstance(value, bool))
            or (kind == "int64" and isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63)
            or (kind == "float64" and isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value)))
        out[name] = value if fits else None
        if not fits:
            dropped.append(f"`{name}` {value!r}")
    if dropped:
        note = f"unusable values dropped: {', '.join(dropped)}"
        out["error"] = f"{out['error']}; {note}" if out.get("error") else note
    return out


def row_hash(spec: JobSpec, row: PromptRow) -> str:
    """What a done marker must match for a row to count as finished: the job's render settings and the row's own."""
    own = canonical({"prompt": row.prompt, "seed": row.seed, "num_chunks": row.num_chunks})
    return digest_canonical(spec.render_settings_json, own)  # = digest(spec.render_settings(), own values)


# ------------------------------------------------------------------------------------------------ claims
@dataclass
class Claim:
    """An attempt this worker holds on a prompt. ``expires_at``: this machine's clock time until which the lease is
    surely ours (set from the clock read before the last renewal that landed); ``lost``: why it is not ours any
    more, once the heartbeat found out."""

    prompt_id: str
    attempt: int
    token: str
    expires_at: float = 0.0
    lost: str | None = None


@dataclass(frozen=True)
class Busy:
    """Another worker holds a live lease on the prompt until ``until`` (a clock time)."""

    until: float


def owner_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Claims:
    """Claims, leases and done markers of one job output."""

    def __init__(self, output: JobOutput, *, lease_s: float, max_attempts: int,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(output, JobOutput):
            raise TypeError(f"`output` must be a JobOutput, got {type(output).__name__}")
        self.output, self.lease_s, self.max_attempts, self.clock = output, lease_s, max_attempts, clock
        self.store = output.store

    @property
    def margin_s(self) -> float:
        """A holder stops committing this long before its lease ends: the time a commit may take to land."""
        return self.lease_s / 6

    def done(self, prompt_id: str) -> dict | None:
        """The done marker of a prompt, checked strictly (`jobs.markers.check_done`), or None;
        `CorruptStateError` when it is anything else."""
        key = self.output.done_key(prompt_id)
        try:
            marker = self.store.get_json(key)
        except KeyNotFound:
            return None
        return check_done(marker, key)

    def done_or_none(self, prompt_id: str) -> dict | None:
        """`done`, with a corrupt marker read as none: the prompt is not finished and renders again."""
        try:
            return self.done(prompt_id)
        except CorruptStateError as exc:
            logger.warning("%s: rendering %s again", exc, prompt_id)
            return None

    def mark_done(self, prompt_id: str, summary: dict) -> bool:
        """Create the done marker, create-only: True if this call made it; False if a valid marker with the same
        ``row_hash`` was there first (another attempt finished the prompt). A corrupt marker, or one written under
        other settings, is replaced."""
        key = self.output.done_key(prompt_id)
        body = json.dumps(summary, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()
        for _ in range(3):
            if self.store.create_only(key, body):
                return True
            old = self.done_or_none(prompt_id)
            if old is not None and old["row_hash"] == summary["row_hash"]:
                return False
            self.store.delete(key)  # corrupt or stale: this attempt is the current one (fenced by the caller)
        return False

    def attempts(self, prompt_id: str) -> list[int]:
        return self.output.attempts(prompt_id)

    def acquire(self, prompt_id: str) -> Claim | Busy | str:
        """A new claim, `Busy` (a live lease exists) or ``"poison"`` (failed attempts used up).
        `CorruptStateError` when a claim or lease of the prompt does not read back as one."""
        attempts = self.attempts(prompt_id)
        leases = {n: self._lease(prompt_id, n) for n in attempts}
        if attempts and self._live(leases[attempts[-1]]):
            return Busy(float(leases[attempts[-1]]["expires_at"]))
        spent = sum(lease["state"] not in ("done", "yielded", "lost") for lease in leases.values())
        if spent >= self.max_attempts:
            return "poison"
        n = attempts[-1] + 1 if attempts else 0
        token = owner_token()
        body = json.dumps({"owner": token, "attempt": n, "claimed_at": self.clock(), "lease_s": self.lease_s})
        if not self.store.create_only(self.output.claim_key(prompt_id, n), body.encode()):
            return Busy(self.clock())  # another worker created attempt n just now: its lease tells how long
        claim = Claim(prompt_id, n, token)
        self.renew(claim)
        logger.info("claimed %s (attempt %d)", prompt_id, n)
        return claim

    def renew(self, claim: Claim) -> None:
        began = self.clock()
        self._put_lease(claim, "held", began + self.lease_s)
        claim.expires_at = began + self.lease_s  # others see at least this: their clocks read it after ours did

    def finish(self, claim: Claim, state: str) -> None:
        """Give the lease up at once: ``done``, ``failed`` (counts towards poison), ``yielded`` or ``lost``."""
        self._put_lease(claim, state, 0.0)

    def superseded(self, claim: Claim) -> bool:
        """Whether a newer attempt than ``claim`` exists (someone took the prompt over)."""
        attempts = self.attempts(claim.prompt_id)
        return bool(attempts) and attempts[-1] > claim.attempt

    def fence(self, claim: Claim) -> None:
        """Raise `LeaseLostError` unless ``claim`` is still the current attempt with time left to commit: called
        right before every commit of the prompt's state (a checkpoint chunk, the video and stats, the done marker).

        Time left means more than `margin_s` before the lease's end on this machine's clock. When the heartbeat's
        renewals did not land in time, the lease is renewed here once and kept only if it lands in time and no newer
        attempt exists afterwards (a late holder nobody replaced goes on; one that was replaced stops)."""
        if claim.lost is None and self.clock() > claim.expires_at - self.margin_s:
            try:
                if self.superseded(claim):
                    claim.lost = "a newer attempt exists"
                else:
                    self.renew(claim)
            except (TokentrimError, OSError) as exc:
                claim.lost = f"its lease ended at {claim.expires_at:.3f} and could not be renewed: {exc}"
            if claim.lost is None and self.clock() > claim.expires_at - self.margin_s:
                claim.lost = (f"its lease ended at {claim.expires_at:.3f} (less than {self.margin_s:g} s left to "
                              "commit): another worker may hold it now")
        if claim.lost is None and self.superseded(claim):
            claim.lost = "a newer attempt exists"
        if claim.lost is not None:
            raise LeaseLostError(f"attempt {claim.attempt} on {claim.prompt_id} is not current: {claim.lost}")

    def _put_lease(self, claim: Claim, state: str, expires_at: float) -> None:
        self.store.put_json(self.output.lease_key(claim.prompt_id, claim.attempt),
                            {"owner": claim.token, "state": state, "expires_at": expires_at})

    def _lease(self, prompt_id: str, attempt: int) -> dict[str, Any]:
        """Attempt n's lease, checked against its claim; a claim whose lease is not written yet is held until
        ``claimed_at + lease_s``."""
        claim_key, lease_key = self.output.claim_key(prompt_id, attempt), self.output.lease_key(prompt_id, attempt)
        claim = check_claim(self.store.get_json(claim_key), claim_key, attempt)
        try:
            lease = self.store.get_json(lease_key)
        except KeyNotFound:
            lease = {"owner": claim["owner"], "state": "held",
                     "expires_at": float(claim["claimed_at"]) + float(claim["lease_s"])}
        return check_lease(lease, lease_key, claim, self.clock())

    def last_lease(self, prompt_id: str) -> tuple[int, dict[str, Any], float | None] | None:
        """The latest attempt on a prompt: its number, its lease and when it was claimed (None: never claimed)."""
        attempts = self.attempts(prompt_id)
        if not attempts:
            return None
        try:
            claim = self.store.get_json(self.output.claim_key(prompt_id, attempts[-1]))
            claimed_at = float(claim["claimed_at"]) if isinstance(claim, dict) else None
        except (KeyNotFound, CorruptStateError, KeyError, TypeError, ValueError):
            claimed_at = None
        return attempts[-1], self._lease(prompt_id, attempts[-1]), claimed_at

    def held(self, prompt_id: str) -> bool:
        """Whether a live lease holds the prompt now (a corrupt one does not: the row fails with it)."""
        attempts = self.attempts(prompt_id)
        try:
            return bool(attempts) and self._live(self._lease(prompt_id, attempts[-1]))
        except (CorruptStateError, KeyNotFound):
            return False

    def _live(self, lease: dict[str, Any]) -> bool:
        return lease.get("state") == "held" and float(lease["expires_at"]) > self.clock()


class Heartbeat:
    """Renews a claim's lease every ``lease_s / 3`` from its own thread, whatever the main thread is doing.

    It renews only while the claim is current: once a newer attempt exists it marks the claim lost and stops. While
    renewals do not land (a store path cut off), the lease's end on this machine's clock comes closer: `Claims.fence`
    then stops the render at its next commit."""

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
        claims, claim = self.claims, self.claim
        while claim.lost is None and not self._stop.wait(claims.lease_s / 3):
            try:
                if claims.superseded(claim):
                    claim.lost = "a newer attempt exists"
                else:  # late is fine while nobody took over: the commits are fenced by the time left (`fence`)
                    claims.renew(claim)
            except (TokentrimError, OSError) as exc:  # a flaky store: the next beat tries again, inside the lease
                logger.warning("lease renewal of %s failed: %s", claim.prompt_id, exc)
        if claim.lost is not None:
            logger.warning("attempt %d on %s lost its lease (%s): stopping before the next commit",
                           claim.attempt, claim.prompt_id, claim.lost)


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
        if (skipped := from_marker(row, spec, claims.done_or_none(row.prompt_id))) is not None:
            return skipped
        claim = claims.acquire(row.prompt_id)
        if isinstance(claim, Busy):
            return result_row(row, "busy", "another worker holds a live lease", retry_at=claim.until)
        if isinstance(claim, str):
            return result_row(row, "poison", f"failed {spec.execution.max_attempts} attempts; not tried again")
        try:
            with Heartbeat(claims, claim):  # stopped before the lease is given up below: no renewal after that
                # finished while we claimed (a concurrent job's worker): the claim is given back unspent
                skipped = from_marker(row, spec, claims.done_or_none(row.prompt_id))
                result = skipped if skipped is not None else _render_claimed(backend, spec, row, claims, claim, force)
            rendered = result["status"] == "ok" and not result.get("reused")
            claims.finish(claim, "done" if rendered else "yielded")
        except LeaseLostError as exc:  # cut off but alive: nothing more is committed; the driver asks again soon
            logger.warning("prompt %s: %s", row.prompt_id, exc)
            claims.finish(claim, "lost")
            return result_row(row, "busy", str(exc), retry_at=claims.clock())
        except TransientError as exc:  # a flaky store or device: the next attempt resumes from the checkpoint
            logger.warning("prompt %s attempt %d: %s; retrying", row.prompt_id, claim.attempt, exc)
            claims.finish(claim, "failed")
            continue
        except Exception as exc:  # noqa: BLE001 - final for this prompt: recorded, the attempt counted
            logger.exception("prompt %s attempt %d failed", row.prompt_id, claim.attempt)
            claims.finish(claim, "failed")
            return result_row(row, "failed", f"{type(exc).__name__}: {exc}", attempt=claim.attempt)
        if rendered:
            drop_state(claims.output, row.prompt_id, keep=spec.execution.keep_state)
        return result


def _render_claimed(backend: WanBackend, spec: JobSpec, row: PromptRow, claims: Claims, claim: Claim,
                    force: bool) -> dict[str, Any]:
    """Render a claimed prompt; every commit (checkpoint chunks, video and stats, the done marker) is fenced by the
    claim. Returns ``ok``, or ``skipped`` when another attempt's done marker got there first."""
    from pipeline.outputs.render import render_prompts

    began = time.perf_counter()
    out = claims.output
    settings = spec.render
    config = dataclasses.replace(settings.rollout, num_chunks=row.num_chunks)
    result = render_prompts(backend, [row.prompt], [row.prompt_id], out.store, config=config, trim=settings.trim,
                            seeds=[row.seed], state=out.rollout(row.prompt_id), force_restart=force,
                            names=(VIDEO_KEY, STATS_KEY), video=settings.video, probe=settings.probe,
                            fence=lambda: claims.fence(claim))[0]
    values = {**drift_summary(result), "video": result.video_url, "stats": result.stats_url,
              "attempt": claim.attempt, "seed": row.seed, "num_chunks": row.num_chunks,
              "render_hash": result.config_hash, "seconds": time.perf_counter() - began}
    claims.fence(claim)
    if not claims.mark_done(row.prompt_id, {**values, "row_hash": row_hash(spec, row), "owner": claim.token}):
        logger.warning("prompt %s: another attempt committed its done marker first", row.prompt_id)
        skipped = from_marker(row, spec, claims.done_or_none(row.prompt_id))
        if skipped is None:
            raise StoreError(f"{out.done_key(row.prompt_id)} could not be created (replaced three times)")
        return skipped
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


def drop_state(out: JobOutput, prompt_id: str, *, keep: bool) -> int:
    """Retention: delete ``rollouts/<id>/`` once the prompt's outputs are committed (unless ``keep``).

    Returns the number of objects deleted. A failure is logged, never fatal: the prompt is finished either way.
    """
    if keep:
        return 0
    try:
        state = out.rollout(prompt_id)
        keys = state.list()
        for key in keys:
            state.delete(key)
    except TokentrimError as exc:
        logger.warning("could not delete the rollout state of %s: %s", prompt_id, exc)
        return 0
    return len(keys)


def finished_rows(spec: JobSpec, rows: list[PromptRow], out: JobOutput
                  ) -> tuple[list[dict[str, Any]], list[PromptRow]]:
    """The driver's first pass, before any worker starts: rows already done get their result row here (a marker
    that cannot be read now: a failed row); the others (a corrupt done marker included: the prompt is not
    finished) are returned to be rendered."""
    def reader(output: JobOutput) -> Callable[[str], dict | None]:
        return Claims(output, lease_s=spec.execution.lease_s, max_attempts=spec.execution.max_attempts).done_or_none

    markers = done_markers(out, reader, [row.prompt_id for row in rows])  # concurrent, and from the done-index
    results: list[dict[str, Any]] = []
    todo: list[PromptRow] = []
    for row in rows:
        if row.prompt_id not in markers:
            todo.append(row)
            continue
        marker = markers.pop(row.prompt_id)
        if isinstance(marker, TokentrimError):
            results.append(result_row(row, "failed", f"{type(marker).__name__}: {marker}"))
            continue
        skipped = from_marker(row, spec, marker)
        if skipped is None:
            todo.append(row)
        else:
            results.append(skipped)
    return results, todo
