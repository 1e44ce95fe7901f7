"""Streams of replayable views: per data shard, per epoch, as the teacher pass and the student see them.

`shard_views` is the one place a training view is made. Both stages call it with the same
(recipe, seed, epoch, shard samples) and get bit-identical tensors, whatever process, worker or
batch they run in. It needs the whole shard because mixing partners are other samples of it.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pipeline.augment import MIX_NONE, Recipe, base_view, eval_view, finish, mix, mix_record, view_seed
from pipeline.reader import Sample, ShardReader, assign_shards, current_worker, shard_order

Join = Callable[[int, int, int, list[dict]], list[dict]]


def library_versions() -> dict:
    """The libraries that make a view's pixels (decode, resize, augment): a replayed view is only
    bit-identical under the same ones."""
    import PIL
    import torchvision
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__}


def view_digest(view: torch.Tensor) -> int:
    """Fingerprint of a view's pixels as 8-bit values: CRC-32 (a checksum, not a cryptographic hash: it
    only has to notice accidental change, and at 224 px it costs about a fifth of blake2b)."""
    # numpy, not torch: on a busy machine torch's intra-op threads make these tiny ops cost milliseconds
    return zlib.crc32(np.rint(view.numpy() * 255).astype(np.uint8))


def views_digest(digests) -> str:
    """One fingerprint of a unit's views in one epoch, from their `view_digest`s in sample order."""
    return hashlib.blake2b(np.asarray(digests, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def shard_views(samples: list[Sample], recipe: Recipe, seed: int, epoch: int, first: int,
                count: int) -> Iterator[dict]:
    """Views of every sample of one shard in one epoch, in stored order.

    Each item: view [3, S, S] float, label, partner_label, lam, index, view_seed, partner, mix_mode,
    digest (of the view's pixels, see `view_digest`).
    """
    seeds = {s.index: view_seed(seed, epoch, s.index) for s in samples}
    bases = {s.index: base_view(s.image, recipe, seeds[s.index]) for s in samples}
    labels = {s.index: s.label for s in samples}
    for s in samples:
        rec = mix_record(recipe, seeds[s.index], s.index, first, count)
        while rec.partner >= 0 and rec.partner not in bases:  # partner skipped by the error policy
            rec.partner = first + (rec.partner - first + 1) % count
            if rec.partner == s.index:
                rec.partner, rec.lam, rec.mode = -1, 1.0, MIX_NONE
        own = finish(bases[s.index])
        mixed = rec.mode != MIX_NONE
        view = mix(own, finish(bases[rec.partner]) if mixed else None, rec)
        yield {"view": view, "label": s.label, "partner_label": labels[rec.partner] if mixed else s.label,
               "lam": rec.lam, "index": s.index, "view_seed": rec.view_seed,
               "partner": rec.partner, "mix_mode": rec.mode, "digest": view_digest(view)}


class UnitViews(IterableDataset):
    """Stage one: for each assigned unit (data shard), every epoch's views, decoding the shard once."""

    def __init__(self, reader: ShardReader, recipe: Recipe, seed: int, epochs: int, units: list[int]):
        self.reader, self.recipe, self.seed, self.epochs, self.units = reader, recipe, seed, epochs, units

    def __iter__(self):
        worker, workers = current_worker()
        for shard in self.units[worker::workers]:
            info = self.reader.split.shards[shard]
            samples = list(self.reader.read_shard(shard))
            for epoch in range(self.epochs):
                for v in shard_views(samples, self.recipe, self.seed, epoch, info.first, info.count):
                    yield {**v, "shard": shard, "epoch": epoch, "n_valid": len(samples)}


class TrainViews(IterableDataset):
    """Stage two: this rank's views of one training epoch, optionally joined with per-view extras.

    `set_epoch(e)` before iterating. Views are a function of the view seed `seed`; the order (shards,
    then a permutation within each shard) is a function of (order_seed, epoch), so students with
    different seeds see the same views in different orders. The views are those of `view_epoch`
    (= epoch modulo `view_epochs`), so they match what a teacher cache of that many epochs saw.

    `join(view_epoch, shard, first, views) -> [dict per view]` adds data to each view of a shard
    before shuffling (the teacher cache's targets: `cache.targets.CacheJoin`); the pipeline does not
    know what it adds.
    """

    def __init__(self, reader: ShardReader, recipe: Recipe, seed: int, rank: int = 0, world: int = 1,
                 join: Join | None = None, view_epochs: int | None = None, order_seed: int | None = None):
        self.reader, self.recipe, self.seed, self.rank, self.world = reader, recipe, seed, rank, world
        self.order_seed = seed if order_seed is None else order_seed  # the student's seed: data order only
        self.join = join
        self.view_epochs = view_epochs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def view_epoch(self) -> int:
        return self.epoch % self.view_epochs if self.view_epochs else self.epoch

    def shards_for(self, worker: int, workers: int) -> list[int]:
        order = shard_order(self.reader.num_shards, self.order_seed, self.epoch)
        return assign_shards(order, self.rank, self.world, worker, workers)

    def __iter__(self):
        worker, workers = current_worker()
        ve = self.view_epoch
        for shard in self.shards_for(worker, workers):
            info = self.reader.split.shards[shard]
            samples = list(self.reader.read_shard(shard))
            views = list(shard_views(samples, self.recipe, self.seed, ve, info.first, info.count))
            if self.join is not None:
                views = [v | extra for v, extra in zip(views, self.join(ve, shard, info.first, views), strict=True)]
            perm = np.random.default_rng([self.order_seed, self.epoch, shard, 0x7E]).permutation(len(views))
            for i in perm:
                yield views[i]


class EvalViews(IterableDataset):
    """Deterministic evaluation views of this rank's shards (no augmentation)."""

    def __init__(self, reader: ShardReader, recipe: Recipe, rank: int = 0, world: int = 1):
        self.reader, self.recipe, self.rank, self.world = reader, recipe, rank, world

    def __iter__(self):
        worker, workers = current_worker()
        for shard in assign_shards(list(range(self.reader.num_shards)), self.rank, self.world, worker, workers):
            for s in self.reader.read_shard(shard):
                yield {"view": eval_view(s.image, self.recipe), "label": s.label, "index": s.index}
