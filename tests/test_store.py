"""Store behaviour on a local folder, memory:// and a loopback fake S3 (moto)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline.errors import CorruptStateError, InputError, StoreError, TransientStoreError
from pipeline.store import KeyNotFound, Store, is_transient
from tests.conftest import FakeS3, StoreRoot
from tests.flaky_store import FlakyStore

HOSTILE_KEYS = ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", ".", "..", "", "a\\b", "a\nb", "a\x00b", "a/"]


def make_store(root: StoreRoot, **kw: object) -> Store:
    return Store(root.url, root.storage_options, backoff_s=0.0, **kw)


def test_bytes_round_trip_and_overwrite(store_url: StoreRoot) -> None:
    store = make_store(store_url)
    payload = bytes(range(256)) * 3
    store.put_bytes("runs/a/latents.bin", payload)
    store.put_bytes("empty", b"")
    assert store.get_bytes("runs/a/latents.bin") == payload
    assert store.get_bytes("empty") == b""
    store.put_bytes("runs/a/latents.bin", b"new")
    assert store.get_bytes("runs/a/latents.bin") == b"new"
    assert store.join("runs", "a/latents.bin") == f"{store_url.url}/runs/a/latents.bin"


def test_list_is_sorted_relative_filtered_by_prefix_and_fresh(store_url: StoreRoot) -> None:
    store = make_store(store_url)
    assert store.list() == []
    for key in ["b/2", "a/1", "b/1", "bb/1", "c"]:
        store.put_bytes(key, key.encode())
    assert store.list() == ["a/1", "b/1", "b/2", "bb/1", "c"]
    assert store.list("b/") == ["b/1", "b/2"]
    assert store.list("b") == ["b/1", "b/2", "bb/1"]
    assert store.list("b/2") == ["b/2"]
    assert store.list("zzz/") == []
    store.delete("b/1")
    store.put_bytes("b/3", b"3")
    assert store.list("b/") == ["b/2", "b/3"]  # no stale listing after a delete and a put


def test_changes_by_another_writer_are_seen_at_once(store_url: StoreRoot) -> None:
    reader, writer = make_store(store_url), make_store(store_url)  # separate filesystems, separate caches
    writer.put_bytes("d/a", b"1")
    assert reader.list("d/") == ["d/a"] and reader.exists("d/a")
    assert not reader.exists("d/b")
    writer.put_bytes("d/b", b"2")
    writer.delete("d/a")
    assert reader.list("d/") == ["d/b"]
    assert reader.exists("d/b") and not reader.exists("d/a")


def test_exists_means_an_object_and_delete_tolerates_missing(store_url: StoreRoot) -> None:
    store = make_store(store_url)
    assert not store.exists("dir/obj")
    store.put_bytes("dir/obj", b"x")
    assert store.exists("dir/obj")
    assert not store.exists("dir")  # a prefix of an object is not an object
    store.delete("dir/obj")
    assert not store.exists("dir/obj")
    store.delete("dir/obj")
    store.delete("never/was")


def test_missing_key_raises_key_not_found_naming_it(store_url: StoreRoot) -> None:
    store = make_store(store_url)
    with pytest.raises(KeyNotFound, match="no/such/key") as info:
        store.get_bytes("no/such/key")
    assert isinstance(info.value, StoreError) and isinstance(info.value, KeyError)
    assert store_url.url in str(info.value)
    with pytest.raises(KeyNotFound):
        store.get_json("no/such.json")


def test_json_round_trip_sorted_utf8_and_strict(store_url: StoreRoot) -> None:
    store = make_store(store_url)
    obj = {"z": 1, "a": [1.5, None, "ünï"], "m": {"y": True, "b": 2}}
    store.put_json("manifest.json", obj)
    assert store.get_json("manifest.json") == obj
    raw = store.get_bytes("manifest.json")
    assert raw == json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with pytest.raises(InputError, match="bad.json"):
        store.put_json("bad.json", {"x": float("nan")})
    assert not store.exists("bad.json")
    store.put_bytes("corrupt.json", b"{not json")
    with pytest.raises(CorruptStateError, match="corrupt.json"):
        store.get_json("corrupt.json")


def test_create_only_creates_once_and_keeps_the_first(store_url: StoreRoot) -> None:
    store = make_store(store_url)
    assert store.create_only("claims/p1", b"owner-1") is True
    assert store.create_only("claims/p1", b"owner-2") is False
    assert store.get_bytes("claims/p1") == b"owner-1"
    store.put_bytes("claims/p2", b"existing")
    assert store.create_only("claims/p2", b"owner-3") is False
    assert store.list("claims/") == ["claims/p1", "claims/p2"]


def test_create_only_concurrent_claims_have_exactly_one_winner(store_url: StoreRoot) -> None:
    store = make_store(store_url)
    check = store._fs.exists

    def slow_check(path: str, **kwargs: object) -> bool:  # widens any check-then-put window an emulation has
        found = check(path, **kwargs)
        time.sleep(0.02)
        return found

    store._fs.exists = slow_check  # type: ignore[method-assign]
    n = 8
    barrier = threading.Barrier(n)
    results: dict[int, bool] = {}

    def claim(i: int) -> None:
        barrier.wait()
        results[i] = store.create_only("claims/hot", f"owner-{i}".encode())

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(results) == n and len(winners) == 1
    assert store.get_bytes("claims/hot") == f"owner-{winners[0]}".encode()


def test_hostile_keys_are_rejected_naming_the_key(store_url: StoreRoot) -> None:
    store = make_store(store_url)
    calls = [
        lambda key: store.put_bytes(key, b"x"),
        store.get_bytes,
        lambda key: store.put_json(key, {}),
        store.exists,
        store.delete,
        lambda key: store.create_only(key, b"x"),
        store.join,
    ]
    for key in HOSTILE_KEYS:
        for call in calls:
            with pytest.raises(InputError) as info:
                call(key)
            assert repr(key) in str(info.value)
    assert store.list() == []


def test_hostile_key_never_escapes_a_local_root(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "root"))
    with pytest.raises(InputError, match=r"\.\./escaped"):
        store.put_bytes("../escaped", b"x")
    with pytest.raises(InputError):
        store.list("../")
    assert not (tmp_path / "escaped").exists()


def test_a_producer_that_raises_before_the_put_writes_nothing(store_url: StoreRoot) -> None:
    store = make_store(store_url)

    def produce() -> bytes:
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError):
        store.put_bytes("video.mp4", produce())
    assert store.list() == [] and not store.exists("video.mp4")


def test_a_local_write_failing_half_way_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    store = Store(str(root), retries=1, backoff_s=0.0)
    store.put_bytes("d/old", b"old content")

    def failing_fsync(fd: int) -> None:  # the bytes are in the temp file, then the disk fails
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(TransientStoreError, match="d/new"):
        store.put_bytes("d/new", b"x" * 10_000)
    with pytest.raises(TransientStoreError, match="d/old"):
        store.put_bytes("d/old", b"replacement")
    with pytest.raises(TransientStoreError):
        store.create_only("d/claim", b"me")
    monkeypatch.undo()
    assert sorted(os.listdir(root / "d")) == ["old"]  # no partial object, no temp file left
    assert store.get_bytes("d/old") == b"old content"
    assert store.list() == ["d/old"]


def test_s3_put_is_one_whole_object_call_never_a_streamed_open(s3: FakeS3) -> None:
    # s3fs uploads the partial object when an exception escapes `with fs.open(p, "wb")`: puts must not use it
    store = Store(f"{s3.url}/{uuid.uuid4().hex}", s3.storage_options)

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"fs.open called with {args} {kwargs}")

    store._fs.open = no_open  # type: ignore[method-assign]
    store.put_bytes("obj", b"whole")
    assert store.create_only("claim", b"me") is True
    assert store.get_bytes("obj") == b"whole"


def test_flaky_store_with_30_percent_failures_round_trips_everything(store_url: StoreRoot) -> None:
    store = FlakyStore(store_url.url, store_url.storage_options, failure_rate=0.3, seed=1, retries=8)
    objects = {f"obj/{i:02d}": os.urandom(64) for i in range(15)}
    for key, data in objects.items():
        store.put_bytes(key, data)
    assert store.list("obj/") == sorted(objects)
    assert {key: store.get_bytes(key) for key in objects} == objects
    assert store.create_only("claim", b"me") is True
    assert store.failures > 5  # the failures really happened and were retried
    assert store.attempts == 15 + 1 + 15 + 1 + store.failures


def test_flaky_store_always_failing_raises_transient_store_error_naming_key(store_url: StoreRoot) -> None:
    store = FlakyStore(store_url.url, store_url.storage_options, failure_rate=1.0, retries=3)
    with pytest.raises(TransientStoreError, match="doomed/key") as info:
        store.put_bytes("doomed/key", b"x")
    assert store_url.url in str(info.value) and "4 attempts" in str(info.value)
    assert store.attempts == 4
    store.failure_rate = 0.0
    assert not store.exists("doomed/key")


def test_create_only_after_a_lost_response_still_reports_its_own_claim(store_url: StoreRoot) -> None:
    # The first attempt lands but its response is lost; the retry finds the key holding our own bytes.
    store = FlakyStore(store_url.url, store_url.storage_options, failure_rate=0.0, when="after", fail_first=1)
    assert store.create_only("claim", b"token-a") is True
    assert store.failures == 1 and store.attempts == 2
    assert store.create_only("claim", b"token-b") is False  # someone else's claim stays theirs
    store.fail_first = store.attempts + 1  # lost response again, but the key held another owner's bytes
    assert store.create_only("claim", b"token-c") is False
    assert store.get_bytes("claim") == b"token-a"


def test_store_pickles_for_workers(store_url: StoreRoot) -> None:
    store = make_store(store_url)
    store.put_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.url == store.url and clone.get_bytes("k") == b"v"


def test_a_child_store_is_the_folder_under_its_prefix(store_url: StoreRoot) -> None:
    root = make_store(store_url)
    child = root.child("rollouts/p0/")
    child.put_bytes("a.bin", b"x")
    assert root.get_bytes("rollouts/p0/a.bin") == b"x" and child.list() == ["a.bin"]
    assert root.list("rollouts/") == ["rollouts/p0/a.bin"] and child.exists("a.bin")
    assert child.url == root.join("rollouts/p0") and child.join("a.bin") == root.join("rollouts/p0/a.bin")
    assert child.create_only("c", b"1") and not child.create_only("c", b"2")
    assert root.get_bytes("rollouts/p0/c") == b"1"
    assert pickle.loads(pickle.dumps(child)).get_bytes("a.bin") == b"x"
    child.delete("a.bin")
    assert root.list("rollouts/") == ["rollouts/p0/c"]
    for bad in ("", "/", "../x", "a/../../b"):
        with pytest.raises(InputError, match="prefix"):
            root.child(bad)


class _FakeClientError(Exception):
    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class EndpointConnectionError(Exception):
    """Named like botocore's, which is not a builtin ConnectionError."""


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionError("reset"), True),
        (TimeoutError("slow"), True),
        (OSError(errno.EIO, "io"), True),
        (_FakeClientError("SlowDown", 503), True),
        (_FakeClientError("InternalError", 500), True),
        (_FakeClientError("AccessDenied", 403), False),
        (EndpointConnectionError("no route"), True),
        (FileNotFoundError("gone"), False),
        (FileExistsError("there"), False),
        (PermissionError("no"), False),
        (OSError(errno.EINVAL, "bad request"), False),
        (ValueError("bug"), False),
    ],
)
def test_transient_errors_are_told_from_final_ones(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_final_store_errors_are_not_retried(tmp_path: Path) -> None:
    store = FlakyStore(str(tmp_path), failure_rate=0.0)
    (tmp_path / "adir").mkdir()
    with pytest.raises(StoreError, match="adir") as info:
        store.get_bytes("adir")
    assert not isinstance(info.value, TransientStoreError)
    assert store.attempts == 1


def test_bad_arguments_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="url"):
        Store("")
    with pytest.raises(ValueError, match="retries"):
        Store(str(tmp_path), retries=-1)
    with pytest.raises(TypeError, match="data"):
        Store(str(tmp_path)).put_bytes("k", "text")  # type: ignore[arg-type]
