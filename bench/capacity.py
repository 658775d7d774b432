"""Capacity model: the wall time of a large render job on GPUs, with one node lost mid-way, from measured overheads.

Measures on a local multi-node Ray cluster (``ray.cluster_utils.Cluster`` on 127.0.0.1: a head with no CPUs and
``--nodes`` one-CPU worker nodes) with the tiny model:
  - start-up: ``submit`` called -> first prompt claimed (Ray Data plan, actors, model load; cluster start excluded);
  - per prompt: a prompt's wall time less its chunks (claim, prompt encoding, mp4/stats/done writes), and the gap
    between one prompt's done marker and the next claim on the same actor (dispatch);
  - per chunk: the time between consecutive commit markers (the CPU rate), and, in-process, the store calls of one
    chunk at Wan2.1-1.3B size (0.80 MB checkpoint + its marker + the lease renewal) on a local folder and on a
    loopback S3 server (moto);
  - after a node loss (a second job; the node of a rollout is killed once it has committed chunks, and a replacement
    node is added, as KubeRay recreates a lost pod): node-death detection, kill -> the interrupted prompt claimed again
    (actor restart, model load, lease wait), and that claim -> its next committed chunk (restore + one chunk).
Then predicts the wall time of ``--prompts`` x ``--video-s`` videos on ``--gpus`` GPUs with one node lost at
``--fail-at`` of the run, taking the GPU rate from the FLOP budget of a chunk (`bench.flops`: the end-to-end
frames/s bound at ``--peak-tflops`` times ``--utilization``; ``--gpu-fps`` sets a measured rate instead) and printing
every input. ``--from-json`` re-predicts from a saved measurement without a cluster.

    python -m bench.capacity [--save bench/capacity-measured.json]       # measure (~3-5 min on 2 cores) + predict
    python -m bench.capacity --from-json FILE --gpu-fps 30 --replace-s 120  # predict only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from statistics import median
from typing import Any

WAN_CHECKPOINT_BYTES = 801_000  # bench/RESULTS.md: Wan2.1-1.3B 480x832 self-forcing bf16 checkpoint bytes per chunk


# ------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class Inputs:
    """Everything the prediction uses. Measured fields are filled from the local cluster run; the rest are
    parameters (defaults named in `PARAMETER_NOTES`)."""

    prompts: int = 1000
    video_s: float = 90.0
    fps: float = 16.0
    frames_per_chunk: int = 12
    gpus: int = 8
    gpus_per_node: int = 1
    gpu_fps: float = 24.0
    fail_at: float = 0.5
    detect_s: float = 15.0
    replace_s: float = 300.0
    model_load_s: float = 60.0
    lease_s: float = 120.0
    restore_ratio: float = 0.222
    queued_per_actor: int = 2
    # measured
    startup_s: float = float("nan")
    per_prompt_s: float = float("nan")
    dispatch_s: float = float("nan")
    end_s: float = float("nan")
    store_chunk_s: float = float("nan")
    cpu_chunk_s: float = float("nan")


PARAMETER_NOTES = {
    "gpu_fps": "end-to-end pixel frames/s per GPU (bench.flops bound x --utilization unless given; bench.gpu "
               "measures it)",
    "detect_s": "Ray's node-death detection (health check 3 s x 5 misses by default)",
    "replace_s": "lost node -> replacement pod ready (Kubernetes evicts pods of an unreachable node after 300 s)",
    "model_load_s": "actor start + Wan2.1-1.3B load on the replacement GPU",
    "lease_s": "claim lease (JobSpec default): the retried prompt waits until it lapses",
    "restore_ratio": "resume at chunk k / regenerate k chunks (bench/RESULTS.md, checkpoint_overhead)",
    "queued_per_actor": "rows Ray Data hands an actor at once (one in flight + queued)",
    "fail_at": "fraction of the failure-free render time at which the node is lost",
}


DEFAULT_UTILIZATION = 0.4  # of the peak; typical of bf16 inference, assumed until bench.gpu measures the card


def computed_gpu_fps(peak_tflops: float | None, utilization: float) -> float:
    """End-to-end pixel frames/s per GPU from the FLOP budget of a steady-state self-forcing chunk at Wan2.1-1.3B
    480x832 (`bench.flops`, 21 latent frames attended, full VAE decode) at ``utilization`` of the peak."""
    from bench.flops import H100_SXM_DENSE_BF16_TFLOPS, SELF_FORCING_CONTEXT, bound_fps, budget
    from pipeline.config import RolloutConfig
    from pipeline.model.vae import TEMPORAL_SCALE
    from tokentrim import TrimConfig

    if not 0 < utilization <= 1:
        raise ValueError(f"`utilization` must be in (0, 1], got {utilization}")
    config = RolloutConfig()
    flops = sum(budget(config, TrimConfig(), SELF_FORCING_CONTEXT).values())
    peak = peak_tflops or H100_SXM_DENSE_BF16_TFLOPS
    return utilization * bound_fps(flops, TEMPORAL_SCALE * config.chunk_frames, peak)


def chunks_per_video(inputs: Inputs) -> int:
    return math.ceil(inputs.video_s * inputs.fps / inputs.frames_per_chunk)


def predict(inputs: Inputs) -> dict[str, float]:
    """Wall seconds of the job without and with one node lost (a fluid model; ``*_upper_s`` adds a one-prompt tail).

    Per prompt: ``C`` chunks at the GPU rate plus their store calls, the per-prompt overhead and the dispatch gap.
    Until the loss every GPU renders. The lost node's actor held ``queued_per_actor`` rows (one in flight, about half
    rendered, its commits kept; the others not started). Ray retries those rows on that actor once it restarts, which
    needs a free GPU:
      - replaced (KubeRay recreates the pod): the GPUs are back after ``max(detect, replace)`` + model load; the
        restarted actor waits out what is left of the lease (idle), restores (``restore_ratio`` x the committed chunks'
        render time) and redoes the chunk it lost (half a chunk on average); the other GPUs go on meanwhile;
      - not replaced: the other GPUs drain the queue, then a freed GPU restarts the actor (model load) and renders the
        held rows one after the other: the job's tail.
    """
    c = chunks_per_video(inputs)
    render_chunk = inputs.frames_per_chunk / inputs.gpu_fps
    t_prompt = c * (render_chunk + inputs.store_chunk_s) + inputs.per_prompt_s + inputs.dispatch_s
    work = inputs.prompts * t_prompt
    g, lost = inputs.gpus, inputs.gpus_per_node
    clean = inputs.startup_s + math.ceil(inputs.prompts / g) * t_prompt + inputs.end_s
    t_fail = inputs.fail_at * (clean - inputs.startup_s - inputs.end_s)  # render time elapsed at the loss
    restore = inputs.restore_ratio * (c / 2) * render_chunk
    resume_cost = restore + render_chunk / 2  # extra work of the interrupted rollout
    # replaced
    back = max(inputs.detect_s, inputs.replace_s) + inputs.model_load_s
    lease_idle = max(0.0, inputs.lease_s - back)
    remaining = work - g * t_fail + lost * (lease_idle + resume_cost)
    during = (g - lost) * back  # rendered while the node is away
    if remaining > during:
        replaced = t_fail + back + (remaining - during) / g
    else:
        replaced = t_fail + remaining / (g - lost)
    # not replaced
    held = lost * (t_prompt / 2 + (inputs.queued_per_actor - 1) * t_prompt)  # the rows the lost actor(s) held
    drained = t_fail + (work - g * t_fail - held) / (g - lost)
    tail = inputs.model_load_s + resume_cost + held / lost
    not_replaced = drained + tail
    start_end = inputs.startup_s + inputs.end_s
    return {"chunks_per_video": c, "render_chunk_s": render_chunk, "prompt_s": t_prompt, "gpu_hours": work / 3600,
            "clean_s": clean, "fail_at_s": inputs.startup_s + t_fail, "node_back_after_s": back,
            "lease_idle_s": lease_idle, "resume_cost_s": resume_cost,
            "replaced_s": start_end + replaced, "replaced_upper_s": start_end + replaced + t_prompt,
            "not_replaced_s": start_end + not_replaced,
            "cost_of_loss_replaced_s": start_end + replaced - clean,
            "cost_of_loss_not_replaced_s": start_end + not_replaced - clean}


# ------------------------------------------------------------------------------------------------ measuring
def _store_chunk_seconds(url: str, storage_options: dict | None, repeats: int) -> float:
    """Median seconds of one chunk's store calls at Wan2.1-1.3B size: checkpoint data, marker, lease renewal."""
    from pipeline.store import Store

    store = Store(url, storage_options)
    payload = os.urandom(WAN_CHECKPOINT_BYTES)
    seconds = []
    for i in range(repeats):
        began = time.perf_counter()
        store.put_bytes(f"rollouts/p/chunk-{i:06d}.safetensors", payload)
        store.put_json(f"rollouts/p/chunk-{i:06d}.json", {"index": i, "bytes": len(payload)})
        store.put_json("claims/p/0.lease", {"owner": "bench", "expires_at": time.time() + 120})
        seconds.append(time.perf_counter() - began)
    return median(seconds)


