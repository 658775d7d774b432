"""A seeded chaos soak of one job output on a loopback S3 (moto): `submit` processes run concurrently, each behind its
own `StoreProxy`; for ``seconds`` the soak kills random ones (SIGKILL: a dead worker and driver), restarts them,
freezes a process's path to the store for longer than a lease, and cuts its connections. Then one clean `resume`.

At the end: every valid row rendered exactly once (one done marker, at most one ``done`` lease and it is the marker's
attempt; no prompt reported ``ok`` by two processes), every video byte-identical to a clean render's, results.parquet
with every row of the table (valid rows ok, bad rows invalid), and exit status 0 for every process that was
not killed. The schedule of faults is drawn from ``seed`` (timings still vary with the machine's speed).

    python -m tests.chaos --seconds 600 --seed 7 --prompts 12      # the long run (a nightly or a bench)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from tests.store_proxy import StoreProxy

ROOT = Path(__file__).resolve().parents[1]
BAD_ROWS = {"../escape": "hostile", "bad\n": "newline"}


@dataclass(frozen=True)
class SoakConfig:
    """seconds: how long faults are injected; prompts: valid rows (plus `BAD_ROWS`); chunks per prompt; lease_s of
    every submit; concurrency: submit processes at once."""

    seed: int = 0
    seconds: float = 30.0
    prompts: int = 3
    chunks: int = 4
    lease_s: float = 2.0
    concurrency: int = 2


@dataclass
class SoakReport:
    faults: list[str] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)  # exit status of every process that was not killed
    killed: int = 0
    oks: dict[str, int] = field(default_factory=dict)  # prompt id -> processes that reported it ok
    problems: list[str] = field(default_factory=list)


def write_table(path: Path, config: SoakConfig) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"p{i}" for i in range(config.prompts)] + list(BAD_ROWS)
    prompts = [f"a {c} circle moving right on a plain background" for c in ("red", "green", "blue", "yellow")]
    texts = [prompts[i % 4] + (f" number {i}" if i >= 4 else "") for i in range(config.prompts)] + list(
        BAD_ROWS.values())
    pq.write_table(pa.table({"prompt_id": ids, "prompt": texts}), path)
    return str(path)


class Submits:
    """The submit processes of the soak, each behind its own proxy."""

    def __init__(self, argv: list[str], endpoint: str, storage_options: dict, log_dir: Path) -> None:
        self.argv, self.storage_options, self.log_dir = argv, storage_options, log_dir
        parsed = urlparse(endpoint)
        self.target = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.running: list[tuple[subprocess.Popen, StoreProxy, Path]] = []
        self.count = 0

    def start(self) -> None:
        proxy = StoreProxy(self.target)
        options = {**self.storage_options, "client_kwargs": {"endpoint_url": proxy.endpoint}}
        log = self.log_dir / f"submit-{self.count}.log"
        self.count += 1
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log, "w") as out:
            proc = subprocess.Popen([*self.argv, "--storage-options", json.dumps(options)], cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.running.append((proc, proxy, log))

    def reap(self, report: SoakReport) -> None:
        for item in list(self.running):
            proc, proxy, log = item
            if proc.poll() is not None:
                self.running.remove(item)
                proxy.close()
                if proc.returncode == -signal.SIGKILL:
                    continue
                report.exits.append(proc.returncode)
                _count_oks(log.read_text(), report)
                if proc.returncode != 0:
                    report.problems.append(f"{log.name} exited {proc.returncode}: {log.read_text()[-2000:]}")


def _count_oks(text: str, report: SoakReport) -> None:
    """Prompts a submit reported rendered: its results table names them; here the log's summary is enough."""
    for line in text.splitlines():
        if line.startswith("rendered-ok: "):
            for pid in line[len("rendered-ok: "):].split(","):
                if pid:
                    report.oks[pid] = report.oks.get(pid, 0) + 1


def inject(submits: Submits, rng: random.Random, config: SoakConfig, report: SoakReport) -> None:
    """One fault on a random running submit: kill it, freeze its store path for longer than a lease, or cut it."""
    if not submits.running:
        return
    proc, proxy, log = rng.choice(submits.running)
    kind = rng.choice(["kill", "freeze", "freeze", "cut", "none"])
    report.faults.append(f"{time.strftime('%H:%M:%S')} {kind} {log.name}")
    if kind == "kill":
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report.killed += 1
    elif kind == "freeze":
        proxy.freeze()
        time.sleep(config.lease_s * rng.uniform(1.3, 2.5))
        proxy.thaw()
    elif kind == "cut":
        proxy.cut()


