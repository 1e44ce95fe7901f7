"""Streams of replayable views: per data shard, per epoch, as the teacher pass and the student see them.

`shard_views` is the one place a training view is made. Both stages call it with the same
(recipe, seed, epoch, shard samples) and get bit-identical tensors, whatever process, worker or
batch they run in. It needs the whole shard because mixing partners are other samples of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pipeline.augment import MIX_NONE, Recipe, base_view, eval_view, finish, mix, mix_record, view_seed
from pipeline.errors import UserError
from pipeline.reader import Sample, ShardReader, assign_shards, current_worker, shard_order


def shard_views(samples: list[Sample], recipe: Recipe, seed: int, epoch: int, first: int,
                count: int) -> Iterator[dict]:
    """Views of every sample of one shard in one epoch, in stored order.

    Each item: view [3, S, S] float, label, partner_label, lam, index, view_seed, partner, mix_mode.
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
               "partner": rec.partner, "mix_mode": rec.mode}


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
    """Stage two: this rank's views of one training epoch, with cached teacher targets joined in.

    `set_epoch(e)` before iterating. Views are a function of the view seed `seed`; the order (shards,
    then a permutation within each shard) is a function of (order_seed, epoch), so students with
    different seeds see the same views in different orders. The views are those of `view_epoch`
    (= epoch modulo the cached epochs), so they match what the teacher saw.
    """

    def __init__(self, reader: ShardReader, recipe: Recipe, seed: int, rank: int = 0, world: int = 1,
                 cache=None, view_epochs: int | None = None, order_seed: int | None = None):
        self.reader, self.recipe, self.seed, self.rank, self.world = reader, recipe, seed, rank, world
        self.order_seed = seed if order_seed is None else order_seed  # the student's seed: data order only
        self.cache = cache
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
            targets = self._targets(views, ve, shard, info.first) if self.cache is not None else None
            perm = np.random.default_rng([self.order_seed, self.epoch, shard, 0x7E]).permutation(len(views))
            for i in perm:
                v = views[i]
                if targets is not None:
                    pos = v["index"] - info.first
                    v = {**v, "t_values": targets[0][pos], "t_indices": targets[1][pos], "t_lse": targets[2][pos],
                         "t_label_logits": targets[3][pos]}
                yield v

    def _targets(self, views: list[dict], epoch: int, shard: int, first: int) -> tuple:
        """One cached epoch of one unit as per-sample tensors, after checking its replay records
        against the views rebuilt here (vectorised: this runs once per shard, not per sample)."""
        t = self.cache.read_epoch(epoch, shard, names=("topk_values", "topk_indices", "lse", "label_logits",
                                                       "view_seed", "partner"))
        pos = np.array([v["index"] for v in views]) - first
        seeds = np.array([v["view_seed"] for v in views], dtype=np.uint32)
        partners = np.array([v["partner"] for v in views], dtype=np.int32)
        bad = np.flatnonzero((t["view_seed"][pos] != seeds) | (t["partner"][pos] != partners))
        if bad.size:
            raise UserError(
                f"cache {self.cache.path} holds a different view for sample {views[bad[0]]['index']} of epoch "
                f"{epoch} than this run rebuilds (replay record mismatch: another seed, recipe or tool version "
                f"made it); rebuild the cache with this version")
        return (torch.from_numpy(t["topk_values"].astype(np.float32)).unbind(0),
                torch.from_numpy(t["topk_indices"].astype(np.int64)).unbind(0),
                torch.from_numpy(t["lse"].astype(np.float32)).unbind(0),
                torch.from_numpy(t["label_logits"].astype(np.float32)).unbind(0))


class EvalViews(IterableDataset):
    """Deterministic evaluation views of this rank's shards (no augmentation)."""

    def __init__(self, reader: ShardReader, recipe: Recipe, rank: int = 0, world: int = 1):
        self.reader, self.recipe, self.rank, self.world = reader, recipe, rank, world

    def __iter__(self):
        worker, workers = current_worker()
        for shard in assign_shards(list(range(self.reader.num_shards)), self.rank, self.world, worker, workers):
            for s in self.reader.read_shard(shard):
                yield {"view": eval_view(s.image, self.recipe), "label": s.label, "index": s.index}
