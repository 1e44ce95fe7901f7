"""The teacher cache's format as code: its arrays, its description and its unit markers, written once.

Every reader and writer of a store goes through these records: the array names and dtypes exist only in
`ARRAYS`, the description's keys only in `TeacherRecord`, `DatasetRecord` and `CacheDescription`, a
unit's marker only in `UnitRecord`. `to_attrs()` gives the JSON a store holds, key for key and in the same
order, and `from_attrs()` reads it back, refusing what this version cannot read (another format version,
missing or unknown keys) instead of guessing. `format_reference()` renders all of it as the README's
"Cache format reference", so the documentation is this module.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.spec import fits, type_name

FORMAT = "ofakd-teacher-cache"
# 1: the first layout. 2: same arrays, but the recipe record changed meaning (timm's RandAugment, RandomErasing
# and random interpolation make the views, issue 22): a version-1 store's views would not replay, so it is refused.
# 3: an optional sampled tail (issue 21: tail_ids, tail_logits, tail_lse, log_z) and the description keys that size
# it (tail_samples, tail_temperatures, tail_draw_temperature); a version-2 store lacks those keys, so it is refused
# by version rather than read with a guessed "no samples".
FORMAT_VERSION = 3
UNITS_DIR = "_units"
INDEX = "index"  # dtype marker: class indices, int16 while C fits it, else int32 (see `index_dtype`)


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: [E, N, *trailing] over (cached epoch, sample of the split)."""

    name: str
    dtype: str
    """numpy dtype name, or `INDEX` for class indices."""
    trailing: tuple[int | str, ...]
    """Trailing shape after [E, N]; "k" stands for the store's top-k, "M" for its tail samples, "t" for its
    recorded tail temperatures."""
    fill: int | float
    """Value of what was never written (a sample the error policy skipped)."""
    doc: str

    def dtype_for(self, num_classes: int) -> str:
        return index_dtype(num_classes) if self.dtype == INDEX else self.dtype

    def trailing_shape(self, k: int, m: int = 0, t: int = 0) -> tuple[int, ...]:
        return tuple({"k": k, "M": m, "t": t}.get(d, d) for d in self.trailing)


# the teacher's outputs per view (what `summarize` makes and a training view needs)
TOPK_VALUES = ArraySpec("topk_values", "float16", ("k",), 0, "teacher logits of the k largest classes, descending")
TOPK_INDICES = ArraySpec("topk_indices", INDEX, ("k",), 0, "their class indices (dataset classes; never float)")
LSE = ArraySpec("lse", "float32", (), 0, "log-sum-exp of all C logits (T = 1)")
LABEL_LOGITS = ArraySpec("label_logits", "float32", (2,), 0,
                         "teacher logit of the view's label and of its mixing partner's label (exact p_target)")
# the sampled tail (only with --tail-samples M > 0): what importance-sampling the classes outside the known ones
# (top-k + label classes) needs; see cache.targets for the estimator
TAIL_SEED_SALT = 0x7A11  # second word of a view's tail-draw seed, so the draw never reuses the view's own stream
TAIL_IDS = ArraySpec("tail_ids", INDEX, ("M",), -1,
                     "M tail classes drawn with replacement from r_j = exp(z_j / T_d - tail_lse) over the classes "
                     f"outside top-k and labels (-1: no tail); numpy default_rng([view_seed, {TAIL_SEED_SALT}])")
TAIL_LOGITS = ArraySpec("tail_logits", "float16", ("M",), 0, "their teacher logits (the draw used these fp16 values)")
TAIL_LSE = ArraySpec("tail_lse", "float32", (),  0,
                     "log-partition of the draw: log-sum-exp of z_j / T_d over the tail classes (fp16 logits)")
LOG_Z = ArraySpec("log_z", "float32", ("t",), 0,
                  "log-sum-exp of all C logits / T for each of tail_temperatures (T = 1 is lse)")

# the replay record: named as the fields of a view (pipeline.views) that they store
VIEW_SEED = ArraySpec("view_seed", "uint32", (), 0, "replay record: the view seed, SeedSequence([seed, epoch, index])")
PARTNER = ArraySpec("partner", "int32", (), -1, "replay record: the mixing partner's global index (-1: not mixed)")
LAM = ArraySpec("lam", "float16", (), 1.0, "replay record: weight of the sample's own label")
MIX_MODE = ArraySpec("mix_mode", "uint8", (), 0, "replay record: 0 none, 1 mixup, 2 cutmix")

