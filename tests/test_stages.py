"""The view stream's stages (pipeline.stages) on plain lists: each stage's contract, and the resume skip planned
on sizes alone giving what skipping the made items gives."""

import gc
import weakref

import numpy as np
import pytest

from pipeline.augment import get_recipe
from pipeline.reader import ShardReader
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
    window_shuffle,
)
from pipeline.views import TrainViews


def _units(sizes):
    return [[(u, p) for p in range(n)] for u, n in enumerate(sizes)]


@pytest.mark.parametrize("buffer", [0, 1, 5, 48])
def test_shuffle_units_hands_out_every_item_once_in_window_shuffle_order(buffer):
    sizes = [7, 0, 12, 3, 9]
    got = list(shuffle_units(_units(sizes), buffer, np.random.default_rng(4)))
    assert got == list(window_shuffle(sizes, buffer, np.random.default_rng(4)))
    assert sorted(got) == [(u, p) for u, n in enumerate(sizes) for p in range(n)]
    if buffer == 0:  # each item leaves as it enters: the units' items in order, whatever the generator
        assert got == [it for unit in _units(sizes) for it in unit]
        assert got == list(shuffle_units(_units(sizes), 0, np.random.default_rng(99)))
    else:
        assert got != [it for unit in _units(sizes) for it in unit]


@pytest.mark.parametrize("buffer", [0, 10])
def test_shuffle_units_takes_a_unit_only_once_the_previous_one_has_entered(buffer):
    """A unit is asked for when it enters the buffer: with buffer 0, after every item of the previous unit left."""
    asked, out = [], []

    def lazy():
        for u, unit in enumerate(_units([4, 4, 4])):
            asked.append((u, len(out)))
            yield unit

    for item in shuffle_units(lazy(), buffer, np.random.default_rng(0)):
        out.append(item)
    if buffer == 0:
        assert asked == [(0, 0), (1, 4), (2, 8)]
    else:  # 10 > 4 + 4: the first two units enter before any item leaves
        assert asked[:2] == [(0, 0), (1, 0)]


class _Samples(list):
    """A shard's samples that a weak reference can watch."""


def test_unit_items_reads_each_shard_once_lets_it_go_and_reads_no_unneeded_shard():
    todo = units_of([5, 2, 9], range(2))
    assert todo == [(5, 0), (5, 1), (2, 0), (2, 1), (9, 0), (9, 1)]
    reads, alive = [], []

    def read(shard):
        alive.append(sum(r() is not None for r in reads))  # samples still held when the next shard is read
        s = _Samples([shard * 10 + i for i in range(3)])
        reads.append(weakref.ref(s))
        return s

    needed = [True, False, False, False, True, True]  # shard 2: neither unit needed
    made = list(unit_items(todo, read, lambda shard, epoch, samples: (shard, epoch, list(samples)), needed))
    assert made == [(5, 0, [50, 51, 52]), None, None, None, (9, 0, [90, 91, 92]), (9, 1, [90, 91, 92])]
    gc.collect()
    assert len(reads) == 2 and alive == [0, 0]  # 5 and 9 read once each, 2 not at all; 5's gone before 9's read
    seen = []
    for _ in unit_items(units_of([1, 2], range(1)), read, lambda shard, epoch, samples: None):
        seen.append(reads[-1]() is None)  # the unit is handed out after its shard's only unit let the samples go
    assert seen == [True, True]


@pytest.mark.parametrize("buffer", [0, 5, 48])
def test_a_skip_planned_on_sizes_gives_the_stream_that_skips_made_items(buffer):
    """Units `resume_needed` leaves out are all skipped: replacing them by placeholders changes no item after the
    skip; with buffer 0 the units left out are exactly those that end at or before the skip (whole shards)."""
    rng = np.random.default_rng(1)
    for _ in range(30):
        sizes = [int(n) for n in rng.integers(0, 50, size=int(rng.integers(1, 8)))]
        skip = int(rng.integers(0, sum(sizes) + 1))
        seed = int(rng.integers(1 << 30))
        needed = resume_needed(sizes, buffer, np.random.default_rng(seed), skip)
        want = list(skip_items(shuffle_units(_units(sizes), buffer, np.random.default_rng(seed)), skip))
        partial = [unit if need else [None] * len(unit) for unit, need in zip(_units(sizes), needed, strict=True)]
        assert list(skip_items(shuffle_units(partial, buffer, np.random.default_rng(seed)), skip)) == want
        assert len(want) == sum(sizes) - skip and None not in want
        if buffer == 0:
            assert needed == [end > skip for end in np.cumsum(sizes)]


def test_loader_position_follows_torchs_worker_turn():
    """Workers with 3, 1 and 2 batches: the turn is w0 w1 w2 w0 w2 w0 (a worker that ran out leaves it)."""
    turn = [0, 1, 2, 0, 2, 0]
    for start in range(len(turn) + 1):
        done, first = loader_position([3, 1, 2], start)
        assert done == [turn[:start].count(k) for k in range(3)]
        assert first == (turn[start] if start < len(turn) else 0)


def test_trimmed_cuts_from_the_last_epochs():
    assert trimmed([3, 3, 3], 9) == [3, 3, 3]
    assert trimmed([3, 3, 3], 7) == [3, 3, 1]
    assert trimmed([3, 3, 3], 2) == [2, 0, 0]


class _Join:
    def __init__(self):
        self.calls, self.ahead = [], []

    def __call__(self, view_epoch, shard, first, views):
        self.calls.append((view_epoch, shard, [v["index"] for v in views]))
        return [{"extra": (view_epoch, v["index"])} for v in views]

    def prefetch(self, view_epoch, shards):
        self.ahead.append((view_epoch, list(shards)))


def test_join_views_adds_the_joins_data_and_permuted_reorders():
    views = [{"index": i} for i in (10, 11, 12)]
    join = _Join()
    assert isinstance(join, Join)
    joined = join_views(views, join, 1, 4, 10)
    assert joined == [{"index": i, "extra": (1, i)} for i in (10, 11, 12)] and join.calls == [(1, 4, [10, 11, 12])]
    assert join_views(views, None, 1, 4, 10) is views
    perm = np.random.default_rng(3).permutation(3)
    assert permuted(joined, np.random.default_rng(3)) == [joined[i] for i in perm]


def test_the_stream_requires_a_join_with_read_ahead_and_uses_it(small_digits):
    """A join without `prefetch` is refused when it is set; a resumed G = 1 stream reads ahead the join's rows of
    exactly the shards it reads, in their order, and joins them in that order."""
    reader = ShardReader(small_digits)
    with pytest.raises(TypeError, match="pipeline.stages.Join"):
        TrainViews(reader, get_recipe("digits"), 3, join=lambda ve, shard, first, views: [{} for _ in views])
    views = TrainViews(reader, get_recipe("digits"), 3, order_seed=5, view_epochs=2)
    with pytest.raises(TypeError, match="pipeline.stages.Join"):
        views.join = lambda ve, shard, first, views: [{} for _ in views]
    views.join = join = _Join()
    views.set_epoch(3)
    order = views.shards(0, 1)
    batches = list(views.loader(3, 16, 0, start=7))  # batch 7 starts at view 112, in the third shard
    assert join.ahead == [(1, order[2:])] and [c[1] for c in join.calls] == order[2:]
    assert all(b["extra"][0].eq(1).all() for b in batches)
