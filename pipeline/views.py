"""Streams of replayable views: per data shard, per epoch, as the teacher pass and the student see them.

`shard_views` is the one place a training view is made. Both stages call it with the same
(recipe, view seed, view epoch, shard samples) and get bit-identical tensors, whatever process, worker or
batch they run in. It needs the whole shard because mixing partners are other samples of it.

The streams are compositions of the stages in `pipeline.stages`: `TrainViews` (the student's: one training epoch,
or a group of them, joined with the teacher cache, shuffled, resumable), `UnitViews` (the teacher pass's: every
view epoch of each of its data shards) and `EvalViews` (evaluation, no augmentation).

Seeds and epochs, one meaning each: the *view seed* (`view_seed`) and the *view epoch* decide the views; the
*order seed* (`order_seed`) and the *training epoch* (`epoch`) decide their order. The view epoch of training epoch
e is e modulo the view epochs (the teacher cache's epochs), so a student replays the views the teacher saw. Each
view's own seed (`vseed`, its field `view_seed` in the replay record) is drawn from the view seed, view epoch and
sample index (`pipeline.augment.seed_of_view`).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import tempfile
import weakref
import zlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.augment import Recipe, erase, preserved_globals, seed_of_view
from pipeline.errors import UserError
from pipeline.preempt import ignore_stop_signals
from pipeline.reader import Sample, ShardReader, assign_shards, current_worker, shard_order
from pipeline.stages import (
    Join,
    join_views,
    loader_position,
    permuted,
    resume_needed,
    shuffle_units,
    skip_items,
    trimmed,
    unit_items,
    units_of,
)
from pipeline.transforms import MIX_NONE, base_view, eval_view, mix, mix_record, to_view

VIEW_CHUNK = 16  # views made between two yields of `shard_views` (16 float views at 224 px: 9.6 MB)


def library_versions() -> dict:
    """The libraries that make a view's pixels (decode, resize, augment): a replayed view is only
    bit-identical under the same ones."""
    import PIL
    import timm
    import torchvision
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "numpy": np.__version__, "timm": timm.__version__}


def view_digest(view: torch.Tensor, clip: bool = False) -> int:
    """Fingerprint of a view's pixels as 8-bit values: CRC-32 (a checksum, not a cryptographic hash: it
    only has to notice accidental change, and at 224 px it costs about a fifth of blake2b).

    `clip`: the view may leave [0, 1] (timm's erasing noise), so clip before the 8-bit cast; only recipes
    that erase pay for it (a fifth of the digest at 224 px)."""
    # numpy, not torch: on a busy machine torch's intra-op threads make these tiny ops cost milliseconds
    q = np.rint(view.numpy() * 255)
    return zlib.crc32((np.clip(q, 0, 255, out=q) if clip else q).astype(np.uint8))


def views_digest(digests) -> str:
    """One fingerprint of a unit's views in one epoch, from their `view_digest`s in sample order."""
    return hashlib.blake2b(np.asarray(digests, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def shard_views(samples: list[Sample], recipe: Recipe, view_seed: int, view_epoch: int, first: int,
                count: int) -> Iterator[dict]:
    """Views of every sample of one shard in one view epoch, in stored order (`first`, `count`: the shard's first
    global index and its sample count in the manifest).

    Each item: view [3, S, S] float, label, partner_label, lam, index, view_seed, partner, mix_mode,
    digest (of the view's pixels, see `view_digest`).
    """
    seeds = {s.index: seed_of_view(view_seed, view_epoch, s.index) for s in samples}
    with preserved_globals():  # timm's ops reseed the global generators: save them once for the whole shard
        bases = {s.index: base_view(s, recipe, seeds[s.index]) for s in samples}  # each decoded for its crop
    labels = {s.index: s.label for s in samples}

    def view(s: Sample) -> dict:
        rec = mix_record(recipe, seeds[s.index], s.index, first, count)
        while rec.partner >= 0 and rec.partner not in bases:  # partner skipped by the error policy
            rec.partner = first + (rec.partner - first + 1) % count
            if rec.partner == s.index:
                rec.partner, rec.lam, rec.mode = -1, 1.0, MIX_NONE
        own = to_view(bases[s.index])
        mixed = rec.mode != MIX_NONE
        # erased after mixing, as timm's loader does it (its collate mixes, then the prefetcher erases)
        m = mix(own, bases[rec.partner] if mixed else None, rec, inplace=True)
        v = erase(m, recipe, rec.view_seed)
        return {"view": v, "label": s.label, "partner_label": labels[rec.partner] if mixed else s.label,
                "lam": rec.lam, "index": s.index, "view_seed": rec.view_seed,
                "partner": rec.partner, "mix_mode": rec.mode,
                "digest": view_digest(v, clip=v is not m)}  # only an erased view can leave [0, 1]

    for i in range(0, len(samples), VIEW_CHUNK):
        with preserved_globals():  # erasing reseeds them too: saved once per chunk, restored before yielding
            chunk = [view(s) for s in samples[i:i + VIEW_CHUNK]]
        yield from chunk


SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path (Linux: 108 with the terminating NUL)
SOCKET_SUFFIX = len("/pymp-XXXXXXXX/listener-XXXXXXXX")  # what multiprocessing adds to the temporary folder


def worker_tempdir_problem(workers: int) -> str | None:
    """Loader workers hand each batch over through a Unix socket in the temporary folder (torch's file-descriptor
    sharing: multiprocessing's resource sharer listens at TMPDIR/pymp-*/listener-*). Where that path is too long
    for a socket, the worker's queue thread prints a traceback and drops the batch, and the loop waits for it
    forever: the sentence that says so up front, or None."""
    if workers < 1 or torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return None
    tmp = tempfile.gettempdir()
    size = len(os.fsencode(tmp))
    if size + SOCKET_SUFFIX <= SOCKET_PATH_MAX:
        return None
    return (f"the temporary folder {tmp} ({size} bytes) is too long a path for the loader workers' "
            f"sockets (at most {SOCKET_PATH_MAX - SOCKET_SUFFIX}); set TMPDIR to a shorter folder, or pass --workers 0")


class TrainViews(IterableDataset):
    """Stage two: this rank's views of one training epoch, optionally joined with per-view extras.

    `set_epoch(e)` before iterating (or take `loader(e, ...)`). Views are a function of the view seed
    `view_seed`; the order (shards, then a permutation within each shard) is a function of (order_seed,
    epoch), so students with different order seeds see the same views in different orders. The views of training
    epoch `epoch` are those of its view epoch (= epoch modulo `view_epochs`), so they match what a teacher cache
    of that many epochs saw.

    Every rank must take the same number of steps (a collective waits otherwise), and a view must not
    depend on how batches are split: the stream owns both rules. Shards are assigned to ranks and
    workers explicitly (`pipeline.reader.assign_shards`), and `steps(epoch, ...)` is the number of
    full batches every rank can make.

    A position in an epoch is one number, the batches taken so far: `loader(epoch, ..., start=i)`
    replays the epoch from batch i without making the first i (`resume_plan` is the one place that
    maps a position to what each data-loader worker skips; extend it there if a worker's stream
    changes shape).

    Several epochs per decode (`epochs_per_decode` G > 1; FKD's multi-crop idea on a replayable cache): training
    epochs are grouped [gG, gG + G) (the last group ends at `epochs`). A group is one stream: each worker reads
    each of its shards once (the group's shard order is its first epoch's) and makes that shard's views of each
    of the group's view epochs in turn (a unit = (shard, epoch): the same views, joined with the same cached
    targets and checks, as G = 1 makes; mixing partners from the same shard and epoch), each unit permuted as
    G = 1 permutes it; the units then pass through a shuffle buffer of one shard's views (`window_shuffle`), so a
    batch mixes the views of several epochs of a shard (and of consecutive shards) rather than G copies of an
    image. Memory per worker: at most the buffer plus the unit entering it (2 shards' views; G = 1 holds 1)
    and the shard's decoded images (each sample decoded once per JPEG reduction its G crops ask for): measured
    by bench/loader_memory.py, about 2.2 MB per image of a shard at G > 1 (1.1 MB at G = 1) at 224 px.
    A training epoch is then a count of batches of the group's stream, not one pass over one cached epoch:
    the loop takes `steps(e)` batches for epoch e, equal to G = 1's (trimmed from the group's last epochs only
    where uneven shards leave the group's stream fewer full batches), and a position is counted from the
    group's start: `loader(e, ..., start)` with start = batches of the group's earlier epochs + those of e
    taken. Every view of the group is made once and stepped at most once; which views of the group fall into
    which of its epochs is the shuffle's. G = 1 is the same stream with a group of one epoch and a buffer of 0.

    `join` (a `pipeline.stages.Join`: the teacher cache's targets, `cache.targets.CacheJoin`) adds data to each
    view of a unit before shuffling; the pipeline does not know what it adds.
    """

    def __init__(self, reader: ShardReader, recipe: Recipe, view_seed: int, rank: int = 0, world: int = 1,
                 join: Join | None = None, view_epochs: int | None = None, order_seed: int | None = None,
                 epochs_per_decode: int = 1, epochs: int | None = None):
        self.reader, self.recipe, self.view_seed, self.rank, self.world = reader, recipe, view_seed, rank, world
        self.order_seed = view_seed if order_seed is None else order_seed  # the student's seed: data order only
        self.join = join
        self.view_epochs = view_epochs
        if epochs_per_decode < 1:
            raise UserError(f"--epochs-per-decode must be at least 1, got {epochs_per_decode}")
        if view_epochs and epochs_per_decode > view_epochs:
            raise UserError(f"--epochs-per-decode {epochs_per_decode} is more than the {view_epochs} view epochs "
                            f"(the cache's): a group would make the same views twice; use at most {view_epochs}")
        self.per_decode, self.epochs = epochs_per_decode, epochs
        self.epoch = 0
        self._skip: list[int] = []  # views each worker role skips at the epoch's start (see `loader`)
        self._rotate = 0
        self._live: _Continued | None = None  # G > 1: the group stream the last `loader` call handed out

    @property
    def join(self) -> Join | None:
        return self._join

    @join.setter
    def join(self, join: Join | None) -> None:
        if join is not None and not isinstance(join, Join):
            raise TypeError(f"a join is a pipeline.stages.Join (called per unit, with read-ahead: `prefetch`), "
                            f"not a {type(join).__name__}")
        self._join = join

    def set_epoch(self, epoch: int) -> None:
        """The training epoch that iterating this stream gives (with its group, at G > 1)."""
        self.epoch = epoch

    @property
    def view_epoch(self) -> int:
        return self.view_epoch_of(self.epoch)

    def view_epoch_of(self, epoch: int) -> int:
        """The view epoch (the cached epoch) of training epoch `epoch`."""
        return epoch % self.view_epochs if self.view_epochs else epoch

    def group(self, epoch: int) -> range:
        """The training epochs that share `epoch`'s stream (one decode): [gG, gG + G), cut at `epochs`."""
        first = epoch - epoch % self.per_decode
        end = first + self.per_decode if self.epochs is None else min(first + self.per_decode, self.epochs)
        return range(first, max(end, epoch + 1))  # (an epoch past `epochs` is still its own stream's)

    def _order(self, epoch: int) -> list[int]:
        return shard_order(self.reader.num_shards, self.order_seed, epoch)

    def shards(self, worker: int, workers: int) -> list[int]:
        """The data shards that loader worker `worker` of `workers` reads for the current epoch's group, in order."""
        return assign_shards(self._order(self.group(self.epoch).start), self.rank, self.world, worker, workers)

    def workers_for(self, epoch: int, workers: int, rank: int | None = None) -> int:
        """Data-loader workers a rank uses in an epoch: no more than it has shards (0: in-process)."""
        rank = self.rank if rank is None else rank
        return max(0, min(workers, len(self._order(epoch)[rank::self.world])))

    def _batches(self, order: list[int], passes: int, batch_size: int, workers: int, rank: int) -> list[int]:
        """Full batches each loader worker of `rank` makes from `passes` views of each of its shards in `order`."""
        counts = [s.count for s in self.reader.split.shards]
        w = max(1, min(workers, len(order[rank::self.world])))
        return [sum(counts[s] for s in assign_shards(order, rank, self.world, k, w)) * passes // batch_size
                for k in range(w)]

    def steps(self, epoch: int, batch_size: int, workers: int) -> int:
        """Full batches every rank can make in this epoch (each worker batches its own shards); with several
        epochs per decode, G = 1's count, trimmed from the group's last epochs where its stream holds fewer."""
        def one(e: int) -> int:
            return min(sum(self._batches(self._order(e), 1, batch_size, workers, r)) for r in range(self.world))
        if self.per_decode == 1:
            return one(epoch)
        group = self.group(epoch)
        room = min(sum(self._batches(self._order(group.start), len(group), batch_size, workers, r))
                   for r in range(self.world))
        return trimmed([one(e) for e in group], room)[epoch - group.start]

    def worker_batches(self, epoch: int, batch_size: int, workers: int) -> list[int]:
        """Full batches each of this rank's loader workers makes in an epoch's stream (one entry in-process);
        with several epochs per decode, in its group's stream."""
        group = self.group(epoch)
        return self._batches(self._order(group.start), len(group), batch_size, workers, self.rank)

    def resume_plan(self, epoch: int, batch_size: int, workers: int, start: int) -> tuple[list[int], int]:
        """Where the loader stands after `start` batches of an epoch (of its group's stream) -> (batches each
        worker has made, the worker that makes batch `start`): `pipeline.stages.loader_position` of the workers'
        batch counts (exact: `read_shard` refuses a shard whose sample count differs from the manifest's; under
        --on-error skip a dropped sample can shift it)."""
        return loader_position(self.worker_batches(epoch, batch_size, workers), start)

    def loader(self, epoch: int, batch_size: int, workers: int, pin_memory: bool = False,
               start: int = 0) -> DataLoader | _Continued:
        """This rank's batches of one epoch (full batches only; take `steps(...)` of them on every rank),
        from batch `start` on: the same batches, in the same order, as batches start, start + 1, ... of
        the uninterrupted loader, without making the first `start` (mid-epoch resume).

        With several epochs per decode, the batches of the epoch's group's stream, `start` counted from the
        group's start; asked for where the previous loader of the same group stopped (the group's next epoch),
        it hands back that stream to go on with (its workers kept alive through evaluation: nothing remade)."""
        self.set_epoch(epoch)
        if self.per_decode == 1:
            return self._loader(epoch, batch_size, workers, pin_memory, start)
        key = (self.group(epoch).start, batch_size, workers, pin_memory)
        if self._live is None or self._live.key != key or self._live.taken != start:
            if self._live is not None:
                self._live.close()
            self._live = _Continued(key, self._loader(epoch, batch_size, workers, pin_memory, start), start)
        return self._live

    def _loader(self, epoch: int, batch_size: int, workers: int, pin_memory: bool, start: int) -> DataLoader:
        done, first = self.resume_plan(epoch, batch_size, workers, start) if start else ([], 0)
        # Each worker skips the views of the batches it made before `start`; the workers' roles rotate so
        # that the worker that made batch `start` is asked first, and the turn then goes on as it did.
        self._skip = [d * batch_size for d in done]
        self._rotate = first
        return DataLoader(self, batch_size=batch_size, num_workers=self.workers_for(epoch, workers),
                          drop_last=True, pin_memory=pin_memory, worker_init_fn=ignore_stop_signals,
                          generator=torch.Generator())  # its seed draw must not move the global RNG (resume)

    def __iter__(self) -> Iterator[dict]:
        """One loader worker's stream of the current epoch's group: its shards' units made in turn, shuffled, the
        first views (those of the batches this worker made before the loader's `start`) left out; a unit none of
        whose views comes after them is not made, nor its shard read if none of the shard's units is."""
        worker, workers = current_worker()
        role = (worker + self._rotate) % workers  # the uninterrupted loader's worker this one stands in for
        skip = self._skip[role] if self._skip else 0
        group = self.group(self.epoch)
        todo = units_of(self.shards(role, workers), group)
        sizes = [self.reader.split.shards[shard].count for shard, _ in todo]
        # G = 1: each unit's views in its own order; G > 1: mixed through a buffer of one shard's views
        buffer = max(s.count for s in self.reader.split.shards) if self.per_decode > 1 else 0

        def rng() -> np.random.Generator:
            return np.random.default_rng([self.order_seed, group.start, self.rank, role, 0x6B])
        needed = [True] * len(todo)
        if skip and self.reader.on_error == "raise":  # sizes are the manifest's: plan the skip on them alone
            needed = resume_needed(sizes, buffer, rng(), skip)
        self._prefetch([shard for (shard, _), need in zip(todo, needed, strict=True) if need], group)
        made = unit_items(todo, lambda shard: list(self.reader.read_shard(shard)), self._unit, needed)
        made = (views if views is not None else [None] * n for views, n in zip(made, sizes, strict=True))
        yield from skip_items(shuffle_units(made, buffer, rng()), skip)

    def _prefetch(self, shards: list[int], group: range) -> None:
        """Read these shards ahead, in this order, and the join's rows of them where the group's epochs share one
        view epoch (the join's read-ahead follows one view epoch)."""
        shards = list(dict.fromkeys(shards))
        self.reader.prefetch(shards)
        view_epochs = {self.view_epoch_of(epoch) for epoch in group}
        if self.join is not None and len(view_epochs) == 1:
            self.join.prefetch(view_epochs.pop(), shards)

    def _unit(self, shard: int, epoch: int, samples: list[Sample]) -> list[dict]:
        """The views of one shard in training epoch `epoch` (its view epoch's), joined, in the epoch's order."""
        info, view_epoch = self.reader.split.shards[shard], self.view_epoch_of(epoch)
        views = list(shard_views(samples, self.recipe, self.view_seed, view_epoch, info.first, info.count))
        views = join_views(views, self.join, view_epoch, shard, info.first)
        return permuted(views, np.random.default_rng([self.order_seed, epoch, shard, 0x7E]))


class _Continued:
    """A group's loader handed out across the group's epochs: each `iter` goes on where the last one stopped,
    and `taken` counts the batches handed out since the group's start."""

    def __init__(self, key: tuple, loader: DataLoader, taken: int):
        self.key, self.loader, self.taken, self._it = key, loader, taken, None
        _OPEN.add(self)

    def __iter__(self):
        if self._it is None:
            self._it = iter(self.loader)
        for batch in self._it:
            self.taken += 1
            yield batch

    def close(self) -> None:
        """Stop the loader's workers now (torch's own shutdown, which dropping the last reference also runs)."""
        it, self._it = self._it, None
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


_OPEN: weakref.WeakSet[_Continued] = weakref.WeakSet()


@atexit.register  # registered after torch's and multiprocessing's exit handlers, so it runs before them
def _close_open_streams() -> None:
    """A multi-worker loader left half-read at interpreter exit hangs the exit (measured with torch 2.14: a plain
    DataLoader iterator too); a group's stream is left so at the end of a run or on a stop signal."""
    for stream in list(_OPEN):
        stream.close()


class UnitViews(IterableDataset):
    """Stage one: for each assigned unit (data shard), every view epoch's views, decoding the shard once."""

    def __init__(self, reader: ShardReader, recipe: Recipe, view_seed: int, view_epochs: int, units: list[int]):
        self.reader, self.recipe, self.view_seed = reader, recipe, view_seed
        self.view_epochs, self.units = view_epochs, units

    def __iter__(self) -> Iterator[dict]:
        worker, workers = current_worker()
        shards = self.units[worker::workers]
        self.reader.prefetch(shards)
        todo = units_of(shards, range(self.view_epochs))
        for views in unit_items(todo, lambda shard: list(self.reader.read_shard(shard)), self._views):
            yield from views

    def _views(self, shard: int, view_epoch: int, samples: list[Sample]) -> Iterator[dict]:
        info = self.reader.split.shards[shard]
        for v in shard_views(samples, self.recipe, self.view_seed, view_epoch, info.first, info.count):
            yield {**v, "shard": shard, "epoch": view_epoch, "n_valid": len(samples)}


class EvalViews(IterableDataset):
    """Deterministic evaluation views of this rank's shards (no augmentation), read one image at a time."""

    def __init__(self, reader: ShardReader, recipe: Recipe, rank: int = 0, world: int = 1):
        self.reader, self.recipe, self.rank, self.world = reader, recipe, rank, world

    def __iter__(self) -> Iterator[dict]:
        worker, workers = current_worker()
        shards = assign_shards(list(range(self.reader.num_shards)), self.rank, self.world, worker, workers)
        self.reader.prefetch(shards)
        for shard in shards:
            for s in self.reader.read_shard(shard):
                yield {"view": eval_view(s, self.recipe), "label": s.label, "index": s.index}