TEACHER_OUTPUTS = (TOPK_VALUES, TOPK_INDICES, LSE, LABEL_LOGITS)
TAIL = (TAIL_IDS, TAIL_LOGITS, TAIL_LSE, LOG_Z)
REPLAY = (VIEW_SEED, PARTNER, LAM, MIX_MODE)
ARRAYS = TEACHER_OUTPUTS + TAIL + REPLAY  # in this order a store creates those it holds (`held_arrays`)
NAMES = tuple(a.name for a in TEACHER_OUTPUTS + REPLAY)  # the arrays every store holds
ALL_NAMES = tuple(a.name for a in ARRAYS)


def held_arrays(tail_samples: int, tail_temperatures: int) -> tuple[ArraySpec, ...]:
    """The arrays a store holds: the tail arrays only with tail samples, log_z only with temperatures."""
    return tuple(a for a in ARRAYS if a not in TAIL or (tail_samples and (a is not LOG_Z or tail_temperatures)))


def raw_bytes_per_view(k: int, num_classes: int, tail_samples: int = 0, tail_temperatures: int = 0) -> int:
    """Bytes of one (epoch, sample) over every array before compression: 4k + 23 with int16 indices, plus
    4M + 4 + 4t with M tail samples and t temperatures."""
    total = 0
    for a in held_arrays(tail_samples, tail_temperatures):
        shape = a.trailing_shape(k, tail_samples, tail_temperatures)
        total += np.dtype(a.dtype_for(num_classes)).itemsize * int(np.prod(shape, dtype=np.int64))
    return total


# ---------------------------------------------------------------------------------------------- records

def _doc(text: str, **kw) -> Any:
    """A field documented where it is declared; `format_reference` prints the text."""
    return field(metadata={"doc": text}, **kw)


class _Flat:
    """JSON object <-> dataclass for records whose fields are plain JSON values, in declaration order."""

    def to_attrs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_attrs(cls, d: dict, where: str = "the store"):
        _check_keys(cls, d, where)
        _check_types(cls, d, where)
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.init})


def _check_types(cls, d: dict, where: str) -> None:
    """Refuse a record whose values are not of their fields' types: a damaged store would otherwise be read
    (a string top-k, a list where a count belongs) and fail later, far from its cause."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in d and not fits(d[f.name], hints[f.name]):
            raise UserError(f"{where} records {cls.__name__}.{f.name} as {_show(d[f.name])}, which is not of type "
                            f"{type_name(hints[f.name])}: it is damaged; rebuild the cache (`cli.py cache-teacher ... "
                            f"--overwrite`)")


def _check_keys(cls, d: dict, where: str) -> None:
    """Refuse a JSON object without exactly this record's keys: this version reads no other layout."""
    have, want = set(d) if isinstance(d, dict) else set(), {f.name for f in fields(cls)}
    if have != want:
        missing, unknown = sorted(want - have), sorted(have - want)
        what = "; ".join(s for s in (f"missing {', '.join(missing)}" if missing else "",
                                     f"unknown {', '.join(unknown)}" if unknown else "") if s)
        raise UserError(f"{where} does not hold a format-{FORMAT_VERSION} {cls.__name__} ({what}): it was written by "
                        f"another version of this tool or damaged; rebuild the cache with this version "
                        f"(`cli.py cache-teacher ... --overwrite`)")


@dataclass(frozen=True)
class TeacherRecord(_Flat):
    """The teacher that made the store (attribute `teacher`)."""

    name: str = _doc("timm model name")
    checkpoint_sha256: str | None = _doc("sha256 of the weights file loaded (none: timm's random init)")
    checkpoint: str | None = _doc("the --checkpoint path, if the weights came from one")
    weights: dict = _doc("what was loaded: source (checkpoint, file, hub, url, init), tag, file, sha256, ... "
                         "(pipeline.models.create_model's record)")
    classes: dict | None = _doc("the teacher's label space mapped onto the dataset's classes: source, num_outputs, "
                                "indices (cache.teacher.ClassMap); none: the teacher has the dataset's classes")
    model_kwargs: dict = _doc("timm keyword arguments of the teacher")
    input_size: int = _doc("the teacher's input size in pixels")
    mean: list[float] = _doc("the teacher's normalisation mean")
    std: list[float] = _doc("the teacher's normalisation std")
    num_features: int = _doc("the teacher's feature width (sizes the students' OFA heads)")

    @property
    def weights_tag(self) -> str | None:
        return self.weights.get("tag")


