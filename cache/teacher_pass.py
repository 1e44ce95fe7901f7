"""Stage one: run the teacher once over every replayable view and store its top-k in zarr.

Several teachers side by side (`--add-teacher`): each view is decoded and augmented once and every teacher runs
on it; each teacher has its own store (--out/<i>-<name>.zarr), identical to the one its single-teacher pass makes,
and a unit counts done per store (a rerun builds a unit's views if any store lacks it, and runs only the teachers
whose stores lack it).

    units = data shards not yet marked complete, split across processes (rank::world)
    for each unit: decode the shard once; for each cached epoch, build its views (pipeline.views),
        run the teacher (eval, no_grad, bf16 autocast on CUDA), keep top-k logits + indices,
        log-sum-exp, the logits of both label classes, optionally M tail classes drawn from the
        rest (`--tail-samples`, see `draw_tail`), and the replay record
    when a unit is whole: write its zarr shards, fsync, then write its completion marker

Killed at any moment, a rerun skips the marked units and redoes the rest; unmarked data is never read.
On SIGTERM/SIGINT the pass finishes the units in flight (at most one per loader worker), starts no other,
and exits with status 75 (pipeline.preempt); units it cannot finish within --stop-grace stay unmarked.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from cache.format import (
    LABEL_LOGITS,
    LOG_Z,
    LSE,
    REPLAY,
    TAIL_IDS,
    TAIL_LOGITS,
    TAIL_LSE,
    TAIL_SEED_SALT,
    TOPK_INDICES,
    TOPK_VALUES,
    VIEW_SEED,
    CacheDescription,
    DatasetRecord,
    TeacherRecord,
)
from cache.store import CacheStore, Unit
from cache.teacher import Teacher, TeacherSpec
from pipeline.augment import Recipe, ViewSpec
from pipeline.errors import UserError
from pipeline.location import Location
from pipeline.models import Weights
from pipeline.preempt import EXIT_PREEMPTED, Preempted, active, ignore_stop_signals
from pipeline.progress import Bar
from pipeline.provenance import code_label
from pipeline.reader import ShardReader
from pipeline.spec import choice_problems, group, mounted
from pipeline.views import UnitViews, library_versions, views_digest


@dataclass
class CacheConfig:
    """Every option of `cache-teacher`, in groups (flags, --config files and help text come from here)."""

    data: str | Path
    """Dataset directory or fsspec URL (s3://, gs://, ...) made by `shards`."""
    out: str | Path
    """Output zarr store (a directory or fsspec URL), e.g. runs/teacher.zarr or s3://bucket/teacher.zarr; with
    --add-teacher, the directory of one store per teacher."""
    teacher: TeacherSpec = field(default_factory=TeacherSpec, metadata=group(
        names={"name": "teacher", "classes": "teacher-classes"}, required=("name",), about="teacher",
        help={"name": "timm model name of the teacher."}))
    add_teacher: list[str] | None = None
    """More teachers in the same pass, each NAME or NAME=CHECKPOINT (over the dataset's classes, timm's default
    kwargs): every view is decoded and augmented once and each teacher runs on it; --out is then a directory with
    one store per teacher, <i>-<name>.zarr (0 is --teacher), each the store a single-teacher pass makes."""
    views: ViewSpec = mounted(ViewSpec, recipe="imagenet-cnn", seed=0)
    split: str = "train"
    """Split to cache."""
    epochs: int = 1
    """Epochs of views to cache."""
    topk: int = 10
    """Teacher logits kept per view."""
    tail_samples: int = 0
    """M: tail classes (outside top-k and labels) drawn per view from the teacher's distribution, stored with their
    logits, so that training estimates the tail's share of every loss without bias (0: the tail is spread
    uniformly, which is biased)."""
    tail_temperatures: list[float] | None = None
    """With --tail-samples: the temperatures besides 1 that training may use; log Z_T is stored for each
    (4 bytes per view each) [default: 4]."""
    tail_draw_temperature: float | None = None
    """With --tail-samples: the temperature of the teacher distribution the tail classes are drawn from. Drawing
    flatter than a loss's temperature is safe, sharper can make the estimate's variance explode; drawing at the
    training temperature is best (1 for OFA) [default: the largest temperature held, 4 by default]."""
    batch_size: int = 256
    """Teacher batch size."""
    workers: int = 2
    """Data-loader workers per process."""
    overwrite: bool = False
    """Replace an existing store made by another request."""
    on_error: Literal["raise", "skip"] = "raise"
    """Corrupt samples: raise (stop) or skip (recorded in the store)."""
    progress: bool = field(default=True, metadata={"flags": ("--progress/--quiet",)})
    """Progress bars."""
    stop_grace: float = 20.0
    """On SIGTERM/SIGINT, finish the units in flight if that takes at most this many seconds (else leave them
    unmarked for the rerun), then exit with status 75; a rerun of the same command completes the store."""

    def __post_init__(self):
        problems = []
        if self.stop_grace < 0:
            problems.append(f"--stop-grace must be >= 0, got {self.stop_grace}")
        if not self.teacher.name:
            problems.append("missing required option --teacher (the timm model name of the teacher)")
        if self.views.get() is None or self.views.seed is None:
            problems.append("cache-teacher needs a recipe and a view seed (--recipe, --seed)")
        if self.epochs < 1:
            problems.append(f"--epochs must be at least 1, got {self.epochs}")
        if self.topk < 1:
            problems.append(f"--topk must be at least 1, got {self.topk}")
        if self.tail_samples < 0:
            problems.append(f"--tail-samples must be >= 0, got {self.tail_samples}")
        if not self.tail_samples and (self.tail_temperatures is not None or self.tail_draw_temperature is not None):
            problems.append("--tail-temperatures and --tail-draw-temperature describe the sampled tail; pass "
                            "--tail-samples M (M > 0) or drop them")
        if any(t <= 0 for t in self.tail_temperatures or ()) or (self.tail_draw_temperature or 1.0) <= 0:
            problems.append("tail temperatures must be > 0")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            problems.append(f"--workers must be >= 0, got {self.workers}")
        t = self.teacher
        if self.add_teacher and (t.classes or t.model_kwargs or t.input_size or t.weights.pretrained
                                 or t.weights.pretrained_file):
            problems.append("--teacher-classes, --model-kwargs, --input-size, --pretrained and --pretrained-file "
                            "would be ambiguous with --add-teacher (they describe one teacher); give every teacher "
                            "as NAME or NAME=CHECKPOINT, or cache such a teacher in its own pass")
        for spec in self.add_teacher or ():
            name, _, ckpt = spec.partition("=")
            if not name or (spec.count("=") and not ckpt):
                problems.append(f"--add-teacher '{spec}' is not NAME or NAME=CHECKPOINT")
        problems += choice_problems(self)
        if problems:
            raise UserError("; ".join(problems))

    @property
    def teachers(self) -> list[tuple[TeacherSpec, str | Path]]:
        """Every teacher of the pass with its store: --teacher alone writes --out; with --add-teacher, teacher i
        writes --out/<i>-<name>.zarr."""
        if not self.add_teacher:
            return [(self.teacher, self.out)]
        specs = [self.teacher]
        for spec in self.add_teacher:
            name, _, ckpt = spec.partition("=")
            specs.append(TeacherSpec(name=name, weights=Weights(checkpoint=Path(ckpt) if ckpt else None)))
        root = Location(self.out)
        return [(t, root.child(f"{i}-{t.name.replace('/', '_').replace(':', '_')}.zarr").url)
                for i, t in enumerate(specs)]

    @property
    def recipe(self) -> Recipe:
        """The recipe of the views, at their size."""
        return self.views.get()

    @property
    def tail(self) -> TailSpec:
        """The sampled tail this pass stores (M = 0: none)."""
        if not self.tail_samples:
            return TailSpec()
        temps = sorted({float(t) for t in ([4.0] if self.tail_temperatures is None else self.tail_temperatures)})
        draw = self.tail_draw_temperature or max([1.0, *temps])
        return TailSpec(self.tail_samples, [t for t in temps if t != 1.0], float(draw))


@dataclass(frozen=True)
class TailSpec:
    """What `summarize` draws and records of the tail: M samples, log Z_T at `temperatures`, draw temperature."""

    samples: int = 0
    temperatures: list[float] = field(default_factory=list)
    draw_temperature: float = 1.0


def versions() -> dict:
    """Libraries that make the views (pipeline.views.library_versions) and those that make the store, and this
    code's commit (`pipeline.provenance.code_label`)."""
    import numcodecs
    import timm
    import zarr
    return {**library_versions(), "timm": timm.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "code": code_label()}


def describe(cfg: CacheConfig, reader: ShardReader, teacher: Teacher, spec: TeacherSpec) -> CacheDescription:
    m, split, minput, ckpt = reader.manifest, reader.split, teacher.input, spec.weights.checkpoint
    return CacheDescription(
        teacher=TeacherRecord(name=spec.name, checkpoint_sha256=teacher.checkpoint_sha256,
                              checkpoint=str(ckpt) if ckpt else None, weights=teacher.weights,
                              classes=teacher.class_map.to_dict() if teacher.class_map else None,
                              model_kwargs=spec.model_kwargs, input_size=minput.size, mean=list(minput.mean),
                              std=list(minput.std), num_features=teacher.num_features),
        dataset=DatasetRecord(name=m.name, split=cfg.split, path=Location(cfg.data).resolved(),
                              manifest_hash=m.split_hash(cfg.split), num_samples=split.count,
                              num_shards=len(split.shards), samples_per_shard=split.samples_per_shard,
                              classes=m.classes),
        num_classes=m.num_classes, topk=cfg.topk, epochs=cfg.epochs, seed=cfg.views.seed, recipe=cfg.recipe.to_dict(),
        recipe_name=cfg.views.name, on_error=cfg.on_error, tail_samples=cfg.tail.samples,
        tail_temperatures=cfg.tail.temperatures, tail_draw_temperature=cfg.tail.draw_temperature, versions=versions())


def draw_tail(logits16: np.ndarray, known: np.ndarray, view_seeds: np.ndarray, m: int, draw_T: float):
    """Draw m tail classes per view, with replacement, from r_j = exp(z_j / T_d - tail_lse) over the classes not
    `known` (the fp16-rounded logits, so that training recomputes r_j from the stored values exactly).

    logits16 [B, C] float64 of fp16 values, known [B, C] bool, view_seeds [B] -> (ids [B, m] int64, -1 where the
    tail is empty; tail_lse [B] float64, -inf there). Each view draws from its own generator seeded
    [view_seed, TAIL_SEED_SALT], so the draw replays from the replay record whatever the batch."""
    a = np.where(known, -np.inf, logits16 / draw_T)
    top = a.max(1, keepdims=True)
    empty = ~np.isfinite(top[:, 0])
    top[empty] = 0.0
    e = np.exp(a - top)  # [B, C], 0 on known classes
    cdf = np.cumsum(e, 1)
    tail_lse = np.where(empty, -np.inf, top[:, 0] + np.log(np.where(empty, 1.0, cdf[:, -1])))
    ids = np.full((len(a), m), -1, dtype=np.int64)
    for b in np.flatnonzero(~empty):
        u = np.random.default_rng([int(view_seeds[b]), TAIL_SEED_SALT]).random(m) * cdf[b, -1]
        # first class whose cumulative mass exceeds u: never a known class (its mass adds nothing), never past C - 1
        ids[b] = np.searchsorted(cdf[b], u, side="right")
    return ids, tail_lse


def summarize(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, k: int,
              view_seeds: np.ndarray | None = None, tail: TailSpec = TailSpec()) -> dict:
    """logits [B, C] -> what the cache keeps of them: array name -> numpy in the array's dtype (cast in torch,
    so that a float16 rounds as the pass has always rounded it). With `tail.samples`, also the sampled tail
    (`draw_tail`; view_seeds [B] from the replay record) and log Z_T at `tail.temperatures`."""
    C = logits.shape[1]
    values, indices = logits.topk(k, dim=1)  # sorted, descending
    label_logits = torch.stack([logits.gather(1, labels[:, None])[:, 0],
                                logits.gather(1, partner_labels[:, None])[:, 0]], dim=1)
    out = {TOPK_VALUES: values, TOPK_INDICES: indices, LSE: torch.logsumexp(logits, dim=1), LABEL_LOGITS: label_logits}
    if tail.samples:
        known = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, indices, True)
        known.scatter_(1, labels[:, None], True).scatter_(1, partner_labels[:, None], True)
        z16 = logits.to(torch.float16).double().cpu().numpy()
        ids, tail_lse = draw_tail(z16, known.cpu().numpy(), view_seeds, tail.samples, tail.draw_temperature)
        tail_logits = np.take_along_axis(z16, np.maximum(ids, 0), 1) * (ids >= 0)
        out |= {TAIL_IDS: torch.from_numpy(ids), TAIL_LOGITS: torch.from_numpy(tail_logits),
                TAIL_LSE: torch.from_numpy(tail_lse)}
        if tail.temperatures:
            out[LOG_Z] = torch.stack([torch.logsumexp(logits.float() / t, dim=1) for t in tail.temperatures], 1)
    return {a.name: t.to(getattr(torch, a.dtype_for(C))).cpu().numpy() for a, t in out.items()}


