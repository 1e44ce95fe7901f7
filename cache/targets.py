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
k = C nothing is approximated. This tail is biased: which class holds which tail logit is lost.

Sampled tail (`cache-teacher --tail-samples M`, `TeacherTargets.distribution`): the pass also draws M
tail classes j_1..j_M per view, with replacement, from r_j = exp(z_j / T_d - tail_lse), the teacher's
distribution at the draw temperature T_d restricted to the tail (the classes outside top-k and labels),
and stores their fp16 logits, tail_lse and log Z_T = logsumexp(z / T) over all C for each recorded T.
Training then knows the teacher's log-probability z_j / T - log Z_T exactly on every known and sampled
class and gives each class a weight
    scale_j = 1 (known),  count_j / (M r_j) (sampled count_j times),  0 (other tail classes).
count_j ~ Binomial(M, r_j), so E[scale_j] = 1 for every class: any per-class sum sum_j scale_j h(p_j, q_j)
(every loss here: see students.losses) is an unbiased importance-sampling estimate of the exact sum, and
so is its gradient w.r.t. the student logits. Var[scale_j] = (1 - r_j) / (M r_j): the loss's variance is
(1/M) times the variance, over tail classes drawn from r, of h_j / r_j: it falls as 1/M, is small when the
tail holds little of the loss's weight, and stays bounded when r is at least as flat as the loss's tail
terms (T_d >= the training temperature; a sharper r leaves rare classes with huge weights). The known
terms (top-k, labels, p_target, DKD's 1 - p_target) stay exact. What is not exact: the fp16 rounding of
the stored logits, as for top-k.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cache.distribution import TeacherDist
from cache.format import (
    LABEL_LOGITS,
    LOG_Z,
    LSE,
    PARTNER,
    TAIL,
    TAIL_IDS,
    TAIL_LOGITS,
    TAIL_LSE,
    TEACHER_OUTPUTS,
    TOPK_INDICES,
    TOPK_VALUES,
    VIEW_SEED,
    CacheRequest,
)
from cache.store import CacheStore
from pipeline.augment import Recipe
from pipeline.errors import UserError
from pipeline.provenance import config_hash
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


FILLER_LOG_P = -80.0  # log p of unsampled tail classes: finite (their scale is 0, and 0 * inf would be NaN)


def sampled_distribution(values: torch.Tensor, indices: torch.Tensor, label_classes: torch.Tensor,
                         label_logits: torch.Tensor, tail_ids: torch.Tensor, tail_logits: torch.Tensor,
                         tail_lse: torch.Tensor, log_z: torch.Tensor, T: float, draw_T: float,
                         num_classes: int) -> TeacherDist:
    """The teacher at temperature T from a sampled-tail cache (module docstring): values/indices [B, k],
    label_classes/label_logits [B, m], tail_ids/tail_logits [B, M] (ids -1: no tail), tail_lse [B], log_z [B]
    (log Z_T) -> TeacherDist of [B, C]."""
    B, M, C = values.shape[0], tail_ids.shape[1], num_classes
    dev = values.device
    valid = (tail_ids >= 0) & torch.isfinite(tail_lse)[:, None]
    ids = torch.where(valid, tail_ids, C)  # invalid draws land in a spare column C, dropped below
    z = torch.zeros(B, C + 1, dtype=torch.float32, device=dev)
    scale = torch.zeros(B, C + 1, dtype=torch.float32, device=dev)
    z.scatter_(1, ids, tail_logits.float())
    w = torch.exp(tail_lse[:, None].float() - tail_logits.float() / draw_T) / M  # 1 / (M r_j) per draw
    scale.scatter_add_(1, ids, torch.where(valid, w, 0.0))
    z, scale = z[:, :C], scale[:, :C]
    z.scatter_(1, indices, values.float())
    z.scatter_(1, label_classes, label_logits.float())  # exact label logits win over fp16 top-k copies
    scale.scatter_(1, indices, 1.0).scatter_(1, label_classes, 1.0)  # known classes are never drawn
    log_p = torch.where(scale > 0, z / T - log_z[:, None].float(), FILLER_LOG_P)
    return TeacherDist(log_p, scale)


class TeacherTargets(NamedTuple):
    """The cached teacher outputs of one view (or, collated, of a batch: a leading [B] dimension). A store
    without tail samples gives empty tail fields ([0], and tail_lse NaN)."""

    values: torch.Tensor  # [k] float: the k largest logits, descending
    indices: torch.Tensor  # [k] int64: their classes
    lse: torch.Tensor  # [] float: log-sum-exp of all C logits
    label_logits: torch.Tensor  # [2] float: logits of the view's label and of its mixing partner's label
    tail_ids: torch.Tensor  # [M] int64: sampled tail classes (-1: none)
    tail_logits: torch.Tensor  # [M] float: their logits
    tail_lse: torch.Tensor  # [] float: log-partition of the draw over the tail
    log_z: torch.Tensor  # [t] float: log Z_T at the store's tail temperatures

    def to(self, device, non_blocking: bool = False) -> TeacherTargets:
        return TeacherTargets(*(t.to(device, non_blocking=non_blocking) for t in self))

    @classmethod
    def from_arrays(cls, t: dict[str, np.ndarray], temperatures: int = 0) -> TeacherTargets:
        """A batch from arrays as the store holds them (name -> [B, ...]: read back, or `summarize`'s output);
        without tail arrays the tail fields are empty ([B, 0], tail_lse NaN, log_z [B, temperatures] zeros)."""
        def get(a, dtype, empty):
            return torch.from_numpy(t[a.name].astype(dtype)) if a.name in t else empty
        n = len(t[LSE.name])
        return cls(get(TOPK_VALUES, np.float32, None), get(TOPK_INDICES, np.int64, None),  # int64: scatter/gather
                   get(LSE, np.float32, None), get(LABEL_LOGITS, np.float32, None),
                   get(TAIL_IDS, np.int64, torch.zeros(n, 0, dtype=torch.int64)),
                   get(TAIL_LOGITS, np.float32, torch.zeros(n, 0)),
                   get(TAIL_LSE, np.float32, torch.full((n,), torch.nan)),
                   get(LOG_Z, np.float32, torch.zeros(n, temperatures)))

    def logits(self, label: torch.Tensor, partner_label: torch.Tensor, num_classes: int) -> torch.Tensor:
        """[B] labels -> the teacher's full logits [B, C], with the uniform tail of the module docstring."""
        labels = torch.stack([label, partner_label], 1)
        return reconstruct_logits(self.values, self.indices, self.lse, labels, self.label_logits, num_classes)

    def distribution(self, label: torch.Tensor, partner_label: torch.Tensor, num_classes: int, T: float,
                     temperatures: list[float], draw_T: float) -> TeacherDist:
        """[B] labels -> the teacher at T with the sampled tail (module docstring); `temperatures`: those of the
        store's log_z, T one of them or 1."""
        log_z = self.lse if T == 1.0 else self.log_z[:, temperatures.index(T)]
        labels = torch.stack([label, partner_label], 1)
        return sampled_distribution(self.values, self.indices, labels, self.label_logits, self.tail_ids,
                                    self.tail_logits, self.tail_lse, log_z, T, draw_T, num_classes)


class CacheJoin:
    """`TrainViews` join: one cached epoch of one unit as per-view `TeacherTargets` (under `key`), after checking
    that the views rebuilt here are the ones the teacher saw (vectorised: runs once per shard, not per view)."""

    def __init__(self, store: CacheStore, key: str = TEACHER_KEY):
        self.store, self.key = store, key
        held = store.description.arrays  # the arrays a join reads: the teacher's outputs, the tail if any, the replay
        self.names = tuple(a.name for a in (*TEACHER_OUTPUTS, *TAIL, VIEW_SEED, PARTNER) if a in held)

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
        batch = TeacherTargets.from_arrays({name: a[pos] for name, a in t.items()},
                                           len(store.description.tail_temperatures))
        return [{self.key: TeacherTargets(*row)} for row in zip(*batch, strict=True)]

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

    def __init__(self, path: str | Path, key: str = TEACHER_KEY):
        self.key = key  # the batch key of its targets (an ensemble's members have one each)
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
        self.join = CacheJoin(self.store, key)

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
        """A collated batch of `views()` -> the teacher's logits [B, C] for its views, on the batch's device
        (the tail spread uniformly, even when the store holds tail samples: see `source` for those)."""
        return batch[self.key].logits(batch["label"], batch["partner_label"], self.num_classes)

    def source(self, T: float):
        """What the losses take at temperature T, as a function of a collated batch: the teacher's logits
        (`logits`) for a store without tail samples, else its sampled-tail `TeacherDist` at T. A temperature
        whose log Z_T the store does not hold is refused now."""
        d = self.description
        if not d.tail_samples:
            return self.logits
        if float(T) not in d.temperatures:
            raise UserError(f"cache {self.path} holds its sampled tail at temperatures "
                            f"{', '.join(f'{t:g}' for t in d.temperatures)}, not at --temperature {T:g}; train at "
                            f"one of those, or rebuild the cache with --tail-temperatures including {T:g}")
        temps = [float(t) for t in d.tail_temperatures]
        return lambda batch: batch[self.key].distribution(batch["label"], batch["partner_label"],
                                                             self.num_classes, float(T), temps,
                                                             d.tail_draw_temperature)

    @property
    def width(self) -> int:
        """The teacher's feature width (num_features), which OFA heads project to."""
        return self.description.teacher.num_features

    def teacher_attrs(self) -> dict | list[dict]:
        """The teacher record, as a run's config.json keeps it."""
        return self.description.teacher.to_attrs()

    def identity(self) -> list[dict]:
        """What a run records of the store it trained from: where, a hash of all its attributes (teacher, data,
        views, contents, versions) and the commit that made it."""
        return [{"path": str(self.path), "id": config_hash(self.store.attrs),
                 "code": self.description.versions.get("code"),
                 "teacher_sha256": self.description.teacher.checkpoint_sha256}]


class EnsembleJoin:
    """`TrainViews` join of several caches of the same views: each member's targets under its own key."""

    def __init__(self, joins: list[CacheJoin]):
        self.joins = joins

    def __call__(self, epoch: int, shard: int, first: int, views: list[dict]) -> list[dict]:
        out = [{} for _ in views]
        for join in self.joins:
            for o, extra in zip(out, join(epoch, shard, first, views), strict=True):
                o.update(extra)
        return out

    def prefetch(self, epoch: int, shards: list[int]) -> None:
        for join in self.joins:  # every member's rows ahead, as for one cache
            join.prefetch(epoch, shards)


class TeacherEnsemble:
    """Several complete caches of the same views (dataset, split, recipe, view seed, epochs, classes, corrupt-
    sample policy) as one teacher, for teachers cached side by side (`cache-teacher` with several --teacher) or
    one at a time. Member i's targets travel under key `teacher` (i = 0) or `teacher.i`; `source(T)` mixes them:

        prob:  p = sum_i w_i softmax(z_i / T), handed to the losses as the logits T log p (their log_softmax at T
               gives back log p exactly), so every loss sees the mixture of the teachers' distributions at T
        logit: z = sum_i w_i z_i, the losses then take softmax(z / T) as for one teacher

    with z_i each member's full logits (the top-k reconstruction, `TeacherTargets.logits`) and weights w_i >= 0
    normalised to sum 1. Stores with a sampled tail are refused: their per-class weights (`scale`) differ per
    teacher, and no loss here is linear in p through its log p terms, so a mix of unbiased per-teacher estimates
    would not be an unbiased estimate of the mixture's loss."""

    def __init__(self, paths: list[str | Path], weights: list[float] | None = None, mode: str = "prob"):
        if weights is not None and len(weights) != len(paths):
            raise UserError(f"--teacher-weights gives {len(weights)} weights for {len(paths)} caches; give one "
                            f"weight per --cache, in the same order")
        if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
            raise UserError(f"--teacher-weights {weights} must be >= 0 with a positive sum")
        self.members = [CachedTeacher(p, TEACHER_KEY if i == 0 else f"{TEACHER_KEY}.{i}") for i, p in enumerate(paths)]
        first = self.members[0]
        want = first.description.request()
        want = CacheRequest(manifest_hash=want.manifest_hash, split=want.split, recipe=want.recipe, seed=want.seed,
                            epochs=want.epochs, num_classes=want.num_classes)
        for m in self.members[1:]:
            problems = m.description.mismatches(want, theirs=f"in {first.path}")
            if m.on_error != first.on_error:
                problems.append(f"corrupt-sample policy is {m.on_error}, in {first.path} {first.on_error}")
            if problems:
                raise UserError(f"caches {first.path} and {m.path} do not hold the same views ({m.path}: "
                                f"{problems[0]}); cache every teacher with the same --data, --split, --recipe, "
                                f"--seed and --epochs (one `cache-teacher` run with several --teacher does)")
        sampled = [m.path for m in self.members if m.description.tail_samples]
        if sampled:
            raise UserError(f"cache {sampled[0]} holds a sampled tail, which an ensemble cannot mix without bias (each "
                            f"teacher's tail weights differ); train from it alone, or cache its teacher without "
                            f"--tail-samples for the ensemble")
        w = [1.0] * len(paths) if weights is None else [float(x) for x in weights]
        self.weights = [x / sum(w) for x in w]
        self.mode = mode
        self.recipe, self.seed, self.epochs = first.recipe, first.seed, first.epochs
        self.num_classes, self.split, self.on_error = first.num_classes, first.split, first.on_error
        self.join = EnsembleJoin([m.join for m in self.members])

    @property
    def width(self) -> int:
        """OFA heads project to the widest teacher's feature width (a head's width is a capacity choice: no
        teacher feature is matched, only the teachers' logits)."""
        return max(m.width for m in self.members)

    def teacher_attrs(self) -> list[dict]:
        return [{**m.teacher_attrs(), "ensemble_weight": w} for m, w in zip(self.members, self.weights, strict=True)]

    def identity(self) -> list[dict]:
        return [i for m in self.members for i in m.identity()]

    def logits(self, batch: dict, T: float = 1.0) -> torch.Tensor:
        """A collated batch -> the ensemble's logits [B, C] at temperature T (class docstring)."""
        zs = torch.stack([m.logits(batch) for m in self.members])  # [n, B, C]
        w = torch.tensor(self.weights, device=zs.device)[:, None, None]
        if self.mode == "logit":
            return (w * zs).sum(0)
        log_p = torch.logsumexp(torch.log(w) + torch.log_softmax(zs / T, dim=2), dim=0)  # [B, C], log of the mix
        # a probability that underflowed to 0 (log -inf) would make the losses' p log p terms 0 * inf = NaN
        return T * log_p.clamp(min=FILLER_LOG_P)

    def source(self, T: float):
        """What the losses take at temperature T: the ensemble's logits (`logits`)."""
        return lambda batch: self.logits(batch, float(T))
