"""Convert an ImageFolder tree (or the embedded digits) into webdataset tar shards + `dataset.json`.

Determinism: files are traversed in sorted order, then put in a fixed pseudo-random order
(seeded, recorded in the manifest) so that every shard holds a mix of classes, which mixup and
cutmix partners (drawn from the same shard) need. Tar members carry fixed metadata, so the same
input gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import UserError
from pipeline.location import Location
from pipeline.manifest import (
    MANIFEST,
    Manifest,
    ShardInfo,
    SplitInfo,
    load_manifest,
    sha256_file,
)
from pipeline.progress import Bar
from pipeline.spec import argument

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
DEFAULT_SHARD_SIZE = 1000
DIGITS_SHARD_SIZE = 200
DEFAULT_QUALITY = 90  # JPEG quality of resized images (--max-size): what FFCV's and timm users' ImageNet copies use
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<num>\d{6})\.tar$")


@dataclass(frozen=True)
class SourceImage:
    src: str  # path relative to the source root (or a synthetic name for embedded data)
    label: int
    ext: str  # "jpg" or "png"
    path: Path | None = None  # read from disk when set
    data: bytes | None = None  # or held in memory

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


def shard_name(split: str, num: int) -> str:
    return f"{split}-{num:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


# ----------------------------------------------------------------------------------------- sources

def scan_image_folder(src: Path) -> tuple[list[str], list[SourceImage]]:
    """`src/<class>/<image>` -> (sorted class names, samples in sorted traversal order)."""
    if not src.exists():
        raise UserError(f"source folder {src} does not exist; pass an ImageFolder tree "
                        f"(SRC/<class>/<image>) or the word 'digits'")
    if not src.is_dir():
        raise UserError(f"source {src} is not a folder; pass an ImageFolder tree (SRC/<class>/<image>)")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"source folder {src} has no class folders; expected SRC/<class>/<image> "
                        f"with JPEG or PNG images")
    samples = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (src / cls).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
        if not files:
            raise UserError(f"class folder {src / cls} holds no JPEG or PNG images; add images or "
                            f"remove the folder")
        samples += [SourceImage(str(p.relative_to(src)), label, IMAGE_EXTS[p.suffix.lower()], path=p)
                    for p in files]
    return classes, samples


def digits_source(val_fraction: float = 0.2) -> tuple[list[str], dict[str, list[SourceImage]]]:
    """scikit-learn's real 8x8 handwritten digits (1,797 images), as lossless grayscale PNGs,
    split into a fixed stratified train/val."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255, exact
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=d.target, random_state=0)
    out = {}
    for split, ids in (("train", sorted(train_idx)), ("val", sorted(val_idx))):
        samples = []
        for i in ids:
            buf = io.BytesIO()
            Image.fromarray(images[i], mode="L").save(buf, format="PNG", optimize=False)
            samples.append(SourceImage(f"digits/{i:04d}.png", int(d.target[i]), "png", data=buf.getvalue()))
        out[split] = samples
    return [str(c) for c in range(10)], out


def read_class_names(path: Path, class_ids: Sequence[str]) -> list[str]:
    """Either `id<TAB>name` lines (Tiny-ImageNet's words.txt) or one name per line in class order."""
    if not path.is_file():
        raise UserError(f"class-names file {path} does not exist; pass a file with 'id<TAB>name' lines "
                        f"or one name per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"class-names file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                        f"UTF-8") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all("\t" in ln for ln in lines):
        table = dict(ln.split("\t", 1) for ln in lines)
        missing = [c for c in class_ids if c not in table]
        if missing:
            raise UserError(f"class-names file {path} has no entry for {len(missing)} class folder(s), "
                            f"e.g. '{missing[0]}'; add them or omit --class-names")
        empty = [c for c in class_ids if not table[c].strip()]
        if empty:
            raise UserError(f"class-names file {path} gives class '{empty[0]}' an empty name; write a name after "
                            f"its tab")
        return [table[c].strip() for c in class_ids]
    if len(lines) != len(class_ids):
        raise UserError(f"class-names file {path} has {len(lines)} names but the source has "
                        f"{len(class_ids)} classes; give one name per class in sorted folder order")
    return [ln.strip() for ln in lines]


# ------------------------------------------------------------------------------------------ writer

