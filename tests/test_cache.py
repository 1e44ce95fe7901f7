import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cache.format import NAMES, raw_bytes_per_view
from cache.inspect import inspect_cache, verify_cache
from cache.store import CacheStore
from cache.teacher import Teacher
from cache.teacher_pass import cache_teacher
from conftest import SMALL_STORE, cache_cfg, kill_inside_a_unit, refused, run_cli, store_arrays, tree_digest
from pipeline.augment import get_recipe
from pipeline.errors import UserError
from pipeline.models import create_model
from pipeline.reader import ShardReader
from pipeline.views import UnitViews

RECIPE = SMALL_STORE["recipe"]  # "digits-mix"




@pytest.fixture
def reference(small_store):
    """cache_teacher(cache_cfg(small_digits, ...)): the session's shared store (conftest), read-only here."""
    return small_store


@pytest.mark.slow
def test_cache_holds_the_teacher_outputs_of_the_replayed_views(small_digits, reference):
    store = CacheStore(reference)
    store.check_complete()
    recipe = get_recipe(RECIPE)
    teacher = Teacher(create_model("test_resnet", 10, role="teacher"), recipe.input_size)
    reader = ShardReader(small_digits)
    loader = DataLoader(UnitViews(reader, recipe, 0, 2, list(range(reader.num_shards))), batch_size=64)
    n = 0
    for b in loader:
        logits = teacher(b["view"])
        e, i = b["epoch"].numpy(), b["index"].numpy()
        log_p = torch.log_softmax(logits, 1)  # the values a store keeps are log-probabilities
        vals = log_p.topk(4, dim=1).values
        cached = store.read_all("topk_values")[e, i]
        ulp = torch.from_numpy(np.spacing(np.abs(cached)).astype(np.float32))  # float16's step at each value
        cached_vals = torch.from_numpy(cached.astype(np.float32))
        cached_idx = torch.from_numpy(store.read_all("topk_indices")[e, i].astype(np.int64))
        # each value is its class's log-probability rounded to float16 (within half its step; the two views of a
        # sample differ by far more), and those classes are the top 4 in order (a near-tie may swap two: their
        # values then agree to float16's step)
        assert ((cached_vals - log_p.gather(1, cached_idx)).abs() <= ulp / 2 + 1e-6).all()
        assert ((cached_vals - vals).abs() <= ulp).all()
        labels = torch.stack([b["label"], b["partner_label"]], 1)
        odds = torch.from_numpy(store.read_all("label_log_odds")[e, i])  # log((1 - p) / p) of each label class
        want = log_p.gather(1, labels) - torch.log1p(-log_p.gather(1, labels).exp())
        assert torch.allclose(-odds, want, atol=1e-4)
        assert torch.allclose(torch.from_numpy(store.read_all("lse")[e, i]), torch.logsumexp(logits, 1), atol=1e-5)
        assert np.array_equal(store.read_all("view_seed")[e, i], b["view_seed"].numpy().astype(np.uint32))
        assert np.array_equal(store.read_all("partner")[e, i], b["partner"].numpy())
        n += len(e)
    assert n == 2 * 270
    assert store.read_all("topk_indices").dtype == np.int16  # integers, never float


def test_store_describes_itself_and_fits_the_byte_budget(reference):
    attrs = CacheStore(reference).attrs
    assert attrs["teacher"]["name"] == "test_resnet" and attrs["topk"] == 4 and attrs["epochs"] == 2
    assert attrs["recipe"] == get_recipe(RECIPE).to_dict() and attrs["dataset"]["num_samples"] == 270
    assert set(attrs["versions"]) >= {"torch", "timm", "zarr"}
    for k in (1, 10, 20):
        assert raw_bytes_per_view(k, 1000) <= 4 * k + 24
    info = inspect_cache(reference)
    assert info["complete"] and info["raw_bytes_per_view"] == 4 * 4 + 23
    assert 0 < info["topk_mass_p5"] <= info["topk_mass_mean"] <= 1


@pytest.mark.slow
def test_a_killed_pass_resumes_to_identical_arrays(small_digits, reference, tmp_path):
    """SIGKILL of a real `cache-teacher` process inside a unit's writes (some arrays of the unit written, no
    marker) after two units are complete: the store refuses to be read as complete, and the same command completes
    it bit for bit, markers included."""
    out = tmp_path / "t.zarr"
    torn = kill_inside_a_unit(_cache_args(small_digits, out), [out], after=2)[out]
    done = CacheStore(out).done_units()
    assert torn and not torn & done and 2 <= len(done) < 6
    with pytest.raises(UserError, match="incomplete"):
        CacheStore(out).check_complete()
    cache_teacher(cache_cfg(small_digits, out))
    a, b = store_arrays(reference), store_arrays(out)
    for name in NAMES:
        assert np.array_equal(a[name], b[name]), name
    assert all(CacheStore(out).unit_info(u) == CacheStore(reference).unit_info(u) for u in range(6))


