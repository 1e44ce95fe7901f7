"""Several epochs per decode (`TrainViews(epochs_per_decode=G)`, --epochs-per-decode): the group's stream holds
exactly G = 1's views of the group's epochs, each with its own join, mixed so that a batch is not G copies of an
image; steps per epoch are G = 1's; a loader resumed at any position of a group, or continued into the group's
next epoch, gives the uninterrupted stream's batches."""

import json
import os
import signal
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import run_cli
from pipeline.augment import get_recipe, seed_of_view
from pipeline.errors import UserError
from pipeline.reader import ShardReader
from pipeline.stages import window_shuffle
from pipeline.views import TrainViews


def _items(views: TrainViews, epoch: int) -> list[dict]:
    views.set_epoch(epoch)
    return list(views)  # in-process: the whole stream, partial batches included


class _Join:
    """A join (`pipeline.stages.Join`) that records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, view_epoch, shard, first, views):
        self.calls.append((view_epoch, shard, tuple(v["index"] for v in views)))
        return [{"joined": (view_epoch, v["index"])} for v in views]

    def prefetch(self, view_epoch, shards):
        pass


def test_a_group_holds_g_1s_views_of_its_epochs_each_joined_once(small_digits):
    """4 epochs from 2 view epochs (epochs 2, 3 replay 0, 1; G = 2 groups [0, 1], [2, 3]) and 3 epochs from 3
    (G = 3): the multiset of (sample, view seed) equals G = 1's, the pixels are G = 1's, each (view epoch, shard)
    is joined once per epoch with the same views, and nothing else comes out."""
    reader, recipe = ShardReader(small_digits), get_recipe("digits-mix")
    for view_epochs, g, epochs in ((2, 2, 4), (3, 3, 3)):
        joins = {1: _Join(), g: _Join()}
        one = TrainViews(reader, recipe, 3, join=joins[1], view_epochs=view_epochs, order_seed=5)
        many = TrainViews(reader, recipe, 3, join=joins[g], view_epochs=view_epochs, order_seed=5,
                          epochs_per_decode=g, epochs=epochs)
        want = [it for e in range(epochs) for it in _items(one, e)]
        got = [it for e in range(0, epochs, g) for it in _items(many, e)]
        key = lambda it: (int(it["index"]), int(it["view_seed"]))  # noqa: E731
        assert Counter(map(key, got)) == Counter(map(key, want)) and len(got) == 270 * epochs
        pixels = {key(it): it["view"] for it in want}
        assert all(torch.equal(it["view"], pixels[key(it)]) for it in got)
        # each view carries its own unit's join: that of its view epoch and sample
        assert all(it["joined"][1] == int(it["index"]) and int(it["view_seed"]) ==
                   seed_of_view(3, it["joined"][0], int(it["index"])) for it in got)
        # every unit joined once, with the same views in stored order
        assert sorted(joins[g].calls) == sorted(joins[1].calls)


def test_views_of_one_decode_come_out_mixed_not_as_g_copies(small_digits):
    """Same-sample pairs within a batch: near what a uniform permutation of a shard's 4 x 48 views gives
    (3/191 = 1.6%), far from G copies of an image (3/15 = 20% in a batch of 16); a batch mixes view epochs."""
    views = TrainViews(ShardReader(small_digits), get_recipe("digits"), 3, order_seed=5, epochs_per_decode=4)
    same = pairs = 0
    epochs_per_batch = []
    for b in views.loader(0, 16, 0):
        idx = b["index"].tolist()
        c = Counter(idx)
        same += sum(n * (n - 1) // 2 for n in c.values())
        pairs += len(idx) * (len(idx) - 1) // 2
        epochs_per_batch.append(len({int(s) for s in b["view_seed"]}) > len(c))  # some sample twice: 2 epochs
    assert same / pairs < 0.04, same / pairs
    assert any(epochs_per_batch)
    # the buffer's mixing itself: items of 4 units of 48 come out interleaved, each exactly once
    out = list(window_shuffle([48] * 4, 48, np.random.default_rng(0)))
    assert sorted(out) == [(u, p) for u in range(4) for p in range(48)]
    assert len({u for u, _ in out[:48]}) >= 2


@pytest.mark.parametrize("workers,world", [(0, 1), (1, 1), (2, 2), (3, 1)])
def test_steps_per_epoch_are_g_1s_and_the_group_stream_holds_them(small_digits, workers, world):
    """Uneven shards (5 x 48 + 30): every epoch's step count equals G = 1's, and the group's stream has them all."""
    reader, recipe = ShardReader(small_digits), get_recipe("digits")
    for rank in range(world):
        one = TrainViews(reader, recipe, 3, rank, world, order_seed=5)
        for g, epochs in ((4, 8), (3, 7)):
            many = TrainViews(reader, recipe, 3, rank, world, order_seed=5, epochs_per_decode=g, epochs=epochs)
            assert [many.steps(e, 16, workers) for e in range(epochs)] == [one.steps(e, 16, workers)
                                                                           for e in range(epochs)]
            for first in range(0, epochs, g):
                group = many.group(first)
                assert sum(many.worker_batches(first, 16, workers)) >= sum(many.steps(e, 16, workers) for e in group)


