"""Where data and caches live: a local path or any fsspec URL (`s3://bucket/prefix`, `gs://...`,
`file://...`, `memory://...`), behind one small class.

    loc = Location("s3://bucket/data")         # or "runs/data", "file:///abs/data"
    loc.child("dataset.json").read_bytes()
    with loc.child("train-000000.tar").open("rb") as f: ...   # streamed, never downloaded whole
    loc.child("dataset.json").write_atomic(data)               # temp + fsync + rename here, one PUT there

fsspec does the I/O (`fsspec.core.url_to_fs`); credentials and endpoints come only from the places
fsspec and the cloud clients read themselves (AWS_* variables, AWS_ENDPOINT_URL, ~/.aws, fsspec's
configuration). What is written by hand here is what fsspec does not give: durability on local disks
(fsync + os.replace, which object stores do not need because a PUT appears whole or not at all), a
fresh listing every time (other processes add objects), and one-sentence errors for the failures a
user can fix (a missing client, missing credentials, a missing bucket), and one retry policy for
stores that are briefly slow or unreachable (`retrying`, below).

Retries live here, in one place: every request this project makes to a URL (through `Location` and
through the zarr store `cache.store` opens) goes through `retrying`, which retries connection failures,
timeouts, cut answers and throttling (never "not found" or "access denied") with exponential backoff:
OFAKD_STORE_RETRIES retries (default 6) after the first try, waiting OFAKD_STORE_BACKOFF seconds
(default 0.5) before the first retry and twice as long before each next one, each wait capped at 8 s
(defaults: 0.5 + 1 + 2 + 4 + 8 + 8 = 23.5 s of outage ridden through). The first failure of an outage
prints one warning line per process; after the last retry the command stops with a UserError naming
the store. The S3 client's own retries are switched off (s3fs's loop and botocore's), so the count
above is the count of requests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import UserError

# protocol -> the optional extra of this project that installs its client (these stores have buckets)
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "adl": "azure"}


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _client_error(url: str, e: Exception) -> UserError:
    proto = protocol_of(url)
    extra = EXTRAS.get(proto)
    if extra:
        return UserError(f"{url} needs the {proto}:// client, which is not installed; install it with "
                         f"`pip install ofakd-cache[{extra}]` (or `pip install .[{extra}]` in a checkout)")
    return UserError(f"{url}: no installed fsspec filesystem handles '{proto}://' ({e}); install its fsspec "
                     f"implementation or use a local path")


def describe_error(url: str, e: BaseException) -> str | None:
    """A one-sentence cause for the storage failures a user fixes outside this tool, else None."""
    name, text = type(e).__name__, str(e)
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return (f"no credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                f"or another source the client reads) in the environment")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return (f"bucket '{bucket}' of {url} does not exist (or is not visible with these credentials); "
                f"create it or fix the URL")
    first = text.splitlines()[0][:120] if text else name
    if any(c in name or c in text for c in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")):
        return f"access to {url} was denied ({first}); check the credentials and their permissions"
    if "Could not connect to the endpoint" in text or "Cannot connect to host" in text:
        return f"cannot reach the storage service for {url} ({first}); check AWS_ENDPOINT_URL or the network"
    return None


# ---------------------------------------------------------------------------------------------- retries
RETRIES_ENV, BACKOFF_ENV, MAX_WAIT = "OFAKD_STORE_RETRIES", "OFAKD_STORE_BACKOFF", 8.0

# failures a store recovers from by itself: refused, reset or cut connections, timeouts, throttling.
# Matched by name along the exception's chain: s3fs, botocore, aiohttp and gcsfs each raise their own types.
TRANSIENT_TYPES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                   "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
                   "SocketTimeoutError", "ServerTimeoutError", "IncompleteRead", "ResponseStreamingError",
                   "HTTPClientError", "FSTimeoutError", "ProtocolError", "ChunkedEncodingError"}
TRANSIENT_TEXT = ("SlowDown", "reduce your request rate", "Service Unavailable", "ServiceUnavailable",
                  "InternalError", "RequestTimeout", "Throttl")


TRANSIENT_STATUS = {429, 500, 502, 503, 504}  # too many requests, and the server errors a store recovers from


def _http_status(e: BaseException) -> int | None:
    """The HTTP status of a failed request's answer, where the client's exception carries it (botocore)."""
    response = getattr(e, "response", None)
    meta = response.get("ResponseMetadata", {}) if isinstance(response, dict) else {}
    return meta.get("HTTPStatusCode") if isinstance(meta, dict) else None


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 6  # after the first try
    backoff: float = 0.5  # seconds before the first retry; doubled before each next one, at most MAX_WAIT

    @staticmethod
    def from_env() -> RetryPolicy:
        try:
            retries = int(os.environ.get(RETRIES_ENV, RetryPolicy.retries))
            backoff = float(os.environ.get(BACKOFF_ENV, RetryPolicy.backoff))
        except ValueError:
            retries = backoff = -1
        if retries < 0 or not backoff >= 0:
            raise UserError(f"{RETRIES_ENV}={os.environ.get(RETRIES_ENV)!r} / {BACKOFF_ENV}="
                            f"{os.environ.get(BACKOFF_ENV)!r} are not a count >= 0 and seconds >= 0; fix or unset them")
        return RetryPolicy(retries, backoff)

    def wait(self, retry: int) -> float:
        return min(self.backoff * 2 ** retry, MAX_WAIT)

    @property
    def total(self) -> float:
        return sum(self.wait(i) for i in range(self.retries))


def is_transient(e: BaseException) -> bool:
    """A failure that waiting may cure (see TRANSIENT_TYPES); "not found", "denied" and bad input are not."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in TRANSIENT_TYPES:
            return True
        if _http_status(e) in TRANSIENT_STATUS:  # an answer without a body names no code (HEAD): its status does
            return True
        if any(t in str(e) for t in TRANSIENT_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _store_root(url: str) -> str:
    """What an outage is an outage of: protocol://bucket (a local path: itself)."""
    if "://" not in url:
        return url
    proto, rest = url.split("://", 1)
    return f"{proto}://{rest.split('/', 1)[0]}"


_outages: dict[str, float] = {}  # store root -> when this process saw it fail first (until it answers again)
_outages_lock = threading.Lock()


def retrying(url: str, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), retried on transient failures under the policy of the module docstring; other
    failures become one-sentence UserErrors where their cause is known (`storage_errors`)."""
    policy, root, first = None, _store_root(url), None
    for attempt in range(1 << 30):
        started = time.monotonic()
        try:
            with storage_errors(url, translate_transient=False):
                out = fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, UserError) or not is_transient(e):
                raise
            policy = policy or RetryPolicy.from_env()
            first = first or started
            _warn_once(root, e, policy)
            if attempt >= policy.retries:
                raise UserError(f"storage {root} did not answer for {time.monotonic() - first:.1f} s "
                                f"({attempt + 1} tries of {url}; last: {_short(e)}); check the network and the "
                                f"endpoint (AWS_ENDPOINT_URL), or allow a longer outage with {RETRIES_ENV} / "
                                f"{BACKOFF_ENV}") from e
            time.sleep(policy.wait(attempt))
            continue
        if _outages:
            with _outages_lock:  # the store answers again: a request sent after the outage began came back
                if _outages.get(root, started) < started:
                    del _outages[root]
        return out


def _warn_once(root: str, e: BaseException, policy: RetryPolicy) -> None:
    """The first failure of an outage (since the store last answered) prints the one warning line."""
    with _outages_lock:
        if root in _outages:
            return
        _outages[root] = time.monotonic()
    if policy.retries:
        print(f"warning: storage {root} is not answering ({_short(e)}); retrying up to {policy.retries} times over "
              f"{policy.total:.1f} s ({RETRIES_ENV}, {BACKOFF_ENV})", file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- read-ahead
PREFETCH_ENV = "OFAKD_STORE_PREFETCH"


def prefetch_depth() -> int:
    """Units a reader fetches ahead from a store (OFAKD_STORE_PREFETCH, default 2; 0: none)."""
    try:
        depth = int(os.environ.get(PREFETCH_ENV, 2))
    except ValueError:
        depth = -1
    if depth < 0:
        raise UserError(f"{PREFETCH_ENV}={os.environ.get(PREFETCH_ENV)!r} is not a count >= 0; fix or unset it")
    return depth


class ReadAhead:
    """fn(key) for a sequence of keys known in advance, `depth` of them running ahead on threads.

    `take(key)` must follow the sequence: it returns the next key's value (waiting for it if needed) and
    starts the key `depth` further on; a key out of sequence gives None (the caller reads it itself) and
    ends the read-ahead. So what is read and in what order does not change, only when; memory holds at
    most `depth` values fetched ahead plus the one taken. Errors surface at `take`, as an inline read's
    would. Hand-written: the stdlib pool has no bounded look-ahead over a known order (Executor.map
    submits every key at once)."""

    def __init__(self, fn: Callable, keys, depth: int):
        self._fn, self._keys, self._depth = fn, list(keys), depth
        self._pid = os.getpid()  # threads do not survive fork: a copy in a child reads inline
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="readahead") if depth else None
        self._futures: deque = deque()
        self._next = 0
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and len(self._futures) < self._depth and self._next < len(self._keys):
            key = self._keys[self._next]
            self._next += 1
            self._futures.append((key, self._pool.submit(self._fn, key)))

    def take(self, key: Hashable):
        if self._pid != os.getpid() or not self._futures or self._futures[0][0] != key:
            self.close()
            return None
        _, future = self._futures.popleft()
        self._fill()
        return future.result()

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            for _, f in self._futures:
                f.cancel()
            self._pool.shutdown(wait=False)
        self._pool, self._futures = None, deque()


_session = None


def client_options(url: str) -> dict:
    """fsspec storage options for `url`: botocore's own retries off (s3), leaving them to `retrying`; and one
    botocore session per process tree, so that each client (one per filesystem, per data-loader worker) does
    not load the service's models again (0.15 s of CPU each, 0.01 s with the session's cache warm)."""
    global _session
    if protocol_of(url) not in ("s3", "s3a"):
        return {}
    if _session is None:
        from aiobotocore.session import AioSession
        _session = AioSession()  # holds no connection: a forked worker may use its copy
    conf = fsspec.config.conf.get("s3", {}).get("config_kwargs", {})
    return {"config_kwargs": {**conf, "retries": {"total_max_attempts": 1, "mode": "standard"}}, "session": _session}


def quiet_client(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """s3fs retries some errors itself (`retries`, a class attribute): once only, so the policy's count holds."""
    if type(fs).__name__ == "S3FileSystem":
        fs.retries = 1
    return fs


