"""The teacher cache's format as code: its arrays, its description and its unit markers, written once.

Every reader and writer of a store goes through these records: the array names and dtypes exist only in
`ARRAYS`, the description's keys only in `TeacherRecord`, `DatasetRecord` and `CacheDescription`, a
unit's marker only in `UnitRecord`. `to_attrs()` gives the JSON a store holds, key for key and in the same
order, and `from_attrs()` reads it back, refusing what this version cannot read (another format version,
missing or unknown keys) instead of guessing. `format_reference()` renders all of it as docs/cache-format.md
(`python -m cache.format > docs/cache-format.md`), so the documentation is this module.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

from pipeline.errors import UserError
from pipeline.spec import fits, type_name

FORMAT = "ofakd-teacher-cache"
# The layout below (ARRAYS, the description, the unit markers) is version FORMAT_VERSION. A change to what any array
# means, or to the keys a reader needs, takes a new version: a reader refuses every other version by name, rather
# than reading a store whose values mean something else with a guess.
FORMAT_VERSION = 4
UNITS_DIR = "_units"
INDEX = "index"  # dtype marker: class indices, int16 while C fits it, else int32 (see `index_dtype`)
VALUE = "value"  # dtype marker: the store's value_dtype (float16, or float32 with --value-dtype float32)
VALUE_DTYPES = ("float16", "float32")


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: [E, N, *trailing] over (cached epoch, sample of the split)."""

    name: str
    dtype: str
    """numpy dtype name, `INDEX` for class indices, or `VALUE` for the store's value dtype."""
    trailing: tuple[int | str, ...]
    """Trailing shape after [E, N]; "k" stands for the store's top-k, "M" for its tail samples, "t" for its
    tail temperature slots (tail_temperatures, then standard_temperatures)."""
    fill: int | float
    """Value of what was never written (a sample the error policy skipped)."""
    doc: str

    def dtype_for(self, num_classes: int, value_dtype: str = "float16") -> str:
        return {INDEX: index_dtype(num_classes), VALUE: value_dtype}.get(self.dtype, self.dtype)

    def trailing_shape(self, k: int, m: int = 0, t: int = 0) -> tuple[int, ...]:
        return tuple({"k": k, "M": m, "t": t}.get(d, d) for d in self.trailing)


# the teacher's outputs per view (what `summarize` makes and a training view needs). Values are log-probabilities at
# T = 1 (logit - lse): their rounding error in float16, |log p| x 2^-11 relative, is small where the probability is
TOPK_VALUES = ArraySpec("topk_values", VALUE, ("k",), 0,
                        "the teacher's log-probabilities (logit - lse) of the k largest classes, descending")
TOPK_INDICES = ArraySpec("topk_indices", INDEX, ("k",), 0, "their class indices (dataset classes; never float)")
LSE = ArraySpec("lse", "float32", (), 0, "log-sum-exp of all C logits (T = 1): a value + lse is the logit")
LABEL_LOG_ODDS = ArraySpec("label_log_odds", "float32", (2,), 0,
                           "log-odds against the view's label class and its mixing partner's label, a_c = "
                           "log((1 - p_c) / p_c) = logsumexp_{j != c}(z_j - z_c): log p_c = -softplus(a_c) and "
                           "log(1 - p_c) = -softplus(-a_c), both exact however confident the teacher")
LOGIT_STD = ArraySpec("logit_std", "float32", (), 0,
                      "standard deviation of the C logits (unbiased, as torch.std): logit standardization's "
                      "temperature scale, T_eff = T (std + 1e-7) (only with --standardize)")
# the sampled tail (only with --tail-samples M > 0): what importance-sampling the classes outside the known ones
# (top-k + label classes) needs; see cache.targets for the estimator
TAIL_SEED_SALT = 0x7A11  # second word of a view's tail-draw seed, so the draw never reuses the view's own stream
TAIL_IDS = ArraySpec("tail_ids", INDEX, ("M",), -1,
                     "M tail classes drawn with replacement from r_j = exp(v_j / T_d - tail_lse) over the classes "
                     f"outside top-k and labels (-1: no tail); numpy default_rng([view_seed, {TAIL_SEED_SALT}])")
TAIL_VALUES = ArraySpec("tail_values", VALUE, ("M",), 0,
                        "their log-probabilities v_j (logit - lse; the draw used these stored values)")
TAIL_LSE = ArraySpec("tail_lse", "float32", (), 0,
                     "log-partition of the draw: log-sum-exp of tail_values / T_d over the tail classes")
LOG_Z = ArraySpec("log_z", "float32", ("t",), 0,
                  "per tail temperature slot: log-sum-exp over all C of (logit - lse) / T_eff, T_eff = T (a tail "
                  "temperature) or T (logit_std + 1e-7) (a standardized one); raw T = 1 needs no slot (there it is 0)")
