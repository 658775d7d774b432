"""Submit, resume and inspect render jobs: validate, record, dispatch to an executor, write the results.

Everything that can be checked is checked before anything is written; finished rows are answered from their done
markers by the driver, before any worker starts. The output's layout is `jobs.layout`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jobs.executors import Executor, make_executor
from jobs.layout import JOB_KEY, RESULTS_KEY, JobOutput
from jobs.policy import RESULT_FIELDS, Claims, finished_rows, result_row
from jobs.progress import JobProgress, watching
from jobs.results import ResultsWriter, write_results
from jobs.spec import JOB_FORMAT, JobSpec, absolute_url, check_device, check_prompt, settings_differ
from jobs.table import BadRow, PromptRow, read_table, validate_rows
from pipeline.errors import CorruptStateError, InputError, OutputConflictError, UsageError
from pipeline.store import KeyNotFound

logger = logging.getLogger(__name__)


@dataclass
class JobReport:
    """What a run did, per status, and where its results are."""

    output_url: str
    counts: dict[str, int] = field(default_factory=dict)
    results_url: str = ""
    seconds: float = 0.0
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        """Every row that could be rendered was (ok: now or by an earlier run); invalid and excluded rows do not count
        against it."""
        return bool(self.counts.get("ok")) and not any(
            self.counts.get(s) for s in ("failed", "poison"))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokentrim")
    except PackageNotFoundError:
        return "unknown"


def check_model(spec: JobSpec) -> None:
    """Refuse an unknown model or a missing weights file before anything is written or any worker starts.

    A path that this machine does not have is accepted only for a Ray job on a remote cluster (RAY_ADDRESS set),
    whose workers may mount it."""
    from pipeline.model.backend import PRESETS

    model, run = spec.model, spec.execution
    remote = run.executor == "ray" and bool(os.environ.get("RAY_ADDRESS"))
    # the workers run on this machine and claim no GPU of Ray's: it must have the device they will ask for (workers
    # that claim GPUs are placed by Ray on nodes that have them: `jobs.resources` checks that before any work)
    if run.executor == "local" or not (remote or run.gpus_per_worker):
        check_device(spec.resolved_device)
    if model.model not in PRESETS:
        if os.path.isdir(model.model):
            if not os.path.isdir(os.path.join(model.model, "transformer")):
                raise UsageError(f"`model` {model.model!r} is a folder without transformer/: not a diffusers Wan2.1 "
                                 "folder")
        elif not (remote and "/" in model.model):
            raise UsageError(f"`model` must be one of {sorted(PRESETS)} or a diffusers Wan2.1 folder, got "
                             f"{model.model!r}")
    if model.weights is not None and not os.path.isfile(model.weights) and not remote:
        raise UsageError(f"`weights` {model.weights!r} is not a file")


def check_output(out: JobOutput, spec: JobSpec, *, force: bool) -> None:
    """Refuse an output written by a job with other render settings (unless ``force``)."""
    try:
        old = out.store.get_json(JOB_KEY)
    except KeyNotFound:
        return
    if isinstance(old, dict) and old.get("config_hash") != spec.config_hash() and not force:
        raise OutputConflictError(
            f"{out.url} holds job {old.get('config_hash')} with other render settings than this one "
            f"({spec.config_hash()}; {_differ(old, spec)} differ); use another output or --force to re-render under "
            "the new settings")


def _differ(old: dict[str, Any], spec: JobSpec) -> str:
    """Which render settings a recorded job.json has other than ``spec``, as dotted names."""
    try:
        recorded = JobSpec.from_dict(old["spec"]).render_settings()
    except (KeyError, TypeError, ValueError):
        return "unreadable recorded settings"
    return ", ".join(settings_differ(recorded, spec.render_settings())) or "no named setting"


def write_job_json(out: JobOutput, spec: JobSpec) -> None:
    out.store.put_json(JOB_KEY, {"format": JOB_FORMAT, "version": _version(), "config_hash": spec.config_hash(),
                                 "spec": spec.to_dict(), "updated_at": time.time()})


def load_spec(out: JobOutput) -> JobSpec:
    """The spec recorded in ``job.json`` of an output, writing to ``out`` (wherever it was first written)."""
    try:
        doc = out.store.get_json(JOB_KEY)
    except KeyNotFound as exc:
        raise UsageError(f"no {JOB_KEY} under {out.url!r}: not a tokentrim job output") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        raise UsageError(f"{JOB_KEY} under {out.url!r} holds no job spec")
    spec = dict(doc["spec"], output_url=absolute_url(out.url))
    return JobSpec.from_dict(spec, out.store.storage_options)


def plan(spec: JobSpec) -> tuple[JobSpec, list[PromptRow], list[dict[str, Any]]]:
    """Everything that can be checked before anything is written: the spec with location-independent URLs, the rows
    to render (``--limit`` applied) and the result rows of the invalid and excluded ones. Raises InputError."""
    spec = dataclasses.replace(spec, input_url=absolute_url(spec.input_url),
                               output_url=absolute_url(spec.output_url))
    good, bad = validate_rows(read_table(spec.input_url, spec.storage_options),
                              default_chunks=spec.render.rollout.num_chunks, base_seed=spec.render.seed)
    refused = {r.row: error for r in good if (error := check_prompt(spec.model, r.prompt)) is not None}
    bad += [BadRow(r.row, r.prompt_id, f"row {r.row}: {refused[r.row]}") for r in good if r.row in refused]
    good = [r for r in good if r.row not in refused]
    if not good:
        first = "; ".join(b.error for b in bad[:3])
        raise InputError(f"prompt table {spec.input_url!r} has no valid row ({len(bad)} invalid): {first}")
    for b in bad:
        logger.warning("skipping %s", b.error)
    other = [result_row({"prompt_id": b.prompt_id, "row": b.row}, "invalid", b.error) for b in bad]
    limit = spec.execution.limit
    if limit is not None:
        other += [result_row(r, "excluded", f"beyond --limit {limit}") for r in good[limit:]]
        good = good[:limit]
    return spec, good, other


def submit(spec: JobSpec, *, force: bool = False, executor: Executor | None = None,
           progress: JobProgress | None = None, output: JobOutput | None = None) -> JobReport:
    """Render every valid row of the spec's prompt table; finished prompts are skipped (decided here, before any
    worker starts), unfinished rollouts continue from their last committed chunk. Writes ``results.parquet``.
    ``progress`` is told what the job commits while it runs (`jobs.progress`). ``output``: the spec's output, when
    the caller has it open already (at the spec's absolute ``output_url``)."""
    began = time.perf_counter()
    check_model(spec)
    spec, rows, results = plan(spec)
    if output is not None and output.url != spec.output_url:
        raise ValueError(f"`output` {output.url!r} is not the spec's output {spec.output_url!r}")
    out = output or JobOutput.open(spec.output_url, spec.storage_options)
    check_output(out, spec, force=force)
    write_job_json(out, spec)
    writer = ResultsWriter(out, results, every_rows=spec.execution.results_every_rows,
                           every_s=spec.execution.results_every_s)
    with watching(out, rows, progress, label=spec.output_url.rstrip("/").rsplit("/", 1)[-1]):
        run_rows(spec, rows, executor or make_executor(spec, out, force=force), out, writer)
    results = sorted(writer.close(), key=lambda r: r["row"])
    counts = dict(Counter(r["status"] for r in results))
    return JobReport(spec.output_url, counts, out.store.join(RESULTS_KEY), time.perf_counter() - began, results)


def run_rows(spec: JobSpec, rows: list[PromptRow], executor: Executor, out: JobOutput,
             writer: ResultsWriter | None = None) -> list[dict[str, Any]]:
    """Rows already done are answered from their markers; the rest go to the executor in rounds: a row that came
    back ``busy`` (a live lease elsewhere) is handed out again as soon as a holder is done, fails or loses its lease
    (watched with a short poll), at the latest once that lease could have run out. Each final row goes to
    ``writer`` as it comes; returns the final rows of this call.
    """
    run = spec.execution
    writer = writer or ResultsWriter(out, every_rows=run.results_every_rows, every_s=run.results_every_s)
    first = len(writer.rows)
    results, todo = finished_rows(spec, rows, out)
    writer.add(results)
    if writer.pending or not writer.written:  # `add` wrote it already when the first pass answered many rows
        writer.write()  # what is known before any work: rows done earlier, invalid and excluded rows
    by_id = {r.prompt_id: r for r in rows}
    claims = Claims(out, lease_s=run.lease_s, max_attempts=run.max_attempts)
    while todo:
        seen, busy = collect(executor.run(todo), writer)
        writer.add([result_row(r, "failed", "the executor returned no result for this row")
                    for r in todo if r.prompt_id not in seen])
        if not busy:
            break
        wake = min(_number(w["retry_at"]) for w in busy)
        logger.info("%d prompt(s) held by live leases elsewhere; back to them when a holder is done (at the latest "
                    "in %.1f s)", len(busy), max(wake - time.time(), 0.0))
        wait_for_holders(claims, [w["prompt_id"] for w in busy], wake)
        todo = [by_id[w["prompt_id"]] for w in busy]
    return writer.rows[first:]


def wait_for_holders(claims: Claims, prompt_ids: list[str], wake: float) -> float:
    """Sleep until one of ``prompt_ids`` is no longer held by a live lease, or until ``wake`` (a clock time, capped
    at one lease from now). Returns the seconds waited."""
    began = time.time()
    until = min(wake + 0.2, began + claims.lease_s)
    poll = min(max(claims.lease_s / 20, 0.05), 1.0)
    while time.time() < until and all(claims.held(pid) for pid in prompt_ids):
        time.sleep(min(poll, max(until - time.time(), 0.0)))
    return time.time() - began


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def collect(work: Iterable[dict[str, Any]], writer: ResultsWriter) -> tuple[set[str], list[dict[str, Any]]]:
    """One round's work rows, as the executor yields them: each final one goes to ``writer`` at once. Returns the
    ids that came back and the busy rows."""
    seen: set[str] = set()
    busy: list[dict[str, Any]] = []
    for w in work:
        seen.add(w["prompt_id"])
        if w["status"] == "busy":
            busy.append(w)
        else:
            writer.add([{k: w[k] for k in RESULT_FIELDS}])
    return seen, busy


def status(out: JobOutput) -> dict[str, Any]:
    """Progress of a job output, also while it runs: rows by state, live leases, last results, stored bytes."""
    spec = load_spec(out)
    done = out.done_ids()
    report: dict[str, Any] = {"output": out.url, "config_hash": spec.config_hash(), "input": spec.input_url}
    chunks_asked: dict[str, int] = {}
    try:
        _, rows, other = plan(spec)
        chunks_asked = {r.prompt_id: r.num_chunks for r in rows}
        counts = Counter(r["status"] for r in other)
        finished = sum(r.prompt_id in done for r in rows)
        report["rows"] = {"to_render": len(rows), "done": finished, "remaining": len(rows) - finished,
                          "invalid": counts["invalid"], "excluded": counts["excluded"]}
    except InputError as exc:
        report["rows"] = {"error": str(exc)}
    claims = Claims(out, lease_s=spec.execution.lease_s, max_attempts=spec.execution.max_attempts)
    report["leases"] = leases(out, claims, done, chunks_asked)
    report["in_progress"] = [lease["prompt_id"] for lease in report["leases"] if lease["state"] == "live"]
    try:
        report["results"] = dict(Counter(out.store.get_table(RESULTS_KEY).column("status").to_pylist()))
    except KeyNotFound:
        report["results"] = None
    report["stored_bytes"] = stored_bytes(out)
    report["eta_s"] = _eta(out, sorted(done), report["rows"].get("remaining"), spec.execution.workers)
    return report


def leases(out: JobOutput, claims: Claims, done: set[str], chunks_asked: dict[str, int]) -> list[dict[str, Any]]:
    """The latest lease of every unfinished prompt that has one: ``live`` (held, not run out) or ``stale`` (held,
    but run out: its worker died or hangs), with its age and the chunks its rollout has committed."""
    committed = Counter(pid for pid, _, _ in out.chunk_markers())
    now, found = time.time(), []
    for pid in sorted(out.claimed_ids() - done):
        last = claims.last_lease(pid)
        if last is None or last[1].get("state") != "held":
            continue
        attempt, lease, claimed_at = last
        expires_in = float(lease["expires_at"]) - now
        found.append({"prompt_id": pid, "attempt": attempt, "state": "live" if expires_in > 0 else "stale",
                      "age_s": None if claimed_at is None else now - claimed_at, "expires_in_s": expires_in,
                      "chunk": committed[pid], "num_chunks": chunks_asked.get(pid)})
    return found


def _eta(out: JobOutput, done: list[str], remaining: int | None, workers: int, sample: int = 32) -> float | None:
    """Seconds left: the mean render time of (up to ``sample``) finished prompts times the prompts left, over the
    workers; None when nothing is left or no finished prompt records its time."""
    if not remaining:
        return None if remaining is None else 0.0
    seconds = []
    for pid in done[-sample:]:
        try:
            marker = out.store.get_json(out.done_key(pid))
        except (KeyNotFound, CorruptStateError):
            continue
        if isinstance(marker, dict) and isinstance(marker.get("seconds"), (int, float)):
            seconds.append(float(marker["seconds"]))
    return sum(seconds) / len(seconds) * remaining / workers if seconds else None


def stored_bytes(out: JobOutput) -> dict[str, int]:
    """Bytes under the output by top-level folder (videos, stats, rollouts, ...) and in total."""
    sizes: Counter[str] = Counter()
    for key, size in out.store.sizes().items():
        sizes[key.split("/", 1)[0] if "/" in key else "other"] += size
    return {**dict(sizes), "total": sum(sizes.values())}


__all__ = ["JobReport", "JobSpec", "load_spec", "run_rows", "status", "submit", "write_results"]
