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
user can fix (a missing client, missing credentials, a missing bucket).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
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


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn credential, bucket and connection failures inside the block into one-sentence UserErrors."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # botocore/aiohttp/gcsfs raise many types; only known causes are translated
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
            self._fs, self._path = url_to_fs(self.url)
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

    # ------------------------------------------------------------------ queries (never from a stale listing)
    def _fresh(self) -> None:
        self.fs.invalidate_cache(self._path)

    def exists(self) -> bool:
        with storage_errors(self.url):
            self._fresh()
            return self.fs.exists(self._path)

    def isfile(self) -> bool:
        with storage_errors(self.url):
            self._fresh()
            return self.fs.isfile(self._path)

    def isdir(self) -> bool:
        with storage_errors(self.url):
            self._fresh()
            return self.fs.isdir(self._path)

    def listdir(self) -> list[str]:
        """Names directly under this folder ([] when it does not exist)."""
        with storage_errors(self.url):
            self._fresh()
            try:
                entries = self.fs.ls(self._path, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def size(self) -> int:
        with storage_errors(self.url):
            return int(self.fs.size(self._path))

    def du(self) -> int:
        """Total bytes of every file under this folder."""
        with storage_errors(self.url):
            self._fresh()
            return int(self.fs.du(self._path, total=True)) if self.fs.exists(self._path) else 0

    def check_writable_root(self) -> None:
        """Before writing under a URL: its bucket (or container) exists, so a wrong name fails in one
        sentence before any work rather than at the first upload."""
        if protocol_of(self.url) not in EXTRAS or not self._path.strip("/"):  # only these have buckets
            return
        bucket = self._path.strip("/").split("/", 1)[0]
        with storage_errors(self.url):
            self.fs.invalidate_cache(bucket)
            ok = self.fs.exists(bucket)
        if not ok:
            raise UserError(f"bucket '{bucket}' of {self.url} does not exist (or is not visible with these "
                            f"credentials); create it or fix the URL")

    # ------------------------------------------------------------------ reading
    def open(self, mode: str = "rb", **kw):
        with storage_errors(self.url):
            return self.fs.open(self._path, mode, **kw)

    def read_bytes(self) -> bytes:
        with storage_errors(self.url):
            return self.fs.cat_file(self._path)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    # ------------------------------------------------------------------ writing
    def mkdir(self) -> None:
        """A folder, where folders exist (object stores have none: a prefix exists once it holds objects)."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)

    def write_atomic(self, data: bytes) -> None:
        """The whole of `data` at this name, or (after a crash) the previous content: locally temp file,
        fsync, rename, fsync of the folder; on an object store one PUT, which is atomic by itself."""
        if self.local is not None:
            write_local_atomic(self.local, data)
            return
        with storage_errors(self.url):
            self.fs.pipe_file(self._path, data)

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
        with storage_errors(self.url):
            self.fs.put_file(str(local_file), self._path)
        local_file.unlink()

    def rm(self, recursive: bool = False) -> None:
        if self.local is not None:
            if self.local.is_dir() and not self.local.is_symlink():
                shutil.rmtree(self.local)
            elif self.local.exists():
                self.local.unlink()
            return
        with storage_errors(self.url):
            self._fresh()
            if self.fs.exists(self._path):
                self.fs.rm(self._path, recursive=recursive)


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
