"""The zarr v3 teacher cache: creation, durable unit writes and the reading side.

What a store holds (arrays, attributes, unit markers) is defined once in `cache.format` and listed in
docs/cache-format.md; this module only stores and fetches it.

A *unit* is one data shard over all cached epochs. Every array is zarr-sharded with shard shape
[E, samples_per_shard, ...] so that a unit is exactly one zarr shard per array: each writer owns
whole zarr shards (writers sharing a zarr shard lose data), and inner chunks [1, samples_per_shard,
...] let a reader fetch one epoch of one unit without decoding the others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.array import AsyncArray
from zarr.storage import StorePath

from cache.format import ALL_NAMES, ARRAYS, UNITS_DIR, CacheDescription, CacheRequest, UnitRecord
from pipeline.errors import UserError
from pipeline.location import (
    Location,
    ReadAhead,
    client_options,
    fsync_dir,
    prefetch_depth,
    quiet_client,
    storage_errors,
)


@dataclass
class Unit:
    """Teacher outputs for one data shard over all epochs, ready to write."""

    shard: int
    first: int
    count: int
    data: dict[str, np.ndarray]  # array name -> [E, count, ...]
    skipped: list[int]  # global indices the error policy skipped
    view_digests: list[str]  # per epoch: pipeline.views.views_digest of the unit's views

    def record(self) -> UnitRecord:
        return UnitRecord(self.shard, self.first, self.count, self.skipped, self.view_digests)


class CacheStore:
    """Open (or create) a store; writes whole units; reads epochs of units."""

    def __init__(self, path: str | Path | Location, mode: str = "r"):
        self.loc = Location(path)  # a local path or an fsspec URL
        self.path = self.loc.local or self.loc.url  # what messages and summaries show
        self._group = None
        self._pid = None
        self._arrays = {}
        self._meta: dict[str, dict] = {}  # array name -> its zarr metadata, read once (metadata never changes)
        self._zstore = None
        self._locks: dict[int, threading.RLock] = {}  # per process: a lock held at fork stays held in the child
        self._units_seen: dict[int, UnitRecord] = {}  # marker contents read so far (a marker never changes)
        self._pool, self._pool_pid = None, None
        self._ahead: ReadAhead | None = None
        self.mode = mode
        if not (self.loc / "zarr.json").isfile():
            raise UserError(f"cache {self.path} does not exist or is not a zarr store; create it with "
                            f"`cli.py cache-teacher --out {self.path}`")
        try:
            self.attrs = self._open().attrs.asdict()  # the description as stored (JSON), for display
        except UserError:
            raise
        except Exception as e:  # zarr raises many types on damaged metadata (ValueError, TypeError, its own)
            raise UserError(f"cache {self.path} has a damaged zarr.json ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); rebuild it (`cli.py cache-teacher ... --overwrite`)"
                            ) from e
        self.description = CacheDescription.from_attrs(self.attrs, f"cache {self.path}")
        if self.loc.is_url:  # every array's metadata now, concurrently: data-loader workers inherit it
            with ThreadPoolExecutor(max_workers=len(ALL_NAMES)) as pool:
                list(pool.map(self.array, self.held_names))

    # zarr keeps an event-loop thread per process; reopen after fork (data-loader workers)
    def _lock(self) -> threading.RLock:
        return self._locks.setdefault(os.getpid(), threading.RLock())

    def _open(self):
        with self._lock():
            if self._group is None or self._pid != os.getpid():
                self._group = self.loc._call(zarr.open_group, self._zarr_store(), zarr_format=3,
                                             use_consolidated=False, mode="r" if self.mode == "r" else "r+")
                self._pid = os.getpid()
                self._arrays = {}
            return self._group

    def _zarr_store(self):
        """Local: a directory path (zarr's LocalStore). URL: zarr's own fsspec store on the same URL, one per
        process, its client's own retries off (pipeline.location.client_options: they are retried there)."""
        if self.loc.local is not None:
            return str(self.loc.local)
        with self._lock():
            if self._zstore is None or self._zstore[0] != os.getpid():
                with storage_errors(self.loc.url):
                    store = zarr.storage.FsspecStore.from_url(self.loc.url, read_only=self.mode == "r",
                                                              storage_options=client_options(self.loc.url) or None)
                quiet_client(store.fs)
                self._zstore = (os.getpid(), store)
            return self._zstore[1]

    def array(self, name: str):
        """Array handle, opened once per process. On a store, from the metadata read once (in the process that
        opened the store): a data-loader worker then opens every array without a request."""
        if self._pid != os.getpid():  # a new process (fork): the parent's handles hold its event loop
            with self._lock():
                if self._pid != os.getpid():
                    self._pid, self._arrays, self._group = os.getpid(), {}, None
        arr = self._arrays.get(name)
        if arr is None:
            if self.loc.is_url and name in self._meta:
                arr = zarr.Array(AsyncArray.from_dict(StorePath(self._zarr_store(), name), self._meta[name]))
            else:
                try:
                    arr = self.loc._call(self._open().__getitem__, name)
                except KeyError:  # zarr's "no such node": the array's metadata, or the group's, is damaged
                    raise UserError(f"cache {self.path} has no readable array {name}: it is damaged; rebuild it "
                                    f"(`cli.py cache-teacher ... --overwrite`)") from None
                self._meta[name] = arr.metadata.to_dict()
            d = self.description
            spec = next(a for a in ARRAYS if a.name == name)
            want = (d.epochs, d.dataset.num_samples, *d.trailing_shape(spec))
            if tuple(arr.shape) != want or str(arr.dtype) != d.dtype(spec):
                raise UserError(f"cache {self.path} has array {name} of shape {tuple(arr.shape)} ({arr.dtype}) where "
                                f"its attributes give {want} ({d.dtype(spec)}): it is damaged; "
                                f"rebuild it (`cli.py cache-teacher ... --overwrite`)")
            self._arrays[name] = arr
        return arr

    def __getstate__(self):
        return {**self.__dict__, "_group": None, "_pid": None, "_arrays": {}, "_pool": None, "_pool_pid": None,
                "_ahead": None, "_zstore": None, "_locks": {}}

    # ------------------------------------------------------------------ description
    @property
    def epochs(self) -> int:
        return self.description.epochs

    @property
    def topk(self) -> int:
        return self.description.topk

    @property
    def num_classes(self) -> int:
        return self.description.num_classes

    @property
    def num_units(self) -> int:
        return self.description.dataset.num_shards

    @property
    def samples_per_shard(self) -> int:
        return self.description.dataset.samples_per_shard

    # ------------------------------------------------------------------ creation
    @staticmethod
    def create(path: str | Path | Location, description: CacheDescription, *, overwrite: bool = False) -> CacheStore:
        """Create a new store, or return the existing one if it was made by the same request.

        The store appears whole or not at all: its metadata is built in a temporary folder, then renamed
        into place (local) or uploaded with the group's zarr.json last (object stores have no rename; a
        store without its root zarr.json is not a store, so a creation killed half-way is retried)."""
        loc = Location(path)
        loc.check_writable_root()
        if (loc / "zarr.json").isfile() and not overwrite:
            store = CacheStore(loc, mode="r+")
            problems = store.description.mismatches(description.request(), every=True)
            if problems:
                raise UserError(f"cache {loc} was made by another request ({'; '.join(problems)}); "
                                f"choose another --out or pass --overwrite to replace it")
            for spec in store.description.arrays:  # a resumed store's arrays must have the shapes its attributes give
                store.array(spec.name)
            return store
        if loc.isfile() and not overwrite:
            raise UserError(f"output {loc} already exists and is not a teacher cache; choose another "
                            f"--out or pass --overwrite")
        names = set(loc.listdir())
        # leftovers of a creation killed before its root zarr.json landed (object stores) may go
        if names - set(ALL_NAMES) - {UNITS_DIR} and not overwrite:
            raise UserError(f"output {loc} already exists and is not a teacher cache; choose another "
                            f"--out or pass --overwrite")
        if names or loc.isfile():
            loc.rm(recursive=True)
        local = loc.local
        tmp = (local.with_name(f".{local.name}.creating-{os.getpid()}") if local is not None
               else Path(tempfile.mkdtemp(prefix="ofakd-store-")) / "store.zarr")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            CacheStore._build(tmp, description)
            if local is not None:
                os.replace(tmp, local)  # the store appears whole or not at all
                fsync_dir(local.parent)
            else:
                files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
                for rel in sorted(files, key=lambda r: r == "zarr.json"):  # the group's zarr.json last
                    (loc / rel).write_atomic((tmp / rel).read_bytes())
        except OSError as e:
            raise UserError(f"cannot create the cache at {loc} ({e.strerror or e}); choose a writable --out") from e
        finally:
            if local is None:
                shutil.rmtree(tmp.parent, ignore_errors=True)
            elif tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return CacheStore(loc, mode="r+")

    @staticmethod
    def _build(where: Path, d: CacheDescription) -> None:
        """The empty store's metadata (no chunks: every array starts as its fill value) in a local folder."""
        E, N, S = d.epochs, d.dataset.num_samples, d.dataset.samples_per_shard
        group = zarr.open_group(str(where), mode="w")
        compressor = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
        for a in d.arrays:
            t = d.trailing_shape(a)
            group.create_array(a.name, shape=(E, N, *t), chunks=(1, S, *t), shards=(E, S, *t),
                               dtype=d.dtype(a), compressors=compressor, fill_value=a.fill)
        group.attrs.update(d.to_attrs())
        (where / UNITS_DIR).mkdir()

    # ------------------------------------------------------------------ units
    def marker(self, shard: int) -> Location:
        return self.loc / UNITS_DIR / f"shard-{shard:06d}.json"

    def done_units(self, check: bool = False) -> set[int]:
        """Units with a completion marker (listed afresh: other processes add markers). `check`: also read
        every marker, so that a damaged one is refused (UserError) before a resumed run trusts its unit."""
        done = {int(n[len("shard-"):-len(".json")]) for n in (self.loc / UNITS_DIR).listdir()
                if re.fullmatch(r"shard-\d{6}\.json", n)}
        for s in sorted(done) if check else ():
            self.unit_info(s)
        return done

    def unit_info(self, shard: int) -> UnitRecord:
        """The unit's completion marker (FileNotFoundError: not complete), checked against the store: a damaged
        one is refused naming it. Remembered once read: a marker is written once, after its data, so
        re-reading it per epoch would only cost a request to an object store."""
        if shard not in self._units_seen:
            where = f"the completion marker {self.marker(shard)} of data shard {shard} of cache {self.path}"
            try:
                attrs = json.loads(self.marker(shard).read_text())
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                raise UserError(f"{where} is not JSON ({' '.join(str(e).split())}): it is damaged; delete it and "
                                f"rerun the same `cli.py cache-teacher` command to redo that unit") from None
            record = UnitRecord.from_attrs(attrs, where)
            S, N = self.samples_per_shard, self.description.dataset.num_samples
            first = shard * S
            if (record.shard, record.first, record.count, len(record.view_digests)) != \
                    (shard, first, min(S, N - first), self.epochs) or \
                    not all(first <= i < first + record.count for i in record.skipped) or \
                    not all(re.fullmatch(r"[0-9a-f]{32}", v) for v in record.view_digests):
                raise UserError(f"{where} does not describe that unit (shard {record.shard}, first {record.first}, "
                                f"count {record.count}, {len(record.view_digests)} epoch digests): it is damaged; "
                                f"delete it and rerun the same `cli.py cache-teacher` command to redo that unit")
            self._units_seen[shard] = record
        return self._units_seen[shard]

    def write_unit(self, unit: Unit) -> None:
        """Write every array's zarr shard for this unit, make it durable, then mark the unit done.

        Local disk: fsync of each shard file and its folder before the marker. Object store: zarr returns
        only after each shard's PUT has completed, and a PUT is atomic, so the marker (one more PUT) is
        written after data that is already whole; no fsync exists or is needed there."""
        sl = slice(unit.first, unit.first + unit.count)
        with storage_errors(self.loc.url):
            for name in (a.name for a in self.description.arrays):
                arr = self.array(name)
                # a whole zarr shard: one PUT per array, so a retry after a cut connection rewrites it whole
                self.loc._call(arr.__setitem__, (slice(None), sl), unit.data[name])
                if self.loc.local is None:
                    continue
                key = arr.metadata.encode_chunk_key((0, unit.shard) + (0,) * (arr.ndim - 2))
                f = self.loc.local / name / key
                if f.exists():  # an all-fill shard may be elided by zarr
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    fsync_dir(f.parent)
        self.marker(unit.shard).write_atomic(json.dumps(unit.record().to_attrs()).encode())

    def prefetch(self, epoch: int, shards: list[int], names=None) -> None:
        """On a store, fetch these units' rows of `epoch` (arrays `names`, and the units' markers) ahead, in
        this order, while earlier ones are used (`pipeline.location.ReadAhead`: OFAKD_STORE_PREFETCH units in
        flight); `read_epoch` in that order takes them. Reads in another order are served as before."""
        if self._ahead is not None:
            self._ahead.close()
        depth = prefetch_depth() if self.loc.is_url else 0
        names = tuple(names) if names is not None else self.held_names
        self._ahead = ReadAhead(lambda key: self._read_epoch(*key), [(epoch, s, names) for s in shards],
                                depth) if depth else None

    def read_epoch(self, epoch: int, shard: int, names=None) -> dict[str, np.ndarray]:
        """One cached epoch of one unit: name -> [count, ...] (names: default every array the store holds).
        Refuses units that are not complete."""
        names = tuple(names) if names is not None else self.held_names
        rows = self._ahead.take((epoch, shard, tuple(names))) if self._ahead is not None else None
        return rows if rows is not None else self._read_epoch(epoch, shard, names)

    @property
    def held_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.description.arrays)

    def _read_epoch(self, epoch: int, shard: int, names) -> dict[str, np.ndarray]:
        if shard not in self._units_seen:
            try:
                self.unit_info(shard)  # the marker, read once: the pixel check needs it, and it says "complete"
            except FileNotFoundError:
                raise UserError(f"cache {self.path} has no complete data for data shard {shard}; finish it with "
                                f"the same `cli.py cache-teacher` command (it resumes)") from None
        S = self.samples_per_shard
        n = self.description.dataset.num_samples
        sl = slice(shard * S, min((shard + 1) * S, n))
        if self.loc.local is not None:
            return {name: self.array(name)[epoch, sl] for name in names}
        # an object store answers each array's two requests (shard index, chunk) with a round trip of
        # latency: issue the arrays' reads together (zarr runs them concurrently on its event loop)
        arrays = [self.array(name) for name in names]
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = ThreadPoolExecutor(max_workers=len(ALL_NAMES)), os.getpid()
        return dict(zip(names, self._pool.map(lambda a: self.loc._call(a.__getitem__, (epoch, sl)), arrays),
                        strict=True))

    def read_all(self, name: str) -> np.ndarray:
        return self.loc._call(self.array(name).__getitem__, ...)

    def check_complete(self) -> None:
        missing = sorted(set(range(self.num_units)) - self.done_units())
        if missing:
            raise UserError(f"cache {self.path} is incomplete: {len(missing)} of {self.num_units} units are "
                            f"not finished (e.g. data shard {missing[0]}); rerun the same `cli.py "
                            f"cache-teacher` command to resume it")

    def skipped(self) -> set[int]:
        out: set[int] = set()
        for s in self.done_units():
            out.update(self.unit_info(s).skipped)
        return out

    def disk_bytes(self) -> int:
        return self.loc.du()

    def check_request(self, request: CacheRequest, every: bool = False) -> None:
        """Refuse with one message listing every mismatch between the store and the request (the fields the
        request gives, e.g. a training run's options; `every`: all checked fields, see `mismatches`)."""
        problems = self.description.mismatches(request, every)
        if problems:
            raise UserError(f"cache {self.path} does not match this run: " + "; ".join(problems)
                            + "; make a matching cache with `cli.py cache-teacher` or fix the options")