def check_image(data: bytes, where: str) -> None:
    """Decode fully (not just the header) so that truncated or corrupt files are caught here."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises several types for bad data
        raise UserError(f"image {where} is corrupt or truncated ({e}); remove or replace it and rerun") from e


def fit_image(data: bytes, ext: str, max_size: int, quality: int) -> bytes:
    """Image bytes whose shorter side is at most `max_size`: as they came when it already is, else resized
    (aspect kept, shorter side = max_size, Lanczos) and re-encoded in the same format (JPEG at `quality`,
    PNG losslessly), in RGB or L, the modes views decode to. Deterministic: same bytes in, same bytes out."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if min(w, h) <= max_size:
            return data
        k = max_size / min(w, h)
        size = (max_size, max(1, round(h * k))) if w <= h else (max(1, round(w * k)), max_size)
        im = im if im.mode in ("RGB", "L") else im.convert("RGB")
        buf = io.BytesIO()
        if ext == "jpg":
            im.resize(size, Image.LANCZOS).save(buf, format="JPEG", quality=quality)
        else:
            im.resize(size, Image.LANCZOS).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _prepare_out(out: Location, split: str, classes: list[str], overwrite: bool) -> Manifest | None:
    """Refuse to clobber anything we did not write; return the existing manifest to extend, if any."""
    if out.isfile():
        raise UserError(f"output {out} exists and is not a folder; choose another OUT")
    names = [n for n in out.listdir() if not n.startswith(".")]
    if not names:
        return None
    existing = None
    if MANIFEST in names:
        existing = load_manifest(out)
    if existing is None:
        foreign = [n for n in names if not SHARD_RE.match(n)]
        if foreign and not overwrite:
            raise UserError(f"output folder {out} already holds other data ({foreign[0]}, ...); choose an "
                            f"empty or new folder, or pass --overwrite")
        return None
    if split in existing.splits and not overwrite:
        raise UserError(f"output folder {out} already holds split '{split}'; pass --overwrite to "
                        f"replace it or choose another --split")
    if existing.classes != classes:
        if not overwrite:
            ours = next((f"{a!r} where the source has {b!r}" for a, b in zip(existing.classes, classes, strict=False)
                         if a != b), f"{existing.num_classes} classes where the source has {len(classes)}")
            raise UserError(f"output folder {out} holds a dataset with other classes (its {MANIFEST} lists {ours}); "
                            f"choose another OUT or pass --overwrite to replace it")
        return None
    return existing


def _open_split(out: Location, split: str, classes: list[str], name: str, class_ids: list[str] | None,
                overwrite: bool) -> Manifest:
    """The manifest the split is added to (`_prepare_out`), with the shards it replaces removed: the split's
    own, or every shard of a dataset it replaces (whose manifest is gone or replaced)."""
    manifest = _prepare_out(out, split, classes, overwrite)
    out.mkdir()
    if manifest is None:
        stale = [n for n in out.listdir() if SHARD_RE.match(n)]
        manifest = Manifest(name=name, classes=classes, class_ids=class_ids)
    else:
        stale = [n for n in out.listdir() if SHARD_RE.match(n) and n.startswith(f"{split}-")]
        manifest.splits.pop(split, None)
        (out / MANIFEST).write_atomic(manifest.to_json().encode())
    for n in stale:
        (out / n).rm()
    return manifest


def _write_shard(path: Path, chunk: list[SourceImage], first: int, max_size: int | None, quality: int | None,
                 class_counts: list[int], bar: Bar) -> None:
    """One shard's tar at the local `path`: per sample (global index `first` on), its image (checked, and fitted
    to `max_size`), class and source path; each sample counted in `class_counts` and on `bar`."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j, s in enumerate(chunk):
            data = s.read()
            check_image(data, s.src if s.path is None else str(s.path))
            if max_size:
                data = fit_image(data, s.ext, max_size, quality)
            key = sample_key(first + j)
            _tar_member(tar, f"{key}.{s.ext}", data)
            _tar_member(tar, f"{key}.cls", str(s.label).encode())
            _tar_member(tar, f"{key}.json", json.dumps({"src": s.src}).encode())
            class_counts[s.label] += 1
            bar.advance(1)


def write_split(out: str | os.PathLike | Location, split: str, classes: list[str], samples: list[SourceImage], *,
                name: str, shard_size: int = DEFAULT_SHARD_SIZE, order_seed: int | None = 0,
                class_ids: list[str] | None = None, overwrite: bool = False, progress: bool = True,
                max_size: int | None = None, quality: int | None = None) -> Manifest:
    """Write one split as shards and record it in `out/dataset.json` (written last, atomically).
    `max_size`: store each image with its shorter side at most this (`fit_image`; JPEG at `quality`, default 90).
    `out` is a local folder or an fsspec URL: each shard is built in a local temporary file, then renamed
    into place (local) or uploaded in one PUT (object store), so a shard appears whole or not at all."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise UserError(f"split name '{split}' must be letters, digits or '_'")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if not samples:
        raise UserError(f"no images found for split '{split}'")
    check_resize(max_size, quality)
    quality = (quality or DEFAULT_QUALITY) if max_size else None
    out = Location(out)
    out.check_writable_root()
    manifest = _open_split(out, split, classes, name, class_ids, overwrite)
    order = np.arange(len(samples))
    if order_seed is not None:
        order = np.random.default_rng(order_seed).permutation(len(samples))
    ordered = [samples[i] for i in order]

    # local: the partial file sits next to its final name (same filesystem, so the rename is atomic)
    tmp_dir = out.local or Path(tempfile.mkdtemp(prefix="ofakd-shards-"))
    shards, class_counts = [], [0] * len(classes)
    with Bar(progress, len(ordered), f"shards {split}") as bar:
        for num, first in enumerate(range(0, len(ordered), shard_size)):
            chunk = ordered[first:first + shard_size]
            final = out / shard_name(split, num)
            tmp = tmp_dir / f".{final.name}.partial"
            _write_shard(tmp, chunk, first, max_size, quality, class_counts, bar)
            digest, size = sha256_file(tmp), tmp.stat().st_size
            final.put_file(tmp)
            shards.append(ShardInfo(final.name, first, len(chunk), digest, size))
    if out.local is None:
        tmp_dir.rmdir()
    manifest.splits[split] = SplitInfo(count=len(ordered), samples_per_shard=shard_size,
                                       class_counts=class_counts, shards=shards, order_seed=order_seed,
                                       max_size=max_size, quality=quality)
    (out / MANIFEST).write_atomic(manifest.to_json().encode())
    return manifest


