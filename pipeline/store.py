"""Whole-object key/value storage on any fsspec URL (`Store`, and `child` stores under a prefix): the only module that
touches fsspec.

Every write is one whole object and `create_only` is an atomic claim on every backend; keys are validated so that
none (a hostile ``../x`` included) names anything outside the root. Only `PROTOCOLS` are accepted, transient
failures are retried then raise `TransientStoreError`, and nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.errors import (
    CorruptStateError,
    InputError,
    StoreError,
    TokentrimError,
    TransientStoreError,
    UnsupportedURLError,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from fsspec import AbstractFileSystem

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CONNECTIONS = 64  # concurrent requests one S3 store may have open (threads share its connection pool)
# the storage protocols the tests cover (local files, S3 incl. S3-compatible stores, in-process memory); a URL with
# any other scheme (http, ftp, ssh, gs, ...) or a chain of them is refused, never retried
PROTOCOLS = ("file", "local", "s3", "memory")
_MAX_KEY_BYTES = 1024  # the S3 limit on object key length
_TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # temp siblings that local writes rename into place
_FINAL_ERRNOS = {errno.EINVAL, errno.ENAMETOOLONG, errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EROFS}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "OperationAborted", "ConditionalRequestConflict", "TooManyRequests",
}  # fmt: skip
_TRANSIENT_CLASS_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "HTTPClientError", "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError",
    "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError",
}  # fmt: skip


class KeyNotFound(StoreError, KeyError):
    """The key holds no object. A `StoreError` (final for `jobs/`) and a `KeyError` (a missing mapping key)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error may go away on retry: network, timeout, 5xx and throttling errors.

    Missing or existing keys, permissions and malformed requests are final. botocore, aiobotocore
    and aiohttp errors are recognised by class name and response, so none of them is imported here.
    """
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError that s3fs did not translate
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_CODES or int(status) >= 500 or int(status) == 429
    if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        cause = exc.__cause__
        if cause is not None and cause is not exc and getattr(cause, "response", None) is not None:
            return is_transient(cause)  # s3fs wraps ClientError in OSError: judge the original
        return exc.errno not in _FINAL_ERRNOS
    return False


def validate_key(key: str, *, name: str = "key", allow_empty: bool = False) -> str:
    """Return `key` if it is a safe relative key, else raise `InputError` naming it."""
    if not isinstance(key, str):
        raise TypeError(f"`{name}` must be a str, got {type(key).__name__}: {key!r}")
    if key == "" and allow_empty:
        return key
    problem = None
    if key == "":
        problem = "is empty"
    elif key.startswith("/"):
        problem = "starts with '/'"
    elif "\\" in key:
        problem = "contains a backslash"
    elif not key.isprintable():
        problem = "contains a non-printable character"
    elif len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        problem = f"is longer than {_MAX_KEY_BYTES} bytes"
    else:
        parts = key.rstrip("/").split("/") if allow_empty else key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            problem = "has an empty, '.' or '..' segment"
    if problem is not None:
        raise InputError(f"`{name}` {key!r} {problem}; keys are relative '/'-separated paths under the store root")
    return key


def url_protocol(url: str) -> str:
    """The storage protocol of `url` (``file`` for a plain path); `UnsupportedURLError` for a scheme outside
    `PROTOCOLS` or a chained URL. The message names the scheme, never the rest of the URL's options."""
    if "::" in url:
        raise UnsupportedURLError(f"`url` {redact_url(url)!r} chains filesystems ('::'), which is not accepted; "
                                  f"use {_allowed()}")
    scheme, sep, _ = url.partition("://")
    protocol = scheme.lower() if sep else "file"
    if protocol not in PROTOCOLS:
        raise UnsupportedURLError(f"`url` {redact_url(url)!r} uses protocol {protocol!r}, which is not accepted; "
                                  f"use {_allowed()}")
    return protocol