@dataclass(frozen=True)
class DatasetRecord(_Flat):
    """The data the views were made from (attribute `dataset`)."""

    name: str = _doc("dataset name from its manifest")
    split: str = _doc("the cached split")
    path: str = _doc("where it was read from (a resolved path or the URL as given)")
    manifest_hash: str = _doc("hash of the split's manifest entries: the dataset's identity")
    num_samples: int = _doc("N, samples in the split")
    num_shards: int = _doc("data shards in the split = units of the store")
    samples_per_shard: int = _doc("samples per data shard (the last may hold fewer) = the zarr shard length")
    classes: list[str] = _doc("the dataset's class names, in label order")


@dataclass(frozen=True)
class UnitRecord(_Flat):
    """A unit's completion marker, `_units/shard-NNNNNN.json`: written after the unit's data is durable, so its
    existence means the unit is complete."""

    shard: int = _doc("the data shard (= unit) index")
    first: int = _doc("global index of its first sample")
    count: int = _doc("its samples")
    skipped: list[int] = _doc("global indices the --on-error skip policy skipped (their rows hold the fill values)")
    view_digests: list[str] = _doc("per cached epoch, the fingerprint of the unit's views (pipeline.views."
                                   "views_digest): training refuses views whose pixels differ")


@dataclass(frozen=True)
class CacheRequest:
    """What a run asks of a store. A field left None is not asked, except in `every` mode (see `mismatches`)."""

    teacher: str | None = None
    checkpoint_sha256: str | None = None
    weights_tag: str | None = None
    classes: dict | None = None  # ClassMap.to_dict(): compared as its num_outputs and indices
    manifest_hash: str | None = None
    split: str | None = None
    recipe: dict | None = None  # Recipe.to_dict()
    seed: int | None = None
    topk: int | None = None
    epochs: int | None = None
    num_classes: int | None = None
    tail_samples: int | None = None
    tail_temperatures: list[float] | None = None
    tail_draw_temperature: float | None = None


def _show(v) -> str:
    s = json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)
    s = s if s.isprintable() else repr(s)  # a line separator or control character would break the sentence
    return s if len(s) <= 60 else s[:57] + "..."


def _classes(c: dict | None, key: str):
    return c.get(key) if isinstance(c, dict) else None


# what a store and a request are compared on (both as a CacheRequest), in the order messages list them
_CHECKED = (
    ("teacher", lambda r: r.teacher),
    ("teacher weights (sha256 of the file loaded)", lambda r: r.checkpoint_sha256),
    ("teacher pretrained tag", lambda r: r.weights_tag),
    ("teacher outputs", lambda r: _classes(r.classes, "num_outputs")),
    ("teacher class map", lambda r: _classes(r.classes, "indices")),
    ("dataset", lambda r: r.manifest_hash),
    ("dataset split", lambda r: r.split),
    ("augmentation recipe", lambda r: r.recipe),
    ("view seed", lambda r: r.seed),
    ("top-k", lambda r: r.topk),
    ("epochs", lambda r: r.epochs),
    ("classes", lambda r: r.num_classes),
    ("tail samples", lambda r: r.tail_samples),
    ("tail temperatures", lambda r: r.tail_temperatures),
    ("tail draw temperature", lambda r: r.tail_draw_temperature),
)


