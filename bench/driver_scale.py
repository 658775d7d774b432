"""The job driver's cost per row as the table grows: 1k, 10k and 100k rows, on file:// and on a loopback moto S3
server behind a proxy that delays every request by ``--latency-ms`` (20).

The renderer does no model work: a stand-in executor runs the real `jobs.policy.process_row` (claims, leases, done
markers, retention) on a thread pool of ``--workers`` with `render_prompts` replaced by a stub that
returns at once. Everything else is the real `jobs.run.submit`: table read and validation, the first pass over the
done markers, dispatch, results written as the job goes, the done-index. Variants, each in a fresh process (its peak
RSS is the driver's memory; in ``fresh`` it includes the stand-in workers):

  fresh        nothing done yet: every row rendered (stub) through real claims      check: all ok, n results
  resume-cold  every row done, no done-index: every marker read (concurrently)       check: all ok (reused), n reads
  resume-warm  every row done, with the done-index the job wrote                      check: all ok (reused), 0 reads

Backends: ``file`` (a local folder), ``s3`` (moto behind the latency proxy: moto answers every list request by
iterating the whole bucket, so its listings cost O(keys) of server CPU each) and ``latency-file`` (the real driver over
a local folder, each store call sleeping ``--latency-ms`` per request it stands for, a listing one request per page of
1,000 keys, and listed by key prefix as on S3 from a name index of the folder, O(page) a request: what a real object
store charges, without moto's scan). Each variant prints its store calls, the requests they stand for, the time spent
in them and the driver's CPU seconds (on s3 also the server process's); ``--profile DIR`` writes a cProfile of each.

On S3 the done state of the resume variants is planted in the server's memory (real marker bytes, not through HTTP),
and ``fresh`` runs only up to ``--fresh-max-s3`` rows (each row costs ~8 requests of the workers). Run from the
repository root:

    python -m bench.driver_scale [--sizes 1000,10000,100000] [--backends file,latency-file,s3] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

BUCKET = "bench"
CREDENTIALS = {"key": "testing", "secret": "testing"}
VARIANTS = ("fresh", "resume-cold", "resume-warm")
BACKENDS = ("file", "latency-file", "s3")


# ------------------------------------------------------------------------------------ the S3 server process
async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy one direction of a connection, each chunk sent ``delay`` seconds after it arrived (order kept)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump_in() -> None:
        while data := await reader.read(1 << 16):
            await queue.put((loop.time() + delay, data))
        await queue.put((0.0, b""))

    async def pump_out() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    try:
        await asyncio.gather(pump_in(), pump_out())
    except (ConnectionError, OSError):
        writer.close()


async def _proxy(upstream: int, delay: float, conn: Any) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(_forward(client_r, server_w, delay), _forward(server_r, client_w, 0.0))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    conn.send(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def _serve(conn: Any, delay: float) -> None:
    """Child process: moto on 127.0.0.1, a latency proxy in front of it; plants objects on request."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    port = moto.get_host_and_port()[1]
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")

    def planter() -> None:
        while True:
            message = conn.recv()
            if message is None:
                os._exit(0)
            for key, data in message:
                backend.put_object(BUCKET, key, data)
            conn.send(len(message))

    threading.Thread(target=planter, daemon=True).start()  # the parent sends nothing before it has the port
    asyncio.run(_proxy(port, delay, conn))


@dataclass
class S3Server:
    process: Any
    conn: Any
    endpoint: str

    @classmethod
    def start(cls, latency_s: float) -> S3Server:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child, latency_s), daemon=True)
        process.start()
        return cls(process, parent, f"http://127.0.0.1:{parent.recv()}")

    def plant(self, objects: list[tuple[str, bytes]]) -> None:
        for i in range(0, len(objects), 20_000):
            self.conn.send(objects[i:i + 20_000])
            self.conn.recv()

    def cpu_s(self) -> float:
        """CPU seconds the server process (moto and the proxy) used so far."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self) -> None:
        self.conn.send(None)
        self.process.join(10)


# ------------------------------------------------------------------------------------------ one variant, in a child
class _Stub:
    """What `render_prompts` returns, without rendering: one chunk's stats."""

    def __init__(self, prompt_id: str, out_url: str) -> None:
        self.rows = [{"severity": 0.5, "verdict": "accepted", "tokens_pruned": 0, "latent_dist_first": 0.0,
                      "hist_dist_first": 0.0, "steadiness": 0.0}]
        self.resumed_from, self.config_hash = 0, "stub"
        self.video_url, self.stats_url = f"{out_url}/videos/{prompt_id}.mp4", f"{out_url}/stats/{prompt_id}.parquet"


def _stub_render(backend: Any, prompts: list[str], ids: list[str], out: Any, **_: Any) -> list[_Stub]:
    return [_Stub(ids[0], out.url)]


