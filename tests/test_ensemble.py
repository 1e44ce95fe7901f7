"""Teachers side by side: train-student from several caches of the same views, sampled tails included."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cache.distribution import TeacherDist, mix
from cache.summary import TailSpec, summarize
from cache.targets import TeacherEnsemble, TeacherTargets
from conftest import SMALL_STORE, run_cli
from students.losses import dkd_loss, kd_loss, ofa_loss


def test_ensemble_targets_are_the_weighted_mean_of_the_teachers(small_digits, small_store, second_store):
    one = TeacherEnsemble([small_store], None)  # each teacher alone, as a one-member ensemble reads it
    prob = TeacherEnsemble([small_store, second_store], [1, 3], "prob")
    logit = TeacherEnsemble([small_store, second_store], [1, 3], "logit")
    views = prob.members[0].views(small_digits, epoch=1)
    views.join = prob.join
    batch = next(iter(DataLoader(views, batch_size=32)))
    za = one.members[0].logits(batch)  # [B, C] reconstructed from top-4
    zb = prob.members[1].logits(batch)  # from top-3
    assert not torch.allclose(za, zb)
    T = 4.0
    p = 0.25 * torch.softmax(za / T, 1) + 0.75 * torch.softmax(zb / T, 1)
    torch.testing.assert_close(torch.softmax(prob.source(T)(batch) / T, 1), p)
    torch.testing.assert_close(logit.source(T)(batch), 0.25 * za + 0.75 * zb)
    assert prob.width == max(m.width for m in prob.members)


# two teachers with sampled tails, mixed in prob mode: the real fixture teacher of tests/test_tail_samples.py and a
# second one (its logits shuffled per view and sharpened), 2000 independent draws of the same 32 views
FIXTURE = Path(__file__).parent / "fixtures" / "tail_logits_tiny50.npz"
K, M, DRAWS, WEIGHTS = 5, 8, 2000, [0.25, 0.75]
LINEAR = {  # the losses linear in the teacher's probabilities: name -> (T, loss(student, teacher, target))
    "kd T=4": (4.0, lambda s, t, c: kd_loss(s, t, 4.0)),
    "dkd T=4": (4.0, lambda s, t, c: dkd_loss(s, t, c, 1.0, 8.0, 4.0)),
    "ofa paper gamma=1.5": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.5, 1.0, "paper")),
    "ofa released gamma=1": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.0, 1.0, "released")),
}


@pytest.fixture(scope="module")
def two_teachers():
    f = np.load(FIXTURE)
    z1 = torch.from_numpy(f["teacher_logits"]).float()
    gen = torch.Generator().manual_seed(0)
    z2 = 1.5 * z1.gather(1, torch.stack([torch.randperm(z1.shape[1], generator=gen) for _ in z1]))
    q, labels = torch.from_numpy(f["student_logits"]), torch.from_numpy(f["labels"]).long()
    B, C = z1.shape
    ll = labels.repeat(DRAWS, 1)
    dists = {}
    for T in (1.0, 4.0):  # each teacher's store (float32 values: the estimator alone is under test), read back at T
        members = []
        for z in (z1, z2):
            arrays = summarize(z.repeat(DRAWS, 1), ll[:, 0], ll[:, 1], K, np.arange(DRAWS * B),
                               TailSpec(M, [4.0], 4.0), "float32")
            members.append(TeacherTargets.from_arrays(arrays, 1).distribution(ll[:, 0], ll[:, 1], C, T, [4.0], 4.0))
        dists[T] = members
    return z1, z2, q, labels, dists


def _mixture_logits(z1, z2, T):
    """The exact mixture as prob mode hands it to the losses: T log(sum_i w_i softmax(z_i / T))."""
    p = WEIGHTS[0] * torch.softmax(z1.double() / T, 1) + WEIGHTS[1] * torch.softmax(z2.double() / T, 1)
    return T * torch.log(p)


def _draws(fn, q, d: TeacherDist, c):
    """Per draw: the loss [R] and its gradient w.r.t. the student logits [R, B, C] (rows are independent)."""
    B = len(q)
    qq = q.repeat(DRAWS, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(fn(qq, d, c.repeat(DRAWS)), qq)
    with torch.no_grad():
        v = torch.vmap(lambda *f: fn(q, TeacherDist(*f), c))(*(x.view(DRAWS, B, -1) for x in d))
    return v.double(), (g * DRAWS).view(DRAWS, B, -1).double()


@pytest.mark.parametrize("name", list(LINEAR))
def test_sampled_tails_mix_without_bias_for_losses_linear_in_p(two_teachers, name):
    """Each class weighted by sum_i w_i scale_i p_i: over DRAWS draws the gradient w.r.t. the student's logits is
    the exact mixture's within 5 standard errors, and so is the student-dependent part of the value (the loss at q
    minus the loss at another student q': the teacher's own p log p terms cancel; the paper-form OFA value has none
    and is compared as is). Mixing the teachers' probabilities without their tail weights misses by far more."""
    z1, z2, q, labels, dists = two_teachers
    T, fn = LINEAR[name]
    c = labels[:, 0]
    exact_z = _mixture_logits(z1, z2, T)
    q2 = q + torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    s = q.clone().requires_grad_(True)
    exact = fn(s, exact_z, c)
    (exact_g,) = torch.autograd.grad(exact, s)
    exact_diff = float(exact.detach()) - float(fn(q2, exact_z, c))
    d = mix(dists[T], WEIGHTS)
    v, g = _draws(fn, q, d, c)
    v2, _ = _draws(fn, q2, d, c)
    diff = v - v2
    assert abs(float(diff.mean()) - exact_diff) <= 5 * float(diff.std() / DRAWS ** 0.5) + 1e-6, name
    if name.startswith("ofa paper"):
        assert abs(float(v.mean()) - float(exact.detach())) <= 5 * float(v.std() / DRAWS ** 0.5) + 1e-6, name
    se_g = g.std(0) / DRAWS ** 0.5
    assert float(((g.mean(0) - exact_g).abs() - (5 * se_g + 1e-7)).max()) <= 0, name
    unweighted = mix([TeacherDist(x.log_p, (x.scale > 0).float(), x.log_rest) for x in dists[T]], WEIGHTS)
    _, g_bad = _draws(fn, q, unweighted, c)
    assert float(((g_bad.mean(0) - exact_g).abs() / (5 * se_g + 1e-7)).max()) > 3, name


