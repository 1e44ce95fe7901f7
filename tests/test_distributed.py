"""Two real CPU ranks (torchrun + ACCELERATE_USE_CPU, see tests/support/launch.py): the teacher pass, training,
kills of one rank, preemption (SIGTERM, exit 75, exact resume; one process too), and the pairing of every
shuffled training view with its cached teacher target.

Every test here asserts how many ranks actually ran (tests/support/probe_cli.py records what accelerate saw)."""

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cache.distribution import label_log_odds
from cache.format import NAMES
from cache.store import CacheStore
from cache.teacher import Teacher
from conftest import ROOT, launch_cmd, launch_env, run_cli, store_arrays
from pipeline.augment import get_recipe, seed_of_view
from pipeline.models import Weights, create_model
from pipeline.reader import ShardReader
from pipeline.views import TrainViews
from tests.support.ranks import (
    assert_same_run,
    assert_same_state,
    assert_two_nodes,
    assert_two_ranks,
    files_of,
    kill_rank,
    ranks_seen,
    run_nodes,
    run_ranks,
    start_ranks,
    wait_for,
)

RECIPE = "digits-mix"


@pytest.fixture(scope="session")
def teacher_ckpt(small_digits, tmp_path_factory):
    """A briefly CE-trained test_resnet in a file: its top-k differs from view to view (a random one ranks the
    classes the same way for every input, and index checks would prove nothing)."""
    root = tmp_path_factory.mktemp("teacher")
    run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "ce", "--recipe",
            "digits", "--epochs", 3, "--batch-size", 32, "--lr", 0.1, "--workers", 0, "--out", root, "--quiet",
            check=True)
    return root / "model.safetensors"


def cache_args(data, ckpt, out) -> list:
    return ["cache-teacher", "--data", data, "--teacher", "test_resnet", "--checkpoint", ckpt, "--out", out,
            "--recipe", RECIPE, "--epochs", 2, "--topk", 4, "--batch-size", 40, "--workers", 0, "--quiet"]


