"""What a security review asks of the code (DESIGN section 8): only the tested storage protocols, credentials that
never show up in an output, a log line, an error, a repr or a Ray actor's arguments, a regression that refuses a
missing or foreign baseline before it renders, and Ray token authentication that refuses a client without the token
(on a local cluster of its own)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import jobs.regress
from jobs.cli import main
from jobs.executors import RayExecutor
from jobs.layout import JobOutput
from jobs.regress import run_regression
from jobs.run import load_spec, status, submit
from jobs.spec import JobSpec
from pipeline.config import RolloutConfig
from pipeline.errors import InputError, UnsupportedURLError
from pipeline.storage_options import shareable_options
from pipeline.store import Store, split_url

CAPTION = "a red circle moving left on a plain background"  # the canary refuses prompts outside its grammar
CAPTION_B = "a blue square moving up on a striped background"

SECRET = f"FAKE-SECRET-{uuid.uuid4().hex}"
ACCESS = f"AKIAFAKE{uuid.uuid4().hex[:12].upper()}"


# ------------------------------------------------------------------------------------------------ protocols
@pytest.mark.parametrize("url", [
    "http://example.com/t", "https://example.com/t", "HTTP://example.com/t", "ftp://host/t", "sftp://host/t",
    "ssh://host/t", "gs://bucket/t", "az://c/t", "s3a://bucket/t", "hdfs://n/t", "nosuch://x/t",
    "simplecache::s3://b/t", "memory::file:///tmp/t"])
def test_a_store_refuses_protocols_that_are_not_tested(url):
    with pytest.raises(UnsupportedURLError) as info:
        Store(url)
    assert "\n" not in str(info.value) and "not accepted" in str(info.value)


def test_the_tested_protocols_and_plain_paths_are_accepted(tmp_path):
    for url in (str(tmp_path / "a"), f"file://{tmp_path}/b", "memory://security/c", "relative/folder"):
        assert Store(url).url == url
    assert split_url("s3://bucket/x/t.parquet")[1] == "t.parquet"  # s3 builds without a call to the server


def test_a_refused_url_is_not_retried_and_hides_a_password_it_holds():
    began = time.perf_counter()
    with pytest.raises(UnsupportedURLError) as info:
        Store("ftp://user:hunter2@host/data", retries=5, backoff_s=1.0)
    assert time.perf_counter() - began < 0.5  # no backoff: refused before any filesystem exists
    assert "hunter2" not in str(info.value) and "ftp://***@host" in str(info.value)


@pytest.mark.parametrize("argv", [
    ["submit", "ftp://host/p.parquet", "--out", "OUT", "--executor", "local"],
    ["submit", "http://host/p.parquet", "--out", "OUT", "--executor", "local"],
    ["submit", "TABLE", "--out", "unknown://bucket/job", "--executor", "local"],
    ["status", "simplecache::s3://bucket/job"],
    ["resume", "ssh://host/job"],
    ["regress", "--out", "ftp://host/night", "--executor", "local"],
    ["render", CAPTION, "--out", "OUT", "--state", "http://host/state", "--num-chunks", "1"],
], ids=["submit-ftp", "submit-http", "submit-out", "status-chained", "resume-ssh", "regress", "render-state"])
def test_the_cli_refuses_an_unaccepted_protocol_with_exit_2_and_one_line(tmp_path, argv):
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": [CAPTION]}), table)
    argv = [str(table) if a == "TABLE" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "not accepted" in lines[0], result.output


# ---------------------------------------------------------------------------------------------- credentials
@pytest.fixture(params=["file", "s3"])
def backend(request, tmp_path, monkeypatch) -> dict[str, Any]:
    """A job folder on a backend, the storage options a CLI user gives (no credentials) and the ones a library user
    gives (with a fake key and secret); the process environment holds the same fake credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    if request.param == "file":
        root, public = str(tmp_path / "store"), {}
    else:
        s3 = request.getfixturevalue("s3")
        root, public = f"{s3.url}/security-{uuid.uuid4().hex}", dict(s3.storage_options)
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["lantern"], "prompt": [CAPTION], "num_chunks": [1]}), table)
    return {"root": root, "public": public, "private": {**public, "key": ACCESS, "secret": SECRET},
            "table": str(table)}


