"""The read side of the teacher cache for training loops (what the store holds is defined in cache.format).

    teacher = CachedTeacher("runs/demo/teacher.zarr")           # checks the store is complete
    views = teacher.views("runs/demo/data", epoch=0)            # the exact views the teacher saw
    for batch in DataLoader(views, batch_size=64, num_workers=2):
        t_logits = teacher.logits(batch)                        # [B, C] teacher logits for those views

`CacheJoin` attaches one `TeacherTargets` per view (key `TEACHER_KEY`) inside the data pipeline,
after checking that the views rebuilt here are the ones the teacher saw (replay record and pixel
fingerprint); the default collate batches them into one `TeacherTargets` of [B, ...] tensors.

Reconstruction (`TeacherTargets.logits`): the cache holds, per view, the top-k logits z_1..z_k, the
log-sum-exp L of all C logits, and the exact logits of the view's label classes. Known classes (top-k
and label classes) keep their logits; the remaining C - n_known classes share the leftover mass
equally, each getting
    z_tail = L + log(1 - sum_known exp(z_i - L)) - log(C - n_known).
At T = 1 this reproduces the known probabilities and the tail's total mass exactly; at other
temperatures the tail's shape is an approximation (its total is what top-k cannot tell). With
k = C nothing is approximated.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cache.format import LABEL_LOGITS, LSE, PARTNER, TEACHER_OUTPUTS, TOPK_INDICES, TOPK_VALUES, VIEW_SEED, CacheRequest
from cache.store import CacheStore
from pipeline.augment import Recipe
from pipeline.errors import UserError
from pipeline.reader import ShardReader
from pipeline.views import TrainViews, library_versions, views_digest

TEACHER_KEY = "teacher"


def reconstruct_logits(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
                       label_classes: torch.Tensor, label_logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """values/indices [B, k], lse [B], label_classes/label_logits [B, m] -> full logits [B, C] (float32)."""
    B = values.shape[0]
    known = torch.zeros(B, num_classes, dtype=torch.bool, device=values.device)
    z = torch.zeros(B, num_classes, dtype=torch.float32, device=values.device)
    z.scatter_(1, indices, values.float())
    known.scatter_(1, indices, True)
    z.scatter_(1, label_classes, label_logits.float())  # exact label logits win over fp16 top-k copies
    known.scatter_(1, label_classes, True)
    n_tail = num_classes - known.sum(1)  # [B]
    lse_known = torch.logsumexp(z.masked_fill(~known, float("-inf")), dim=1)
    frac = torch.exp(lse_known - lse.float()).clamp(max=1.0 - 1e-6)
    z_tail = lse.float() + torch.log1p(-frac) - torch.log(n_tail.clamp(min=1).float())
    return torch.where(known, z, z_tail[:, None])


class TeacherTargets(NamedTuple):
    """The cached teacher outputs of one view (or, collated, of a batch: a leading [B] dimension)."""

    values: torch.Tensor  # [k] float: the k largest logits, descending
    indices: torch.Tensor  # [k] int64: their classes
    lse: torch.Tensor  # [] float: log-sum-exp of all C logits
    label_logits: torch.Tensor  # [2] float: logits of the view's label and of its mixing partner's label

    def to(self, device, non_blocking: bool = False) -> TeacherTargets:
        return TeacherTargets(*(t.to(device, non_blocking=non_blocking) for t in self))

    def logits(self, label: torch.Tensor, partner_label: torch.Tensor, num_classes: int) -> torch.Tensor:
        """[B] labels -> the teacher's full logits [B, C], rebuilt as the module docstring says."""
        labels = torch.stack([label, partner_label], 1)
        return reconstruct_logits(self.values, self.indices, self.lse, labels, self.label_logits, num_classes)


