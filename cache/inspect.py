"""`inspect-cache` and `verify-cache`: what a store holds, and whether it is right."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache.format import (
    LABEL_LOG_ODDS,
    LOG_Z,
    LOGIT_STD,
    LSE,
    PARTNER,
    TAIL_IDS,
    TAIL_LABEL_LOG_ODDS,
    TAIL_LSE,
    TOPK_INDICES,
    TOPK_VALUES,
    VIEW_SEED,
    TeacherRecord,
)
from cache.store import CacheStore
from cache.summary import TailSpec, summarize
from cache.teacher import ClassMap, Teacher
from pipeline.augment import Recipe
from pipeline.errors import UserError
from pipeline.models import Weights, file_sha256
from pipeline.reader import ShardReader
from pipeline.spec import argument, group
from pipeline.views import shard_views, views_digest


@dataclass
class InspectConfig:
    """The options of `inspect-cache`."""

    store: str = field(metadata=argument())
    """Teacher cache store (path or URL)."""
    json_out: bool = field(default=False, metadata={"flags": ("--json",)})
    """Print JSON."""


@dataclass
class VerifyConfig:
    """The options of `verify-cache`."""

    store: str = field(metadata=argument())
    """Teacher cache store (path or URL)."""
    samples: int = 32
    """Random views to rebuild and re-run."""
    data: str | None = None
    """Dataset directory or URL [default: the one recorded]."""
    weights: Weights = field(default_factory=Weights, metadata=group(about="teacher [default: the weights recorded]"))
    seed: int = 0
    """Seed of the random pick."""


def topk_mass(store: CacheStore, units: list[int]) -> np.ndarray:
    """Teacher probability held by the cached top-k, per (epoch, sample) of the given units."""
    out = []
    for u in units:
        for e in range(store.epochs):
            d = store.read_epoch(e, u, names=(TOPK_VALUES.name, LSE.name))
            out.append(np.exp(d[TOPK_VALUES.name].astype(np.float64)).sum(1))  # values are log-probabilities
    return np.concatenate(out) if out else np.zeros(0)


def inspect_cache(path: str | Path) -> dict:
    store = CacheStore(path)
    d, t, ds = store.description, store.description.teacher, store.description.dataset
    done = sorted(store.done_units())
    n_done = sum(store.unit_info(u).count for u in done)
    disk = store.disk_bytes()
    mass = topk_mass(store, done)
    return {
        "store": str(path), "teacher": t.name, "checkpoint_sha256": t.checkpoint_sha256,
        "teacher_weights": t.weights,
        "teacher_classes": t.classes and {k: t.classes[k] for k in ("source", "num_outputs")},
        "teacher_input": f"{t.input_size}px mean={t.mean} std={t.std}",
        "dataset": f"{ds.name}/{ds.split} ({ds.num_samples} samples, {d.num_classes} classes, "
                   f"manifest {ds.manifest_hash[:12]})",
        "recipe": f"{d.recipe_name}: {d.recipe}", "seed": d.seed, "epochs": d.epochs, "topk": d.topk,
        "tail_samples": d.tail_samples,
        "tail": (f"{d.tail_samples} classes per view drawn at T_d = {d.tail_draw_temperature:g}; unbiased losses "
                 f"at T = {', '.join(f'{t:g}' for t in d.temperatures)}") if d.tail_samples else
                "none: the tail is spread uniformly (biased); cache with --tail-samples M to sample it",
        "tail_temperatures": d.temperatures if d.tail_samples else [],
        "tail_draw_temperature": d.tail_draw_temperature if d.tail_samples else None,
        "value_dtype": d.value_dtype, "standardize": d.standardize,
        "standard_temperatures": d.standard_temperatures if d.tail_samples else [],
        "format_version": d.format_version, "versions": d.versions,
        "units_done": f"{len(done)}/{store.num_units}", "complete": len(done) == store.num_units,
        "skipped_samples": len(store.skipped()),
        "disk_bytes": disk, "raw_bytes_per_view": d.raw_bytes_per_view,
        "disk_bytes_per_view": disk / max(1, n_done * store.epochs),
        "topk_mass_mean": float(mass.mean()) if mass.size else float("nan"),
        "topk_mass_p5": float(np.percentile(mass, 5)) if mass.size else float("nan"),
    }


def check_ranges(store: CacheStore) -> list[str]:
    """Structural checks over every complete unit; returns problems found."""
    problems = []
    C, S = store.num_classes, store.samples_per_shard
    skipped = store.skipped()
    for u in sorted(store.done_units()):
        first = u * S
        for e in range(store.epochs):
            d = store.read_epoch(e, u)
            n = len(d[LSE.name])
            ok = np.array([first + i not in skipped for i in range(n)], dtype=bool)
            idx, val = d[TOPK_INDICES.name][ok], d[TOPK_VALUES.name][ok].astype(np.float32)
            if idx.size and (idx.min() < 0 or idx.max() >= C):
                problems.append(f"unit {u} epoch {e}: class index outside [0, {C})")
            if idx.size and store.topk > 1 and (np.diff(val, axis=1) > 0).any():
                problems.append(f"unit {u} epoch {e}: top-k values are not in descending order")
            if (val > 0).any():
                problems.append(f"unit {u} epoch {e}: top-k values above 0 (they are log-probabilities)")
            p = d[PARTNER.name][ok]
            if ((p != -1) & ((p < first) | (p >= first + n))).any():
                problems.append(f"unit {u} epoch {e}: mixing partner outside the unit's data shard")
            if not np.isfinite(d[LSE.name][ok]).all():
                problems.append(f"unit {u} epoch {e}: non-finite log-sum-exp")
            if TAIL_IDS.name in d:
                tid = d[TAIL_IDS.name][ok].astype(np.int64)
                if tid.size and (tid.min() < -1 or tid.max() >= C):
                    problems.append(f"unit {u} epoch {e}: tail class index outside [-1, {C})")
                if tid.size and (tid[:, :, None] == idx[:, None, :].astype(np.int64)).any():
                    problems.append(f"unit {u} epoch {e}: a tail sample is one of the top-k classes")
    return problems


def recorded_weights(teacher: TeacherRecord) -> Weights:
    """The teacher weights a store recorded, as a request: the same checkpoint or pretrained file, or the hub."""
    source, file = teacher.weights["source"], teacher.weights.get("file")  # init and hub record no file
    if source == "checkpoint":
        return Weights(checkpoint=Path(file))
    if source == "file":
        return Weights(pretrained_file=Path(file))
    return Weights(pretrained=source in ("hub", "url"))


def verify_cache(path: str | Path, samples: int = 32, data: str | Path | None = None,
                 weights: Weights | None = None,
                 seed: int = 0, atol: float = 0.02, rtol: float = 0.01) -> dict:
    """Rebuild `samples` random views, rerun the teacher (`weights`; default: those recorded), compare."""
    store = CacheStore(path)
    d, ds = store.description, store.description.dataset
    problems = []
    missing = store.num_units - len(store.done_units())
    if missing:
        problems.append(f"{missing} of {store.num_units} units are not complete")
    problems += check_ranges(store)
    data = data or ds.path  # a path or URL
    reader = ShardReader(data, ds.split, on_error=d.on_error)
    if reader.manifest.split_hash(ds.split) != ds.manifest_hash:
        raise UserError(f"dataset {data} is not the one cache {path} was made from (manifest hash differs); "
                        f"pass the right --data")
    teacher = recorded_teacher(store, weights)
    recipe = Recipe.from_dict(d.recipe)
    checked, worst = 0, 0.0
    skipped = store.skipped()
    for (u, e), positions in sorted(_picks(store, samples, seed).items()):
        info = reader.split.shards[u]
        samples_u = list(reader.read_shard(u))
        views = {v["index"]: v for v in shard_views(samples_u, recipe, d.seed, e, info.first, info.count)}
        if views_digest([v["digest"] for v in views.values()]) != store.unit_info(u).view_digests[e]:
            problems.append(f"unit {u} epoch {e}: the rebuilt views differ pixel for pixel from those the teacher saw")
        idx = [info.first + p for p in sorted(set(positions)) if info.first + p not in skipped]
        if not idx:
            continue
        batch = [views[i] for i in idx]
        found, diff = _compare_views(store, teacher, u, e, batch, np.array(idx) - info.first, atol, rtol)
        problems += found
        worst = max(worst, diff)
        checked += len(idx)
    return {"store": str(path), "views_checked": checked, "max_abs_difference": worst,
            "problems": problems, "ok": not problems}


def recorded_teacher(store: CacheStore, weights: Weights | None = None) -> Teacher:
    """The store's teacher with `weights` (default: those recorded), refused unless they are the weights the
    store was made with."""
    path, d, t = store.path, store.description, store.description.teacher
    if weights is None or not (weights.checkpoint or weights.from_timm):
        weights = recorded_weights(t)
    if weights.checkpoint and file_sha256(weights.checkpoint) != t.checkpoint_sha256:  # before building
        raise UserError(f"teacher checkpoint {weights.checkpoint} is not the one cache {path} was made with; pass the "
                        f"right --checkpoint")
    teacher = Teacher.build(t.name, store.num_classes, d.recipe["input_size"], weights=weights,
                            class_map=ClassMap.from_dict(t.classes), model_kwargs=t.model_kwargs,
                            input_size=t.input_size, mean=t.mean, std=t.std)
    if teacher.checkpoint_sha256 != t.checkpoint_sha256:
        raise UserError(f"teacher weights {teacher.weights.get('file') or teacher.weights.get('source')} are not the "
                        f"ones cache {path} was made with (sha256 {t.checkpoint_sha256}); pass the right "
                        f"--checkpoint or --pretrained-file")
    return teacher


def _picks(store: CacheStore, samples: int, seed: int) -> dict[tuple[int, int], list[int]]:
    """`samples` random (unit, epoch, position) of the complete units, grouped by (unit, epoch)."""
    rng = np.random.default_rng(seed)
    done = sorted(store.done_units())
    picks: dict[tuple[int, int], list[int]] = {}
    for _ in range(samples if done else 0):
        u = int(rng.choice(done))
        e = int(rng.integers(store.epochs))
        picks.setdefault((u, e), []).append(int(rng.integers(store.unit_info(u).count)))
    return picks


def _compare_views(store: CacheStore, teacher: Teacher, u: int, e: int, batch: list[dict], pos: np.ndarray,
                   atol: float, rtol: float) -> tuple[list[str], float]:
    """Rerun the teacher on rebuilt views (`batch`, at positions `pos` of unit u) and compare what the store holds
    for them with what a fresh pass would write -> (problems, largest absolute difference)."""
    d, problems, worst = store.description, [], 0.0
    logits = teacher(torch.stack([v["view"] for v in batch]))
    fresh = summarize(logits, torch.tensor([v["label"] for v in batch]),
                      torch.tensor([v["partner_label"] for v in batch]), store.topk,
                      np.array([v[VIEW_SEED.name] for v in batch]), TailSpec.of(d), d.value_dtype, d.standardize)
    cached = store.read_epoch(e, u)
    if d.tail_samples:  # the draw replays from the view seed; a value one fp16 step off may move a rare draw
        drawn = fresh[TAIL_IDS.name] != cached[TAIL_IDS.name][pos]
        if drawn.mean() > 0.01:
            problems.append(f"unit {u} epoch {e}: {drawn.mean():.1%} of the cached tail samples differ from "
                            f"those the view seeds draw")
    for name in (TOPK_VALUES.name, LSE.name, LABEL_LOG_ODDS.name, LOGIT_STD.name, TAIL_LSE.name, LOG_Z.name,
                 TAIL_LABEL_LOG_ODDS.name):
        if name not in fresh:
            continue
        want, got = fresh[name].astype(np.float32), cached[name][pos].astype(np.float32)
        err = np.abs(want - got) - rtol * np.abs(want)
        worst = max(worst, float(np.abs(want - got).max()))
        if (err > atol).any():
            problems.append(f"unit {u} epoch {e}: cached {name} differ from a fresh teacher pass "
                            f"(max abs difference {np.abs(want - got).max():.4g})")
    # indices may legitimately swap where two logits tie within fp16; compare as sets of near-ties
    for j in range(len(pos)):
        fi, ci = fresh[TOPK_INDICES.name][j], cached[TOPK_INDICES.name][pos[j]]
        if not np.array_equal(fi, ci):
            fv = logits[j].float().cpu().numpy()
            if np.abs(np.sort(fv[fi]) - np.sort(fv[ci.astype(np.int64)])).max() > atol + rtol * np.abs(fv).max():
                problems.append(f"unit {u} epoch {e} sample {batch[j]['index']}: cached top-k classes differ")
    for name in (VIEW_SEED.name, PARTNER.name):  # a view's fields are named as the replay arrays
        want = np.array([v[name] for v in batch])
        if not np.array_equal(want, cached[name][pos]):
            problems.append(f"unit {u} epoch {e}: cached replay record '{name}' differs from the rebuilt view")
    return problems, worst