def _no_secret(*things: Any) -> None:
    for thing in things:
        text = thing if isinstance(thing, str) else repr(thing)
        assert SECRET not in text and ACCESS not in text, text[:2000]


def _stored_bytes(root: str, options: dict[str, Any]) -> list[bytes]:
    store = Store(root, options)
    return [store.get_bytes(key) for key in store.list()]


def test_no_dataclass_shows_its_storage_options_in_a_repr():
    import dataclasses
    import importlib
    import pkgutil

    found = []
    for package in ("jobs", "pipeline", "tokentrim"):
        for info in pkgutil.walk_packages([str(Path(__file__).resolve().parents[1] / package)], f"{package}."):
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if dataclasses.is_dataclass(value) and isinstance(value, type) and value.__module__ == info.name:
                    found += [(value, f) for f in dataclasses.fields(value) if "storage_options" in f.name]
    assert found and all(not f.repr for _, f in found), [(c.__name__, f.name) for c, f in found if f.repr]


def test_credentials_never_reach_an_output_a_log_an_error_a_repr_or_a_ray_actor(backend, caplog):
    caplog.set_level(logging.INFO)
    for ours in ("jobs", "pipeline", "tokentrim"):
        caplog.set_level(logging.DEBUG, logger=ours)
    # the command line: credentials from the environment, only the endpoint as an option
    options = ["--storage-options", json.dumps(backend["public"])] if backend["public"] else []
    job = f"{backend['root']}/cli"
    runs = [["submit", backend["table"], "--out", job, "--model", "canary", "--num-chunks", "1",
             "--executor", "local"],
            ["resume", job, "--executor", "local"], ["status", job],
            ["render", CAPTION, "--out", f"{backend['root']}/one", "--model", "canary", "--num-chunks", "1"],
            ["regress", "--out", f"{backend['root']}/night", "--model", "canary", "--executor", "local"]]
    for argv in runs:
        result = CliRunner().invoke(main, [*argv, *options])
        assert result.exit_code == (1 if argv[0] == "regress" else 0), (argv, result.output)  # regress: no baseline
        _no_secret(result.output, result.exception)
    # the library: credentials in the storage options themselves
    spec = load_spec(JobOutput.open(job, backend["private"]))
    assert spec.storage_options == backend["private"]
    _no_secret(spec, spec.to_dict(), status(JobOutput.open(job, backend["private"])))
    # what Ray would show and store for each render actor: no credential, only what the workers may see
    kwargs = RayExecutor(spec).worker_kwargs()
    assert SECRET.encode() not in pickle.dumps(kwargs) and ACCESS.encode() not in pickle.dumps(kwargs)
    assert kwargs["storage_options"] == shareable_options(backend["private"]) == backend["public"]
    # errors name the place, never the options
    for call in (lambda: status(JobOutput.open(f"{backend['root']}/missing", backend["private"])),
                 lambda: run_regression(JobSpec.from_fields(input_url=backend["table"],
                                                            output_url=f"{backend['root']}/night",
                                                            storage_options=backend["private"]))):
        with pytest.raises(InputError) as info:
            call()
        _no_secret(str(info.value), repr(info.value))
    _no_secret(*(r.getMessage() for r in caplog.records), *(repr(r.args) for r in caplog.records))
    for data in _stored_bytes(backend["root"], backend["public"]):
        assert SECRET.encode() not in data and ACCESS.encode() not in data
    # and a credential given on the command line is refused without being repeated
    for bad in (backend["private"], {"client_kwargs": {"aws_secret_access_key": SECRET}}):
        result = CliRunner().invoke(main, ["status", job, "--storage-options", json.dumps(bad)])
        assert result.exit_code == 2 and "credentials" in result.output
        _no_secret(result.output)


