"""`tokentrim report`: one static HTML page per job output (``report.html``) and per regression.

The pages make no network request (inline SVG charts, style and script; videos linked relative to the page), so the
folder can be copied anywhere; everything read back from the store is checked before it is shown.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from jobs.layout import PAGE_KEY, RESULTS_KEY, JobOutput
from jobs.policy import STATUSES
from jobs.run import load_spec
from pipeline.errors import CorruptStateError
from pipeline.rollout.chunk_stats import VERDICTS
from pipeline.store import KeyNotFound, Store

if TYPE_CHECKING:
    import jinja2

    from jobs.regress import Regression
    from jobs.spec import JobSpec

# results columns shown per prompt, with their meaning (column headers' tooltips)
FIGURES = {"mean_severity": "mean TokenTrim severity over judged chunks (latent L2 drift of the top-p tokens)",
           "latent_dist_first": "latent RMS distance of the last chunk to the first",
           "hist_dist_first": "colour-histogram distance of the last chunk to the first (0-1)",
           "steadiness": "VBench temporal-flickering score (255 - mean |frame change|) / 255: higher is steadier",
           "seconds": "render wall seconds"}
SHOWN_ERRORS = ("invalid", "failed", "poison")


@dataclass(frozen=True)
class PromptView:
    """One prompt as the job page shows it."""

    prompt_id: str
    prompt: str
    status: str
    error: str
    verdict: str  # pruned | accepted | not judged | none (no stats)
    chunks: int | None
    pruned_chunks: int | None
    figures: dict[str, float | None]
    video: str | None = None  # href relative to the page
    chart: str = ""  # inline SVG
    problems: list[str] = field(default_factory=list)


def environment() -> jinja2.Environment:
    """The pages' template environment (``jobs/templates``), escaping every value."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("jobs", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    return env


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def source_commit() -> str:
    """The git commit of the code that made the page (``+dirty`` with local changes), or ``unknown``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def now_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptStateError(f"{where} must be a number, got {value!r}")
    return float(value)


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CorruptStateError(f"{where} must be an integer >= 0, got {value!r}")
    return value


def read_results(out: JobOutput) -> list[dict[str, Any]]:
    """``results.parquet`` as checked rows (prompt id, status in `STATUSES`, error, counts, figures)."""
    try:
        rows = out.store.get_table(RESULTS_KEY).to_pylist()
    except KeyNotFound as exc:
        raise CorruptStateError(f"no {RESULTS_KEY} under {out.url!r}: run or resume the job first") from exc
    checked = []
    for i, r in enumerate(rows):
        where = f"results.parquet row {i}"
        missing = {"prompt_id", "status", "error", "chunks", "pruned_chunks", *FIGURES} - set(r)
        if missing:
            raise CorruptStateError(f"{where} lacks the columns {sorted(missing)}")
        if r["status"] not in STATUSES:
            raise CorruptStateError(f"{where}: `status` must be one of {STATUSES}, got {r['status']!r}")
        if not isinstance(r["prompt_id"], (str, type(None))) or not isinstance(r["error"], (str, type(None))):
            raise CorruptStateError(f"{where}: `prompt_id` and `error` must be text")
        checked.append({"prompt_id": r["prompt_id"] or "", "status": r["status"], "error": r["error"] or "",
                        "chunks": _count(r["chunks"], f"{where} `chunks`"),
                        "pruned_chunks": _count(r["pruned_chunks"], f"{where} `pruned_chunks`"),
                        **{k: _number(r[k], f"{where} `{k}`") for k in FIGURES}})
    return checked


def read_chunks(out: JobOutput, prompt_id: str) -> dict[str, list[Any]]:
    """The per-chunk columns a chart needs from ``stats/<id>.parquet``, checked."""
    key = out.stats_key(prompt_id)
    table = out.store.get_table(key)
    names = ("chunk", "severity", "threshold", "verdict", "latent_dist_first")
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise CorruptStateError(f"{key} lacks the columns {missing}")
    cols = {n: table.column(n).to_pylist() for n in names}
    bad = [v for v in cols["verdict"] if v not in VERDICTS]
    if bad:
        raise CorruptStateError(f"{key}: `verdict` must be one of {VERDICTS}, got {bad[0]!r}")
    for n in ("severity", "threshold", "latent_dist_first"):
        cols[n] = [math.nan if v is None else _number(v, f"{key} `{n}`") for v in cols[n]]
    cols["chunk"] = [_count(v, f"{key} `chunk`") for v in cols["chunk"]]
    return cols


def prompt_verdict(verdicts: list[str]) -> str:
    if "pruned" in verdicts:
        return "pruned"
    return "accepted" if "accepted" in verdicts else "not judged"


def video_href(prompt_id: str, folder: str = "") -> str:
    """The page-relative link of a prompt's mp4 (``folder`` for a variant's job under a regression)."""
    return quote(folder + JobOutput.video_key(prompt_id))


def prompt_view(out: JobOutput, row: dict[str, Any], prompts: dict[str, str]) -> PromptView:
    """A results row with its chart and video link; a prompt whose stats cannot be read keeps its row, with why."""
    from jobs.plots import severity_chart

    pid = row["prompt_id"]
    view = PromptView(pid, prompts.get(pid, ""), row["status"], row["error"], "none", row["chunks"],
                      row["pruned_chunks"], {k: row[k] for k in FIGURES})
    if row["status"] != "ok":
        return view
    try:
        cols = read_chunks(out, pid)
    except (KeyNotFound, CorruptStateError) as exc:
        view.problems.append(str(exc))
        return view
    chart = severity_chart(cols["chunk"], cols["severity"], cols["threshold"], cols["verdict"],
                           cols["latent_dist_first"])
    return PromptView(pid, view.prompt, view.status, view.error, prompt_verdict(cols["verdict"]), view.chunks,
                      view.pruned_chunks, view.figures, video_href(pid), chart)


def prompt_texts(spec: JobSpec) -> dict[str, str]:
    """Prompt id -> prompt from the job's table (empty when the table cannot be read any more)."""
    from jobs.run import plan

    try:
        return {row.prompt_id: row.prompt for row in plan(spec)[1]}
    except (OSError, ValueError, KeyNotFound, CorruptStateError) as exc:  # InputError is a ValueError
        import logging

        logging.getLogger(__name__).warning("prompt texts unavailable: %s", exc)
        return {}