def measure_store(repeats: int) -> dict[str, float]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    out = {}
    with tempfile.TemporaryDirectory() as folder:
        out["file"] = _store_chunk_seconds(folder, None, repeats)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("bench")
        out["s3"] = _store_chunk_seconds("s3://bench/capacity", options, repeats)
    finally:
        server.stop()
    return out


def _stamps(root: Path) -> dict[str, dict[str, Any]]:
    """Per prompt: claims (attempt -> (claimed_at, owner)), commit-marker mtimes by chunk, done-marker mtime."""
    out: dict[str, dict[str, Any]] = {}
    for claim in (root / "claims").glob("*/*.json"):
        doc = json.loads(claim.read_text())
        out.setdefault(claim.parent.name, {"claims": {}, "chunks": {}, "done": None})["claims"][doc["attempt"]] = (
            doc["claimed_at"], doc["owner"])
    for pid, entry in out.items():
        for marker in (root / "rollouts" / pid).glob("chunk-*.json"):
            entry["chunks"][int(marker.stem.split("-")[1])] = marker.stat().st_mtime
        done = root / "done" / f"{pid}.json"
        entry["done"] = done.stat().st_mtime if done.exists() else None
    return out


def steady_figures(root: Path, submitted_at: float, returned_at: float, chunks: int) -> dict[str, float]:
    stamps = _stamps(root)
    gaps = [b - a for e in stamps.values() for a, b in zip(sorted(e["chunks"].values()),
                                                           sorted(e["chunks"].values())[1:])]
    chunk_s = median(gaps)
    per_prompt = [e["done"] - e["claims"][0][0] - chunks * chunk_s for e in stamps.values()]
    by_owner: dict[str, list[tuple[float, float]]] = {}
    for e in stamps.values():
        by_owner.setdefault(e["claims"][0][1].split(":")[1], []).append((e["claims"][0][0], e["done"]))
    dispatch = [b[0] - a[1] for runs in by_owner.values() for a, b in zip(sorted(runs), sorted(runs)[1:])]
    return {"startup_s": min(e["claims"][0][0] for e in stamps.values()) - submitted_at,
            "cpu_chunk_s": chunk_s, "per_prompt_s": median(per_prompt),
            "dispatch_s": median(dispatch) if dispatch else 0.0,
            "end_s": returned_at - max(e["done"] for e in stamps.values())}