@pytest.mark.slow
def test_train_student_distils_from_two_caches(small_digits, small_store, second_store, tmp_path):
    """One step of KD (--w-ce 0) from two caches, mixed as probabilities at T = 4 with weights 1:2: the loss the run
    reports is KD on the batch it stepped on (tests/support/probe_cli.py records it) against the teachers' mixture
    made by hand from each store's rows (their top-k reconstructions), for the student at its initial weights."""
    from conftest import probe_batches, stored_targets
    from pipeline.augment import get_recipe
    from pipeline.models import create_model, model_input
    from students.losses import kd_loss
    out = tmp_path / "ens"
    (b,) = probe_batches(tmp_path / "probe", "train-student", "--data", small_digits, "--student", "test_resnet",
                         "--epochs", 1, "--batch-size", 32, "--workers", 0, "--max-steps-per-epoch", 1, "--quiet",
                         "--method", "kd", "--w-ce", 0, "--cache", small_store, "--cache", second_store,
                         "--teacher-weights", "1,2", "--ensemble", "prob", "--out", out)
    # each teacher's logits as one cache gives them
    zs = [stored_targets(s, 0, b["index"].numpy()).logits(b["label"], b["partner_label"], 10)
          for s in (small_store, second_store)]
    T = 4.0
    mixed = T * torch.log(torch.softmax(zs[0] / T, 1) / 3 + 2 * torch.softmax(zs[1] / T, 1) / 3)
    student = create_model("test_resnet", 10, role="student", init_seed=0).train()
    with torch.no_grad():
        s = student(model_input(student, get_recipe(SMALL_STORE["recipe"]).input_size)(b["view"]))
    want = kd_loss(s, mixed, T).item()
    alone = [kd_loss(s, z, T).item() for z in zs]  # what either teacher alone would give: far from it
    metrics = json.loads((out / "metrics.json").read_text())["history"][-1]
    assert metrics["train/loss"] == metrics["train/kd/final"] == pytest.approx(want, rel=1e-5), (metrics, want)
    assert all(abs(a - want) > 1e-3 * want for a in alone), (alone, want)
    teachers = json.loads((out / "config.json").read_text())["resolved"]["cache_teacher"]
    assert [t["name"] for t in teachers] == ["test_resnet", "test_vit"]
    assert [round(t["ensemble_weight"], 4) for t in teachers] == [0.3333, 0.6667]


