"""The report pages in a real browser (Debian's headless ``chromium``, over the DevTools protocol): a small canary
regression is rendered once (2 prompts, 3 chunks, three variants); its ``report.html`` and the ``tokentrim report``
page of its TokenTrim job are served on 127.0.0.1 and opened. Every ``<video>`` must reach a playable state with
the duration of its mp4, every chart must be drawn, the page must ask for nothing outside its own folder, and a
screenshot is written under the test's tmp dir. Without chromium these tests fail under CI=true, else skip."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.layout import JobOutput
from jobs.policy import result_row
from jobs.regress import METRICS, default_table, run_regression
from jobs.report import job_report
from jobs.run import write_job_json, write_results
from jobs.spec import JobSpec
from pipeline.config import RolloutConfig
from pipeline.errors import CorruptStateError
from pipeline.outputs.video import decode_mp4
from pipeline.store import Store
from tests.browser import Chromium, Page, serve

FPS = RolloutConfig().fps
# every <video> of the page: wait (at most 30 s) until it can play, or fails; then its state and duration
VIDEOS_JS = """Promise.all(Array.from(document.querySelectorAll("video")).map(v => new Promise(resolve => {
  const done = () => resolve({src: v.getAttribute("src"), state: v.readyState, duration: v.duration,
                              error: v.error && v.error.code});
  if (v.readyState >= 3) { done(); return; }
  v.addEventListener("canplay", done, {once: true}); v.addEventListener("error", done, {once: true});
  setTimeout(done, 30000); v.preload = "auto"; v.load();
})))"""
CHARTS_JS = """Array.from(document.querySelectorAll("figure.chart")).map(f => {
  const svg = f.querySelector("svg"), box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {key: f.dataset.prompt || f.dataset.metric, width: box.width, height: box.height,
          lines: svg ? svg.querySelectorAll("path, line, use").length : 0, text: svg ? svg.textContent : ""};
})"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium = Chromium(tmp_path_factory.mktemp("chromium"))
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def nightly(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A canary regression of 2 prompts x 3 chunks against its own baseline (passes): tokentrim/, no-trim/, probe/."""
    out = tmp_path_factory.mktemp("nightly") / "night"
    spec = JobSpec.from_fields(input_url=default_table("canary"), output_url=str(out), model="canary",
                               rollout=RolloutConfig(num_chunks=3), limit=2, executor="local")
    result = run_regression(spec, update_baseline=True)
    assert result.passed, result.failures
    return out


def _open(browser: Chromium, url: str) -> Page:
    page = browser.page()
    page.open(url)
    return page


def _check_page(page: Page, root: str, folder: Path, shot: Path) -> list[dict]:
    """Videos playable with their mp4's duration, nothing requested outside ``root``, no script error, a
    screenshot; returns the charts."""
    videos = page.evaluate(VIDEOS_JS)
    assert videos, "the page shows no video"
    for v in videos:
        assert v["error"] is None and v["state"] >= 3, v
        frames = decode_mp4((folder / v["src"]).read_bytes()).shape[0]
        assert v["duration"] == pytest.approx(frames / FPS, abs=0.5 / FPS), v
    outside = [u for u in page.requested() if not (u.startswith(root) or u.startswith("data:"))]
    assert outside == [], f"the page asked for {outside}"
    assert page.console_errors() == []
    assert page.screenshot(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return page.evaluate(CHARTS_JS)


def test_job_report_page_plays_every_video_and_draws_every_chart(nightly, browser, tmp_path):
    job = nightly / "tokentrim"
    done = CliRunner().invoke(main, ["report", str(job)])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == f"report: {job / 'report.html'}"
    ok = [r["prompt_id"] for r in Store(str(job)).get_table("results.parquet").to_pylist() if r["status"] == "ok"]
    with serve(job) as root:
        page = _open(browser, root + "report.html")
        charts = _check_page(page, root, job, tmp_path / "job-report.png")
        assert sorted(c["key"] for c in charts) == sorted(ok)
        for chart in charts:
            assert chart["width"] > 300 and chart["height"] > 150 and chart["lines"] > 10, chart
            assert "chunk" in chart["text"] and "threshold" in chart["text"], chart
        assert page.evaluate("document.querySelectorAll('#prompts tbody tr').length") == len(ok)
        # filter by status, then sort by drift: the page's script works
        shown = page.evaluate("""(() => { const s = document.getElementById("f-status"); s.value = "ok";
            s.dispatchEvent(new Event("input"));
            return document.querySelectorAll("#prompts tbody tr:not([hidden])").length; })()""")
        assert shown == len(ok)
        order = page.evaluate("""(() => { const th = Array.from(document.querySelectorAll("#prompts th"))
            .find(h => h.textContent.trim().startsWith("latent_dist_first")); th.click();
            const i = Array.from(th.parentNode.children).indexOf(th);
            return Array.from(document.querySelectorAll("#prompts tbody tr"))
              .map(r => parseFloat(r.cells[i].dataset.value)); })()""")
        assert order == sorted(order) and len(order) == len(ok)
        page.close()
    assert (tmp_path / "job-report.png").stat().st_size > 10_000


def test_regression_page_shows_three_variants_metrics_and_curves(nightly, browser, tmp_path):
    with serve(nightly) as root:
        page = _open(browser, root + "report.html")
        charts = _check_page(page, root, nightly, tmp_path / "regress-report.png")
        assert sorted(c["key"] for c in charts) == sorted(METRICS)
        assert all(c["width"] > 300 and "chunk" in c["text"] and "no-trim" in c["text"] for c in charts), charts
        sources = page.evaluate("Array.from(document.querySelectorAll('video')).map(v => v.getAttribute('src'))")
        assert sorted({s.split("/")[0] for s in sources}) == ["no-trim", "probe", "tokentrim"]
        assert len(sources) == 3 * 2
        rows = page.evaluate("""Array.from(document.querySelectorAll("#checks tbody tr"))
            .map(r => Array.from(r.cells).map(c => c.textContent.trim()))""")
        page.close()
    metrics = json.loads((nightly / "baseline.json").read_text())["metrics"]
    assert sorted((r[0], r[1]) for r in rows) == sorted((v, m) for v, ms in metrics.items() for m in ms)
    assert all(r[6] == "✓" for r in rows), rows
    html = (nightly / "report.html").read_text()
    assert "PASS" in html and '"num_chunks": 3' in html and "commit" in html


def _fake_job(tmp_path: Path) -> Store:
    """A job output written by hand: one ok prompt whose chunk 3 was pruned, one invalid and one failed row whose
    errors hold markup."""
    spec = JobSpec.from_fields(input_url=str(tmp_path / "missing.parquet"), output_url=str(tmp_path / "job"))
    out = Store(spec.output_url)
    write_job_json(JobOutput(out), spec)
    write_results(JobOutput(out), [
        result_row({"prompt_id": "cat", "row": 0}, "ok", chunks=4, pruned_chunks=1, latent_dist_first=0.5),
        result_row({"prompt_id": None, "row": 1}, "invalid", "row 1: `prompt` <b>empty</b>"),
        result_row({"prompt_id": "dog", "row": 2}, "failed", "RuntimeError: <script>alert(1)</script>"),
    ])
    nan = float("nan")
    out.put_table("stats/cat.parquet", pa.table({
        "chunk": [0, 1, 2, 3], "severity": [nan, 1.0, 1.1, 5.0], "threshold": [nan, nan, nan, 1.3],
        "verdict": ["warmup", "warmup", "warmup", "pruned"], "latent_dist_first": [0.0, 0.1, 0.2, 0.5]}))
    return out


def test_job_report_marks_pruned_chunks_and_lists_failed_rows_escaped(tmp_path):
    out = _fake_job(tmp_path)
    assert job_report(JobOutput(out)) == out.join("report.html")
    html = out.get_bytes("report.html").decode()
    assert 'data-verdict="pruned"' in html and "pruned, regenerated" in html  # the row and the chart's marker
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert "&lt;b&gt;empty&lt;/b&gt;" in html and ">failed<" in html and ">invalid<" in html
    assert 'src="videos/cat.mp4"' in html and "http://" not in html.replace("http://www.w3.org/", "")


def test_job_report_refuses_a_results_table_it_cannot_trust(tmp_path):
    out = _fake_job(tmp_path)
    out.put_table("results.parquet", pa.table({"prompt_id": ["cat"], "status": ["done?"]}))
    with pytest.raises(CorruptStateError, match="row 0 lacks the columns"):
        job_report(JobOutput(out))
    table = out.get_table("stats/cat.parquet").to_pylist()
    write_results(JobOutput(out), [result_row({"prompt_id": "cat", "row": 0}, "ok", chunks=4)])
    out.put_table("stats/cat.parquet", pa.Table.from_pylist([dict(table[0], verdict="great")]))
    html = job_report(JobOutput(out)) and out.get_bytes("report.html").decode()
    assert "`verdict` must be one of" in html  # the row stays, with why its chart is missing
    assert CliRunner().invoke(main, ["report", str(tmp_path / "nothing")]).exit_code == 1