class _UnitBuffer:
    """Teacher outputs of one unit, filled in any order, handed to the store when whole."""

    def __init__(self, shard: int, first: int, count: int, desc: CacheDescription):
        self.shard, self.first, self.count, self.epochs = shard, first, count, desc.epochs
        self.data = {}
        for a in desc.arrays:
            self.data[a.name] = np.full((desc.epochs, count, *desc.trailing_shape(a)), a.fill,
                                        dtype=a.dtype_for(desc.num_classes))
        self.seen = np.zeros((self.epochs, count), dtype=bool)
        self.digests = np.zeros((self.epochs, count), dtype=np.int64)
        self.expected = None

    def add(self, epoch: np.ndarray, pos: np.ndarray, values: dict, digests: np.ndarray) -> None:
        for name, v in values.items():
            self.data[name][epoch, pos] = v
        self.seen[epoch, pos] = True
        self.digests[epoch, pos] = digests

    def whole(self) -> bool:
        return self.expected is not None and int(self.seen.sum()) == self.expected

    def unit(self) -> Unit:
        skipped = (np.flatnonzero(~self.seen[0]) + self.first).tolist()
        digests = [views_digest(self.digests[e][self.seen[e]]) for e in range(self.epochs)]
        return Unit(self.shard, self.first, self.count, self.data, skipped, digests)