@pytest.fixture(scope="module")
def sampled_store(small_digits, tmp_path_factory) -> Path:
    """small_store's views and teacher with a sampled tail (4 classes per view)."""
    from cache.teacher_pass import CacheConfig, cache_teacher
    from commands.options import build
    out = tmp_path_factory.mktemp("sampled") / "tail.zarr"
    cache_teacher(build(CacheConfig, data=small_digits, out=out, progress=False, tail_samples=4, **SMALL_STORE))
    return out


def test_an_ensemble_with_a_sampled_tail_mixes_the_members_distributions(small_digits, small_store, sampled_store,
                                                                         tmp_path):
    """prob mode: the source is the mix of each member's TeacherDist at T (the top-k member's, from its logits),
    through the real join; train-student distils from it."""
    from cache.distribution import dist_of_logits
    ens = TeacherEnsemble([small_store, sampled_store], [1, 3], "prob")
    views = ens.members[0].views(small_digits, epoch=0)
    views.join = ens.join
    batch = next(iter(DataLoader(views, batch_size=32)))
    labels = torch.stack([batch["label"], batch["partner_label"]], 1)
    got = ens.source(4.0)(batch)
    want = mix([dist_of_logits(ens.members[0].logits(batch), 4.0, labels), ens.members[1].source(4.0)(batch)],
               [0.25, 0.75])
    assert isinstance(got, TeacherDist) and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert (got.scale == 1).all()  # the top-k member holds every class (its uniform tail)
    run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "dkd", "--cache",
            small_store, "--cache", sampled_store, "--epochs", 1, "--batch-size", 32, "--max-steps-per-epoch", 2,
            "--workers", 0, "--quiet", "--out", tmp_path / "run", check=True)
    last = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"][-1]
    assert np.isfinite(last["train/dkd/final"]) and last["train/dkd/final"] > 0, last


def test_caches_of_other_views_or_a_wrong_weight_count_are_refused(small_digits, small_store, sampled_store, tmp_path):
    from cache.teacher_pass import CacheConfig, cache_teacher
    from commands.options import build
    other = tmp_path / "seed1.zarr"
    cache_teacher(build(CacheConfig, data=small_digits, out=other, progress=False, **{**SMALL_STORE, "seed": 1}))
    common = ["--data", small_digits, "--student", "test_resnet", "--method", "kd", "--workers", 0, "--quiet"]
    p = run_cli("train-student", *common, "--cache", small_store, "--cache", other, "--out", tmp_path / "a")
    assert p.returncode == 2, p.stderr
    assert f"caches {small_store} and {other} do not hold the same views" in p.stderr
    assert f"view seed is 1, in {small_store} 0" in p.stderr
    assert not (tmp_path / "a").exists()
    p = run_cli("train-student", *common, "--cache", small_store, "--cache", small_store, "--teacher-weights", "1,2,3",
                "--out", tmp_path / "b")
    assert p.returncode == 2 and "gives 3 weights for 2 caches" in p.stderr, p.stderr
    assert not (tmp_path / "b").exists()
    p = run_cli("train-student", *common, "--cache", small_store, "--ensemble", "logit", "--out", tmp_path / "c")
    assert p.returncode == 2 and "pass --cache more than once" in p.stderr, p.stderr
    tail = sampled_store  # the same views with a sampled tail: mixed where that is unbiased, else refused
    p = run_cli("train-student", *common, "--cache", small_store, "--cache", tail, "--ensemble", "logit",
                "--out", tmp_path / "d")
    assert p.returncode == 2 and f"cache {tail} holds a sampled tail, which --ensemble logit cannot mix" in p.stderr
    assert "use --ensemble prob" in p.stderr, p.stderr
    assert not (tmp_path / "d").exists()
    p = run_cli("train-student", *common[:-4], "ofa", "--workers", 0, "--quiet", "--ofa-form", "released",
                "--gamma", 1.5, "--cache", small_store, "--cache", tail, "--out", tmp_path / "e")
    assert p.returncode == 2, p.stderr
    assert f"cache {tail} holds a sampled tail, and released-form OFA with --gamma 1.5 weights each class by " \
           "p_j^gamma, which is not linear in the teacher's probabilities" in p.stderr, p.stderr
    assert not (tmp_path / "e").exists()