@dataclass(frozen=True)
class CacheDescription:
    """The store's group attributes (zarr.json): everything that made it, so a reader can check it fits."""

    format: str = _doc(f'always "{FORMAT}"', init=False)
    format_version: int = _doc("the layout version; a store of another version is refused", init=False)
    teacher: TeacherRecord = _doc("see the teacher keys below")
    dataset: DatasetRecord = _doc("see the dataset keys below")
    num_classes: int = _doc("C, the dataset's classes (the teacher's logits are over these)")
    topk: int = _doc("k, teacher logits kept per view")
    epochs: int = _doc("E, cached epochs of views")
    seed: int = _doc("run seed of the views (--seed of cache-teacher, --view-seed of train-student)")
    recipe: dict = _doc("the augmentation recipe's fields (pipeline.augment.Recipe)")
    recipe_name: str = _doc("the preset it came from, or custom")
    on_error: str = _doc("the corrupt-sample policy of the pass (raise or skip); training applies the same")
    index_dtype: str = _doc("dtype of topk_indices (from num_classes)", init=False)
    raw_bytes_per_view: int = _doc("bytes per (epoch, sample) before compression (from topk, num_classes, "
                                   "tail_samples and tail_temperatures)", init=False)
    versions: dict = _doc("library versions that made the views and the store")
    tail_samples: int = _doc("M, tail classes drawn per view (0: none; the tail is then spread uniformly)", default=0)
    tail_temperatures: list[float] = _doc("temperatures T != 1 whose log Z_T (log_z) is stored, ascending; with "
                                          "samples, training runs at 1 or one of these", default_factory=list)
    tail_draw_temperature: float = _doc("T_d, the temperature of the distribution the tail classes are drawn from",
                                        default=1.0)

    def __post_init__(self):
        derived = {"format": FORMAT, "format_version": FORMAT_VERSION, "index_dtype": index_dtype(self.num_classes),
                   "raw_bytes_per_view": raw_bytes_per_view(self.topk, self.num_classes, self.tail_samples,
                                                            len(self.tail_temperatures))}
        for k, v in derived.items():
            object.__setattr__(self, k, v)

    @property
    def arrays(self) -> tuple[ArraySpec, ...]:
        """The arrays this store holds, in creation order."""
        return held_arrays(self.tail_samples, len(self.tail_temperatures))

    def trailing_shape(self, a: ArraySpec) -> tuple[int, ...]:
        return a.trailing_shape(self.topk, self.tail_samples, len(self.tail_temperatures))

    @property
    def temperatures(self) -> list[float]:
        """Temperatures at which the teacher's log-probabilities are exact from this store (with tail samples)."""
        return sorted({1.0, *self.tail_temperatures})

    def to_attrs(self) -> dict:
        return {f.name: (v.to_attrs() if isinstance(v := getattr(self, f.name), _Flat) else v) for f in fields(self)}

    @classmethod
    def from_attrs(cls, d: dict, where: str = "the store") -> CacheDescription:
        """Read a store's attributes; refuse another format version (older or newer) and any other layout."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{where} is a zarr store but not a teacher cache (no '{FORMAT}' format attribute); "
                            f"point --cache at a store made by `cli.py cache-teacher`")
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{where} has cache format version {d.get('format_version')} but this tool reads format "
                            f"version {FORMAT_VERSION}; rebuild the cache with this version "
                            f"(`cli.py cache-teacher ... --overwrite`)")
        _check_keys(cls, d, where)
        _check_types(cls, d, where)
        ds = d["dataset"]
        counts = {"num_classes": d["num_classes"], "topk": d["topk"], "epochs": d["epochs"],
                  **({k: ds.get(k) for k in ("num_samples", "num_shards", "samples_per_shard")}
                     if isinstance(ds, dict) else {})}
        bad = [f"{k} {v!r}" for k, v in counts.items() if isinstance(v, int) and v < 1]
        if bad:
            raise UserError(f"{where} records {', '.join(bad)} (each must be at least 1): it is damaged; rebuild the "
                            f"cache (`cli.py cache-teacher ... --overwrite`)")
        desc = cls(teacher=TeacherRecord.from_attrs(d["teacher"], where),
                   dataset=DatasetRecord.from_attrs(d["dataset"], where),
                   **{f.name: d[f.name] for f in fields(cls) if f.init and f.name not in ("teacher", "dataset")})
        for f in fields(cls):
            if not f.init and getattr(desc, f.name) != d[f.name]:
                raise UserError(f"{where} records {f.name} {d[f.name]!r} where its other attributes give "
                                f"{getattr(desc, f.name)!r}: it is damaged; rebuild the cache with this version")
        return desc

    def request(self) -> CacheRequest:
        """Every checked field of this description, as the request that would make it."""
        t, ds = self.teacher, self.dataset
        return CacheRequest(teacher=t.name, checkpoint_sha256=t.checkpoint_sha256, weights_tag=t.weights_tag,
                            classes=t.classes, manifest_hash=ds.manifest_hash, split=ds.split, recipe=self.recipe,
                            seed=self.seed, topk=self.topk, epochs=self.epochs, num_classes=self.num_classes,
                            tail_samples=self.tail_samples, tail_temperatures=self.tail_temperatures,
                            tail_draw_temperature=self.tail_draw_temperature)

    def mismatches(self, request: CacheRequest, every: bool = False, theirs: str = "requested") -> list[str]:
        """Each checked field where this store differs from the request, as readable phrases ("<field> is <ours>,
        <theirs> <wanted>"). Only the fields the request gives are compared, or with `every` all of them (None
        included): a store reused by `cache-teacher` must be what that exact request would make."""
        out, store = [], self.request()
        for label, of in _CHECKED:
            have, want = of(store), of(request)
            if (want is None and not every) or have == want:
                continue
            if isinstance(have, dict) and isinstance(want, dict):  # the recipe: name the fields that differ
                diff = [f"{k}: {_show(have.get(k))} != {_show(want.get(k))}" for k in sorted(set(have) | set(want))
                        if have.get(k) != want.get(k)]
                out.append(f"{label} differs ({'; '.join(diff)})")
            else:
                out.append(f"{label} is {_show(have)}, {theirs} {_show(want)}")
        return out


# ---------------------------------------------------------------------------------------------- reference

def _dtype_doc(a: ArraySpec) -> str:
    return "int16 (int32 beyond 32,767 classes)" if a.dtype == INDEX else a.dtype


def _rows(record, prefix: str = "") -> list[str]:
    return [f"| `{prefix}{f.name}` | {f.metadata['doc']} |" for f in fields(record)]


def format_reference() -> str:
    """The README's "Cache format reference" section, rendered from the records above (tests/test_format.py
    checks the README holds exactly this; regenerate with `python -m cache.format`)."""
    arrays = [f"| `{a.name}` | {_dtype_doc(a)} | `[E, N{''.join(f', {d}' for d in a.trailing)}]` | {a.fill} | {a.doc} |"
              for a in ARRAYS]
    lines = [
        "## Cache format reference",
        "",
        "<!-- generated by `python -m cache.format` from cache/format.py; tests/test_format.py checks it -->",
        "",
        f"A store is a zarr v3 group, `format` `{FORMAT}`, `format_version` {FORMAT_VERSION}. A store of another "
        "format version (older or newer) is refused, naming both versions: rebuild it with this version. "
        "E = cached epochs, N = samples in the split, k = top-k, C = classes, M = tail samples, t = tail "
        "temperatures. The tail arrays exist only in a store made with `--tail-samples M` (M > 0), `log_z` only "
        "when it records temperatures.",
        "",
        f"**Arrays** (`[E, N, ...]`; {raw_bytes_per_view(1, 10) - raw_bytes_per_view(0, 10)}k + "
        f"{raw_bytes_per_view(0, 10)} bytes per (epoch, sample) (+ 4M + 4 + 4t with a sampled tail) before "
        "compression with int16 indices; Blosc-zstd, byte shuffle; zarr shard `[E, samples_per_shard, ...]` = one "
        "unit, inner chunk `[1, samples_per_shard, ...]` = one epoch of one unit):",
        "",
        "| array | dtype | shape | fill | meaning |",
        "| --- | --- | --- | --- | --- |",
        *arrays,
        "",
        "**Attributes** (the group's `zarr.json`, `cache.format.CacheDescription`):",
        "",
        "| key | meaning |",
        "| --- | --- |",
        *_rows(CacheDescription),
        *_rows(TeacherRecord, "teacher."),
        *_rows(DatasetRecord, "dataset."),
        "",
        f"**Unit markers** (`{UNITS_DIR}/shard-NNNNNN.json`, `cache.format.UnitRecord`): "
        f"{UnitRecord.__doc__.split(': ', 1)[1]}",
        "",
        "| key | meaning |",
        "| --- | --- |",
        *_rows(UnitRecord),
    ]
    return "\n".join(" ".join(line.split()) if not line.startswith("|") else line for line in lines) + "\n"


if __name__ == "__main__":
    print(format_reference(), end="")