def run_soak(config: SoakConfig, work: Path, endpoint: str, bucket_url: str, storage_options: dict) -> SoakReport:
    """The soak; see the module docstring. ``bucket_url``: an s3:// prefix on the server at ``endpoint``."""
    from jobs.run import submit
    from jobs.spec import JobSpec
    from pipeline.config import RolloutConfig
    from pipeline.store import Store

    rng = random.Random(config.seed)
    report = SoakReport()
    work.mkdir(parents=True, exist_ok=True)
    table = write_table(work / "prompts.parquet", config)
    out = f"{bucket_url}/chaos-{config.seed}-{int(time.time() * 1000)}"
    common = ["--executor", "local", "--model", "tiny", "--num-chunks", str(config.chunks),
              "--lease-s", str(config.lease_s), "--max-attempts", "1000"]
    clean = JobSpec.from_fields(input_url=table, output_url=str(work / "clean"), executor="local", model="tiny",
                                rollout=RolloutConfig(num_chunks=config.chunks), lease_s=config.lease_s)
    submit(clean)  # the reference videos, rendered without faults
    submits = Submits([sys.executable, "-m", "tests.chaos", "submit", table, "--out", out, *common], endpoint,
                      storage_options, work)
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        submits.reap(report)
        while len(submits.running) < config.concurrency:
            submits.start()  # a restarted driver, or one more concurrent submit
        time.sleep(rng.uniform(0.5, 3.0))
        inject(submits, rng, config, report)
    for _, proxy, _ in submits.running:
        proxy.thaw()
    for proc, _, _ in submits.running:
        proc.wait(timeout=600)
    submits.reap(report)
    final = Submits([sys.executable, "-m", "tests.chaos", "resume", out], endpoint, storage_options, work)
    final.start()
    final.running[0][0].wait(timeout=600)
    final.reap(report)
    check(Store(out, storage_options), Store(str(work / "clean")), config, report)
    return report


def check(store, clean, config: SoakConfig, report: SoakReport) -> None:
    """The promises, appended to ``report.problems`` when broken."""
    valid = [f"p{i}" for i in range(config.prompts)]
    for pid in valid:
        states = {int(k.rsplit("/", 1)[1][:-6]): store.get_json(k)["state"]
                  for k in store.list(f"claims/{pid}/") if k.endswith(".lease")}
        done_leases = [n for n, s in states.items() if s == "done"]
        marker = store.get_json(f"done/{pid}.json")
        if len(done_leases) > 1 or (done_leases and done_leases != [marker["attempt"]]):
            report.problems.append(f"{pid}: rendered more than once: leases {states}, marker attempt "
                                   f"{marker['attempt']}")
        if report.oks.get(pid, 0) > 1:
            report.problems.append(f"{pid}: reported ok by {report.oks[pid]} processes")
        if store.get_bytes(f"videos/{pid}.mp4") != clean.get_bytes(f"videos/{pid}.mp4"):
            report.problems.append(f"{pid}: the video differs from the clean render's")
    rows = store.get_table("results.parquet").to_pylist()
    statuses = {r["prompt_id"]: r["status"] for r in rows}
    if len(rows) != config.prompts + len(BAD_ROWS):
        report.problems.append(f"results.parquet has {len(rows)} rows, not {config.prompts + len(BAD_ROWS)}")
    for pid in valid:
        if statuses.get(pid) != "ok":
            report.problems.append(f"{pid}: final status {statuses.get(pid)!r}")
    if sorted(s for p, s in statuses.items() if p not in valid) != ["invalid"] * len(BAD_ROWS):
        report.problems.append(f"bad rows: {statuses}")


def _cli(argv: list[str]) -> int:
    """``submit``/``resume`` as the `tokentrim` command runs them, plus one ``rendered-ok:`` line naming the prompts
    this process rendered (its own report, not results.parquet, which a concurrent submit may rewrite)."""
    import click

    import jobs.run
    from jobs.cli import main

    reports: list = []
    real = jobs.run.submit

    def spy(*args, **kwargs):
        reports.append(real(*args, **kwargs))
        return reports[-1]

    jobs.run.submit = spy  # the command imports it when it runs
    try:
        main.main(argv, standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    ok = [r["prompt_id"] for report in reports for r in report.results if r["status"] == "ok" and not r["reused"]]
    print("rendered-ok: " + ",".join(ok), flush=True)  # noqa: T201 - read by the soak
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["submit"], ["resume"]):
        return _cli(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--lease-s", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--work", default="out/chaos")
    args = parser.parse_args(argv)
    config = SoakConfig(args.seed, args.seconds, args.prompts, args.chunks, args.lease_s, args.concurrency)
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("chaos")
        report = run_soak(config, Path(args.work), f"http://{host}:{port}", "s3://chaos", options)
    finally:
        server.stop()
    for fault in report.faults:
        print(fault)  # noqa: T201
    print(f"seed {config.seed}: {len(report.faults)} faults, {report.killed} kills, exits {report.exits}, "  # noqa: T201
          f"rendered ok by {report.oks}")
    for problem in report.problems:
        print(f"PROBLEM {problem}")  # noqa: T201
    print("PASS" if not report.problems else "FAIL")  # noqa: T201
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