def check_resize(max_size: int | None, quality: int | None) -> None:
    if max_size is not None and max_size < 8:
        raise UserError(f"--max-size must be at least 8 pixels (the smallest view side), got {max_size}; "
                        f"pass e.g. --max-size 256, or omit it to store images as they came")
    if quality is not None and not max_size:
        raise UserError("--quality applies only to images resized by --max-size; pass --max-size too, or omit "
                        "--quality (images are otherwise stored as they came)")
    if quality is not None and not 1 <= quality <= 95:
        raise UserError(f"--quality must be in 1..95 (JPEG quality; Pillow advises against more), got {quality}")


# ------------------------------------------------------------------------------------- entry point

@dataclass
class ShardsConfig:
    """The options of `shards`."""

    src: str = field(metadata=argument())
    """ImageFolder tree SRC/<class>/<image>, or 'digits' for the embedded default."""
    out: str = field(metadata=argument())
    """Dataset directory or URL, e.g. s3://bucket/data (can hold several splits)."""
    split: str = "train"
    """Split name written by this call (digits writes train and val)."""
    shard_size: int | None = None
    """Samples per shard [default: 1000, digits 200]."""
    class_names: Path | None = None
    """'id<TAB>name' lines (e.g. Tiny-ImageNet words.txt) or one name per line."""
    name: str | None = None
    """Dataset name recorded in dataset.json."""
    order_seed: int = 0
    """Seed of the fixed sample order (mixes classes within shards)."""
    overwrite: bool = False
    """Replace the split if it exists."""
    max_size: int | None = None
    """Store each image with its shorter side at most this many pixels (aspect kept, Lanczos, re-encoded in its
    format: JPEG at --quality, PNG losslessly); smaller images are stored as they came. Recorded in
    dataset.json, so the split's identity (and a cache's check of it) changes. [default: no resizing]"""
    quality: int | None = None
    """JPEG quality of images resized by --max-size [default: 90]."""
    progress: bool = field(default=True, metadata={"flags": ("--progress/--quiet",)})
    """Progress bar."""


def make_shards(src: str, out: str | os.PathLike, *, split: str = "train", shard_size: int | None = None,
                class_names: Path | None = None, name: str | None = None, order_seed: int | None = 0,
                overwrite: bool = False, progress: bool = True, max_size: int | None = None,
                quality: int | None = None) -> Manifest:
    """`src` is an ImageFolder path or the word 'digits' (writes train and val); `out` a folder or fsspec URL."""
    check_resize(max_size, quality)
    if src == "digits":
        classes, splits = digits_source()
        manifest = None
        for i, (sp, samples) in enumerate(splits.items()):
            manifest = write_split(out, sp, classes, samples, name=name or "digits",
                                   shard_size=shard_size or DIGITS_SHARD_SIZE, order_seed=order_seed,
                                   overwrite=overwrite or i > 0, progress=progress, max_size=max_size,
                                   quality=quality)
        return manifest
    src_path = Path(src)
    class_ids, samples = scan_image_folder(src_path)
    classes = read_class_names(class_names, class_ids) if class_names else class_ids
    return write_split(out, split, classes, samples, name=name or src_path.resolve().parent.name or src_path.name,
                       shard_size=shard_size or DEFAULT_SHARD_SIZE, order_seed=order_seed,
                       class_ids=class_ids if class_names else None, overwrite=overwrite, progress=progress,
                       max_size=max_size, quality=quality)

