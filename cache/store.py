"""The zarr v3 teacher cache: layout, creation, durable unit writes and the reading side.

Layout (E = cached epochs, N = samples in the split, k = top-k)::

    STORE.zarr/zarr.json        group attributes: the full description (see `describe`)
    topk_values   [E, N, k] float16    teacher logits of the k largest classes, descending
    topk_indices  [E, N, k] int16|int32  their class indices (never float)
    lse           [E, N]    float32    log-sum-exp of all C logits (T = 1)
    label_logits  [E, N, 2] float32    teacher logit of the view's label and of its mixing partner's label
    view_seed     [E, N]    uint32     the replay record: view seed ...
    partner       [E, N]    int32      ... mixing partner's global index (-1: not mixed)
    lam           [E, N]    float16    ... weight of the sample's own label
    mix_mode      [E, N]    uint8      ... 0 none, 1 mixup, 2 cutmix
    _units/shard-NNNNNN.json           completion marker of one unit, written after its data is durable;
                                       it also holds the fingerprint of the unit's views in each epoch

Raw bytes per (epoch, sample) = 2k + 2k + 4 + 8 + 4 + 4 + 2 + 1 = 4k + 23.

A *unit* is one data shard over all cached epochs. Every array is zarr-sharded with shard shape
[E, samples_per_shard, ...] so that a unit is exactly one zarr shard per array: each writer owns
whole zarr shards (writers sharing a zarr shard lose data), and inner chunks [1, samples_per_shard,
...] let a reader fetch one epoch of one unit without decoding the others.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.errors import UserError
from pipeline.manifest import fsync_dir, write_atomic

FORMAT = "ofakd-teacher-cache"
FORMAT_VERSION = 1
UNITS_DIR = "_units"

# name -> (dtype or None for the index dtype, trailing shape as a function of k)
ARRAYS: dict[str, tuple[str | None, callable]] = {
    "topk_values": ("float16", lambda k: (k,)),
    "topk_indices": (None, lambda k: (k,)),
    "lse": ("float32", lambda k: ()),
    "label_logits": ("float32", lambda k: (2,)),
    "view_seed": ("uint32", lambda k: ()),
    "partner": ("int32", lambda k: ()),
    "lam": ("float16", lambda k: ()),
    "mix_mode": ("uint8", lambda k: ()),
}
FILL = {"partner": -1, "lam": 1.0}

# what training compares against its own request; description key path -> readable name
CHECKED = {
    ("teacher", "name"): "teacher",
    ("teacher", "checkpoint_sha256"): "teacher weights (sha256 of the file loaded)",
    ("teacher", "weights", "tag"): "teacher pretrained tag",
    ("teacher", "classes", "num_outputs"): "teacher outputs",
    ("teacher", "classes", "indices"): "teacher class map",
    ("dataset", "manifest_hash"): "dataset",
    ("dataset", "split"): "dataset split",
    ("recipe",): "augmentation recipe",
    ("seed",): "view seed",
    ("topk",): "top-k",
}


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def raw_bytes_per_view(k: int, num_classes: int) -> int:
    total = 0
    for dtype, trail in ARRAYS.values():
        dt = np.dtype(dtype or index_dtype(num_classes))
        total += dt.itemsize * int(np.prod(trail(k), dtype=np.int64))
    return total


def _get(d: dict, path: tuple[str, ...]):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _show(v) -> str:
    s = json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def mismatches(have: dict, want: dict, keys=CHECKED) -> list[str]:
    """Every checked field where the store's description differs from the request."""
    out = []
    for path, label in keys.items():
        a, b = _get(have, path), _get(want, path)
        if a != b:
            if path == ("recipe",) and isinstance(a, dict) and isinstance(b, dict):
                diff = [f"{k}: {_show(a.get(k))} != {_show(b.get(k))}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]
                out.append(f"{label} differs ({'; '.join(diff)})")
            else:
                out.append(f"{label} is {_show(a)}, requested {_show(b)}")
    return out


@dataclass
class Unit:
    """Teacher outputs for one data shard over all epochs, ready to write."""

    shard: int
    first: int
    count: int
    data: dict[str, np.ndarray]  # name -> [E, count, ...]
    skipped: list[int]  # global indices the error policy skipped
    view_digests: list[str] | None = None  # per epoch: pipeline.views.views_digest of the unit's views


class CacheStore:
    """Open (or create) a store; writes whole units; reads epochs of units."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        self._group = None
        self._pid = None
        self._arrays = {}
        self.mode = mode
        if not (self.path / "zarr.json").is_file():
            raise UserError(f"cache {self.path} does not exist or is not a zarr store; create it with "
                            f"`cli.py cache-teacher --out {self.path}`")
        self.attrs = self._open().attrs.asdict()
        if self.attrs.get("format") != FORMAT:
            raise UserError(f"{self.path} is a zarr store but not a teacher cache (no '{FORMAT}' format "
                            f"attribute); point --cache at a store made by `cli.py cache-teacher`")
        if self.attrs.get("format_version", 0) > FORMAT_VERSION:
            raise UserError(f"cache {self.path} has format version {self.attrs['format_version']}, newer "
                            f"than this tool reads ({FORMAT_VERSION}); upgrade the tool")

    # zarr keeps an event-loop thread per process; reopen after fork (data-loader workers)
    def _open(self):
        if self._group is None or self._pid != os.getpid():
            self._group = zarr.open_group(str(self.path), mode="r" if self.mode == "r" else "r+")
            self._pid = os.getpid()
            self._arrays = {}
        return self._group

    def array(self, name: str):
        """Array handle, opened once per process (opening costs a metadata read)."""
        group = self._open()
        if name not in self._arrays:
            self._arrays[name] = group[name]
        return self._arrays[name]

    def __getstate__(self):
        return {**self.__dict__, "_group": None, "_pid": None, "_arrays": {}}

    # ------------------------------------------------------------------ description
    @property
    def epochs(self) -> int:
        return int(self.attrs["epochs"])

    @property
    def topk(self) -> int:
        return int(self.attrs["topk"])

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def num_units(self) -> int:
        return int(self.attrs["dataset"]["num_shards"])

    @property
    def samples_per_shard(self) -> int:
        return int(self.attrs["dataset"]["samples_per_shard"])

    # ------------------------------------------------------------------ creation
    @staticmethod
    def create(path: str | Path, description: dict, *, overwrite: bool = False) -> CacheStore:
        """Create a new store, or return the existing one if it was made by the same request."""
        path = Path(path)
        if path.exists():
            if (path / "zarr.json").is_file() and not overwrite:
                store = CacheStore(path, mode="r+")
                problems = mismatches(store.attrs, description,
                                      {**CHECKED, ("epochs",): "epochs", ("num_classes",): "classes"})
                if problems:
                    raise UserError(f"cache {path} was made by another request ({'; '.join(problems)}); "
                                    f"choose another --out or pass --overwrite to replace it")
                return store
            if not overwrite and (not path.is_dir() or any(path.iterdir())):
                raise UserError(f"output {path} already exists and is not a teacher cache; choose another "
                                f"--out or pass --overwrite")
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        d = description
        E, N, k, S = d["epochs"], d["dataset"]["num_samples"], d["topk"], d["dataset"]["samples_per_shard"]
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            path.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(tmp), mode="w")
            compressor = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
            for name, (dtype, trail) in ARRAYS.items():
                t = trail(k)
                group.create_array(name, shape=(E, N, *t), chunks=(1, S, *t), shards=(E, S, *t),
                                   dtype=dtype or index_dtype(d["num_classes"]), compressors=compressor,
                                   fill_value=FILL.get(name, 0))
            group.attrs.update(d)
            (tmp / UNITS_DIR).mkdir()
            os.replace(tmp, path)  # the store appears whole or not at all
            fsync_dir(path.parent)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot create the cache at {path} ({e.strerror or e}); choose a writable --out") from e
        return CacheStore(path, mode="r+")

    # ------------------------------------------------------------------ units
    def marker(self, shard: int) -> Path:
        return self.path / UNITS_DIR / f"shard-{shard:06d}.json"

    def done_units(self) -> set[int]:
        d = self.path / UNITS_DIR
        if not d.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in d.glob("shard-*.json")}

    def unit_info(self, shard: int) -> dict:
        return json.loads(self.marker(shard).read_text())

    def write_unit(self, unit: Unit) -> None:
        """Write every array's zarr shard for this unit, make it durable, then mark the unit done."""
        group = self._open()
        sl = slice(unit.first, unit.first + unit.count)
        for name in ARRAYS:
            arr = group[name]
            arr[:, sl] = unit.data[name]
            key = arr.metadata.encode_chunk_key((0, unit.shard) + (0,) * (arr.ndim - 2))
            f = self.path / name / key
            if f.exists():  # an all-fill shard may be elided by zarr
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(f.parent)
        info = {"shard": unit.shard, "first": unit.first, "count": unit.count, "skipped": unit.skipped,
                "view_digests": unit.view_digests}
        write_atomic(self.marker(unit.shard), json.dumps(info).encode())

    def read_epoch(self, epoch: int, shard: int, names=tuple(ARRAYS)) -> dict[str, np.ndarray]:
        """One cached epoch of one unit: name -> [count, ...]. Refuses units that are not complete."""
        if not self.marker(shard).is_file():
            raise UserError(f"cache {self.path} has no complete data for data shard {shard}; finish it with "
                            f"the same `cli.py cache-teacher` command (it resumes)")
        S = self.samples_per_shard
        n = int(self.attrs["dataset"]["num_samples"])
        sl = slice(shard * S, min((shard + 1) * S, n))
        return {name: self.array(name)[epoch, sl] for name in names}

    def read_all(self, name: str) -> np.ndarray:
        return self.array(name)[...]

    def check_complete(self) -> None:
        missing = sorted(set(range(self.num_units)) - self.done_units())
        if missing:
            raise UserError(f"cache {self.path} is incomplete: {len(missing)} of {self.num_units} units are "
                            f"not finished (e.g. data shard {missing[0]}); rerun the same `cli.py "
                            f"cache-teacher` command to resume it")

    def skipped(self) -> set[int]:
        out: set[int] = set()
        for s in self.done_units():
            out.update(self.unit_info(s).get("skipped", []))
        return out

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def check_request(self, want: dict, only_given: bool = False) -> None:
        """Refuse with one message listing every mismatch between the store and the request
        (`only_given`: compare just the fields the request names, e.g. a training run's options)."""
        keys = {p: label for p, label in CHECKED.items() if _get(want, p) is not None} if only_given else CHECKED
        problems = mismatches(self.attrs, want, keys)
        if problems:
            raise UserError(f"cache {self.path} does not match this run: " + "; ".join(problems)
                            + "; make a matching cache with `cli.py cache-teacher` or fix the options")
