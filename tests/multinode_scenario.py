"""A render job on a local multi-node Ray cluster that loses worker nodes while it renders.

Run in a process of its own (``python -m tests.multinode_scenario --out DIR --report FILE``): it starts a
``ray.cluster_utils.Cluster`` on 127.0.0.1 (a head with no CPUs, which holds the control plane and this driver, and
``--nodes`` worker nodes with one CPU each), submits a job over ``--prompts`` prompts, and each time a rollout has
committed ``--kill-after`` chunks on a node, removes that node (its raylet and workers are killed) until ``--kills``
nodes are gone. It records every write of a done marker and of a chunk's commit marker (each write of a local store
key is a new file: temp file + rename), renders the interrupted prompts again in one go without Ray (the oracle),
then writes a JSON report for `tests/test_multinode.py` to check.

``RAY_TMPDIR`` must point to a private folder: the cluster writes its address file there instead of
``/tmp/ray/ray_current_cluster``, where every other ``ray.init()`` on the machine would find and join it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# a dead node is declared after ~period x threshold (default ~15 s); kept above a loaded CI machine's hiccups
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                 "health_check_failure_threshold": 6}
WATCHED = re.compile(r"^(done/[^/]+\.json|rollouts/[^/]+/chunk-\d{6}\.json)$")
CHUNK_MARKER = re.compile(r"^chunk-(\d{6})\.json$")


def start_cluster(nodes: int) -> Any:
    """A `ray.cluster_utils.Cluster` on 127.0.0.1: a head with no CPUs (control plane and driver only) and ``nodes``
    one-CPU worker nodes, with this process connected as the driver. The caller shuts both down."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False,
        "_system_config": dict(SYSTEM_CONFIG)})  # a copy: Ray adds its own keys to the dict it is given
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        ray.init(address=cluster.address, logging_level=logging.WARNING, configure_logging=False)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


class WriteWatcher(threading.Thread):
    """Polls a local job output and records each distinct file (inode, mtime) seen under a watched key."""

    def __init__(self, root: Path, period_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.root, self.period_s = root, period_s
        self.versions: dict[str, set[tuple[int, int]]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.period_s)
        self.poll()

    def poll(self) -> None:
        for folder in ("done", "rollouts"):
            for path in (self.root / folder).rglob("*.json") if (self.root / folder).exists() else []:
                key = path.relative_to(self.root).as_posix()
                if not WATCHED.match(key):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # deleted between listing and stat (retention)
                    continue
                self.versions.setdefault(key, set()).add((st.st_ino, st.st_mtime_ns))


def committed_chunks(root: Path, prompt_id: str) -> int:
    folder = root / "rollouts" / prompt_id
    return sum(bool(CHUNK_MARKER.match(p.name)) for p in folder.iterdir()) if folder.exists() else 0


def node_of_pid(cluster: Any, pid: int) -> Any | None:
    """The cluster worker node whose raylet started process ``pid`` (a Ray worker), or None."""
    import psutil
    from ray._private import ray_constants

    raylets = {info.process.pid: node for node in cluster.worker_nodes
               for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])}
    try:
        proc: Any = psutil.Process(pid)
        while proc is not None:
            if proc.pid in raylets:
                return raylets[proc.pid]
            proc = proc.parent()
    except psutil.NoSuchProcess:
        return None
    return None


def kill_node(cluster: Any, node: Any) -> None:
    """A machine lost: SIGKILL the node's Ray workers (they outlive their raylet by seconds otherwise, finishing
    their render), then its raylet and the rest (``remove_node`` without a graceful stop)."""
    import psutil
    from ray._private import ray_constants

    workers = []
    for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []):
        try:
            workers += psutil.Process(info.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in workers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)


def live_claims(root: Path) -> list[tuple[str, int, int]]:
    """(prompt id, attempt, owner pid) of every claim file, newest attempt last."""
    out = []
    for path in sorted((root / "claims").glob("*/*.json")) if (root / "claims").exists() else []:
        try:
            owner = json.loads(path.read_text())["owner"]
        except (json.JSONDecodeError, KeyError, OSError):  # being written
            continue
        out.append((path.parent.name, int(path.stem), int(owner.split(":")[1])))
    return out


