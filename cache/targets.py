"""The read side of the teacher cache for training loops (what the store holds is defined in cache.format).

    teacher = CachedTeacher("runs/demo/teacher.zarr")           # checks the store is complete
    views = teacher.views("runs/demo/data", epoch=0)            # the exact views the teacher saw
    for batch in DataLoader(views, batch_size=64, num_workers=2):
        t_logits = teacher.logits(batch)                        # [B, C] teacher logits for those views

`CacheJoin` attaches one `TeacherTargets` per view (key `TEACHER_KEY`) inside the data pipeline,
after checking that the views rebuilt here are the ones the teacher saw (replay record and pixel
fingerprint); the default collate batches them into one `TeacherTargets` of [B, ...] tensors.

Reconstruction (`TeacherTargets.logits`): the cache holds, per view, the teacher's log-probabilities
v_1..v_k of its top-k classes (v = z - L, L the log-sum-exp of all C logits, also kept), and the label
classes' log-odds a_c = log((1 - p_c) / p_c), from which log p_c and log(1 - p_c) are exact. Known classes
(top-k and label classes) keep their values; the remaining C - n_known classes share the leftover mass
equally, each getting
    v_tail = log(1 - p_label - sum_{known j != label} p_j) - log(C - n_known),
computed from the label's exact 1 - p_label, so that it keeps its precision for confident teachers; the
logits are v + L. At T = 1 this reproduces the known probabilities and the tail's total mass exactly; at
other temperatures the tail's shape is an approximation (its total is what top-k cannot tell). With k = C
nothing is approximated. This tail is biased: which class holds which tail logit is lost.

Sampled tail (`cache-teacher --tail-samples M`, `TeacherTargets.distribution`): the pass also draws M
tail classes j_1..j_M per view, with replacement, from r_j = exp(v_j / T_d - tail_lse), the teacher's
distribution at the draw temperature T_d restricted to the tail (the classes outside top-k and labels),
and stores their values, tail_lse, and for each recorded temperature T (a slot) log Z_T = logsumexp(v / T)
over all C and the label classes' log-odds at T. Training then knows the teacher's log-probability
v_j / T - log Z_T on every known and sampled class (the label classes' from their log-odds) and gives each
class a weight
    scale_j = 1 (known),  count_j / (M r_j) (sampled count_j times),  0 (other tail classes).
count_j ~ Binomial(M, r_j), so E[scale_j] = 1 for every class: any per-class sum sum_j scale_j h(p_j, q_j)
(every loss here: see students.losses) is an unbiased importance-sampling estimate of the exact sum, and
so is its gradient w.r.t. the student logits. Var[scale_j] = (1 - r_j) / (M r_j): the loss's variance is
(1/M) times the variance, over tail classes drawn from r, of h_j / r_j: it falls as 1/M, is small when the
tail holds little of the loss's weight, and stays bounded when r is at least as flat as the loss's tail
terms (T_d >= the training temperature; a sharper r leaves rare classes with huge weights). The known
terms (top-k, labels, p_target, DKD's 1 - p_target) stay exact. What is not exact: the rounding of the
stored values in float16 (|log p_j| x 2^-11 relative on p_j; none with --value-dtype float32).

Logit standardization (`train-student --standardize`, a store made with `--standardize`): the losses
z-score the teacher's logits per view before the temperature, which is softmax(z / T_eff) with
T_eff = T (std + 1e-7) (cache.distribution.effective_temperature; the mean is a shift, which softmax
drops). The store keeps each view's std; with a sampled tail, its standardized temperature slots hold
log Z and the label log-odds at T_eff, so the estimate stays exact on known classes and unbiased.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cache.distribution import (
    FILLER_LOG_P,
    TeacherDist,
    dist_of_logits,
    effective_temperature,
    mix,
    reconstruct_log_p,
    reconstruct_logits,
    sampled_distribution,
)
from cache.format import (
    LABEL_LOG_ODDS,
    LOG_Z,
    LOGIT_STD,
    LSE,
    PARTNER,
    STANDARD,
    TAIL,
    TAIL_IDS,
    TAIL_LABEL_LOG_ODDS,
    TAIL_LSE,
    TAIL_VALUES,
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


class TeacherTargets(NamedTuple):
    """The cached teacher outputs of one view (or, collated, of a batch: a leading [B] dimension), as
    cache.format's arrays. A store without tail samples gives empty tail fields ([0], tail_lse NaN); one without
    --standardize a NaN logit_std."""

    values: torch.Tensor  # [k] float: log-probabilities of the k largest classes, descending
    indices: torch.Tensor  # [k] int64: their classes
    lse: torch.Tensor  # [] float: log-sum-exp of all C logits
    label_log_odds: torch.Tensor  # [2] float: log-odds against the view's label and its mixing partner's label
    logit_std: torch.Tensor  # [] float: standard deviation of the logits
    tail_ids: torch.Tensor  # [M] int64: sampled tail classes (-1: none)
    tail_values: torch.Tensor  # [M] float: their log-probabilities
    tail_lse: torch.Tensor  # [] float: log-partition of the draw over the tail
    log_z: torch.Tensor  # [t] float: log Z at each tail temperature slot
    tail_label_log_odds: torch.Tensor  # [t, 2] float: label_log_odds at each slot

    def to(self, device, non_blocking: bool = False) -> TeacherTargets:
        return TeacherTargets(*(t.to(device, non_blocking=non_blocking) for t in self))

    @classmethod
    def from_arrays(cls, t: dict[str, np.ndarray], slots: int = 0) -> TeacherTargets:
        """A batch from arrays as the store holds them (name -> [B, ...]: read back, or `summarize`'s output);
        arrays the store lacks give the empty fields of the class docstring (log_z [B, slots] zeros)."""
        def get(a, dtype, empty):
            return torch.from_numpy(t[a.name].astype(dtype)) if a.name in t else empty
        n = len(t[LSE.name])
        return cls(get(TOPK_VALUES, np.float32, None), get(TOPK_INDICES, np.int64, None),  # int64: scatter/gather
                   get(LSE, np.float32, None), get(LABEL_LOG_ODDS, np.float32, None),
                   get(LOGIT_STD, np.float32, torch.full((n,), torch.nan)),
                   get(TAIL_IDS, np.int64, torch.zeros(n, 0, dtype=torch.int64)),
                   get(TAIL_VALUES, np.float32, torch.zeros(n, 0)),
                   get(TAIL_LSE, np.float32, torch.full((n,), torch.nan)),
                   get(LOG_Z, np.float32, torch.zeros(n, slots)),
                   get(TAIL_LABEL_LOG_ODDS, np.float32, torch.zeros(n, slots, 2)))

    def logits(self, label: torch.Tensor, partner_label: torch.Tensor, num_classes: int) -> torch.Tensor:
        """[B] labels -> the teacher's full logits [B, C], with the uniform tail of the module docstring."""
        labels = torch.stack([label, partner_label], 1)
        return reconstruct_logits(self.values, self.indices, self.lse, labels, self.label_log_odds, num_classes)

    def distribution(self, label: torch.Tensor, partner_label: torch.Tensor, num_classes: int, T: float,
                     temperatures: list[float], draw_T: float, standardize: bool = False,
                     standard_temperatures: list[float] = ()) -> TeacherDist:
        """[B] labels -> the teacher at T with the sampled tail (module docstring), of the raw logits or (with
        `standardize`) of the standardized ones; `temperatures` and `standard_temperatures`: the store's slots
        (its tail_temperatures and standard_temperatures), T one of the asked kind's, or raw 1."""
        labels = torch.stack([label, partner_label], 1)
        if not standardize and T == 1.0:
            log_z, odds, T_eff = torch.zeros_like(self.lse), self.label_log_odds, 1.0
        else:
            i = len(temperatures) + list(standard_temperatures).index(T) if standardize else temperatures.index(T)
            log_z, odds = self.log_z[:, i], self.tail_label_log_odds[:, i]
            T_eff = effective_temperature(T, self.logit_std) if standardize else T
        return sampled_distribution(self.values, self.indices, labels, odds, self.tail_ids, self.tail_values,
                                    self.tail_lse, log_z, T_eff, draw_T, num_classes)

    def standardized(self, label: torch.Tensor, partner_label: torch.Tensor, num_classes: int,
                     T: float) -> TeacherDist:
        """[B] labels -> the teacher's standardized logits at T from a store without a sampled tail: the uniform-tail
        reconstruction at T_eff = T (std + 1e-7), std the one the store kept (exact at k = C)."""
        labels = torch.stack([label, partner_label], 1)
        v = reconstruct_log_p(self.values, self.indices, labels, self.label_log_odds, num_classes)
        return dist_of_logits(v, effective_temperature(T, self.logit_std), labels)


class CacheJoin:
    """`TrainViews` join: one cached epoch of one unit as per-view `TeacherTargets` (under `key`), after checking
    that the views rebuilt here are the ones the teacher saw (vectorised: runs once per shard, not per view)."""

    def __init__(self, store: CacheStore, key: str = TEACHER_KEY):
        self.store, self.key = store, key
        held = store.description.arrays  # the arrays a join reads: the teacher's outputs, the tail if any, the replay
        self.names = tuple(a.name for a in (*TEACHER_OUTPUTS, *STANDARD, *TAIL, VIEW_SEED, PARTNER) if a in held)

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
        batch = TeacherTargets.from_arrays({name: a[pos] for name, a in t.items()}, len(store.description.slots))
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

    def source(self, T: float, standardize: bool = False, nonlinearity: str | None = None):
        """What the losses take at temperature T, as a function of a collated batch: the teacher's logits
        (`logits`) for a store without tail samples, else its sampled-tail `TeacherDist` at T; with `standardize`
        (logit standardization), the `TeacherDist` of the standardized logits at T. A store that lacks what T or
        `standardize` needs is refused now. (`nonlinearity` concerns ensembles only: one teacher's estimate is
        unbiased for every loss.)"""
        d, key, C = self.description, self.key, self.num_classes
        if standardize and not d.standardize:
            raise UserError(f"cache {self.path} does not hold its teacher's logit standard deviations, which "
                            f"--standardize needs; rebuild it with `cli.py cache-teacher ... --standardize`")
        if not d.tail_samples:
            if standardize:
                return lambda batch: batch[key].standardized(batch["label"], batch["partner_label"], C, float(T))
            return self.logits
        held = d.standard_temperatures if standardize else d.temperatures
        if float(T) not in held:
            what, flag = ("standardized logits", "--standard-temperatures") if standardize else ("logits",
                                                                                               "--tail-temperatures")
            raise UserError(f"cache {self.path} holds its sampled tail for {what} at temperatures "
                            f"{', '.join(f'{t:g}' for t in held) or 'none'}, not at --temperature {T:g}; train at "
                            f"one of those, or rebuild the cache with {flag} including {T:g}")
        temps, std_temps = [float(t) for t in d.tail_temperatures], [float(t) for t in d.standard_temperatures]
        return lambda batch: batch[key].distribution(batch["label"], batch["partner_label"], C, float(T), temps,
                                                     d.tail_draw_temperature, standardize, std_temps)

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
    normalised to sum 1.

    Stores with a sampled tail mix in prob mode only, as `cache.distribution.mix`: each class gets the weight
    p_j = sum_i w_i scale_ij p_ij, an unbiased estimate of the mixture's p_j, so the losses linear in the teacher's
    probabilities (KD, DKD, paper-form OFA, released-form OFA with gamma 1) keep an unbiased gradient and, up to
    the teacher's own entropy terms (constant for the student), an unbiased value. Refused, because no estimate
    from per-teacher samples can be unbiased: logit mode (the mix of logits needs every teacher's logit of every
    class) and a loss nonlinear in p (released-form OFA with gamma != 1: p_j^gamma). With --standardize in prob
    mode, each teacher's standardized distribution is mixed the same way."""

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
        self.sampled = [m.path for m in self.members if m.description.tail_samples]
        if self.sampled and mode == "logit":
            raise UserError(f"cache {self.sampled[0]} holds a sampled tail, which --ensemble logit cannot mix without "
                            f"bias: the mixed logits sum_i w_i z_i need every teacher's logit of every class, while a "
                            f"sampled class is known only to the teacher that drew it, with a weight that makes its "
                            f"probability, not its logit, unbiased; use --ensemble prob, or caches without "
                            f"--tail-samples")
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

    def source(self, T: float, standardize: bool = False, nonlinearity: str | None = None):
        """What the losses take at temperature T: the ensemble's logits (`logits`), or, in prob mode with sampled
        tails or `standardize`, the mixture of the members' `TeacherDist`s (class docstring). `nonlinearity`: why
        the loss is not linear in the teacher's probabilities (None: it is), which a sampled tail cannot mix."""
        T = float(T)
        if self.mode == "logit" or not (self.sampled or standardize):
            return lambda batch: self.logits(batch, T)  # logit mode: the losses standardize the mixed logits
        if self.sampled and nonlinearity:
            raise UserError(f"cache {self.sampled[0]} holds a sampled tail, and {nonlinearity}, which is not linear "
                            f"in the teacher's probabilities: each teacher's tail classes carry their own weights, "
                            f"and only a loss linear in p mixes those unbiased estimates into an unbiased one; use "
                            f"--ofa-form paper or --gamma 1, or caches without --tail-samples")
        sources = [m.source(T, standardize) for m in self.members]

        def mixed(batch: dict) -> TeacherDist:
            labels = torch.stack([batch["label"], batch["partner_label"]], 1)
            dists = [d if isinstance(d := s(batch), TeacherDist) else dist_of_logits(d, T, labels) for s in sources]
            return mix(dists, self.weights)
        return mixed