class UnitBatches(IterableDataset):
    """Teacher batches that never straddle a (unit, epoch). A row's float32 logits can depend on its
    position in the batch (CPU kernels treat the rows of a tail block differently, 1 ulp), so batches are
    cut per (unit, epoch): their contents, and the stored arrays, are then the same whatever the number
    of processes or data-loader workers."""

    def __init__(self, views: IterableDataset, batch_size: int):
        self.views, self.batch_size = views, batch_size

    def __iter__(self):
        buf: list[dict] = []
        for v in self.views:
            if buf and (len(buf) == self.batch_size or (v["shard"], v["epoch"]) != (buf[0]["shard"], buf[0]["epoch"])):
                yield default_collate(buf)
                buf = []
            buf.append(v)
        if buf:
            yield default_collate(buf)


def cache_teacher(cfg: CacheConfig) -> dict:
    """Run (or resume) the teacher pass; returns a summary dict. Raises Preempted (exit 75) after a stop signal,
    once the units in flight are written."""
    with active() as stop:  # before the loader starts: its workers inherit the handler
        return _cache_teacher(cfg, stop)


def _cache_teacher(cfg: CacheConfig, stop) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator()
    device = accelerator.device
    reader = ShardReader(cfg.data, cfg.split, on_error=cfg.on_error)
    reader.check_files(verify=accelerator.is_main_process)
    C = reader.manifest.num_classes
    if cfg.topk > C:
        raise UserError(f"--topk {cfg.topk} is larger than the {C} classes of {cfg.data}; use at most {C}")
    if cfg.recipe.mixes and reader.split.samples_per_shard < 2:
        raise UserError("mixing recipes need at least 2 samples per shard; recreate the shards with a "
                        "larger --shard-size")
    teachers = [Teacher.from_spec(spec, reader.manifest, cfg.recipe.input_size, device=device)
                for spec, _ in cfg.teachers]
    descs = [describe(cfg, reader, t, spec) for t, (spec, _) in zip(teachers, cfg.teachers, strict=True)]
    paths = [out for _, out in cfg.teachers]

    if accelerator.is_main_process:
        for path, desc in zip(paths, descs, strict=True):
            CacheStore.create(path, desc, overwrite=cfg.overwrite)
    accelerator.wait_for_everyone()
    stores = [CacheStore(path, mode="r+") for path in paths]
    # a unit counts done per store: the views of a unit are built when some store lacks it, and only the
    # teachers whose stores lack it run on them (a rerun completes each store where it is missing)
    dones = [store.done_units(check=True) for store in stores]  # a damaged marker is refused, not trusted
    num_units = stores[0].num_units
    todo = [u for u in range(num_units) if any(u not in done for done in dones)]
    accelerator.wait_for_everyone()  # everyone has read the same `done` before anyone marks more
    mine = todo[accelerator.process_index::accelerator.num_processes]

    stream = UnitViews(reader, cfg.recipe, cfg.views.seed, cfg.epochs, mine)
    loader = DataLoader(UnitBatches(stream, cfg.batch_size), batch_size=None, num_workers=min(cfg.workers, len(mine)),
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    total_views = sum(reader.split.shards[u].count for u in mine) * cfg.epochs
    buffers: dict[tuple[int, int], _UnitBuffer] = {}  # (teacher, shard) -> its outputs so far
    written, t0, finishing, stopped = 0, time.perf_counter(), None, False
    done_before = sum(len(d) for d in dones) // len(dones)
    names = ", ".join(spec.name for spec, _ in cfg.teachers)
    bar = Bar(cfg.progress and accelerator.is_local_main_process and total_views > 0, total_views,
               f"teacher {names} [{done_before}/{num_units} units done before]", unit="views")
    with bar:
        for batch in loader:
            in_flight = {shard for _, shard in buffers}
            if stop.requested:
                if finishing is None:
                    finishing = set(in_flight)  # the units in flight: finish these, start no other
                if not finishing & in_flight or time.monotonic() - stop.signal_time > cfg.stop_grace:
                    stopped = True
                    break
                if int(batch["shard"][0]) not in finishing:  # a batch holds one unit (UnitBatches)
                    continue
            views = batch["view"].to(device, non_blocking=True)
            replay = {a.name: batch[a.name].numpy().astype(a.dtype) for a in REPLAY}  # the views' replay record
            shard = int(batch["shard"][0])  # one unit per batch (UnitBatches)
            for i, (teacher, store, desc) in enumerate(zip(teachers, stores, descs, strict=True)):
                if shard in dones[i]:
                    continue
                logits = teacher(views)
                out = summarize(logits, batch["label"].to(device), batch["partner_label"].to(device), cfg.topk,
                                batch[VIEW_SEED.name].numpy(), cfg.tail) | replay
                if (i, shard) not in buffers:
                    info = reader.split.shards[shard]
                    buffers[i, shard] = _UnitBuffer(shard, info.first, info.count, desc)
                buf = buffers[i, shard]
                buf.expected = int(batch["n_valid"][0]) * cfg.epochs
                buf.add(batch["epoch"].numpy(), batch["index"].numpy() - buf.first, out, batch["digest"].numpy())
                if buf.whole():
                    try:
                        store.write_unit(buf.unit())
                    except OSError as e:  # disk full, quota, permissions: the unit stays unmarked
                        raise UserError(f"writing data shard {shard} to cache {store.path} failed ({e.strerror or e});"
                                        f" free space or fix the location, then rerun the same command: it resumes "
                                        f"after the {len(store.done_units())} complete units") from e
                    del buffers[i, shard]
            written += len(batch["shard"])
            bar.advance(len(batch["shard"]))
    if stopped:  # no collective from here: a rank that got no signal is stopped by its launcher
        print(f"stopped by {stop.name}: {min(len(s.done_units()) for s in stores)} of {num_units} units complete, "
              f"{len({shard for _, shard in buffers})} in flight left unmarked; rerun the same command to complete "
              f"the store (exit status {EXIT_PREEMPTED})", file=sys.stderr)
        raise Preempted("the teacher pass")
    if buffers:  # the stream ended with a unit short of views: a bug, never a silent partial unit
        raise RuntimeError(f"units {sorted(buffers)} ended incomplete; they were not marked done")
    elapsed = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    counts = accelerator.reduce(torch.tensor([written], device=device), reduction="sum")
    total = int(counts.item())
    n_views = max(1, stores[0].epochs * descs[0].dataset.num_samples)
    return {"store": str(cfg.out), "stores": [str(p) for p in paths], "views_written": total,
            "units_skipped_as_done": done_before, "units_total": num_units, "seconds": elapsed,
            "views_per_second": total / elapsed if elapsed > 0 else 0.0,
            "disk_bytes_per_view": sum(s.disk_bytes() for s in stores) / n_views,
            "raw_bytes_per_view": sum(d.raw_bytes_per_view for d in descs), "is_main": accelerator.is_main_process}

