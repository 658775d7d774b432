"""Shared fixtures. Storage: a loopback fake S3 (moto) for the session, and `store_url`, one fresh root per test
on a local folder, memory:// and the fake S3."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

S3_BUCKET = "test-bucket"


@dataclass(frozen=True)
class FakeS3:
    """A running moto server: `url` is the bucket root, `storage_options` go to `Store`/s3fs (the endpoint only: the
    credentials are the session's AWS_* variables, as on a cluster)."""

    url: str
    endpoint: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class StoreRoot:
    """A fresh, empty store root for one test; `kind` is "file", "memory" or "s3"."""

    kind: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


@pytest.fixture(scope="session")
def s3() -> Iterator[FakeS3]:
    """A moto S3 server on 127.0.0.1 (a free port) with one bucket, for the whole session."""
    import s3fs
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.setenv(name, "testing")
        for name in (
            "AWS_SESSION_TOKEN",
            "AWS_SECURITY_TOKEN",
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
        ):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            options = {"client_kwargs": {"endpoint_url": endpoint}}
            s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(S3_BUCKET)
            yield FakeS3(url=f"s3://{S3_BUCKET}", endpoint=endpoint, storage_options=options)
        finally:
            server.stop()


@pytest.fixture(params=["file", "memory", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreRoot]:
    """A fresh root URL (unique prefix) and its storage_options, on each backend in turn."""
    prefix = uuid.uuid4().hex
    if request.param == "file":
        yield StoreRoot("file", f"file://{tmp_path / prefix}")
    elif request.param == "memory":
        import fsspec

        url = f"memory://tests/{prefix}"
        yield StoreRoot("memory", url)
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)
    else:
        s3: FakeS3 = request.getfixturevalue("s3")
        yield StoreRoot("s3", f"{s3.url}/{prefix}", dict(s3.storage_options))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the test session (2 CPUs, a small object store), stopped by `ray.shutdown`. Its
    workers read S3 credentials from their environment (the fake S3's), as on a cluster: none is passed to them."""
    import logging

    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            mp.setenv(name, value)
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        import ray

        ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=False)
        try:
            yield
        finally:
            ray.shutdown()
