"""Rendering the rows of a job: one prompt at a time, claimed, resumable, with a result row for each.

`render_row` holds the per-prompt policy (skip finished, claim, render with checkpoints, record the outcome) and
needs no cluster; `RenderWorker` is the Ray Data callable class that loads the model once per actor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

from jobs.claims import Claim, Claims
from jobs.spec import JobSpec
from jobs.table import PromptRow
from pipeline.backend import WanBackend, load_backend
from pipeline.errors import TokentrimError, TransientError
from pipeline.render import RenderResult, render, render_hash
from pipeline.store import Store

logger = logging.getLogger(__name__)

VIDEO_KEY, STATS_KEY = "videos/{id}.mp4", "stats/{id}.parquet"
RESULT_FIELDS = ("prompt_id", "row", "status", "error", "attempt", "video", "stats", "chunks", "resumed_from",
                 "pruned_chunks", "tokens_pruned", "mean_severity", "latent_dist_first", "hist_dist_first",
                 "flicker", "seconds", "config_hash")


def result_row(row: PromptRow | dict, status: str, error: str | None = None, **values: Any) -> dict[str, Any]:
    """One line of ``results.parquet``; every field present (None where unknown)."""
    base = row.to_dict() if isinstance(row, PromptRow) else row
    out: dict[str, Any] = {name: None for name in RESULT_FIELDS}
    out.update({"prompt_id": base.get("prompt_id"), "row": base.get("row"), "status": status, "error": error})
    out.update(values)
    return out


def drift_summary(result: RenderResult) -> dict[str, Any]:
    """Per-prompt summary of the per-chunk stats: what the results table and the regression compare."""
    rows = result.rows
    severities = [s for r in rows if isinstance(s := r.get("severity"), float) and not math.isnan(s)]
    return {
        "chunks": len(rows), "resumed_from": result.resumed_from,
        "pruned_chunks": sum(r["verdict"] == "pruned" for r in rows),
        "tokens_pruned": sum(int(r["tokens_pruned"]) for r in rows),
        "mean_severity": sum(severities) / len(severities) if severities else None,
        "latent_dist_first": rows[-1]["latent_dist_first"], "hist_dist_first": rows[-1]["hist_dist_first"],
        "flicker": sum(r["flicker"] for r in rows) / len(rows),
    }


def render_row(backend: WanBackend, spec: JobSpec, row: PromptRow, claims: Claims, *, force: bool = False
               ) -> dict[str, Any]:
    """Render one prompt of the job unless it is finished, claimed by a live worker, or poison."""
    config = dataclasses.replace(spec.rollout, num_chunks=row.num_chunks)
    digest = render_hash(backend, config, spec.trim)
    done = claims.done(row.prompt_id)
    if done is not None and done.get("config_hash") == digest:
        return result_row(row, "skipped", None, video=done.get("video"), stats=done.get("stats"),
                          config_hash=digest)
    waited = False
    while True:
        claim = claims.acquire(row.prompt_id)
        if claim == "busy" and not waited:
            # a worker that died mid-rollout (and whose row Ray retries here) holds a lease that is no longer
            # renewed: wait it out once; a live holder renews it and the prompt is reported busy
            waited = True
            _sleep_until(claims, claims.lease_expiry(row.prompt_id) + 1.0)
            continue
        if isinstance(claim, str):
            error = {"busy": "another worker holds a live claim on this prompt",
                     "poison": f"failed {spec.max_attempts} attempts; not tried again"}[claim]
            return result_row(row, claim, error, config_hash=digest)
        try:
            return _render_claimed(backend, spec, row, claims, claim, config, digest, force)
        except TransientError as exc:  # a flaky store or device: the next attempt resumes from the checkpoint
            logger.warning("prompt %s attempt %d: %s; retrying", row.prompt_id, claim.attempt, exc)
            claims.release(claim)
        except TokentrimError as exc:
            claims.release(claim)
            return result_row(row, "failed", f"{type(exc).__name__}: {exc}", attempt=claim.attempt,
                              config_hash=digest)
        except Exception as exc:  # noqa: BLE001 - any other failure is recorded for this row; the job goes on
            logger.exception("prompt %s failed", row.prompt_id)
            claims.release(claim)
            return result_row(row, "failed", f"{type(exc).__name__}: {exc}", attempt=claim.attempt,
                              config_hash=digest)


def _sleep_until(claims: Claims, deadline: float) -> None:
    while (left := deadline - claims.clock()) > 0:
        time.sleep(min(left, 5.0))


def _render_claimed(backend: WanBackend, spec: JobSpec, row: PromptRow, claims: Claims, claim: Claim, config,
                    digest: str, force: bool) -> dict[str, Any]:
    began = time.perf_counter()
    out = Store(spec.output_url, spec.storage_options)
    result = render(backend, [row.prompt], [row.prompt_id], spec.output_url, config=config, trim=spec.trim,
                    seeds=[row.seed], state_url=out.join(f"rollouts/{row.prompt_id}"),
                    storage_options=spec.storage_options, force_restart=force,
                    on_chunk=lambda index, rows: claims.renew(claim), names=(VIDEO_KEY, STATS_KEY))[0]
    summary = drift_summary(result)
    values = {**summary, "video": result.video_url, "stats": result.stats_url, "attempt": claim.attempt,
              "seconds": time.perf_counter() - began, "config_hash": digest}
    claims.mark_done(row.prompt_id, {k: v for k, v in values.items() if k != "seconds"})
    claims.release(claim)
    return result_row(row, "ok", None, **values)


class RenderWorker:
    """Ray Data actor: loads the model once, then renders each batch of prompt rows (one result row each)."""

    def __init__(self, spec: dict[str, Any], storage_options: dict[str, Any] | None = None,
                 force: bool = False) -> None:
        import torch

        self.spec = JobSpec.from_dict(spec, storage_options)
        self.force = force
        self.backend = load_backend(self.spec.model, device=self.spec.resolved_device,
                                    dtype=getattr(torch, self.spec.dtype), weights=self.spec.weights)
        self.claims = Claims(Store(self.spec.output_url, self.spec.storage_options), lease_s=self.spec.lease_s,
                             max_attempts=self.spec.max_attempts)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """``batch``: columns of PromptRow fields -> columns of result fields."""
        n = len(batch["prompt_id"])
        rows = [PromptRow(**{f.name: _plain(batch[f.name][i]) for f in dataclasses.fields(PromptRow)})
                for i in range(n)]
        results = [render_row(self.backend, self.spec, row, self.claims, force=self.force) for row in rows]
        return {name: [r[name] for r in results] for name in RESULT_FIELDS}


def _plain(value: Any) -> Any:
    """numpy scalars from Ray Data batches -> Python values."""
    return value.item() if hasattr(value, "item") else value
