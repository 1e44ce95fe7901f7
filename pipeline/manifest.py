"""`dataset.json`: what a dataset directory of webdataset shards holds.

Layout of a dataset directory::

    OUT/dataset.json            # this manifest
    OUT/<split>-000000.tar      # webdataset shards, `samples_per_shard` samples each (last may be short)

Each sample in a shard has `__key__` = its global index within the split (9 digits), the image
file with its original bytes (`.jpg`/`.png`; or, in a split written with `--max-size`, resized and
re-encoded where its shorter side was larger: the split's `max_size` and `quality` say so), `.cls`
(class index as text) and `.json` (`{"src": original relative path}`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.location import Location, fsync_dir, write_local_atomic  # noqa: F401 (fsync_dir: re-export)

FORMAT_VERSION = 1
MANIFEST = "dataset.json"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the dataset directory
    first: int  # global index of the first sample
    count: int
    sha256: str
    bytes: int


@dataclass
class SplitInfo:
    count: int
    samples_per_shard: int
    class_counts: list[int]
    shards: list[ShardInfo]
    order_seed: int | None  # seed of the fixed sample permutation, None = sorted traversal order
    max_size: int | None = None  # images stored with their shorter side at most this (`shards --max-size`)
    quality: int | None = None  # JPEG quality of the images so resized


@dataclass
class Manifest:
    name: str
    classes: list[str]
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    class_ids: list[str] | None = None  # e.g. Tiny-ImageNet wnids when `classes` holds readable names
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise UserError(f"dataset '{self.name}' has no split '{name}' (it has: {have}); "
                            f"create it with `cli.py shards SRC OUT --split {name}`")
        return self.splits[name]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    def split_hash(self, split: str) -> str:
        """Identity of one split's content: classes plus every shard checksum, order and count."""
        info = self.split(split)
        d = {"classes": self.classes, "split": split, "count": info.count,
             "shards": [(s.name, s.first, s.count, s.sha256) for s in info.shards]}
        if info.max_size:  # only then, so the identity of splits stored as they came is what it was
            d |= {"max_size": info.max_size, "quality": info.quality}
        payload = json.dumps(d, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    @staticmethod
    def from_dict(d: dict) -> Manifest:
        """The manifest in `d`; ValueError naming the first problem when it is not one `shards` could write
        (wrong types, counts that do not add up, shards that do not tile the split)."""
        splits = {k: SplitInfo(**{**v, "shards": [ShardInfo(**s) for s in v["shards"]]})
                  for k, v in d["splits"].items()}
        m = Manifest(name=d["name"], classes=d["classes"], splits=splits, class_ids=d.get("class_ids"),
                     format_version=d.get("format_version", 1))
        m.check()
        return m

    def check(self) -> None:
        """Refuse (ValueError) what `write_split` never writes: a damaged or hand-edited dataset.json would
        otherwise be trusted, and extended by the next `shards` call."""
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(what)

        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        def names(v) -> bool:
            return isinstance(v, list) and all(isinstance(c, str) and c for c in v)

        need(isinstance(self.name, str), "name is not a string")
        need(names(self.classes) and len(self.classes) > 0, "classes is not a list of class names")
        need(self.class_ids is None or (names(self.class_ids) and len(self.class_ids) == len(self.classes)),
             "class_ids is not one id per class")
        need(count(self.format_version), "format_version is not a number")
        for split, info in self.splits.items():
            need(bool(re.fullmatch(r"[A-Za-z0-9_]+", split)), f"split name {split!r} is not letters, digits or _")
            need(count(info.count) and count(info.samples_per_shard) and info.samples_per_shard > 0,
                 f"split '{split}' count or samples_per_shard is not a positive number")
            need(info.order_seed is None or count(info.order_seed), f"split '{split}' order_seed is not a number")
            # (a slice of a split, as bench/ writes one, keeps the whole split's class counts)
            need(isinstance(info.class_counts, list) and len(info.class_counts) == len(self.classes)
                 and all(map(count, info.class_counts)), f"split '{split}' class_counts are not one count per class")
            first = 0
            for i, s in enumerate(info.shards):  # a shard's name need not carry the split's (a renamed split)
                need(isinstance(s.name, str) and bool(re.fullmatch(r"[A-Za-z0-9_]+-\d{6}\.tar", s.name))
                     and s.first == first and count(s.count) and 0 < s.count <= info.samples_per_shard
                     and (s.count == info.samples_per_shard or i == len(info.shards) - 1),
                     f"split '{split}' shard {i} is not a NAME-NNNNNN.tar of samples_per_shard samples "
                     f"(the last may hold fewer) from sample {first} on")
                need(isinstance(s.sha256, str) and bool(re.fullmatch(r"[0-9a-f]{64}", s.sha256)) and count(s.bytes),
                     f"split '{split}' shard {s.name} has no valid sha256 and size")
                first += s.count
            need(first == info.count, f"split '{split}' shards hold {first} samples, not its count {info.count}")


def load_manifest(root: str | os.PathLike | Location) -> Manifest:
    """`root/dataset.json`; `root` is a local path or an fsspec URL."""
    root = Location(root)
    path = root / MANIFEST
    if not root.isdir():
        raise UserError(f"dataset directory {root} does not exist; create it with `cli.py shards SRC {root}`")
    if not path.isfile():
        raise UserError(f"{path} is missing, so {root} is not a dataset directory; "
                        f"create one with `cli.py shards SRC {root}`")
    try:
        d = json.loads(path.read_text())
        manifest = Manifest.from_dict(d)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = f"no key {e}" if isinstance(e, KeyError) else _one_line(e)
        raise UserError(f"{path} is not a valid dataset manifest ({why}); recreate it with "
                        f"`cli.py shards SRC {root} --overwrite`") from e
    if manifest.format_version > FORMAT_VERSION:
        raise UserError(f"{path} has format version {manifest.format_version}, newer than this tool "
                        f"understands ({FORMAT_VERSION}); upgrade the tool")
    return manifest


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 120 else text[:117] + "..."


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to the local `path` durably: temp file, fsync, rename, fsync of the directory."""
    write_local_atomic(path, data)


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
