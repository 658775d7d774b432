"""Workers pinned to GPUs, on a machine without any: a local Ray that declares two GPUs, workers that resolve their
own card and load on the CPU (`jobs.executors.CUDA_AS_CPU_ENV`); and `jobs.resources`, which refuses a job that no
node of the cluster can place (exit 2, one line) instead of letting Ray Data wait forever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.executors import worker_device
from jobs.layout import JobOutput
from jobs.resources import ClusterResourceError, check_cluster, fits
from jobs.run import write_job_json
from jobs.spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]


def _table(path: Path, n: int = 2) -> str:
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(n)],
                             "prompt": [f"a lantern number {i}" for i in range(n)]}), path)
    return str(path)


def _spec(gpus: float, executor: str = "ray") -> JobSpec:
    return JobSpec.from_fields(input_url="t.parquet", output_url="out", gpus_per_worker=gpus, executor=executor)  # type: ignore


# ------------------------------------------------------------------------------------------ the card of a worker
@pytest.mark.parametrize(("device", "gpus", "ids", "visible", "expected"), [
    ("auto", 1.0, ["3"], "3", "cuda:0"),  # Ray's usual setting: the worker sees only its card
    ("auto", 1.0, ["3"], "2,3", "cuda:1"),  # two visible cards, the worker's is the second
    ("auto", 0.5, ["1"], None, "cuda:1"),  # Ray told not to set CUDA_VISIBLE_DEVICES: the card's own number
    ("cuda:1", 1.0, ["0"], "0", "cuda:1"),  # an explicit device is kept
    ("auto", 0.0, [], None, "cpu"),
    ("cpu", 1.0, ["0"], "0", "cpu"),
])
def test_a_worker_resolves_cuda_to_its_own_card(device, gpus, ids, visible, expected):
    spec = JobSpec.from_fields(input_url="t", output_url="o", device=device, gpus_per_worker=gpus)
    assert worker_device(spec, ids, visible) == expected


# ------------------------------------------------------------------------------------------ can a worker be placed
def _fake_ray(nodes: list[dict], groups: list[tuple[dict, int]] | None = None) -> SimpleNamespace:
    config = None if groups is None else SimpleNamespace(node_group_configs=[
        SimpleNamespace(resources=resources, max_count=count) for resources, count in groups])
    state = SimpleNamespace(state=SimpleNamespace(get_cluster_config=lambda: config))
    return SimpleNamespace(nodes=lambda: list(nodes), _private=SimpleNamespace(state=state))


CPU_NODE = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 1e9}}
GPU_NODE = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}


def test_a_worker_fits_a_node_with_its_cpu_and_gpus():
    assert fits({"CPU": 1, "GPU": 0.5}, {"CPU": 1, "GPU": 1}) and fits({"CPU": 1}, {"CPU": 1})
    assert not fits({"CPU": 1, "GPU": 2}, {"CPU": 8, "GPU": 1}) and not fits({"CPU": 1, "GPU": 1}, {"CPU": 8})


def test_a_cluster_with_a_node_that_fits_is_accepted_at_once():
    check_cluster(_spec(1), ray=_fake_ray([CPU_NODE, GPU_NODE]), sleep=pytest.fail)
    check_cluster(_spec(0), ray=_fake_ray([CPU_NODE]), sleep=pytest.fail)
    check_cluster(_spec(8, executor="local"), ray=_fake_ray([]), sleep=pytest.fail)  # no cluster to ask


def test_a_cluster_without_gpus_and_no_autoscaler_is_refused_at_once_naming_what_is_missing():
    dead_gpu = dict(GPU_NODE, Alive=False)
    with pytest.raises(ClusterResourceError) as err:
        check_cluster(_spec(1), ray=_fake_ray([CPU_NODE, dead_gpu]), sleep=pytest.fail)
    assert str(err.value) == ("the Ray cluster cannot place a worker needing {CPU: 1, GPU: 1} (1 alive node(s), the "
                              "most any has: CPU 4, GPU 0): lower --gpus-per-worker or add nodes with GPUs")
    with pytest.raises(ClusterResourceError, match=r"GPU: 2\} \(1 alive .* GPU 1\)"):
        check_cluster(_spec(2), ray=_fake_ray([GPU_NODE]), sleep=pytest.fail)
    with pytest.raises(ClusterResourceError, match="no node group of its autoscaler has them either"):
        check_cluster(_spec(1), ray=_fake_ray([CPU_NODE], [({"CPU": 16.0}, 10), ({"CPU": 8, "GPU": 1}, 0)]),
                      sleep=pytest.fail)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_with_an_autoscaler_it_waits_for_a_node_then_gives_up_after_the_stated_time():
    clock = _Clock()
    ray = _fake_ray([CPU_NODE], [({"CPU": 8.0, "GPU": 1.0}, 4)])
    with pytest.raises(ClusterResourceError, match="waited 30 s for the autoscaler to add a node"):
        check_cluster(_spec(1), ray=ray, wait_s=30.0, clock=clock, sleep=clock.sleep)
    assert clock.now == 30.0
    nodes = [CPU_NODE]
    ray = _fake_ray(nodes, [({"CPU": 8.0, "GPU": 1.0}, -1)])
    ray.nodes = lambda: [CPU_NODE] + ([GPU_NODE] if clock.now >= 40 else [])  # a GPU node joins after 10 s
    check_cluster(_spec(1), ray=ray, wait_s=30.0, clock=clock, sleep=clock.sleep)
    assert clock.now == 40.0


def test_submit_resume_regress_asking_for_gpus_on_the_cpu_cluster_exit_2_at_once(ray_cluster, tmp_path):
    table = _table(tmp_path / "p.parquet")
    out = tmp_path / "job"
    write_job_json(JobOutput.open(str(out)), JobSpec.from_fields(input_url=table, output_url=str(out),
                                                                 gpus_per_worker=1))
    commands = {"submit": ["submit", table, "--out", str(tmp_path / "new"), "--gpus-per-worker", "1"],
                "resume": ["resume", str(out)],
                "regress": ["regress", "--out", str(tmp_path / "nightly"), "--gpus-per-worker", "0.5"]}
    for name, argv in commands.items():
        began = time.monotonic()
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 2, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: the Ray cluster cannot place a worker needing {CPU: 1,"
                                                       " GPU: "), (name, result.output)
        assert "GPU 0" in lines[0] and time.monotonic() - began < 30, name
    assert not (tmp_path / "new").exists() and not (tmp_path / "nightly").exists()  # nothing written


# ------------------------------------------------------------------------------------------ a cluster with GPUs
@pytest.mark.slow
def test_workers_claiming_gpus_each_see_their_own_card_and_load_the_model_once(tmp_path):
    """``--gpus-per-worker 1``: two workers on two cards; ``0.5``: two workers share a card. Each worker's record
    (`workers/` under the job) holds the cards Ray gave it, the device it resolved and the rows it rendered."""
    table = _table(tmp_path / "p.parquet", n=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="tt-ray-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        env["RAY_TMPDIR"] = ray_tmp
        run = subprocess.run([sys.executable, "-m", "tests.gpu_scenario", table, str(tmp_path)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name, cards in (("one", 2), ("half", 1)):
        workers = [json.loads(p.read_text()) for p in sorted((tmp_path / name / "workers").glob("*.json"))]
        assert len(workers) == 2, name
        for w in workers:
            assert len(w["gpu_ids"]) == 1 and w["cuda_visible_devices"] == w["gpu_ids"][0], w
            assert w["device"] == "cuda:0" and w["torch_device"] == "cpu" and w["model_loads"] == 1, w
        assert len({w["gpu_ids"][0] for w in workers}) == cards, (name, workers)  # 0.5: both on one card
        assert len({w["pid"] for w in workers}) == 2
        rendered = sorted(p for w in workers for p in w["prompt_ids"])
        assert rendered == ["p0", "p1", "p2"], name  # each row once, by one of the two workers
        results = pq.read_table(tmp_path / name / "results.parquet").to_pylist()
        assert [r["status"] for r in results] == ["ok"] * 3, name