class StandInExecutor:
    """The real `process_row` for every row on a thread pool (the workers), yielding each result as it finishes."""

    def __init__(self, spec: Any, workers: int, allow: bool) -> None:
        from jobs.layout import JobOutput
        from jobs.policy import Claims

        self.spec, self.workers, self.allow, self.calls = spec, workers, allow, 0
        self.claims = Claims(JobOutput.open(spec.output_url, spec.storage_options), lease_s=spec.execution.lease_s,
                             max_attempts=spec.execution.max_attempts)

    def run(self, rows: list[Any]) -> Any:
        from jobs.policy import process_row

        self.calls += len(rows)
        if rows and not self.allow:
            raise AssertionError(f"a resume variant dispatched {len(rows)} row(s)")
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(process_row, None, self.spec, row, self.claims) for row in rows]  # type: ignore
            for future in as_completed(futures):
                yield future.result()


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    import pipeline.outputs.render as render_module
    from bench.store_model import LATENCY_FS, StoreCalls, latency_file
    from jobs.run import submit
    from jobs.spec import JobSpec

    render_module.render_prompts = _stub_render  # type: ignore[assignment]
    is_latency_file = job["backend"] == "latency-file"
    calls = latency_file(job["latency_s"]) if is_latency_file else StoreCalls()
    spec = JobSpec.from_fields(input_url=job["table"], output_url=job["out"], model="tiny", executor="local",
                               storage_options=job["storage_options"], lease_s=600.0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    executor = StandInExecutor(spec, job["workers"], allow=job["variant"] == "fresh")
    profile = cProfile.Profile() if job.get("profile") else None
    cpu, began = time.process_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    report = submit(spec, executor=executor)
    if profile is not None:
        profile.disable()
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    if profile is not None:
        profile.dump_stats(job["profile"])
    counts = calls.counts
    server_s = LATENCY_FS[0].server_s if LATENCY_FS else 0.0
    worker_reads = counts["get:done"] if job["variant"] == "fresh" else 0
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "base_rss_mb": base_rss / 1024, "counts": report.counts, "listing_snapshot_s": server_s,
            "dispatched": executor.calls,
            "marker_reads": counts["get:done"], "results_rows": len(report.results),
            "store_calls": sum(counts.values()) - worker_reads, "requests": calls.requests - worker_reads,
            "call_counts": dict(counts), "call_seconds": {k: round(v, 3) for k, v in calls.seconds.items()}}


# ------------------------------------------------------------------------------------------------ orchestration
def _table(n: int) -> Any:
    import pyarrow as pa

    return pa.table({"prompt_id": [f"prompt-{i:06d}" for i in range(n)],
                     "prompt": [f"a lantern floating over a river at dusk, shot {i}" for i in range(n)]})