def test_a_ray_job_passes_its_workers_no_credential_and_records_none(ray_cluster, s3, tmp_path, monkeypatch):
    """Workers read the cluster's own credentials (here: the fake S3's, set in their environment); the secret given
    to the driver appears in no Ray job record and no Ray log of this session."""
    import ray

    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["lantern"], "prompt": [CAPTION], "num_chunks": [1]}), table)
    spec = JobSpec.from_fields(input_url=str(table), output_url=f"{s3.url}/ray-security-{uuid.uuid4().hex}",
                               model="canary",
                               rollout=RolloutConfig(num_chunks=1),
                               storage_options={**s3.storage_options, "key": ACCESS, "secret": SECRET})
    assert submit(spec).counts == {"ok": 1}
    from ray._private import state

    _no_secret(json.dumps(state.jobs(), default=str))  # entrypoints and metadata of every job of this cluster
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------------------- regress baseline
@pytest.mark.parametrize("baseline", ["missing", "other-settings", "not-a-baseline"])
def test_regress_refuses_a_missing_or_foreign_baseline_before_rendering_anything(tmp_path, monkeypatch, baseline):
    renders: list[Any] = []
    monkeypatch.setattr(jobs.regress, "submit", lambda *a, **k: renders.append(a) or pytest.fail("rendered"))
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": [CAPTION, CAPTION_B]}), table)
    spec = JobSpec.from_fields(input_url=str(table), output_url=str(tmp_path / "night"), executor="local",
                               rollout=RolloutConfig(num_chunks=4), limit=2)
    path = tmp_path / "baseline.json"
    if baseline == "other-settings":
        other = dict(jobs.regress.settings_of(spec, ["a", "b"]), prompt_ids=["a"])
        path.write_text(json.dumps({"format": jobs.regress.BASELINE_FORMAT, "settings": other,
                                    "config_hash": "0" * 16, "metrics": {}}))
    elif baseline == "not-a-baseline":
        path.write_text(json.dumps({"metrics": "none"}))
    with pytest.raises(InputError, match="baseline") as info:
        run_regression(spec, baseline_url=str(path))
    assert renders == []
    expected = "prompt_ids" if baseline == "other-settings" else "--update-baseline"
    assert expected in str(info.value)
    assert not (tmp_path / "night").exists()


# ------------------------------------------------------------------------------------------ Ray token auth
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CLIENT = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print("ANSWER", ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


def test_a_token_auth_ray_cluster_refuses_a_client_without_the_token(tmp_path):
    """The mechanism every cluster in infra/ uses (RAY_AUTH_MODE=token, the token from a Secret mounted as
    RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) on a head of its own: private temp dir and HOME, stopped by its PID."""
    ray_bin = Path(sys.executable).with_name("ray")
    token = uuid.uuid4().hex + uuid.uuid4().hex
    (tmp_path / "token").write_text(token)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(tmp_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    port = _free_port()
    log = (tmp_path / "head.log").open("w")
    ray_tmp = tempfile.mkdtemp(prefix="tt-ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", f"--temp-dir={ray_tmp}",
         "--node-ip-address=127.0.0.1", "--num-cpus=1", "--include-dashboard=false",
         f"--object-store-memory={80 * 2**20}", "--disable-usage-stats"],
        env=dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        fast_fail = {"RAY_gcs_server_port_wait_time_s": "2"}  # one connection attempt, not twenty
        clients = {
            "no token": dict(base, RAY_AUTH_MODE="disabled", **fast_fail),
            "wrong token": dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex * 2, **fast_fail),
            "the token": dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token")),
        }
        procs = {name: subprocess.Popen([sys.executable, "-c", _CLIENT, f"127.0.0.1:{port}"], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name, env in clients.items()}
        outcomes = {name: (p.wait(timeout=180), p.stdout.read() if p.stdout else "") for name, p in procs.items()}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # the head's own process group: its GCS, raylet and workers
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    code, output = outcomes["the token"]
    assert code == 0 and "ANSWER 42" in output, output[-3000:]
    for name in ("no token", "wrong token"):
        code, output = outcomes[name]
        assert code != 0 and "ANSWER" not in output, (name, output[-3000:])
        assert "InvalidAuthToken" in output or "Unauthenticated" in output, (name, output[-3000:])