TAIL_LABEL_LOG_ODDS = ArraySpec("tail_label_log_odds", "float32", ("t", 2), 0,
                                "label_log_odds at each slot's T_eff")

# the replay record: named as the fields of a view (pipeline.views) that they store
VIEW_SEED = ArraySpec("view_seed", "uint32", (), 0, "replay record: the view seed, SeedSequence([seed, epoch, index])")
PARTNER = ArraySpec("partner", "int32", (), -1, "replay record: the mixing partner's global index (-1: not mixed)")
LAM = ArraySpec("lam", "float16", (), 1.0, "replay record: weight of the sample's own label")
MIX_MODE = ArraySpec("mix_mode", "uint8", (), 0, "replay record: 0 none, 1 mixup, 2 cutmix")

TEACHER_OUTPUTS = (TOPK_VALUES, TOPK_INDICES, LSE, LABEL_LOG_ODDS)
STANDARD = (LOGIT_STD,)
TAIL = (TAIL_IDS, TAIL_VALUES, TAIL_LSE, LOG_Z, TAIL_LABEL_LOG_ODDS)
SLOTTED = (LOG_Z, TAIL_LABEL_LOG_ODDS)  # one entry per tail temperature slot
REPLAY = (VIEW_SEED, PARTNER, LAM, MIX_MODE)
ARRAYS = TEACHER_OUTPUTS + STANDARD + TAIL + REPLAY  # in this order a store creates those it holds (`held_arrays`)
NAMES = tuple(a.name for a in TEACHER_OUTPUTS + REPLAY)  # the arrays every store holds
ALL_NAMES = tuple(a.name for a in ARRAYS)


def held_arrays(tail_samples: int, tail_slots: int, standardize: bool = False) -> tuple[ArraySpec, ...]:
    """The arrays a store holds: logit_std only with --standardize, the tail arrays only with tail samples, and of
    those the per-slot ones only with temperature slots."""
    def held(a: ArraySpec) -> bool:
        if a in STANDARD:
            return standardize
        return a not in TAIL or bool(tail_samples and (a not in SLOTTED or tail_slots))
    return tuple(a for a in ARRAYS if held(a))


def raw_bytes_per_view(k: int, num_classes: int, tail_samples: int = 0, tail_slots: int = 0,
                       value_dtype: str = "float16", standardize: bool = False) -> int:
    """Bytes of one (epoch, sample) over every array before compression: 4k + 23 with float16 values and int16
    indices (6k + 23 with float32 values), + 4 with --standardize, + 4M + 4 + 12t with M tail samples (float16)
    and t temperature slots."""
    total = 0
    for a in held_arrays(tail_samples, tail_slots, standardize):
        shape = a.trailing_shape(k, tail_samples, tail_slots)
        total += np.dtype(a.dtype_for(num_classes, value_dtype)).itemsize * int(np.prod(shape, dtype=np.int64))
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
    value_dtype: str | None = None
    standardize: bool | None = None
    standard_temperatures: list[float] | None = None


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
    ("value dtype", lambda r: r.value_dtype),
    ("logit standard deviation kept", lambda r: r.standardize),
    ("standardized tail temperatures", lambda r: r.standard_temperatures),
)