def redact_url(url: str) -> str:
    """`url` with any ``user:password@`` part replaced by ``***@`` (for messages)."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


def _allowed() -> str:
    return ", ".join(f"{p}://" for p in PROTOCOLS if p != "local") + " or a local path"


def split_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Store, str]:
    """The store holding the object at `url` (its folder) and the object's key: ``s3://b/x/t.parquet`` ->
    ``(Store("s3://b/x"), "t.parquet")``; a bare file name is in the working directory."""
    if not isinstance(url, str) or not url.strip() or url.endswith("/"):
        raise InputError(f"`url` must name an object, got {url!r}")
    root, _, key = url.rpartition("/")
    if root.endswith(":/"):  # "s3://bucket-only" has no folder part to root a store at
        raise InputError(f"`url` {url!r} names no object under a bucket or folder")
    return Store(root or ".", storage_options), key


class Store:
    """Whole-object key/value store rooted at an fsspec URL (file://, plain local path, memory://, s3://...).

    Args:
        url: root of the store; a trailing '/' is dropped.
        storage_options: passed to `fsspec.filesystem` (for s3: key, secret, client_kwargs...).
        retries: how many times a transiently failing call is retried (attempts = retries + 1).
        backoff_s: the sleep before retry i is `backoff_s * 2**i`.
    """

    _memory_lock = threading.Lock()  # memory:// is one in-process dict: claims on it serialise here

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None = None, *, retries: int = 4, backoff_s: float = 0.05
    ) -> None:
        if not isinstance(url, str) or not url.strip("/"):
            raise InputError(f"`url` must name a store root, got {url!r}")
        url_protocol(url)
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"`retries` must be an int >= 0, got {retries!r}")
        if not backoff_s >= 0:
            raise ValueError(f"`backoff_s` must be >= 0, got {backoff_s!r}")
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.retries = retries
        self.backoff_s = float(backoff_s)
        self._fs, self._protocol = self._make_fs()
        self._root = self._fs._strip_protocol(self.url).rstrip("/")

    def _make_fs(self) -> tuple[AbstractFileSystem, str]:
        try:
            import fsspec
        except ImportError as e:  # pragma: no cover - fsspec is a core dependency
            raise ImportError("pipeline.store needs fsspec: pip install tokentrim (or pip install fsspec)") from e
        protocol = url_protocol(self.url)
        options = dict(self.storage_options)
        if protocol == "s3":
            try:
                import s3fs  # noqa: F401
            except ImportError as e:
                raise ImportError(f"`url` {self.url!r} needs s3fs: pip install 's3fs>=2024.6'") from e
            options.setdefault("skip_instance_cache", True)  # tests with different endpoints must not share one
            # botocore's default pool (10) would cap the concurrent reads of the job driver (`jobs.done_index`)
            options["config_kwargs"] = {"max_pool_connections": MAX_CONNECTIONS, **options.get("config_kwargs", {})}
        fs = fsspec.filesystem(protocol, **options)
        return fs, "local" if protocol in ("file", "local") else protocol

    def __getstate__(self) -> dict[str, Any]:  # rebuild the filesystem on unpickle (Ray workers)
        state = dict(self.__dict__)
        state.pop("_fs")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = self._make_fs()[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- keys ---------------------------------------------------------------------------------

    def join(self, *parts: str) -> str:
        """Full URL of the key made of `parts` joined by '/'."""
        return f"{self.url}/{validate_key('/'.join(parts))}"

    def child(self, prefix: str) -> Store:
        """The store rooted at `prefix` under this one (``store.child("a").get_bytes("b")`` reads ``a/b``): the same
        options, retries and filesystem, no new connection pool."""
        prefix = validate_key(prefix.rstrip("/"), name="prefix")
        view = Store.__new__(Store)
        view.url, view.storage_options = f"{self.url}/{prefix}", self.storage_options
        view.retries, view.backoff_s = self.retries, self.backoff_s
        view._fs, view._protocol, view._root = self._fs, self._protocol, f"{self._root}/{prefix}"
        return view

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}"

    # -- retry loop ---------------------------------------------------------------------------

    def _invoke(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """One attempt of a storage call. A seam for tests (see tests/flaky_store.py)."""
        return fn()

    def _retry(self, op: str, key: str, fn: Callable[[], T]) -> T:
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._invoke(op, key, fn)
            except TokentrimError:
                raise
            except FileNotFoundError as e:
                raise KeyNotFound(f"no object at key {key!r} under {self.url!r}") from e
            except Exception as e:  # classified, then re-raised or retried: never swallowed
                if not is_transient(e):
                    if isinstance(e, OSError) or getattr(e, "response", None) is not None:
                        raise StoreError(f"{op} of key {key!r} under {self.url!r} failed: {e!r}") from e
                    raise
                last = e
                logger.warning("%s of key %r under %r failed (attempt %d/%d): %r",
                               op, key, self.url, attempt + 1, self.retries + 1, e)  # fmt: skip
        raise TransientStoreError(
            f"{op} of key {key!r} under {self.url!r} failed after {self.retries + 1} attempts: {last!r}"
        ) from last

    # -- whole-object reads and writes --------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` as the whole object at `key`, replacing any old one; a reader never sees part of it."""
        validate_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"`data` for key {key!r} must be bytes, got {type(data).__name__}")
        data = bytes(data)
        path = self._path(key)
        if self._protocol == "local":
            self._retry("put", key, lambda: self._local_write(path, data, exclusive=False))
        else:
            self._retry("put", key, lambda: self._fs.pipe_file(path, data))  # one call: a whole object

    def get_bytes(self, key: str) -> bytes:
        """The whole object at `key`; `KeyNotFound` if there is none."""
        path = self._path(validate_key(key))
        return self._retry("get", key, lambda: bytes(self._fs.cat_file(path)))

    def put_json(self, key: str, obj: Any) -> None:
        """Write `obj` as UTF-8 JSON with sorted keys (NaN and Inf are rejected: they are not JSON)."""
        validate_key(key)
        try:
            text = json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise InputError(f"`obj` for key {key!r} is not JSON-serialisable: {e}") from e
        self.put_bytes(key, text.encode("utf-8"))

    def get_json(self, key: str) -> Any:
        """The JSON value at `key`, parsed strictly (`strict_json`); `CorruptStateError` if it does not parse."""
        data = self.get_bytes(key)
        try:
            return strict_json(data)
        except ValueError as e:
            raise CorruptStateError(f"object at key {key!r} under {self.url!r} is not strict UTF-8 JSON: {e}") from e

    def get_table(self, key: str) -> pa.Table:
        """The Parquet table at `key`, read from a copy in memory that pyarrow owns; `CorruptStateError` if it does
        not parse.

        Never from a Python object (an `io.BytesIO`, or even `bytes` behind `pa.BufferReader`): `read_table` scans
        asynchronously, and its thread pool can drop the last reference to the source after the call returned. When
        that source is a Python object, the dropping thread takes the GIL; if the interpreter is exiting by then,
        the thread is ended inside a C++ destructor and the process aborts ("terminate called without an active
        exception", exit 134; seen in about half of `tokentrim status` runs with torch imported first).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        sink.write(self.get_bytes(key))
        try:
            return pq.read_table(pa.BufferReader(sink.getvalue()))
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise CorruptStateError(f"object at key {key!r} under {self.url!r} is not Parquet: {e}") from e

    def put_table(self, key: str, table: pa.Table) -> None:
        """Write `table` as one whole Parquet object at `key`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.put_bytes(key, sink.getvalue().to_pybytes())

    def exists(self, key: str) -> bool:
        """Whether an object (not just a prefix of others) is stored at `key`."""
        path = self._path(validate_key(key))

        def op() -> bool:
            self._fs.invalidate_cache(path)
            try:
                return self._fs.info(path)["type"] == "file"
            except FileNotFoundError:
                return False

        return self._retry("exists", key, op)

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys, relative to the root, that start with `prefix` (a fresh listing, never a cached one)."""
        validate_key(prefix, name="prefix", allow_empty=True)
        folder = prefix.rpartition("/")[0]
        path = self._path(folder) if folder else self._root

        def op() -> list[str]:
            self._fs.invalidate_cache(path)
            try:
                found = self._fs.find(path)
            except FileNotFoundError:
                return []
            strip = len(self._root) + 1
            keys = [p[strip:] for p in found if p.startswith(self._root + "/")]
            return sorted(k for k in keys if k.startswith(prefix) and not _TMP_NAME.match(k.rpartition("/")[2]))

        return self._retry("list", prefix, op)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Bytes of every object whose key starts with `prefix` (a fresh listing), by key."""
        validate_key(prefix, name="prefix", allow_empty=True)
        folder = prefix.rpartition("/")[0]
        path = self._path(folder) if folder else self._root

        def op() -> dict[str, int]:
            self._fs.invalidate_cache(path)
            try:
                found = self._fs.find(path, detail=True)
            except FileNotFoundError:
                return {}
            strip = len(self._root) + 1
            keys = {p[strip:]: int(info.get("size") or 0) for p, info in found.items()
                    if p.startswith(self._root + "/")}
            return {k: v for k, v in sorted(keys.items())
                    if k.startswith(prefix) and not _TMP_NAME.match(k.rpartition("/")[2])}

        return self._retry("sizes", prefix, op)

    @property
    def pages_listings(self) -> bool:
        """Whether the server pages a listing (S3: 1,000 keys a round trip), so that listings of several key
        prefixes at once beat one of the whole folder; local folders and memory:// list a folder in one call."""
        return self._protocol not in ("local", "memory")

    def versions(self, prefix: str = "") -> dict[str, str]:
        """A version tag of every object whose key starts with `prefix` (one fresh listing, paged by the backend):
        S3's ETag, else size, mtime and inode. A rewritten object shows another tag (locally: unless rewritten in
        place within one mtime tick at the same size and inode; `put_bytes` renames a new file into place)."""
        validate_key(prefix, name="prefix", allow_empty=True)
        folder, _, rest = prefix.rpartition("/")
        path = self._path(folder) if folder else self._root

        def op() -> dict[str, str]:
            self._fs.invalidate_cache(path)
            try:  # s3fs filters by `prefix` on the server (others ignore it): pages of matching keys only
                found = self._fs.find(path, detail=True, prefix=rest)
            except FileNotFoundError:
                return {}
            strip = len(self._root) + 1
            tags = {p[strip:]: _version_tag(info) for p, info in found.items() if p.startswith(self._root + "/")}
            return {k: v for k, v in tags.items()
                    if k.startswith(prefix) and not _TMP_NAME.match(k.rpartition("/")[2])}

        return self._retry("versions", prefix, op)

    def delete(self, key: str) -> None:
        """Remove the object at `key`; a missing key is fine."""
        path = self._path(validate_key(key))

        def op() -> None:
            try:
                self._fs.rm_file(path)
            except FileNotFoundError:
                pass
            self._fs.invalidate_cache(path)

        self._retry("delete", key, op)

    # -- claims -------------------------------------------------------------------------------

    def create_only(self, key: str, data: bytes) -> bool:
        """Atomically create `key` holding `data`: True if this call created it, False if it already existed.

        Local: a complete temp file hard-linked into place (link fails if the name exists). S3: one
        PutObject with `If-None-Match: *` (s3fs `pipe_file(mode="create")`). memory://: check and put
        under a process-wide lock. If an attempt failed transiently and a retry finds the key, the
        request may have landed before the failure: the call returns True iff the stored bytes equal
        `data`, so put something unique to the caller (an owner token) in `data`.
        """
        validate_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"`data` for key {key!r} must be bytes, got {type(data).__name__}")
        data = bytes(data)
        path = self._path(key)
        attempts = [0]

        def op() -> bool:
            attempts[0] += 1
            try:
                self._create(path, data)
                return True
            except FileExistsError:
                if attempts[0] > 1:
                    return bytes(self._fs.cat_file(path)) == data
                return False

        return self._retry("create_only", key, op)

    def _create(self, path: str, data: bytes) -> None:
        """Create `path` or raise FileExistsError."""
        if self._protocol == "local":
            self._local_write(path, data, exclusive=True)
        elif self._protocol == "memory":
            with self._memory_lock:
                if self._fs.exists(path):
                    raise FileExistsError(path)
                self._fs.pipe_file(path, data)
        else:
            try:
                self._fs.pipe_file(path, data, mode="create")
            except OSError as e:
                if _is_precondition_failed(e):  # s3fs maps 412 to FileExistsError only if the server names the header
                    raise FileExistsError(path) from e
                raise
            finally:
                self._fs.invalidate_cache(path)

    def _local_write(self, path: str, data: bytes, *, exclusive: bool) -> None:
        """Write a complete temp sibling, then rename it into place (or hard-link it, when `exclusive`)."""
        folder, _, name = path.rpartition("/")
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                _link_or_create(tmp, path, data)
            else:
                os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def strict_json(data: bytes | str) -> Any:
    """Parse JSON as written by `Store.put_json`: UTF-8, no NaN or Infinity (nor a number too large for a float),
    no key twice in an object. Raises ValueError (json's own, or naming the constant, number or key)."""

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} does not fit a float")
        return value

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"key {k!r} appears twice in one object")
            out[k] = v
        return out

    text = data.decode("utf-8") if isinstance(data, bytes) else data  # UnicodeDecodeError is a ValueError
    return json.loads(text, parse_constant=constant, parse_float=number, object_pairs_hook=pairs)


def _version_tag(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag)
    stamp = info.get("mtime", info.get("created"))
    return f"{info.get('size')}:{stamp!r}:{info.get('ino', '')}"


def _link_or_create(tmp: str, path: str, data: bytes) -> None:
    """Hard-link `tmp` to `path` (atomic; FileExistsError if `path` exists); without hard links, open it 'xb'."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        logger.debug("no hard links at %r (%r): claiming with open('xb')", path, e)
        with open(path, "xb") as f:  # still create-only; a reader may see the claim before its bytes
            f.write(data)


def _is_precondition_failed(exc: BaseException) -> bool:
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if error.get("Code") == "PreconditionFailed" or status == 412:
                return True
    return False