def test_rerun_skips_done_units_and_refuses_another_request(small_digits, reference, tmp_path):
    out = tmp_path / "copy.zarr"
    shutil.copytree(reference, out)
    summary = cache_teacher(cache_cfg(small_digits, out))
    assert summary["views_written"] == 0 and summary["units_skipped_as_done"] == 6
    before = tree_digest(out)
    msg = refused(_cache_cli(small_digits, out, topk=5, teacher="test_convnext"))
    assert "top-k" in msg and "test_convnext" in msg and "--overwrite" in msg
    assert tree_digest(out) == before  # the refused request left the store as it was


def test_opening_for_another_request_names_every_mismatch(reference):
    store = CacheStore(reference)
    same = store.description.request()
    want = dataclasses.replace(same, teacher="vit_base_patch16_224", manifest_hash="0" * 64,
                               recipe={**same.recipe, "mixup_alpha": 0.2}, topk=20)
    with pytest.raises(UserError) as e:
        store.check_request(want, every=True)
    msg = str(e.value)
    for needle in ("teacher is test_resnet, requested vit_base_patch16_224", "dataset is", "mixup_alpha",
                   "top-k is 4, requested 20"):
        assert needle in msg, msg


def test_verify_cache_passes_and_catches_tampering(small_digits, reference, tmp_path):
    proc = run_cli("verify-cache", reference, "--samples", 12, check=True)
    assert "OK" in proc.stdout
    bad = tmp_path / "bad.zarr"
    shutil.copytree(reference, bad)
    store = CacheStore(bad, mode="r+")
    group = store._open()
    vals = group["topk_values"][...]
    vals[:, :, 0] += 0.5
    group["topk_values"][...] = vals
    r = verify_cache(bad, samples=12)
    assert not r["ok"] and any("topk_values" in p for p in r["problems"])
    proc = run_cli("verify-cache", bad, "--samples", 12)
    assert proc.returncode == 1 and "FAILED" in proc.stdout


def test_inspect_cache_cli(reference):
    proc = run_cli("inspect-cache", reference, "--json", check=True)
    info = json.loads(proc.stdout)
    assert info["units_done"] == "6/6" and info["teacher"] == "test_resnet"


def _cache_args(data, out, **kw) -> list:
    """`cli.py cache-teacher` arguments of the request of the shared small_store, `kw` changed (flag names)."""
    args = {"data": data, "out": out, **SMALL_STORE, **kw}
    return ["cache-teacher", "--quiet", *(a for k, v in args.items() for a in (f"--{k.replace('_', '-')}", v))]


def _cache_cli(data, out, **kw):
    return run_cli(*_cache_args(data, out, **kw))


def test_bad_requests_fail_cleanly(small_digits, tmp_path):
    refused(_cache_cli(small_digits, tmp_path / "x.zarr", topk=11), "--topk 11", "larger than the 10 classes")
    refused(_cache_cli(small_digits, tmp_path / "y.zarr", teacher="resnet_9000"), "resnet_9000", "not a timm model")
    refused(_cache_cli(tmp_path / "nodata", tmp_path / "z.zarr"), "nodata", "does not exist")
    refused(_cache_cli(small_digits, tmp_path / "w.zarr", epochs=0), "--epochs must be at least 1")
    for out in ("x.zarr", "y.zarr", "z.zarr", "w.zarr"):  # a refused request writes nothing
        assert not (tmp_path / out).exists(), out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even a temporary folder beside it


def test_another_view_seed_is_refused_by_both_stages(small_digits, reference, tmp_path):
    out = tmp_path / "copy.zarr"
    shutil.copytree(reference, out)
    with pytest.raises(UserError, match="seed is 0, requested 1"):
        cache_teacher(cache_cfg(small_digits, out, seed=1))
    assert store_arrays(out)["view_seed"].tobytes() == store_arrays(reference)["view_seed"].tobytes()  # untouched
    p = run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "kd", "--cache",
                reference, "--view-seed", 1, "--out", tmp_path / "run")
    assert p.returncode == 2 and "view seed is 0, requested 1" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_loader_workers_do_not_change_the_store(small_digits, reference, tmp_path):
    out = tmp_path / "w2.zarr"
    summary = cache_teacher(cache_cfg(small_digits, out, workers=2))
    assert summary["views_written"] == 2 * 270  # every view once, across both workers
    a, b = store_arrays(reference), store_arrays(out)
    for name in NAMES:
        assert np.array_equal(a[name], b[name]), name