@dataclass(frozen=True)
class CacheDescription:
    """The store's group attributes (zarr.json): everything that made it, so a reader can check it fits."""

    format: str = _doc(f'always "{FORMAT}"', init=False)
    format_version: int = _doc("the layout version; a store of another version is refused", init=False)
    teacher: TeacherRecord = _doc("see the teacher keys below")
    dataset: DatasetRecord = _doc("see the dataset keys below")
    num_classes: int = _doc("C, the dataset's classes (the teacher's logits are over these)")
    topk: int = _doc("k, classes whose log-probabilities are kept per view")
    epochs: int = _doc("E, cached epochs of views")
    seed: int = _doc("run seed of the views (--seed of cache-teacher, --view-seed of train-student)")
    recipe: dict = _doc("the augmentation recipe's fields (pipeline.augment.Recipe)")
    recipe_name: str = _doc("the preset it came from, or custom")
    on_error: str = _doc("the corrupt-sample policy of the pass (raise or skip); training applies the same")
    index_dtype: str = _doc("dtype of topk_indices (from num_classes)", init=False)
    raw_bytes_per_view: int = _doc("bytes per (epoch, sample) before compression (from topk, num_classes, "
                                   "value_dtype, standardize and the tail's keys)", init=False)
    versions: dict = _doc("library versions that made the views and the store")
    tail_samples: int = _doc("M, tail classes drawn per view (0: none; the tail is then spread uniformly)", default=0)
    tail_temperatures: list[float] = _doc("temperatures T != 1 whose log Z_T (log_z) and label log-odds are stored, "
                                          "ascending; with samples, training runs at 1 or one of these",
                                          default_factory=list)
    tail_draw_temperature: float = _doc("T_d, the temperature of the distribution the tail classes are drawn from",
                                        default=1.0)
    value_dtype: Literal["float16", "float32"] = _doc("dtype of topk_values and tail_values", default="float16")
    standardize: bool = _doc("whether logit_std is kept (training with --standardize needs it)", default=False)
    standard_temperatures: list[float] = _doc("with samples and standardize: temperatures of the standardized logits "
                                              "whose log Z and label log-odds are stored (slots after "
                                              "tail_temperatures), ascending", default_factory=list)

    def __post_init__(self):
        derived = {"format": FORMAT, "format_version": FORMAT_VERSION, "index_dtype": index_dtype(self.num_classes),
                   "raw_bytes_per_view": raw_bytes_per_view(self.topk, self.num_classes, self.tail_samples,
                                                            len(self.slots), self.value_dtype, self.standardize)}
        for k, v in derived.items():
            object.__setattr__(self, k, v)

    @property
    def arrays(self) -> tuple[ArraySpec, ...]:
        """The arrays this store holds, in creation order."""
        return held_arrays(self.tail_samples, len(self.slots), self.standardize)

    def trailing_shape(self, a: ArraySpec) -> tuple[int, ...]:
        return a.trailing_shape(self.topk, self.tail_samples, len(self.slots))

    def dtype(self, a: ArraySpec) -> str:
        return a.dtype_for(self.num_classes, self.value_dtype)

    @property
    def slots(self) -> list[tuple[float, bool]]:
        """The tail temperature slots of log_z and tail_label_log_odds: (T, standardized), the tail temperatures
        first, then the standardized ones (none without tail samples)."""
        if not self.tail_samples:
            return []
        return [(float(t), False) for t in self.tail_temperatures] + [(float(t), True)
                                                                       for t in self.standard_temperatures]

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
                            tail_draw_temperature=self.tail_draw_temperature, value_dtype=self.value_dtype,
                            standardize=self.standardize, standard_temperatures=self.standard_temperatures)

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
    return {INDEX: "int16 (int32 beyond 32,767 classes)", VALUE: "value_dtype (float16 or float32)"}.get(a.dtype,
                                                                                                         a.dtype)


def _rows(record, prefix: str = "") -> list[str]:
    return [f"| `{prefix}{f.name}` | {f.metadata['doc']} |" for f in fields(record)]


def format_reference() -> str:
    """docs/cache-format.md, rendered from the records above (tests/test_format.py checks the page is exactly
    this; regenerate it with `python -m cache.format > docs/cache-format.md`)."""
    arrays = [f"| `{a.name}` | {_dtype_doc(a)} | `[E, N{''.join(f', {d}' for d in a.trailing)}]` | {a.fill} | {a.doc} |"
              for a in ARRAYS]
    lines = [
        "# Cache format reference",
        "",
        "<!-- generated by `python -m cache.format > docs/cache-format.md` from cache/format.py; "
        "tests/test_format.py checks it -->",
        "",
        "What a teacher cache (a store made by `cache-teacher`) holds, rendered from `cache/format.py`, the one place "
        "that defines it. How the pieces are made and used: [the design](design.md).",
        "",
        f"A store is a zarr v3 group, `format` `{FORMAT}`, `format_version` {FORMAT_VERSION}. A store of another "
        "format version (older or newer) is refused, naming both versions: rebuild it with this version. "
        "E = cached epochs, N = samples in the split, k = top-k, C = classes, M = tail samples, t = tail "
        "temperature slots (`tail_temperatures`, then `standard_temperatures`). `logit_std` exists only in a store "
        "made with `--standardize`; the tail arrays only with `--tail-samples M` (M > 0), and `log_z` and "
        "`tail_label_log_odds` only when it records temperature slots.",
        "",
        f"**Arrays** (`[E, N, ...]`; {raw_bytes_per_view(1, 10) - raw_bytes_per_view(0, 10)}k + "
        f"{raw_bytes_per_view(0, 10)} bytes per (epoch, sample) before compression with float16 values and int16 "
        f"indices ({raw_bytes_per_view(1, 10, value_dtype='float32') - raw_bytes_per_view(0, 10)}k + "
        f"{raw_bytes_per_view(0, 10)} with float32 values), + "
        f"{raw_bytes_per_view(0, 10, standardize=True) - raw_bytes_per_view(0, 10)} with `--standardize`, "
        f"+ {raw_bytes_per_view(0, 10, 1) - raw_bytes_per_view(0, 10) - 4}M + 4 + "
        f"{raw_bytes_per_view(0, 10, 1, 1) - raw_bytes_per_view(0, 10, 1)}t with M float16 tail samples and t "
        "temperature slots; Blosc-zstd, byte shuffle; zarr shard `[E, samples_per_shard, ...]` = one unit, inner "
        "chunk `[1, samples_per_shard, ...]` = one epoch of one unit):",
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