class CacheJoin:
    """`TrainViews` join: one cached epoch of one unit as per-view `TeacherTargets`, after checking that
    the views rebuilt here are the ones the teacher saw (vectorised: runs once per shard, not per view)."""

    def __init__(self, store: CacheStore):
        self.store = store
        self.names = tuple(a.name for a in (*TEACHER_OUTPUTS, VIEW_SEED, PARTNER))  # the arrays a join reads

    def __call__(self, epoch: int, shard: int, first: int, views: list[dict]) -> list[dict]:
        store = self.store
        t = store.read_epoch(epoch, shard, names=self.names)
        pos = np.array([v["index"] for v in views]) - first
        # the replay record as the views rebuilt here have it (a view's fields are named as the arrays)
        seeds = np.array([v[VIEW_SEED.name] for v in views], dtype=VIEW_SEED.dtype)
        partners = np.array([v[PARTNER.name] for v in views], dtype=PARTNER.dtype)
        bad = np.flatnonzero((t[VIEW_SEED.name][pos] != seeds) | (t[PARTNER.name][pos] != partners))
        if bad.size:
            raise UserError(
                f"cache {store.path} holds a different view for sample {views[bad[0]]['index']} of epoch "
                f"{epoch} than this run rebuilds (replay record mismatch: another seed, recipe or tool version "
                f"made it); rebuild the cache with this version")
        self._check_pixels(epoch, shard, views)
        values = torch.from_numpy(t[TOPK_VALUES.name][pos].astype(np.float32))
        indices = torch.from_numpy(t[TOPK_INDICES.name][pos].astype(np.int64))  # what scatter/gather index with
        lse = torch.from_numpy(t[LSE.name][pos].astype(np.float32))
        label_logits = torch.from_numpy(t[LABEL_LOGITS.name][pos].astype(np.float32))
        return [{TEACHER_KEY: TeacherTargets(*row)} for row in zip(values, indices, lse, label_logits, strict=True)]

    def prefetch(self, epoch: int, shards: list[int]) -> None:
        self.store.prefetch(epoch, shards, self.names)  # object stores: these units' rows ahead, in this order

    def _check_pixels(self, epoch: int, shard: int, views: list[dict]) -> None:
        recorded = self.store.unit_info(shard).view_digests[epoch]
        if views_digest([v["digest"] for v in views]) != recorded:
            then = {k: v for k, v in self.store.description.versions.items() if k in library_versions()}
            raise UserError(
                f"the views of data shard {shard}, epoch {epoch}, rebuilt here differ pixel for pixel from those the "
                f"teacher saw in cache {self.store.path} (libraries then: {then}; installed: {library_versions()}); "
                f"install the recorded versions or rebuild the cache")


class CachedTeacher:
    """A complete teacher cache as a training loop sees it: its views, and the teacher's logits for them.

    This is the Python API for your own training loop (the README shows one); `cli.py train-student`
    uses it too.
    """

    def __init__(self, path: str | Path):
        self.store = CacheStore(path)
        self.store.check_complete()
        self.description = d = self.store.description
        self.path = self.store.path
        self.recipe = Recipe.from_dict(d.recipe)
        self.seed, self.epochs, self.num_classes = d.seed, d.epochs, d.num_classes
        self.split, self.on_error = d.dataset.split, d.on_error
        classes = d.teacher.classes  # the teacher's label space, already restricted to the dataset's
        if classes and len(classes["indices"]) != self.num_classes:
            raise UserError(f"cache {self.path} maps {len(classes['indices'])} classes onto its teacher but holds "
                            f"{self.num_classes}; the store is damaged: rebuild it with `cli.py cache-teacher`")
        self.join = CacheJoin(self.store)

    def reader(self, data: str | Path, on_error: str | None = None) -> ShardReader:
        """The training split of `data`, refused unless it is the dataset the cache was made from."""
        reader = ShardReader(data, self.split, on_error=on_error or self.on_error)
        self.store.check_request(CacheRequest(manifest_hash=reader.manifest.split_hash(self.split)))
        return reader

    def views(self, data: str | Path | ShardReader, epoch: int = 0, *, rank: int = 0, world: int = 1,
              order_seed: int = 0) -> TrainViews:
        """The views of training epoch `epoch` (cached epoch `epoch % epochs`), each with key `TEACHER_KEY`."""
        reader = data if isinstance(data, ShardReader) else self.reader(data)
        views = TrainViews(reader, self.recipe, self.seed, rank, world, join=self.join,
                           view_epochs=self.epochs, order_seed=order_seed)
        views.set_epoch(epoch)
        return views

    def logits(self, batch: dict) -> torch.Tensor:
        """A collated batch of `views()` -> the teacher's logits [B, C] for its views, on the batch's device."""
        return batch[TEACHER_KEY].logits(batch["label"], batch["partner_label"], self.num_classes)
