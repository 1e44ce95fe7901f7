"""The stages of a view stream, each a small function or generator on plain values (webdataset's manner).

One data-loader worker's stream of training views (`pipeline.views.TrainViews`) is

    shard_order -> assign_shards -> units_of -> unit_items(read, make) -> shuffle_units -> skip_items

shard order: a permutation of the data shards, a function of (order seed, training epoch) (`pipeline.reader`);
rank/worker assignment: this rank's and worker's share of it (`pipeline.reader`); units_of: (data shard, training
epoch) pairs, each shard's epochs in turn; read and views per unit: one read of a shard serves its consecutive
units, each made into its views (`pipeline.views.shard_views`), joined with the cache (`join_views`) and permuted
(`permuted`); window shuffle: the units' items through a shuffle buffer (`window_shuffle`; a buffer of 0 passes
them in order); resume skip: the first items of the stream left out (`skip_items`), the units all of whose items
are among them not made at all (`resume_needed`). The teacher pass's stream (`pipeline.views.UnitViews`) is
units_of -> unit_items, every view epoch of each shard in turn.

A unit's items and every stage's order are functions of the stage's arguments alone (the random ones take a
generator), so a stream can be rebuilt, and a resumed one planned, in any process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

T = TypeVar("T")


@runtime_checkable
class Join(Protocol):
    """Data added to each view of a unit before the views are shuffled (the teacher cache's targets:
    `cache.targets.CacheJoin`, or an ensemble's `EnsembleJoin`); the pipeline does not know what it adds."""

    def __call__(self, view_epoch: int, shard: int, first: int, views: list[dict], /) -> list[dict]:
        """One dict per view of data shard `shard` (whose first sample has global index `first`) in view epoch
        `view_epoch`, in the views' order."""

    def prefetch(self, view_epoch: int, shards: list[int], /) -> None:
        """Start fetching what the calls for these shards of `view_epoch` will read, in this order (an object
        store's read-ahead; what the calls return does not change)."""


def units_of(shards: Iterable[int], epochs: Iterable[int]) -> list[tuple[int, int]]:
    """The units (data shard, epoch) of a stream: each shard's epochs in turn, so that one read makes them all."""
    epochs = list(epochs)
    return [(shard, epoch) for shard in shards for epoch in epochs]


def unit_items(units: Sequence[tuple[int, int]], read: Callable[[int], list], make: Callable[[int, int, list], T],
               needed: Sequence[bool] | None = None) -> Iterator[T | None]:
    """make(shard, epoch, samples) of each unit in turn (None for a unit that `needed` says is not), where
    samples = read(shard): one read serves a shard's consecutive units, and is let go after the last of them,
    before the next shard is read (a shard none of whose units is needed is not read)."""
    samples = None
    for k, (shard, epoch) in enumerate(units):
        need = needed is None or needed[k]
        if need and samples is None:
            samples = read(shard)
        out = make(shard, epoch, samples) if need else None
        if k + 1 == len(units) or units[k + 1][0] != shard:
            samples = None  # the shard's last unit: its samples go now, not when the next unit is asked for
        yield out


def join_views(views: list[dict], join: Join | None, view_epoch: int, shard: int, first: int) -> list[dict]:
    """Each view of a unit with its joined data added (the views as they are without a join)."""
    if join is None:
        return views
    return [v | extra for v, extra in zip(views, join(view_epoch, shard, first, views), strict=True)]


def permuted(items: list, rng: np.random.Generator) -> list:
    """The items in the order of one permutation drawn from `rng`."""
    return [items[i] for i in rng.permutation(len(items))]


def window_shuffle(sizes: Iterable[int], buffer: int, rng: np.random.Generator) -> Iterator[tuple[int, int]]:
    """(unit, position) of every item of a sequence of units, out through a shuffle buffer of `buffer` items.

    Units enter whole, in order (`sizes` is read lazily: the next unit's size is asked for only once the previous
    unit has entered, so a caller can make a unit's items at that moment); once the buffer holds more than
    `buffer` items, each entering item sends a random one out; at the end the rest leave in random order. With
    `buffer` 0 each item leaves as it enters: the items in order, whatever `rng`. The output is a pure function
    of the sizes and the generator's state, so a resumed stream can compute which items it skips without making
    them. (webdataset's `shuffle` stage works on the items themselves and cannot say in advance which items it
    will hand out first.)"""
    buf: list[tuple[int, int]] = []
    for u, n in enumerate(sizes):
        for p in range(n):
            buf.append((u, p))
            if len(buf) > buffer:
                k = int(rng.integers(len(buf)))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
    for k in rng.permutation(len(buf)):
        yield buf[k]


def shuffle_units(units: Iterable[Sequence[T]], buffer: int, rng: np.random.Generator) -> Iterator[T]:
    """The items of a sequence of units (lists), in `window_shuffle`'s order: a unit is taken from `units` as it
    enters the buffer, and each item let go as it leaves (its slot cleared; the unit once all its items have)."""
    held: dict[int, list] = {}
    left: dict[int, int] = {}

    def sizes() -> Iterator[int]:
        for u, items in enumerate(units):
            if items:
                held[u], left[u] = items, len(items)
            yield len(items)

    for u, p in window_shuffle(sizes(), buffer, rng):
        item, held[u][p] = held[u][p], None
        left[u] -= 1
        if not left[u]:
            del held[u], left[u]
        yield item


def resume_needed(sizes: Sequence[int], buffer: int, rng: np.random.Generator, skip: int) -> list[bool]:
    """Which units have an item at or after position `skip` of their `shuffle_units` stream (units of these
    sizes, the same buffer and generator state); the others' items are all skipped, so they need not be made."""
    last = [-1] * len(sizes)
    for out, (u, _) in enumerate(window_shuffle(sizes, buffer, rng)):
        last[u] = out
    return [n >= skip for n in last]


def skip_items(items: Iterable[T], skip: int) -> Iterator[T]:
    """The items after the first `skip`."""
    return islice(items, skip, None)


def loader_position(per_worker: Sequence[int], start: int) -> tuple[list[int], int]:
    """Where a data loader stands after `start` batches -> (batches each worker has made, the worker that makes
    batch `start`), for workers that make `per_worker` batches each.

    torch's DataLoader asks its workers for batches in turn (worker 0, 1, ..., 0, 1, ...), a worker that runs
    out dropping out of the turn; so the order is round r = 0, 1, ...: worker k's r-th batch, for each k that
    has more than r batches."""
    made, done = 0, [0] * len(per_worker)
    for r in range(max(per_worker, default=0)):
        for k, n in enumerate(per_worker):
            if r < n:
                if made == start:
                    return done, k
                done[k] += 1
                made += 1
    return done, 0  # past the end: every worker has run out


def trimmed(steps: Sequence[int], room: int) -> list[int]:
    """The step counts of a group's epochs cut, from the last epoch back, to at most `room` in all."""
    out, excess = list(steps), max(0, sum(steps) - room)
    for j in reversed(range(len(out))):
        cut = min(excess, out[j])
        out[j], excess = out[j] - cut, excess - cut
    return out