@contextlib.contextmanager
def storage_errors(url: str, translate_transient: bool = True) -> Iterator[None]:
    """Turn credential, bucket and connection failures inside the block into one-sentence UserErrors."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # botocore/aiohttp/gcsfs raise many types; only known causes are translated
        if not translate_transient and is_transient(e):
            raise  # `retrying` decides
        why = describe_error(url, e)
        if why is None:
            raise
        raise UserError(why) from e


class Location:
    """A file or folder named by a local path or an fsspec URL. Pickles as its URL (the filesystem
    object is rebuilt per process: cloud clients hold sockets and event loops that do not survive fork)."""

    def __init__(self, url: str | os.PathLike | Location):
        url = url.url if isinstance(url, Location) else os.fspath(url)
        self.url = url
        self._fs, self._path, self._pid = None, None, None
        self._connect()

    def _connect(self) -> None:
        try:
            self._fs, self._path = url_to_fs(self.url, **client_options(self.url))
            quiet_client(self._fs)
        except ImportError as e:
            raise _client_error(self.url, e) from e
        except ValueError as e:  # "Protocol not known"
            raise _client_error(self.url, e) from e
        self._pid = os.getpid()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._pid != os.getpid():
            self._connect()
        return self._fs

    @property
    def path(self) -> str:
        """The path as the filesystem names it (no protocol)."""
        return self._path

    @property
    def local(self) -> Path | None:
        """A local `Path` when this is on the local disk (fsync and rename apply), else None."""
        return Path(self._path) if isinstance(self._fs, LocalFileSystem) else None

    @property
    def is_url(self) -> bool:
        return self.local is None

    def __getstate__(self):
        return {"url": self.url}

    def __setstate__(self, state):
        self.__init__(state["url"])

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and self.url == other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def child(self, name: str) -> Location:
        return Location(f"{self.url.rstrip('/')}/{name}" if "://" in self.url else os.path.join(self.url, name))

    __truediv__ = child

    @property
    def name(self) -> str:
        return self._path.rstrip("/").rsplit("/", 1)[-1]

    def resolved(self) -> str:
        """What to record in an artifact: an absolute local path, or the URL."""
        return str(self.local.resolve()) if self.local is not None else self.url

    # ------------------------------------------------------------------ requests (retried: `retrying`)
    def _call(self, fn: Callable, *args, **kwargs):
        if self.local is not None:
            with storage_errors(self.url):
                return fn(*args, **kwargs)
        return retrying(self.url, fn, *args, **kwargs)

    # ------------------------------------------------------------------ queries (never from a stale listing)
    def _fresh(self) -> None:
        self.fs.invalidate_cache(self._path)

    def _fresh_call(self, fn: Callable):
        def call():
            self._fresh()
            return fn(self._path)
        return self._call(call)

    def _kind(self, path: str) -> str | None:
        """"file", "directory" or None (absent), from `info`: fsspec's exists/isfile answer False for any
        failure (an outage would read as a missing file), `info` raises it, and `retrying` retries it."""
        try:
            return self.fs.info(path)["type"]
        except (FileNotFoundError, NotADirectoryError):  # a path under a file does not exist either
            return None

    def exists(self) -> bool:
        return self._fresh_call(self._kind) is not None

    def isfile(self) -> bool:
        return self._fresh_call(self._kind) == "file"

    def isdir(self) -> bool:
        return self._fresh_call(self._kind) == "directory"

    def listdir(self) -> list[str]:
        """Names directly under this folder ([] when it does not exist)."""
        def ls(path):
            try:
                return self.fs.ls(path, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self._fresh_call(ls))

    def size(self) -> int:
        return int(self._call(self.fs.size, self._path))

    def du(self) -> int:
        """Total bytes of every file under this folder."""
        return self._fresh_call(lambda p: int(self.fs.du(p, total=True)) if self.fs.exists(p) else 0)

    def check_writable_root(self) -> None:
        """Before writing under a URL: its bucket (or container) exists, so a wrong name fails in one
        sentence before any work rather than at the first upload."""
        if protocol_of(self.url) not in EXTRAS or not self._path.strip("/"):  # only these have buckets
            return
        bucket = self._path.strip("/").split("/", 1)[0]

        def bucket_exists():
            self.fs.invalidate_cache(bucket)
            return self.fs.exists(bucket)
        if not self._call(bucket_exists):
            raise UserError(f"bucket '{bucket}' of {self.url} does not exist (or is not visible with these "
                            f"credentials); create it or fix the URL")

    # ------------------------------------------------------------------ reading
    def open(self, mode: str = "rb", **kw):
        """A file object; on a URL, read-mode files retry each read (a failed read leaves the position as it
        was, so the retried read returns the same bytes)."""
        f = self._call(self.fs.open, self._path, mode, **kw)
        return _RetryingReader(f, self.url) if self.is_url and "r" in mode else f

    def read_bytes(self) -> bytes:
        # s3fs asks an object's size first (a HEAD: one more round trip) to split big downloads; ours are
        # small (markers, manifests) or one of several shards read ahead together: one GET each
        kw = {"max_concurrency": 1} if type(self.fs).__name__ == "S3FileSystem" else {}
        return self._call(self.fs.cat_file, self._path, **kw)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    # ------------------------------------------------------------------ writing
    def mkdir(self) -> None:
        """A folder, where folders exist (object stores have none: a prefix exists once it holds objects)."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)

    def write_atomic(self, data: bytes) -> None:
        """The whole of `data` at this name, or (after a crash) the previous content: locally temp file,
        fsync, rename, fsync of the folder; on an object store one PUT, which is atomic by itself (so a PUT
        retried after a cut connection leaves the old object or the whole new one, never a part)."""
        if self.local is not None:
            write_local_atomic(self.local, data)
            return
        self._call(self.fs.pipe_file, self._path, data)

    def write_text(self, text: str) -> None:
        self.write_atomic(text.encode("utf-8"))

    # pathlib spellings, so code and tests written against `Path` keep working on a Location
    def is_file(self) -> bool:
        return self.isfile()

    def unlink(self) -> None:
        self.rm()

    def put_file(self, local_file: Path) -> None:
        """Move a finished local file here durably (rename locally; one upload otherwise, then delete it)."""
        if self.local is not None:
            with open(local_file, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(local_file, self.local)
            fsync_dir(self.local.parent)
            return
        self._call(self.fs.put_file, str(local_file), self._path)
        local_file.unlink()

    def rm(self, recursive: bool = False) -> None:
        if self.local is not None:
            if self.local.is_dir() and not self.local.is_symlink():
                shutil.rmtree(self.local)
            elif self.local.exists():
                self.local.unlink()
            return
        def rm(path):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=recursive)
        self._fresh_call(rm)


class _RetryingReader:
    """A read-mode file on a store whose reads are `retrying`; everything else is the file's own."""

    def __init__(self, f, url: str):
        self._f, self._url = f, url

    def read(self, n: int = -1) -> bytes:
        return retrying(self._url, self._f.read, n)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def write_local_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` durably: temp file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