def _same_store(a, b):
    """Arrays, group attributes and unit records of two stores are equal."""
    from cache.format import NAMES
    from cache.store import CacheStore
    sa, sb = CacheStore(a), CacheStore(b)
    assert sa.description == sb.description
    for name in NAMES:
        assert np.array_equal(sa.read_all(name), sb.read_all(name)), name
    assert sa.done_units() == sb.done_units()
    for u in sa.done_units():
        assert sa.unit_info(u) == sb.unit_info(u), u


@pytest.fixture(scope="session")
def side_by_side(small_digits, small_store, tmp_path_factory):
    """One pass of small_store's request with a second teacher (test_convnext), and test_convnext's own pass."""
    from cache.teacher_pass import CacheConfig, cache_teacher
    from commands.options import build
    root = tmp_path_factory.mktemp("side_by_side")
    summary = cache_teacher(build(CacheConfig, data=small_digits, out=root / "both", progress=False,
                                  add_teacher=["test_convnext"], **SMALL_STORE))
    cache_teacher(build(CacheConfig, data=small_digits, out=root / "convnext.zarr", progress=False,
                        **{**SMALL_STORE, "teacher": "test_convnext"}))
    return root, summary


def test_a_two_teacher_pass_writes_each_single_teacher_store(small_store, side_by_side):
    root, summary = side_by_side
    assert summary["stores"] == [str(root / "both" / "0-test_resnet.zarr"), str(root / "both" / "1-test_convnext.zarr")]
    assert summary["views_written"] == 2 * 270  # each view built once
    _same_store(small_store, root / "both" / "0-test_resnet.zarr")
    _same_store(root / "convnext.zarr", root / "both" / "1-test_convnext.zarr")


@pytest.mark.slow
def test_a_killed_two_teacher_pass_redoes_only_what_each_store_misses(small_digits, side_by_side, tmp_path,
                                                                       monkeypatch):
    """SIGKILL of a real two-teacher `cache-teacher` process inside a unit's writes, once the first store has two
    units: the rerun writes exactly
    the units each store does not mark complete, and both stores come out as the uninterrupted pass's."""
    from cache.store import CacheStore
    from cache.teacher_pass import CacheConfig, cache_teacher
    from commands.options import build
    from conftest import kill_inside_a_unit
    root, _ = side_by_side
    out = tmp_path / "both"
    stores = [out / "0-test_resnet.zarr", out / "1-test_convnext.zarr"]
    args = ["cache-teacher", "--data", small_digits, "--out", out, "--add-teacher", "test_convnext", "--quiet",
            *(a for k, v in SMALL_STORE.items() for a in (f"--{k.replace('_', '-')}", v))]
    torn = kill_inside_a_unit(args, stores, after=2)
    missing = {p.name: set(range(6)) - CacheStore(p).done_units() for p in stores}
    assert all(torn[p] <= missing[p.name] for p in stores) and 1 <= len(missing[stores[0].name]) <= 4, (torn, missing)
    real, writes = CacheStore.write_unit, []
    monkeypatch.setattr(CacheStore, "write_unit", lambda self, unit: (writes.append((self.path.name, unit.shard)),
                                                                      real(self, unit)))
    cache_teacher(build(CacheConfig, data=small_digits, out=out, progress=False, add_teacher=["test_convnext"],
                        **SMALL_STORE))
    assert sorted(writes) == sorted((name, u) for name, units in missing.items() for u in units)
    for mine, theirs in zip(stores, sorted((root / "both").iterdir()), strict=True):
        _same_store(theirs, mine)


@pytest.mark.parametrize("option", [["--model-kwargs", "drop_rate=0.1"], ["--mean", "0.5,0.5,0.5"],
                                    ["--std", "0.2,0.2,0.2"]])
def test_ambiguous_teacher_options_are_refused(small_digits, tmp_path, option):
    """Options that describe one teacher would apply to --teacher only, silently: they are refused."""
    p = run_cli("cache-teacher", "--data", small_digits, "--teacher", "test_resnet", *option,
                "--add-teacher", "test_vit", "--out", tmp_path / "x")
    assert p.returncode == 2 and "ambiguous with --add-teacher" in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()