def _markers(table_url: str, out_url: str, options: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The done markers a finished job holds (the bytes `Store.put_json` writes), keyed under the output."""
    from jobs.policy import row_hash
    from jobs.run import plan
    from jobs.spec import JobSpec

    spec, rows, _ = plan(JobSpec.from_fields(input_url=table_url, output_url=out_url, model="tiny",
                                             storage_options=options))
    objects = []
    for row in rows:
        values = {"attempt": 0, "seed": row.seed, "num_chunks": row.num_chunks, "chunks": 1, "resumed_from": 0,
                  "pruned_chunks": 0, "tokens_pruned": 0, "mean_severity": 0.5, "latent_dist_first": 0.0,
                  "hist_dist_first": 0.0, "steadiness": 0.0, "render_hash": "stub",
                  "video": f"{out_url}/videos/{row.prompt_id}.mp4",
                  "stats": f"{out_url}/stats/{row.prompt_id}.parquet",
                  "row_hash": row_hash(spec, row)}
        text = json.dumps(values, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        objects.append((f"done/{row.prompt_id}.json", text.encode()))
    return objects


def _plant(server: S3Server | None, root: str, objects: list[tuple[str, bytes]]) -> None:
    if server is not None:
        server.plant([(f"{root}/{k}", b) for k, b in objects])
        return
    os.makedirs(f"{root}/done", exist_ok=True)
    for key, data in objects:
        with open(f"{root}/{key}", "wb") as f:
            f.write(data)


def _plant_index(out: Any, planted: list[tuple[str, bytes]]) -> None:
    """`jobs.results.ResultsWriter`'s last index refresh without its reads (the bytes are the planted ones)."""
    from jobs.done_index import marker_versions, save_index
    from jobs.layout import JobOutput

    job = JobOutput(out)
    data = {pid: value for key, value in planted if (pid := JobOutput.done_id(key)) is not None}
    versions = marker_versions(job, list(data))
    save_index(job, {pid: (versions[pid], data[pid]) for pid in data})


def _child(job: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-m", "bench.driver_scale", "--one", json.dumps(job)], env=env,
                          capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"variant {job['variant']} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _check(variant: str, n: int, r: dict[str, Any], latency_s: float = 0.0) -> str:
    want = {"fresh": ({"ok": n}, n), "resume-cold": ({"ok": n}, 0), "resume-warm": ({"ok": n}, 0)}
    counts, dispatched = want[variant]
    problems = []
    if r["counts"] != counts or r["results_rows"] != n or r["dispatched"] != dispatched:
        problems.append(f"counts {r['counts']}, {r['results_rows']} results, {r['dispatched']} dispatched")
    if variant == "resume-cold" and r["marker_reads"] != n:
        problems.append(f"{r['marker_reads']} marker reads, not {n}")
    if variant == "resume-warm" and r["marker_reads"]:
        problems.append(f"{r['marker_reads']} marker reads, not 0 (the index should answer)")
    if r["backend"] == "latency-file":  # listed by prefix pages, each request delayed as it claims
        pages = r["call_counts"].get("versions:done", 0)
        if variant != "fresh" and pages < -(-n // 1000):
            problems.append(f"{pages} listing calls of done/, fewer than one per 1,000 rows")
        if sum(r["call_seconds"].values()) < latency_s * r["requests"]:
            problems.append("store calls took less than the injected latency")
    return "; ".join(problems) or "ok"


def bench(backend: str, n: int, args: argparse.Namespace, server: S3Server | None, tmp: str) -> list[dict]:
    from pipeline.store import Store, split_url

    run = uuid.uuid4().hex[:8]
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "s3":
        assert server is not None
        options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": server.endpoint}}
        root = f"s3://{BUCKET}/{run}"
    else:
        options, root = {}, f"file://{tmp}/{run}"
    table_url, out_url = f"{root}/table.parquet", f"{root}/out"
    store, key = split_url(table_url, options)
    store.put_table(key, _table(n))
    out = Store(out_url, options)
    rows = []
    for variant in args.variants:
        if variant == "fresh" and backend == "s3" and n > args.fresh_max_s3:
            continue
        if variant == "fresh":
            for k in out.list():
                out.delete(k)
        else:
            if not out.exists("done/" + "prompt-000000.json"):  # no run before: plant the done state
                planted = _markers(table_url, out_url, options)
                _plant(server if backend == "s3" else None, f"{run}/out" if backend == "s3" else f"{tmp}/{run}/out",
                       planted)
                if variant == "resume-warm":  # the index as the job's last results write leaves it
                    _plant_index(out, planted)
            if variant == "resume-cold":
                out.delete("done_index.parquet")
        latency_s = args.latency_ms / 1000 if backend == "latency-file" else 0.0
        job = {"variant": variant, "table": table_url, "out": out_url, "storage_options": options,
               "workers": args.workers, "backend": backend, "latency_s": latency_s,
               "profile": f"{args.profile}/{backend}-{n}-{variant}.prof" if args.profile else None}
        server_cpu = server.cpu_s() if backend == "s3" and server is not None else 0.0
        r = _child(job)
        r.update(backend=backend, rows=n, variant=variant)
        r["server_cpu_s"] = server.cpu_s() - server_cpu if backend == "s3" and server is not None else 0.0
        r["check"] = _check(variant, n, r, latency_s)
        rows.append(r)
        on_server = (f"server CPU {r['server_cpu_s']:.1f} s  " if backend == "s3" else
                     f"of it folder snapshot {r['listing_snapshot_s']:.1f} s  " if backend == "latency-file" else "")
        print(f"{backend:12s} {n:>7d} {variant:12s} {r['seconds']:8.2f} s  {r['seconds'] / n * 1000:7.3f} s/1k  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB ({(r['peak_rss_mb'] - r['base_rss_mb']) / n * 1000:6.1f} MB/1k "
              f"over {r['base_rss_mb']:.0f})  marker reads {r['marker_reads']:>6d}  "
              f"store calls {r['store_calls']:>6d} ({r['requests']} requests)  driver CPU {r['cpu_s']:.1f} s  "
              f"{on_server}check: {r['check']}", flush=True)
        print("      time in store calls (sum over threads): " + ", ".join(
            f"{op} {r['call_counts'][op]}x {sec:.2f} s" for op, sec in sorted(r["call_seconds"].items(),
                                                                              key=lambda kv: -kv[1])[:6]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--backends", default="file,s3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=16, help="stand-in worker threads in the fresh variant")
    parser.add_argument("--fresh-max-s3", type=int, default=1000)
    parser.add_argument("--profile", default=None, help="folder for a cProfile of each variant's driver")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    backends = args.backends.split(",")
    if set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(set(backends) - set(BACKENDS))}; choose from {BACKENDS}")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    command = "python -m bench.driver_scale " + " ".join(a for a in sys.argv[1:])
    print(f"# {command.strip()}\n# latency {args.latency_ms:.0f} ms per request on s3 (proxy) and latency-file; "
          f"stand-in workers {args.workers}", flush=True)
    server = S3Server.start(args.latency_ms / 1000) if "s3" in backends else None
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="driver-scale-") as tmp:
            for backend in backends:
                for n in (int(s) for s in args.sizes.split(",")):
                    results += bench(backend, n, args, server, tmp)
    finally:
        if server is not None:
            server.stop()
    print("BENCH_JSON " + json.dumps({"command": command.strip(), "latency_ms": args.latency_ms, "rows": results}))


if __name__ == "__main__":
    main()
