"""Submit, resume and inspect render jobs. All distribution lives here (Ray Data); ray is imported lazily.

Output layout under the job URL: ``job.json`` (spec, config hash, version), ``videos/<id>.mp4``,
``stats/<id>.parquet``, ``rollouts/<id>/`` (latent context), ``claims/`` and ``done/`` (bookkeeping),
``results.parquet`` (one row per prompt of the table: status, error, paths, drift summary).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jobs.spec import JOB_FORMAT, JobSpec
from jobs.table import BadRow, PromptRow, read_table, validate_rows
from jobs.worker import RESULT_FIELDS, RenderWorker, result_row
from pipeline.errors import ConfigMismatchError, InputError
from pipeline.store import KeyNotFound, Store

logger = logging.getLogger(__name__)


@dataclass
class JobReport:
    """What a run did, per status, and where its results are."""

    output_url: str
    counts: dict[str, int] = field(default_factory=dict)
    results_url: str = ""
    seconds: float = 0.0
    results: list[dict[str, Any]] = field(default_factory=list)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokentrim")
    except PackageNotFoundError:
        return "unknown"


def write_job_json(out: Store, spec: JobSpec, *, force: bool) -> None:
    """Record the spec; refuse an output written by a job with other render settings (unless ``force``)."""
    try:
        old = out.get_json("job.json")
    except KeyNotFound:
        old = None
    if old is not None and old.get("config_hash") != spec.config_hash() and not force:
        raise ConfigMismatchError(
            f"{out.url} holds job {old.get('config_hash')} with other render settings than this one "
            f"({spec.config_hash()}); use another output or --force to re-render under the new settings")
    out.put_json("job.json", {"format": JOB_FORMAT, "version": _version(), "config_hash": spec.config_hash(),
                              "spec": spec.to_dict(), "updated_at": time.time()})


def load_spec(output_url: str, storage_options: dict | None = None) -> JobSpec:
    """The spec recorded in ``job.json`` of an output (for resume and status)."""
    try:
        doc = Store(output_url, storage_options).get_json("job.json")
    except KeyNotFound as exc:
        raise InputError(f"no job.json under {output_url!r}: not a tokentrim job output") from exc
    return JobSpec.from_dict(doc["spec"], storage_options)


def submit(spec: JobSpec, *, force: bool = False, limit: int | None = None) -> JobReport:
    """Render every valid row of the spec's prompt table on Ray; finished prompts are skipped, unfinished
    rollouts continue from their last committed chunk. Returns counts per status; writes ``results.parquet``."""
    began = time.perf_counter()
    out = Store(spec.output_url, spec.storage_options)
    write_job_json(out, spec, force=force)
    good, bad = validate_rows(read_table(spec.input_url, spec.storage_options),
                              default_chunks=spec.rollout.num_chunks, base_seed=spec.seed)
    if limit is not None:
        good = good[:limit]
    for b in bad:
        logger.warning("skipping %s", b.error)
    results = run_rows(spec, good, force=force) if good else []
    results += [result_row({"prompt_id": b.prompt_id, "row": b.row}, "invalid", b.error) for b in bad]
    results.sort(key=lambda r: r["row"])
    write_results(out, results)
    counts = dict(Counter(r["status"] for r in results))
    return JobReport(spec.output_url, counts, out.join("results.parquet"), time.perf_counter() - began, results)


def run_rows(spec: JobSpec, rows: list[PromptRow], *, force: bool = False) -> list[dict[str, Any]]:
    """Ray Data: rows -> an actor pool of `RenderWorker` (model loaded once per actor, ``gpus_per_worker`` each)."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a dependency; the message names the fix
        raise ImportError("tokentrim jobs need Ray: pip install 'ray[data,default]'") from exc
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)  # honours RAY_ADDRESS; a local cluster otherwise
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.verbose_progress = False
    # one row is a whole long rollout: do not let Ray Data call that "no progress" after its default 30 min
    ctx.execution_no_progress_timeout_s = max(ctx.execution_no_progress_timeout_s, 6 * 3600.0)
    ds = ray.data.from_items([r.to_dict() for r in rows], override_num_blocks=min(len(rows), 200))
    with warnings.catch_warnings():  # actor restart caps have no named parameter yet (Ray 2.60)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = _render_pool(ds, spec, force)
    return [{name: row.get(name) for name in RESULT_FIELDS} for row in ds.take_all()]


def _render_pool(ds: Any, spec: JobSpec, force: bool) -> Any:
    import ray

    return ds.map_batches(
        RenderWorker,
        fn_constructor_kwargs={"spec": spec.to_dict(), "storage_options": spec.storage_options, "force": force},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=spec.workers),
        num_gpus=spec.gpus_per_worker or None,
        num_cpus=1,
        # no max_restarts / max_task_retries: Ray Data's defaults (unlimited) restart an actor lost with its node on
        # another node and retry its rows there; the claims bound the attempts per prompt (a cap failed the whole job)
    )


def write_results(out: Store, results: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    schema = pa.schema([("prompt_id", pa.string()), ("row", pa.int64()), ("status", pa.string()),
                        ("error", pa.string()), ("attempt", pa.int64()), ("video", pa.string()),
                        ("stats", pa.string()), ("chunks", pa.int64()), ("resumed_from", pa.int64()),
                        ("pruned_chunks", pa.int64()), ("tokens_pruned", pa.int64()),
                        ("mean_severity", pa.float64()), ("latent_dist_first", pa.float64()),
                        ("hist_dist_first", pa.float64()), ("flicker", pa.float64()), ("seconds", pa.float64()),
                        ("config_hash", pa.string())])
    out.put_table("results.parquet", pa.Table.from_pylist(results, schema=schema))


def status(output_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Progress of a job output: prompts finished, claimed, and the last results table's counts."""

    out = Store(output_url, storage_options)
    spec = load_spec(output_url, storage_options)
    done = [k for k in out.list("done/") if k.endswith(".json")]
    claimed = {k.split("/")[1] for k in out.list("claims/") if k.endswith(".json")}
    report: dict[str, Any] = {"output": out.url, "config_hash": spec.config_hash(), "input": spec.input_url,
                              "done": len(done), "claimed": len(claimed), "results": None}
    try:
        table = out.get_table("results.parquet")
        report["results"] = dict(Counter(table.column("status").to_pylist()))
    except KeyNotFound:
        pass
    return report


__all__ = ["BadRow", "JobReport", "JobSpec", "load_spec", "run_rows", "status", "submit"]