def _submit_in_thread(spec: Any) -> tuple[threading.Thread, dict[str, Any]]:
    from jobs.run import submit

    outcome: dict[str, Any] = {}

    def job() -> None:
        try:
            outcome["report"] = submit(spec)
        except Exception as exc:  # noqa: BLE001 - printed with the figures
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        outcome["returned_at"] = time.time()

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    return thread, outcome


def failure_figures(cluster: Any, spec: Any, kill_after: int) -> dict[str, Any]:
    """Run a job, kill the node of the first rollout with ``kill_after`` commits, add a replacement node."""
    import ray

    from tests.multinode_scenario import committed_chunks, kill_node, live_claims, node_of_pid

    root = Path(spec.output_url)
    thread, outcome = _submit_in_thread(spec)
    kill: dict[str, Any] = {}
    while thread.is_alive() and not kill:
        for prompt_id, attempt, pid in live_claims(root):
            node = node_of_pid(cluster, pid) if committed_chunks(root, prompt_id) >= kill_after else None
            if node is None:
                continue
            lease = json.loads((root / "claims" / prompt_id / f"{attempt}.lease").read_text())
            kill = {"prompt_id": prompt_id, "node_id": node.node_id, "at": time.time(),
                    "lease_left_s": lease["expires_at"] - time.time()}
            kill_node(cluster, node)
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20, wait=False)
            break
        time.sleep(0.02)
    while thread.is_alive() and not kill.get("detect_s"):
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        if alive.get(kill.get("node_id")) is False:
            kill["detect_s"] = time.time() - kill["at"]
        time.sleep(0.1)
    thread.join()
    if "error" in outcome or not kill:
        raise RuntimeError(f"the failure job did not complete as planned: {outcome.get('error')}, kill {kill}")
    entry = _stamps(root)[kill["prompt_id"]]
    claimed_again = entry["claims"][max(entry["claims"])][0]
    next_commit = min(t for t in entry["chunks"].values() if t > claimed_again)
    return {"counts": outcome["report"].counts, "detect_local_s": kill["detect_s"],
            "lease_left_at_kill_s": kill["lease_left_s"], "kill_to_reclaim_s": claimed_again - kill["at"],
            "reclaim_to_next_commit_s": next_commit - claimed_again, "job_s": outcome["returned_at"] - kill["at"]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    # a private Ray temp dir: the cluster's address file must not make other ray.init() calls join it
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ttcap")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.pop("RAY_ADDRESS", None)

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from jobs.spec import JobSpec
    from pipeline.config import RolloutConfig
    from tests.multinode_scenario import SYSTEM_CONFIG, start_cluster

    folder = Path(tempfile.mkdtemp(prefix="ttcap-out"))
    ids = [f"p{i}" for i in range(args.local_prompts)]
    pq.write_table(pa.table({"prompt_id": ids, "prompt": [f"a harbour at dawn, take {i}" for i in ids]}),
                   folder / "prompts.parquet")
    measured: dict[str, Any] = {"store_chunk": measure_store(args.store_repeats),
                                "checkpoint_bytes": WAN_CHECKPOINT_BYTES}
    cluster = start_cluster(args.nodes)
    try:

        def spec(name: str, chunks: int, lease_s: float) -> JobSpec:
            return JobSpec.from_fields(input_url=str(folder / "prompts.parquet"), output_url=str(folder / name),
                                       rollout=RolloutConfig(num_chunks=chunks), workers=args.nodes, lease_s=lease_s,
                                       device="cpu", allow_any_prompt=True)

        submitted = time.time()
        thread, outcome = _submit_in_thread(spec("steady", args.local_chunks, 60.0))
        thread.join()
        if "error" in outcome:
            raise RuntimeError(outcome["error"])
        measured["steady"] = steady_figures(folder / "steady", submitted, outcome["returned_at"], args.local_chunks)
        measured["steady"]["counts"] = outcome["report"].counts
        measured["failure"] = failure_figures(cluster, spec("failure", args.local_chunks + 2, args.local_lease_s),
                                              kill_after=2)
        measured["failure"]["local_lease_s"] = args.local_lease_s
        measured["local"] = {"nodes": args.nodes, "workers": args.nodes, "prompts": args.local_prompts,
                             "chunks": args.local_chunks, "model": "tiny", "health_check": dict(SYSTEM_CONFIG)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    return measured


# ------------------------------------------------------------------------------------------------ output
def inputs_from(measured: dict[str, Any], args: argparse.Namespace) -> Inputs:
    steady = measured["steady"]
    values = {f.name: getattr(args, f.name) for f in fields(Inputs) if hasattr(args, f.name)}
    values.update({k: steady[k] for k in ("startup_s", "per_prompt_s", "dispatch_s", "end_s", "cpu_chunk_s")})
    values["store_chunk_s"] = (measured["store_chunk"][args.store] if args.store_chunk_s is None
                               else args.store_chunk_s)
    return Inputs(**values)


def print_report(measured: dict[str, Any], inputs: Inputs, command: str) -> None:
    local, steady, failure = measured["local"], measured["steady"], measured["failure"]
    print(f"Measured on a local Ray cluster ({local['nodes']} one-CPU worker nodes + a head, {local['model']} "
          f"model, {local['prompts']} prompts x {local['chunks']} chunks, {local['workers']} workers):")
    for key in ("startup_s", "per_prompt_s", "dispatch_s", "end_s", "cpu_chunk_s"):
        print(f"  {key:<28} {steady[key]:8.3f}")
    print(f"  {'counts':<28} {steady['counts']}")
    print(f"  store calls per chunk, Wan2.1-1.3B size ({measured.get('checkpoint_bytes', 702_000) / 1e6:.3f} MB + "
          "marker + lease):")
    for kind, seconds in measured["store_chunk"].items():
        print(f"    {kind:<26} {seconds:8.4f} s")
    check = local["health_check"]
    print(f"  after a node kill (lease {failure['local_lease_s']:g} s, health check "
          f"{check['health_check_period_ms']} ms x {check['health_check_failure_threshold']}):")
    for key in ("detect_local_s", "lease_left_at_kill_s", "kill_to_reclaim_s", "reclaim_to_next_commit_s", "job_s"):
        print(f"    {key:<26} {failure[key]:8.3f}")
    print(f"    {'counts':<26} {failure['counts']}")
    print("\nInputs of the prediction:")
    for f in fields(Inputs):
        note = PARAMETER_NOTES.get(f.name, "measured above" if f.name.endswith("_s") and f.name in (
            "startup_s", "per_prompt_s", "dispatch_s", "end_s", "store_chunk_s", "cpu_chunk_s") else "")
        print(f"  {f.name:<16} {getattr(inputs, f.name):>10.4g}  {note}")
    gpu = predict(inputs)
    cpu = predict(Inputs(**{**asdict(inputs), "gpu_fps": inputs.frames_per_chunk / inputs.cpu_chunk_s}))
    print(f"\nPrediction: {inputs.prompts} prompts x {inputs.video_s:g} s videos ({gpu['chunks_per_video']} chunks) "
          f"on {inputs.gpus} GPUs at {inputs.gpu_fps:g} frames/s each, one {inputs.gpus_per_node}-GPU node lost at "
          f"{inputs.fail_at:.0%} of the run:")
    for key, value in gpu.items():
        hours = f"  ({value / 3600:.2f} h)" if key.endswith("_s") and value > 600 else ""
        print(f"  {key:<28} {value:12.1f}{hours}")
    print(f"  (the formula at the measured CPU chunk rate instead, {cpu['render_chunk_s']:.3f} s per chunk of the "
          f"tiny model, not Wan2.1: {cpu['clean_s'] / 3600:.2f} h clean, {cpu['replaced_s'] / 3600:.2f} h with the "
          "loss)")
    print(f"\nreproduce: {command}")
    print("BENCH_JSON " + json.dumps({"bench": "capacity", "command": command, "measured": measured,
                                      "inputs": asdict(inputs), "prediction": gpu, "results": []}, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Inputs()
    for f in fields(Inputs):
        if f.name in ("startup_s", "per_prompt_s", "dispatch_s", "end_s", "store_chunk_s", "cpu_chunk_s", "gpu_fps"):
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name), help=PARAMETER_NOTES.get(f.name))
    parser.add_argument("--gpu-fps", type=float, default=None, help=PARAMETER_NOTES["gpu_fps"])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's peak dense bf16 TFLOP/s (default: H100 SXM, bench.flops)")
    parser.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION,
                        help="fraction of the peak a chunk runs at (assumed until bench.gpu measures it)")
    parser.add_argument("--store", choices=["s3", "file"], default="s3", help="whose per-chunk store calls count")
    parser.add_argument("--store-chunk-s", type=float, default=None,
                        help="override the measured per-chunk store seconds (e.g. a real S3 bucket's)")
    parser.add_argument("--nodes", type=int, default=2, help="local one-CPU worker nodes (= workers)")
    parser.add_argument("--local-prompts", type=int, default=6)
    parser.add_argument("--local-chunks", type=int, default=4)
    parser.add_argument("--local-lease-s", type=float, default=5.0)
    parser.add_argument("--store-repeats", type=int, default=15)
    parser.add_argument("--from-json", help="a measurement saved with --save: predict only")
    parser.add_argument("--save", help="write the measurement here (JSON)")
    args = parser.parse_args(argv)
    if args.gpu_fps is None:
        bound = computed_gpu_fps(args.peak_tflops, 1.0)
        args.gpu_fps = bound * args.utilization
        print(f"GPU rate from the FLOP budget (bench.flops): bound {bound:.1f} frames/s end to end at "
              f"{args.peak_tflops or 'the H100 SXM'} peak, x utilization {args.utilization:g} = {args.gpu_fps:.1f}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    measured = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args)
    if args.save:
        Path(args.save).write_text(json.dumps(measured, indent=1))
    command = " ".join(["python", "-m", "bench.capacity", *(argv if argv is not None else sys.argv[1:])])
    print_report(measured, inputs_from(measured, args), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