@pytest.mark.parametrize("workers,world", [(0, 1), (2, 1), (3, 2)])
def test_a_group_loader_resumed_or_continued_gives_the_uninterrupted_batches(small_digits, workers, world):
    """loader(e, start=i) with i counted from the group's start yields batches i, i + 1, ... of the uninterrupted
    group stream; loader(e + 1, start=where e stopped) goes on with the same stream (nothing remade)."""
    reader, recipe = ShardReader(small_digits), get_recipe("digits")
    for rank in range(world):
        views = TrainViews(reader, recipe, 3, rank, world, order_seed=5, epochs_per_decode=3)
        full = [b["index"].tolist() for b in views.loader(3, 16, workers)]
        assert len(full) == sum(views.worker_batches(3, 16, workers)) >= 16
        for start in sorted({1, 7, len(full) // 2, len(full) - 1}):
            assert [b["index"].tolist() for b in views.loader(4, 16, workers, start=start)] == full[start:]
        taken, first = [], views.loader(3, 16, workers)
        for k, b in enumerate(first):
            taken.append(b["index"].tolist())
            if k == 4:
                break
        second = views.loader(4, 16, workers, start=5)
        assert second is first  # the same stream goes on: its workers were not restarted
        assert taken + [b["index"].tolist() for b in second] == full


def test_a_resumed_group_does_not_make_the_units_it_skips(small_digits, monkeypatch):
    reader, read = ShardReader(small_digits), []
    real = reader.read_shard
    monkeypatch.setattr(reader, "read_shard", lambda shard: read.append(shard) or real(shard))
    views = TrainViews(reader, get_recipe("digits"), 3, order_seed=5, epochs_per_decode=2)
    order = views.shards(0, 1)
    n = len(list(views.loader(0, 16, 0)))
    assert read == order  # each shard read once for both epochs
    read.clear()
    list(views.loader(0, 16, 0, start=n - 2))  # the last 2 batches: only the last shards' units remain
    assert read and read == order[-len(read):] and len(read) < len(order) // 2


def test_bad_epochs_per_decode_is_refused_in_one_sentence(small_digits, tmp_path):
    reader, recipe = ShardReader(small_digits), get_recipe("digits")
    with pytest.raises(UserError, match="more than the 2 view epochs"):
        TrainViews(reader, recipe, 3, view_epochs=2, epochs_per_decode=3)
    p = run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "ce",
                "--epochs-per-decode", 0, "--out", tmp_path / "run", "--quiet")
    assert p.returncode == 2 and "--epochs-per-decode must be at least 1, got 0" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def group_args(data, store, out, *extra) -> list:
    """Small OFA runs with dropout, 2 epochs from the 2-epoch cache as one group (G = 2), 2 loader workers."""
    return ["train-student", "--data", data, "--student", "test_resnet", "--model-kwargs", "drop_rate=0.2",
            "--method", "ofa", "--cache", store, "--epochs", 2, "--batch-size", 16, "--workers", 2,
            "--lr", 0.05, "--out", out, "--quiet", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_inside_a_group_resumes_to_the_uninterrupted_run(small_digits, small_store, tmp_path, ranks):
    """SIGTERM during step 3 of the group's second epoch: exit 75, --resume restarts at that position of the
    group's stream and ends torch.equal with the uninterrupted G = 2 run, whose per-epoch learning rates (so
    steps and schedule) are G = 1's."""
    from safetensors.torch import load_file
    from test_distributed import ranks_seen, run_ranks, start_ranks, wait_for

    full, cut, probe = tmp_path / "full", tmp_path / "cut", tmp_path / "pc"
    proc = run_ranks(ranks, tmp_path / "pf", *group_args(small_digits, small_store, full, "--epochs-per-decode", 2),
                     env={"PROBE_BATCHES": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stepped = [torch.load(tmp_path / "pf" / f"batches-{r}.pt") for r in range(ranks)]
    pairs = [(int(i), int(s)) for b in stepped[0] for i, s in zip(b["index"], b["view_seed"], strict=True)]
    assert len(pairs) == len(set(pairs))  # the group's second epoch goes on with its stream: no view twice
    if ranks == 1:  # the same step counts and schedule as G = 1 (only its rates are read: run in this process)
        run_cli(*group_args(small_digits, small_store, tmp_path / "one"), check=True)
        lrs = [[h["lr"] for h in json.loads((d / "metrics.json").read_text())["history"]]
               for d in (full, tmp_path / "one")]
        assert lrs[0] == lrs[1]
    run = start_ranks(ranks, probe, *group_args(small_digits, small_store, cut, "--epochs-per-decode", 2),
                      env={"PROBE_STALL": "1,2"})
    wait_for(lambda: all((probe / f"stalled-{r}").exists() for r in range(ranks)), run)
    os.killpg(run.pid, signal.SIGTERM)
    run.wait(timeout=120)
    assert [(r["world"], r["exit"]) for r in ranks_seen(probe)] == [(ranks, 75)] * ranks
    progress = json.loads((cut / "progress.json").read_text())
    assert (progress["step"]["epoch"], progress["step"]["micro"]) == (1, 3)
    assert progress["step"]["layout"]["epochs_per_decode"] == 2
    p = run_cli(*group_args(small_digits, small_store, cut, "--resume"))  # another G: another position
    assert p.returncode == 2 and "epochs_per_decode 2 (now 1)" in p.stderr, p.stderr[-2000:]
    resumed = run_ranks(ranks, tmp_path / "pr", *group_args(small_digits, small_store, cut, "--epochs-per-decode", 2,
                                                             "--resume"), env={"PROBE_BATCHES": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for r in range(ranks):  # it steps on the uninterrupted run's batches from step 3 of epoch 2 on
        rest = [b["index"].tolist() for b in torch.load(tmp_path / "pr" / f"batches-{r}.pt")]
        assert rest == [b["index"].tolist() for b in stepped[r] if b["epoch"] == 1][3:]
    assert "in epoch 2 of 2, after optimizer step 3" in resumed.stdout
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = ([{k: v for k, v in h.items() if k not in ("train_seconds", "images_per_second", "loader_wait_seconds")}
               for h in json.loads((d / "metrics.json").read_text())["history"]] for d in (full, cut))
    assert ha == hb
