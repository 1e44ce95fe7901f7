"""Stage one: run the teacher once over every replayable view and store its top-k in zarr.

Several teachers side by side (`--add-teacher`): each view is decoded and augmented once and every teacher runs
on it; each teacher has its own store (--out/<i>-<name>.zarr), identical to the one its single-teacher pass makes,
and a unit counts done per store (a rerun builds a unit's views if any store lacks it, and runs only the teachers
whose stores lack it).

    units = data shards not yet marked complete, split across processes (rank::world)
    for each unit: decode the shard once; for each cached epoch, build its views (pipeline.views),
        run the teacher (eval, no_grad, bf16 autocast on CUDA), keep what cache.summary makes of its
        logits (top-k log-probabilities + indices, log-sum-exp, both label classes' log-odds, optionally
        the logits' std and M tail classes drawn from the rest), and the replay record
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

from cache.format import REPLAY, VIEW_SEED, CacheDescription, DatasetRecord, TeacherRecord
from cache.store import CacheStore, Unit
from cache.summary import TailSpec, summarize
from cache.teacher import Teacher, TeacherSpec
from pipeline import collectives
from pipeline.augment import Recipe, ViewSpec
from pipeline.errors import UserError
from pipeline.location import Location
from pipeline.models import Weights
from pipeline.preempt import EXIT_PREEMPTED, Preempted, active, ignore_stop_signals
from pipeline.progress import Bar
from pipeline.provenance import code_label
from pipeline.reader import ShardReader
from pipeline.spec import choice_problems, group, mounted
from pipeline.views import UnitViews, library_versions, views_digest, worker_tempdir_problem


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
    """Classes whose teacher log-probabilities are kept per view (the largest)."""
    value_dtype: Literal["float16", "float32"] = "float16"
    """dtype of the kept log-probabilities: float16 (2 bytes each; rounding error |log p| x 2^-11 relative on each
    probability) or float32 (4 bytes; exact to float32)."""
    standardize: bool = False
    """Also keep each view's logit standard deviation (4 bytes per view), which `train-student --standardize`
    (logit standardization, Sun et al. CVPR 2024) needs."""
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
    standard_temperatures: list[float] | None = None
    """With --tail-samples and --standardize: the temperatures of the standardized logits that training may use;
    log Z and the label log-odds are stored for each (12 bytes per view each). On the raw logits such a T is
    T x their std: draw the tail at least that flat (--tail-draw-temperature) [default: 1 2]."""
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
        if self.standard_temperatures is not None and not (self.tail_samples and self.standardize):
            problems.append("--standard-temperatures describes the sampled tail of standardized logits; pass "
                            "--tail-samples M (M > 0) and --standardize, or drop it")
        if any(t <= 0 for t in [*(self.tail_temperatures or ()), *(self.standard_temperatures or ())]) or \
                (self.tail_draw_temperature or 1.0) <= 0:
            problems.append("tail temperatures must be > 0")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            problems.append(f"--workers must be >= 0, got {self.workers}")
        if sockets := worker_tempdir_problem(self.workers):
            problems.append(sockets)
        t = self.teacher
        if self.add_teacher and (t.classes or t.model_kwargs or t.input_size or t.mean or t.std
                                 or t.weights.pretrained or t.weights.pretrained_file):
            problems.append("--teacher-classes, --model-kwargs, --input-size, --mean, --std, --pretrained and "
                            "--pretrained-file "
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
        std_temps = [1.0, 2.0] if self.standard_temperatures is None else self.standard_temperatures
        return TailSpec(self.tail_samples, [t for t in temps if t != 1.0], float(draw),
                        sorted({float(t) for t in std_temps}) if self.standardize else [])


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
        tail_temperatures=cfg.tail.temperatures, tail_draw_temperature=cfg.tail.draw_temperature, versions=versions(),
        value_dtype=cfg.value_dtype, standardize=cfg.standardize, standard_temperatures=cfg.tail.standard_temperatures)


class _UnitBuffer:
    """Teacher outputs of one unit, filled in any order, handed to the store when whole."""

    def __init__(self, shard: int, first: int, count: int, desc: CacheDescription):
        self.shard, self.first, self.count, self.epochs = shard, first, count, desc.epochs
        self.data = {}
        for a in desc.arrays:
            self.data[a.name] = np.full((desc.epochs, count, *desc.trailing_shape(a)), a.fill,
                                        dtype=desc.dtype(a))
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
        return TeacherPass(cfg).run(stop)


class TeacherPass:
    """One process's share of the pass: its teachers and their stores, the units it owns, and the outputs of the
    units in flight (`buffers`)."""

    def __init__(self, cfg: CacheConfig):
        from accelerate import Accelerator

        self.cfg, self.accelerator = cfg, Accelerator()
        self.device = self.accelerator.device
        self.reader = reader = ShardReader(cfg.data, cfg.split, on_error=cfg.on_error)
        reader.check_files(verify=self.accelerator.is_main_process)
        C = reader.manifest.num_classes
        if cfg.topk > C:
            raise UserError(f"--topk {cfg.topk} is larger than the {C} classes of {cfg.data}; use at most {C}")
        if cfg.recipe.mixes and reader.split.samples_per_shard < 2:
            raise UserError("mixing recipes need at least 2 samples per shard; recreate the shards with a "
                            "larger --shard-size")
        self.teachers = [Teacher.from_spec(spec, reader.manifest, cfg.recipe.input_size, device=self.device)
                         for spec, _ in cfg.teachers]
        self.descs = [describe(cfg, reader, t, spec) for t, (spec, _) in zip(self.teachers, cfg.teachers, strict=True)]
        self.paths = [out for _, out in cfg.teachers]
        self.buffers: dict[tuple[int, int], _UnitBuffer] = {}  # (teacher, shard) -> its outputs so far
        self._open_stores()

    def _open_stores(self) -> None:
        """Create (or reopen) every store, then split the units some store lacks across the processes."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            for path, desc in zip(self.paths, self.descs, strict=True):
                CacheStore.create(path, desc, overwrite=self.cfg.overwrite)
        accelerator.wait_for_everyone()
        self.stores = [CacheStore(path, mode="r+") for path in self.paths]
        # a unit counts done per store: the views of a unit are built when some store lacks it, and only the
        # teachers whose stores lack it run on them (a rerun completes each store where it is missing)
        self.dones = [store.done_units(check=True) for store in self.stores]  # a damaged marker is refused
        self.num_units = self.stores[0].num_units
        todo = [u for u in range(self.num_units) if any(u not in done for done in self.dones)]
        accelerator.wait_for_everyone()  # everyone has read the same `done` before anyone marks more
        self.mine = todo[accelerator.process_index::accelerator.num_processes]

    def run(self, stop) -> dict:
        """Every unit this process owns, batch by batch; on a stop signal, finish the units in flight (within
        --stop-grace) and raise Preempted."""
        cfg, reader, mine = self.cfg, self.reader, self.mine
        stream = UnitViews(reader, cfg.recipe, cfg.views.seed, cfg.epochs, mine)
        loader = DataLoader(UnitBatches(stream, cfg.batch_size), batch_size=None,
                            num_workers=min(cfg.workers, len(mine)), pin_memory=self.device.type == "cuda",
                            worker_init_fn=ignore_stop_signals)
        total_views = sum(reader.split.shards[u].count for u in mine) * cfg.epochs
        written, t0, finishing, stopped = 0, time.perf_counter(), None, False
        self.done_before = sum(len(d) for d in self.dones) // len(self.dones)
        names = ", ".join(spec.name for spec, _ in cfg.teachers)
        bar = Bar(cfg.progress and self.accelerator.is_local_main_process and total_views > 0, total_views,
                  f"teacher {names} [{self.done_before}/{self.num_units} units done before]", unit="views")
        with bar:
            for batch in loader:
                in_flight = {shard for _, shard in self.buffers}
                if stop.requested:
                    if finishing is None:
                        finishing = set(in_flight)  # the units in flight: finish these, start no other
                    if not finishing & in_flight or time.monotonic() - stop.signal_time > cfg.stop_grace:
                        stopped = True
                        break
                    if int(batch["shard"][0]) not in finishing:  # a batch holds one unit (UnitBatches)
                        continue
                self.add_batch(batch)
                written += len(batch["shard"])
                bar.advance(len(batch["shard"]))
        if stopped:  # no collective from here: a rank that got no signal is stopped by its launcher
            print(f"stopped by {stop.name}: {min(len(s.done_units()) for s in self.stores)} of {self.num_units} "
                  f"units complete, {len({shard for _, shard in self.buffers})} in flight left unmarked; rerun the "
                  f"same command to complete the store (exit status {EXIT_PREEMPTED})", file=sys.stderr)
            raise Preempted("the teacher pass")
        if self.buffers:  # the stream ended with a unit short of views: a bug, never a silent partial unit
            raise RuntimeError(f"units {sorted(self.buffers)} ended incomplete; they were not marked done")
        return self.summary(written, time.perf_counter() - t0)

    def add_batch(self, batch: dict) -> None:
        """Run every teacher whose store lacks the batch's unit on its views, and write each unit made whole."""
        cfg = self.cfg
        views = batch["view"].to(self.device, non_blocking=True)
        replay = {a.name: batch[a.name].numpy().astype(a.dtype) for a in REPLAY}  # the views' replay record
        shard = int(batch["shard"][0])  # one unit per batch (UnitBatches)
        for i, teacher in enumerate(self.teachers):
            if shard in self.dones[i]:
                continue
            logits = teacher(views)
            out = summarize(logits, batch["label"].to(self.device), batch["partner_label"].to(self.device), cfg.topk,
                            batch[VIEW_SEED.name].numpy(), cfg.tail, cfg.value_dtype, cfg.standardize) | replay
            if (i, shard) not in self.buffers:
                info = self.reader.split.shards[shard]
                self.buffers[i, shard] = _UnitBuffer(shard, info.first, info.count, self.descs[i])
            buf = self.buffers[i, shard]
            buf.expected = int(batch["n_valid"][0]) * cfg.epochs
            buf.add(batch["epoch"].numpy(), batch["index"].numpy() - buf.first, out, batch["digest"].numpy())
            if buf.whole():
                self._write(self.stores[i], buf)
                del self.buffers[i, shard]

    @staticmethod
    def _write(store: CacheStore, buf: _UnitBuffer) -> None:
        try:
            store.write_unit(buf.unit())
        except OSError as e:  # disk full, quota, permissions: the unit stays unmarked
            raise UserError(f"writing data shard {buf.shard} to cache {store.path} failed ({e.strerror or e}); free "
                            f"space or fix the location, then rerun the same command: it resumes after the "
                            f"{len(store.done_units())} complete units") from e

    def summary(self, written: int, elapsed: float) -> dict:
        """What the pass did, over every process: views written, their rate, bytes per view."""
        accelerator, stores, descs = self.accelerator, self.stores, self.descs
        accelerator.wait_for_everyone()
        counts = collectives.reduce(torch.tensor([written], device=self.device), "sum")
        total = int(counts.item())
        n_views = max(1, stores[0].epochs * descs[0].dataset.num_samples)
        return {"store": str(self.cfg.out), "stores": [str(p) for p in self.paths], "views_written": total,
                "units_skipped_as_done": self.done_before, "units_total": self.num_units, "seconds": elapsed,
                "views_per_second": total / elapsed if elapsed > 0 else 0.0,
                "disk_bytes_per_view": sum(s.disk_bytes() for s in stores) / n_views,
                "raw_bytes_per_view": sum(d.raw_bytes_per_view for d in descs), "is_main": accelerator.is_main_process}