def wait_and_kill(cluster: Any, root: Path, killed: list[dict], kill_after: int, job: threading.Thread,
                  timeout_s: float) -> dict | None:
    """Wait for a rollout (a prompt not hit before, not done) with ``kill_after`` committed chunks, then remove the
    node that renders it. None when the job ended first."""
    hit = {k["prompt_id"] for k in killed}
    deadline = time.monotonic() + timeout_s
    while job.is_alive() and time.monotonic() < deadline:
        for prompt_id, attempt, pid in live_claims(root):
            if prompt_id in hit or (root / "done" / f"{prompt_id}.json").exists():
                continue
            chunks = committed_chunks(root, prompt_id)
            if chunks < kill_after:
                continue
            node = node_of_pid(cluster, pid)
            if node is None:
                continue
            began = time.monotonic()
            chunks = committed_chunks(root, prompt_id)
            kill_node(cluster, node)
            return {"prompt_id": prompt_id, "attempt": attempt, "pid": pid, "node_id": node.node_id,
                    "committed_at_kill": chunks, "remove_s": time.monotonic() - began}
        time.sleep(0.02)
    return None


def render_oracles(spec: Any, prompt_ids: list[str], folder: Path) -> None:
    """Render these rows of the job in one go, here, without Ray: ``folder/<id>/videos/<id>.mp4``. This process
    has the actors' thread settings (``OMP_NUM_THREADS=1``): CPU renders are bit-identical only at equal ones."""
    import dataclasses

    from jobs.layout import JobOutput
    from jobs.policy import Claims, process_row
    from jobs.table import read_table, validate_rows
    from pipeline.model.backend import load_backend

    backend = load_backend(spec.model.model)
    rows, _ = validate_rows(read_table(spec.input_url), default_chunks=spec.render.rollout.num_chunks,
                            base_seed=spec.render.seed)
    for row in (r for r in rows if r.prompt_id in prompt_ids):
        alone = dataclasses.replace(spec, output_url=str(folder / row.prompt_id))
        process_row(backend, alone, row, Claims(JobOutput.open(alone.output_url), lease_s=60, max_attempts=1))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from jobs.run import submit
    from jobs.spec import JobSpec
    from pipeline.config import RolloutConfig

    root = Path(args.out)
    root.parent.mkdir(parents=True, exist_ok=True)
    table = root.parent / "prompts.parquet"
    ids = [f"p{i}" for i in range(args.prompts)]
    pq.write_table(pa.table({"prompt_id": ids, "prompt": [f"a lighthouse in a storm, take {i}" for i in ids]}), table)
    spec = JobSpec.from_fields(input_url=str(table), output_url=str(root),
                               rollout=RolloutConfig(num_chunks=args.chunks),
                               workers=args.workers, lease_s=args.lease_s, device="cpu", allow_any_prompt=True,
                               # the write watcher counts every chunk marker, so none is deleted under it
                               keep_state=True)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    cluster = start_cluster(args.nodes)
    try:
        timings["cluster_start_s"] = time.monotonic() - t0
        watcher = WriteWatcher(root)
        watcher.start()
        outcome: dict[str, Any] = {}

        def job() -> None:
            try:
                outcome["report"] = submit(spec)
            except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails on it
                outcome["error"] = f"{type(exc).__name__}: {exc}"

        began = time.monotonic()
        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        killed: list[dict] = []
        for _ in range(args.kills):
            kill = wait_and_kill(cluster, root, killed, args.kill_after, thread, args.timeout_s)
            if kill is None:
                break
            kill["at_s"] = time.monotonic() - began
            killed.append(kill)
        thread.join(timeout=max(1.0, args.timeout_s - (time.monotonic() - began)))
        timings["job_s"] = time.monotonic() - began
        watcher.stop.set()
        watcher.join()
        report = outcome.get("report")
        if report is not None:
            render_oracles(spec, [k["prompt_id"] for k in killed], root.parent / "oracle")
        return {
            "error": outcome.get("error") or (None if report else "the job did not end in time"),
            "counts": report.counts if report else None,
            "results": report.results if report else None,
            "kills": killed,
            "live_worker_nodes": len(cluster.worker_nodes),
            "writes": {k: len(v) for k, v in sorted(watcher.versions.items())},
            "timings": timings,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="local job output folder (must not exist)")
    parser.add_argument("--report", required=True, help="where the JSON report goes")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=3, help="worker nodes (one CPU each) besides the head")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--kill-after", type=int, default=2, help="committed chunks before a rollout's node dies")
    parser.add_argument("--lease-s", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=400.0)
    args = parser.parse_args(argv)
    if not os.environ.get("RAY_TMPDIR"):
        parser.error("set RAY_TMPDIR to a private folder (see the module docstring)")
    report = run(args)
    Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