def job_report(out: JobOutput) -> str:
    """Write ``report.html`` under a job output; returns its URL."""
    spec = load_spec(out)
    results = read_results(out)
    prompts = prompt_texts(spec)
    views = [prompt_view(out, r, prompts) for r in results if r["status"] not in SHOWN_ERRORS + ("excluded",)]
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    html = environment().get_template("job.html.j2").render(
        title=f"tokentrim job {out.url}", output=out.url, spec=spec.to_dict(), config_hash=spec.config_hash(),
        counts=counts, views=views, errors=[r for r in results if r["status"] in SHOWN_ERRORS],
        figures=FIGURES, verdicts=("pruned", "accepted", "not judged", "none"), date=now_utc(),
        commit=source_commit())
    out.store.put_bytes(PAGE_KEY, html.encode("utf-8"))
    return out.store.join(PAGE_KEY)


def regression_page(out: Store, result: Regression) -> str:
    """Write the regression's ``report.html`` under its output: per prompt the variants' videos side by side, per
    metric baseline, tonight, change, allowed limit and a check mark, the curves, settings, date and commit."""
    from jobs.plots import curves_chart
    from jobs.regress import METRIC_UNITS

    curves = {m: curves_chart(m, METRIC_UNITS.get(m, ""), {v: c[m] for v, c in result.curves.items() if m in c})
              for m in METRIC_UNITS if any(m in c for c in result.curves.values())}
    jobs = {v: JobOutput(out.child(v)) for v in result.variants}
    variants = [v for v in result.variants if jobs[v].store.exists(RESULTS_KEY)]
    videos = {pid: {v: video_href(pid, f"{v}/") if jobs[v].store.exists(jobs[v].video_key(pid)) else None
                    for v in variants} for pid in result.prompts}
    html = environment().get_template("regress.html.j2").render(
        title=f"tokentrim regression {out.url}", output=out.url, passed=result.passed, failures=result.failures,
        checks=result.checks, curves=curves, variants=variants, prompts=result.prompts, videos=videos,
        settings=result.settings, baseline_url=result.baseline_url, date=now_utc(), commit=source_commit())
    out.put_bytes(PAGE_KEY, html.encode("utf-8"))
    return out.join(PAGE_KEY)