@pytest.fixture(scope="session")
def ref_store(small_digits, teacher_ckpt, tmp_path_factory):
    """The one-process reference store (2 epochs of digits-mix views, top-4), made by the same CLI in the
    same environment as the 2-rank runs."""
    root = tmp_path_factory.mktemp("ref")
    proc = run_ranks(1, root / "probe", *cache_args(small_digits, teacher_ckpt, root / "teacher.zarr"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["world"] for r in ranks_seen(root / "probe")] == [1]
    return root / "teacher.zarr"


@pytest.mark.slow
def test_two_ranks_give_the_same_store_and_split_the_units(small_digits, teacher_ckpt, ref_store, tmp_path):
    out, probe = tmp_path / "two.zarr", tmp_path / "probe"
    proc = run_ranks(2, probe, *cache_args(small_digits, teacher_ckpt, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = assert_two_ranks(probe)
    # units are dealt rank::world: each rank wrote its own half, and nobody wrote a unit twice
    assert [sorted(r["units_written"]) for r in seen] == [[0, 2, 4], [1, 3, 5]]
    a, b = store_arrays(ref_store), store_arrays(out)
    for name in NAMES:
        assert np.array_equal(a[name], b[name]), name
    assert CacheStore(out).done_units() == set(range(6))


@pytest.mark.slow
def test_sigkill_of_one_rank_mid_pass_then_rerun_gives_identical_arrays(small_digits, teacher_ckpt, ref_store,
                                                                        tmp_path):
    out = tmp_path / "killed.zarr"
    # slow unit writes (fault injection of cache/store.py) so the kill lands while both ranks have units left
    proc = start_ranks(2, tmp_path / "p1", *cache_args(small_digits, teacher_ckpt, out),
                       env={"OFAKD_CHAOS_SLOW_WRITES": "0.25"})
    wait_for(lambda: (out / "_units").is_dir() and any((out / "_units").glob("shard-*.json")), proc)
    status = kill_rank(proc, 1)
    assert status != 0  # the launcher saw its rank die
    done = CacheStore(out).done_units()
    assert 0 < len(done) < 6, done  # killed mid-pass: some units marked, some not
    # the killed rank left no record; torchrun's SIGTERM made the other finish its unit in flight and exit 75
    assert [(r["rank"], r["exit"]) for r in ranks_seen(tmp_path / "p1")] in ([], [(0, 75)])
    rerun = run_ranks(2, tmp_path / "p2", *cache_args(small_digits, teacher_ckpt, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    seen = assert_two_ranks(tmp_path / "p2")
    redone = sorted(u for r in seen for u in r["units_written"])
    assert redone == sorted(set(range(6)) - done)  # the rerun redid exactly the unmarked units
    a, b = store_arrays(ref_store), store_arrays(out)
    for name in NAMES:
        assert np.array_equal(a[name], b[name]), name


def train_args(data, store, out, *extra) -> list:
    return ["train-student", "--data", data, "--student", "test_resnet", "--method", "ofa", "--cache", store,
            "--epochs", 2, "--batch-size", 16, "--max-steps-per-epoch", 3, "--workers", 1, "--lr", 0.05,
            "--out", out, "--quiet", *extra]


@pytest.fixture(scope="session")
def two_rank_run(small_digits, ref_store, tmp_path_factory):
    """An uninterrupted `train_args` run on two ranks: the reference of the killed run here and of the run two
    machines share (the same command; made once)."""
    root = tmp_path_factory.mktemp("two-rank-run")
    proc = run_ranks(2, root / "probe", *train_args(small_digits, ref_store, root / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_two_ranks(root / "probe")
    return root / "run"


@pytest.mark.slow
def test_two_rank_training_killed_mid_epoch_resumes_to_the_same_weights(small_digits, ref_store, two_rank_run,
                                                                        tmp_path):
    full = two_rank_run
    assert json.loads((full / "config.json").read_text())["resolved"]["processes"] == 2
    m = json.loads((full / "metrics.json").read_text())
    assert [h["val_samples"] for h in m["history"]] == [96, 96]  # both ranks' val shards, each counted once

    cut, probe = tmp_path / "cut", tmp_path / "pc"
    # step 2 of epoch 2 stalls on both ranks, after the step checkpoint of step 1 (--save-every-steps 1): the
    # kill lands mid-epoch and the resume starts inside the epoch
    run = start_ranks(2, probe, *train_args(small_digits, ref_store, cut, "--save-every-steps", 1),
                      env={"PROBE_STALL": "1,1"})
    wait_for(lambda: (probe / "stalled-1").exists(), run)
    assert kill_rank(run, 1) != 0
    progress = json.loads((cut / "progress.json").read_text())
    assert progress["epoch"] == 0 and (progress["step"]["epoch"], progress["step"]["micro"]) == (1, 1)
    assert not (cut / "model.safetensors").exists() and not (cut / "metrics.json").exists()
    resumed = run_ranks(2, tmp_path / "pr", *train_args(small_digits, ref_store, cut, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_two_ranks(tmp_path / "pr")
    assert "resuming" in resumed.stdout and "in epoch 2 of 2, after optimizer step 1" in resumed.stdout
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mb = json.loads((cut / "metrics.json").read_text())
    assert [h["train/loss"] for h in m["history"]] == [h["train/loss"] for h in mb["history"]]
    assert m["top1"] == mb["top1"]


def preempt_args(data, store, out, ranks: int, *extra) -> list:
    """Small OFA runs with dropout (the restored RNG state matters), an EMA (restored too) and `ranks` loader
    workers per rank (2 workers read 2 + 1 of a rank's 3 shards: a loader resumed at step 3 must rotate the
    workers' turn)."""
    return ["train-student", "--data", data, "--student", "test_resnet", "--model-kwargs", "drop_rate=0.2",
            "--method", "ofa", "--cache", store, "--epochs", 2, "--batch-size", 8, "--max-steps-per-epoch", 5,
            "--ema-decay", 0.5, "--workers", ranks, "--lr", 0.05, "--out", out, "--quiet", *extra]


@pytest.fixture(scope="session")
def uninterrupted(small_digits, ref_store, tmp_path_factory):
    """ranks -> the run directory of an uninterrupted `preempt_args` run on that many ranks (made once)."""
    runs = {}

    def get(ranks: int):
        if ranks not in runs:
            root = tmp_path_factory.mktemp(f"uninterrupted{ranks}")
            proc = run_ranks(ranks, root / "probe", *preempt_args(small_digits, ref_store, root / "run", ranks))
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert [(r["world"], r["exit"]) for r in ranks_seen(root / "probe")] == [(ranks, 0)] * ranks
            runs[ranks] = root / "run"
        return runs[ranks]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_mid_epoch_saves_exits_75_and_resumes_to_the_uninterrupted_run(small_digits, ref_store, uninterrupted,
                                                                               tmp_path, ranks):
    """SIGTERM to every process of the job (launcher, ranks, loader workers), as a scheduler sends it, while
    step 3 of epoch 2 runs: each rank finishes the step, saves, exits 75; --resume ends torch.equal."""
    cut, probe = tmp_path / "cut", tmp_path / "pc"
    run = start_ranks(ranks, probe, *preempt_args(small_digits, ref_store, cut, ranks), env={"PROBE_STALL": "1,2"})
    wait_for(lambda: all((probe / f"stalled-{r}").exists() for r in range(ranks)), run)
    os.killpg(run.pid, signal.SIGTERM)  # torchrun also forwards its copy to the ranks: a repeat, ignored
    status = run.wait(timeout=120)
    seen = ranks_seen(probe)
    assert [(r["rank"], r["world"], r["exit"]) for r in seen] == [(r, ranks, 75) for r in range(ranks)], seen
    assert status == 75 if ranks == 1 else status != 0  # torchrun reports its ranks' failure as its own
    progress = json.loads((cut / "progress.json").read_text())
    assert progress["epoch"] == 0 and (progress["step"]["epoch"], progress["step"]["micro"]) == (1, 3)
    assert [p.name for p in (cut / "state").iterdir()] == ["step-0001-0000003"]  # the epoch's state is replaced
    assert not (cut / "model.safetensors").exists()
    # a position inside an epoch means nothing under another layout (students.checkpoint.layout): each change is
    # refused, naming it, and nothing in the run directory changes (epochs per decode: tests/test_epochs_per_decode.py)
    before = files_of(cut)
    changes = [(("--batch-size", 4), "batch_size 8 (now 4)"), (("--workers", 2), "workers 1 (now 2)"),
               (("--grad-accum", 2), "grad_accum 1 (now 2)"),
               (("--max-steps-per-epoch", 4), "max_steps_per_epoch 5 (now 4)"),
               (("--seed", 7, "--order-seed", 0), "seed 0 (now 7)"),  # the order seed defaults to the seed: kept
               (("--order-seed", 3), "order_seed 0 (now 3)")] if ranks == 1 else \
        [((), "processes 2 (now 1)")]  # the 2-rank position resumed by one process (this one)
    for flags, says in changes:
        p = run_cli(*preempt_args(small_digits, ref_store, cut, ranks, *flags, "--resume"))
        assert p.returncode == 2 and f" with {says}; resume with the same settings" in p.stderr, \
            (flags, p.stderr[-2000:])  # that one change, alone
    assert files_of(cut) == before
    resumed = run_ranks(ranks, tmp_path / "pr", *preempt_args(small_digits, ref_store, cut, ranks, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "in epoch 2 of 2, after optimizer step 3" in resumed.stdout
    assert [(r["world"], r["exit"]) for r in ranks_seen(tmp_path / "pr")] == [(ranks, 0)] * ranks
    assert_same_run(uninterrupted(ranks), cut)
    assert_same_state(uninterrupted(ranks), cut)


@pytest.mark.slow
def test_sigterm_during_evaluation_saves_the_epoch_exits_75_and_resumes_to_the_uninterrupted_run(
        small_digits, ref_store, uninterrupted, tmp_path):
    """SIGTERM while epoch 1 is evaluated: the evaluation finishes, the epoch is saved whole (no position inside
    it), the run exits 75, and --resume starts after epoch 1 and ends torch.equal to the uninterrupted run, full
    state included."""
    cut, probe = tmp_path / "cut", tmp_path / "pc"
    run = start_ranks(1, probe, *preempt_args(small_digits, ref_store, cut, 1), env={"PROBE_STALL_EVAL": "0"})
    wait_for(lambda: (probe / "stalled-eval-0").exists(), run)
    os.killpg(run.pid, signal.SIGTERM)
    assert run.wait(timeout=120) == 75
    assert [(r["rank"], r["world"], r["exit"]) for r in ranks_seen(probe)] == [(0, 1, 75)]
    progress = json.loads((cut / "progress.json").read_text())
    assert progress["epoch"] == 0 and not progress.get("step") and len(progress["history"]) == 1
    assert "top1" in progress["history"][0] and "ema_top1" in progress["history"][0]  # both evaluations ran
    resumed = run_ranks(1, tmp_path / "pr", *preempt_args(small_digits, ref_store, cut, 1, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1 of 2" in resumed.stdout
    assert_same_run(uninterrupted(1), cut)
    assert_same_state(uninterrupted(1), cut)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_next_check_and_resumes_to_the_uninterrupted_run(
        small_digits, ref_store, uninterrupted, tmp_path):
    """SIGTERM to rank 1 only, while it runs step 3 of epoch 2, with --check-signal-every 3: rank 0 never got a
    signal, yet the ranks agree at the next check (after step 4), both save that step and exit 75, and --resume
    ends with the uninterrupted run's weights, metrics and full state."""
    cut, probe = tmp_path / "cut", tmp_path / "pc"
    extra = ("--check-signal-every", 3)
    run = start_ranks(2, probe, *preempt_args(small_digits, ref_store, cut, 2, *extra),
                      env={"PROBE_STALL": "1,2", "PROBE_STALL_RANKS": "1"})
    wait_for(lambda: (probe / "stalled-1").exists() and (probe / "stalled-1").read_text(), run)
    os.kill(int((probe / "stalled-1").read_text()), signal.SIGTERM)  # that rank's process, nothing else
    assert run.wait(timeout=120) != 0  # torchrun reports its ranks' exit 75 as a failure of its own
    seen = ranks_seen(probe)
    assert [(r["rank"], r["world"], r["exit"]) for r in seen] == [(0, 2, 75), (1, 2, 75)], seen
    assert not (probe / "stalled-0").exists()
    progress = json.loads((cut / "progress.json").read_text())
    # the next check: optimizer steps are counted over the run (5 per epoch), so the signal during step 3 of
    # epoch 2 (the 8th) is seen by both ranks after the 9th, step 4 of epoch 2
    assert (progress["step"]["epoch"], progress["step"]["micro"]) == (1, 4)
    resumed = run_ranks(2, tmp_path / "pr", *preempt_args(small_digits, ref_store, cut, 2, "--resume", *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "in epoch 2 of 2, after optimizer step 4" in resumed.stdout
    assert_same_run(uninterrupted(2), cut)
    assert_same_state(uninterrupted(2), cut)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_mid_pass_finishes_units_in_flight_exits_75_and_a_rerun_completes_the_store(
        small_digits, teacher_ckpt, ref_store, tmp_path, ranks):
    """SIGTERM to the whole job (launcher, ranks, loader workers): every rank finishes its units in flight,
    marks them, exits 75; a rerun on as many ranks writes exactly the rest, and the store equals a clean one."""
    out = tmp_path / "stopped.zarr"
    args = [*cache_args(small_digits, teacher_ckpt, out), "--workers", 2]  # two units in flight per rank
    proc = start_ranks(ranks, tmp_path / "p1", *args, env={"OFAKD_CHAOS_SLOW_WRITES": "0.25"})
    wait_for(lambda: (out / "_units").is_dir() and any((out / "_units").glob("shard-*.json")), proc)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun forwards its copy to the ranks too: a repeat, ignored
    status = proc.wait(timeout=120)
    assert status == 75 if ranks == 1 else status != 0  # torchrun reports its ranks' failure as its own
    # each rank finished the units it had in flight rather than dropping them
    assert proc.stderr.read().count("0 in flight left unmarked") == ranks
    done = CacheStore(out).done_units()
    assert 0 < len(done) < 6, done
    records = ranks_seen(tmp_path / "p1")
    assert [(r["rank"], r["world"], r["exit"]) for r in records] == [(r, ranks, 75) for r in range(ranks)], records
    written = [u for r in records for u in r["units_written"]]
    assert sorted(written) == sorted(done)  # every unit written was marked, once: none left partial
    rerun = run_ranks(ranks, tmp_path / "p2", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    records = ranks_seen(tmp_path / "p2")
    assert [(r["world"], r["exit"]) for r in records] == [(ranks, 0)] * ranks
    assert sorted(u for r in records for u in r["units_written"]) == sorted(set(range(6)) - done)
    a, b = store_arrays(ref_store), store_arrays(out)
    for name in NAMES:
        assert np.array_equal(a[name], b[name]), name


def _topk_agree(cached_vals, cached_idx, logits, k) -> torch.Tensor:
    """Per row: the cached top-k is the teacher's top-k on this view, to fp16 (indices may swap only at
    fp16 ties, i.e. where the cached values of the swapped positions are equal)."""
    vals, idx = logits.topk(k, dim=1)
    close = torch.isclose(cached_vals, vals.half().float(), atol=2e-3, rtol=1e-3).all(1)
    swapped = cached_idx != idx
    tie = (~swapped | (cached_vals == vals.half().float())).all(1)
    same_set = (cached_idx.sort(1).values == idx.sort(1).values).all(1)
    return close & tie & same_set


@pytest.mark.slow
@pytest.mark.parametrize("per_decode", [1, 2])
def test_every_shuffled_view_is_paired_with_its_own_teacher_target(small_digits, teacher_ckpt, ref_store, tmp_path,
                                                                   per_decode):
    """2 ranks x 2 workers, digits-mix, 3 epochs from a 2-epoch cache: each stepped view's cached top-k,
    log-sum-exp and label logits are the teacher's on that exact view; epoch 3 replays cached epoch 1. With 2
    epochs per decode (groups [0, 1], [2]) the first group's batches mix both cached epochs' views."""
    probe = tmp_path / "probe"
    proc = run_ranks(2, probe, "train-student", "--data", small_digits, "--student", "test_resnet", "--method", "kd",
                     "--cache", ref_store, "--epochs", 3, "--batch-size", 12, "--max-steps-per-epoch", 3,
                     "--workers", 2, "--epochs-per-decode", per_decode, "--out", tmp_path / "run", "--quiet",
                     env={"PROBE_BATCHES": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_two_ranks(probe)
    assert proc.stdout.count("replays cached epoch e mod 2") == 1
    teacher = Teacher(create_model("test_resnet", 10, weights=Weights(checkpoint=teacher_ckpt), role="teacher"),
                      get_recipe(RECIPE).input_size)
    reader = ShardReader(small_digits)
    first = [s.first for s in reader.split.shards]
    shard_of = lambda i: int(np.searchsorted(first, i, side="right") - 1)  # noqa: E731
    seen, top1s, mixed_epochs = {}, set(), set()
    for rank in (0, 1):
        batches = torch.load(probe / f"batches-{rank}.pt")
        assert [b["epoch"] for b in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        for b in batches:
            e, idx = b["epoch"], b["index"]
            # the views of training epoch e are those of cached epoch e mod 2, so e = 2 replays epoch 0 (with
            # several epochs per decode: those of its group's cached epochs)
            group = range(e - e % per_decode, min(e - e % per_decode + per_decode, 3))
            want = [{seed_of_view(0, g % 2, int(i)) for g in group} for i in idx]
            assert all(int(s) in w for s, w in zip(b["view_seed"], want, strict=True))
            if per_decode > 1 and e < 2:
                mixed_epochs |= {int(s) == seed_of_view(0, 1, int(i)) for s, i in zip(b["view_seed"], idx, strict=True)}
            logits = teacher(b["view"])
            top1s.update(logits.argmax(1).tolist())
            log_p = torch.log_softmax(logits, 1)  # a store keeps log-probabilities
            ok = _topk_agree(b["t_values"], b["t_indices"], log_p, 4)
            assert ok.all(), f"rank {rank} epoch {e}: views {idx[~ok].tolist()} carry another view's target"
            # the check can fail: the same targets one row off do not match
            assert (~_topk_agree(b["t_values"].roll(1, 0), b["t_indices"].roll(1, 0), log_p, 4)).float().mean() > .5
            assert torch.allclose(b["t_lse"], torch.logsumexp(logits, 1), atol=1e-4)
            labels = torch.stack([b["label"], b["partner_label"]], 1)
            assert torch.allclose(b["t_label_log_odds"], label_log_odds(logits, labels), atol=1e-4)
            seen.setdefault((rank, e), []).append(b)
    assert len(top1s) >= 5  # the teacher ranks classes differently from view to view
    assert per_decode == 1 or mixed_epochs == {True, False}  # one group's batches hold views of both cached epochs
    for e in range(3):
        idx = [torch.cat([b["index"] for b in seen[(r, e)]]) for r in (0, 1)]
        assert not set(idx[0].tolist()) & set(idx[1].tolist())  # the ranks read disjoint shards
        for r in (0, 1):
            bs = seen[(r, e)]
            # shuffled within shards, and batches from both workers' shards
            assert any(not torch.equal(b["index"], b["index"].sort().values) for b in bs)
            views = TrainViews(reader, get_recipe(RECIPE), 0, r, 2, order_seed=0, epochs_per_decode=per_decode,
                               epochs=3)
            views.set_epoch(e)
            by_worker = [set(views.shards(w, 2)) for w in (0, 1)]
            shards = {shard_of(int(i)) for b in bs for i in b["index"]}
            assert shards & by_worker[0] and shards & by_worker[1], (shards, by_worker)
            assert any((b["lam"] < 1).any() and (b["partner"] != b["index"]).any() for b in bs)  # mixed views


def test_a_tampered_replay_record_is_refused(small_digits, ref_store, tmp_path):
    import shutil

    for name, delta in (("view_seed", 1), ("partner", 1)):
        bad = tmp_path / f"{name}.zarr"
        shutil.copytree(ref_store, bad)
        arr = CacheStore(bad, mode="r+")._open()[name]
        vals = arr[...]
        first_of_shard0 = 0
        vals[0, first_of_shard0 + 5] = vals[0, first_of_shard0 + 5] + delta  # epoch 0, sample 5
        arr[...] = vals
        p = run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "kd", "--cache",
                    bad, "--epochs", 1, "--batch-size", 48, "--workers", 0, "--out", tmp_path / f"run-{name}",
                    "--quiet")
        assert p.returncode == 2, p.stderr[-2000:]
        assert "replay record mismatch" in p.stderr and "sample 5 of epoch 0" in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / f"run-{name}" / "model.safetensors").exists()


# ------------------------------------------------------------------------------ two machines, simulated

@pytest.mark.slow
def test_two_machines_share_one_store_and_one_run(small_digits, teacher_ckpt, ref_store, two_rank_run, tmp_path):
    """Two torchrun machines (--nnodes 2) on 127.0.0.1 sharing a folder as the bucket (data, store, run),
    each with its own working directory, probe and temporary folder. The shared bucket is a local folder
    here: tests/test_object_store.py's moto server is session-wide state of that module (os.environ and
    fsspec's cached clients point at it), and the shared-storage semantics tested here (whole-unit writers,
    markers after data, main-process-only files) do not depend on the backend, which that module covers."""
    bucket = tmp_path / "bucket"
    shutil.copytree(small_digits, bucket / "data")
    nodes = [tmp_path / f"node{r}" for r in (0, 1)]
    # stage one on two machines: the store equals the one-process store bit for bit
    procs = run_nodes(nodes, *cache_args(bucket / "data", teacher_ckpt, bucket / "teacher.zarr"))
    assert all(p.returncode == 0 for p in procs), [p.stderr[-3000:] for p in procs]
    seen = assert_two_nodes(nodes)
    assert [sorted(r["units_written"]) for r in seen] == [[0, 2, 4], [1, 3, 5]]
    assert [r["stores_built"] for r in seen] == [1, 0]  # the store's metadata and attributes: written once
    a, b = store_arrays(ref_store), store_arrays(bucket / "teacher.zarr")
    for name in NAMES:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    attrs = [CacheStore(s).attrs for s in (bucket / "teacher.zarr", ref_store)]
    for a_ in attrs:  # where the data was read from differs (the bucket's copy): everything else is equal
        a_["dataset"].pop("path")
    assert attrs[0] == attrs[1]
    for u in range(6):
        assert CacheStore(bucket / "teacher.zarr").unit_info(u) == CacheStore(ref_store).unit_info(u)
    # nothing of ours left in the node-local temporary folders (torchrun keeps its own torchelastic_* there)
    assert [p for wd in nodes for p in (wd / "tmp").iterdir() if not p.name.startswith("torchelastic_")] == []

    # stage two on two machines into one shared run directory
    procs = run_nodes(nodes, *train_args(bucket / "data", bucket / "teacher.zarr", bucket / "run"))
    assert all(p.returncode == 0 for p in procs), [p.stderr[-3000:] for p in procs]
    seen = assert_two_nodes(nodes)
    main_files = {"config.json", "progress.json", "metrics.json", "metrics.jsonl"}
    assert set(seen[0]["writes"]) >= main_files and seen[1]["writes"] == [], seen  # only the main process writes
    assert seen[0]["writes"].count("config.json") == seen[0]["writes"].count("metrics.json") == 1
    assert json.loads((bucket / "run" / "config.json").read_text())["resolved"]["processes"] == 2
    # the weights equal a one-machine run of the same world size: training is only promised equal across
    # runs of one world size (each rank steps on its own shards, so the batches differ with the world size),
    # which is how test_two_rank_training_killed_mid_epoch_resumes_to_the_same_weights compares too
    w2, w1 = load_file(bucket / "run" / "model.safetensors"), load_file(two_rank_run / "model.safetensors")
    assert w2.keys() == w1.keys() and all(torch.equal(w2[k], w1[k]) for k in w1)
    m2, m1 = (json.loads((d / "metrics.json").read_text()) for d in (bucket / "run", two_rank_run))
    assert [h["train/loss"] for h in m2["history"]] == [h["train/loss"] for h in m1["history"]]


@pytest.mark.slow
def test_the_tensors_of_our_collectives_are_freed_in_the_main_thread_so_forking_workers_is_safe(tmp_path):
    """pipeline.collectives keeps each work, so its tensors are freed by this thread: not by gloo's, which would
    create a Python thread state under the runtime's lock, where a loader worker forked at that moment hangs
    before it starts (CPython 3.11, gh-112275; a 2-rank run stuck at an epoch's end). The same probe with
    torch.distributed's plain calls shows tensors freed on gloo's threads, so the check can tell."""
    out = tmp_path / "freed.json"
    proc = subprocess.run(launch_cmd(2, ROOT / "tests" / "support" / "free_thread_probe.py"), capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=launch_env({"PROBE_OUT": str(out)}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["world"] == 2 and len(record["ours"]) == len(record["plain"]) == 200
    assert set(record["ours"]) == {"main"}, record["ours"]
    assert "other" in record["plain"], record["plain"]
