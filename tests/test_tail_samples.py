"""The sampled tail (cache-teacher --tail-samples): the store holds replayable draws, training reads them, and the
losses estimated from them are unbiased, in value and in gradient, where the uniform tail is not."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.distribution import TeacherDist
from cache.format import raw_bytes_per_view
from cache.inspect import inspect_cache, verify_cache
from cache.summary import TailSpec, summarize
from cache.targets import TEACHER_KEY, CachedTeacher, TeacherTargets
from cache.teacher_pass import CacheConfig
from commands.options import build
from conftest import run_cli
from pipeline.errors import UserError
from students.losses import dkd_loss, kd_loss, ofa_loss

# the first 32 views of bench/tail_sampling.py's run: a CE-trained resnet18 teacher on the Tiny-ImageNet 50-class
# slice (its logits rounded to fp16), the student logits of that run, and the views' label and mixing partner's label
FIXTURE = Path(__file__).parent / "fixtures" / "tail_logits_tiny50.npz"
K, M, TEMPS, DRAW_T, DRAWS = 5, 8, [4.0], 4.0, 2000  # the defaults of --tail-temperatures and the draw
LOSSES = {  # name -> (T, loss(student, teacher, target))
    "kd T=4": (4.0, lambda s, t, c: kd_loss(s, t, 4.0)),
    "ofa paper gamma=1.5": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.5, 1.0, "paper")),
    "ofa released gamma=1.5": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.5, 1.0, "released")),
    "dkd T=4": (4.0, lambda s, t, c: dkd_loss(s, t, c, 1.0, 8.0, 4.0)),
}


def _fixture():
    f = np.load(FIXTURE)
    return (torch.from_numpy(f["teacher_logits"]).float(), torch.from_numpy(f["student_logits"]),
            torch.from_numpy(f["labels"]).long())


def _value_and_grad(fn, s: torch.Tensor, teacher, c: torch.Tensor):
    s = s.clone().requires_grad_(True)
    loss = fn(s, teacher, c)
    (g,) = torch.autograd.grad(loss, s)
    return float(loss.detach()), g


def _per_draw(fn, q: torch.Tensor, d: TeacherDist, c: torch.Tensor):
    """d: DRAWS blocks of B rows -> each draw's batch-mean loss [R] and its gradient [R, B, C]. One backward for all
    draws: rows are independent, so the gradient of the mean over R * B rows is each draw's gradient / R."""
    B = len(q)
    qq, cc = q.repeat(DRAWS, 1).requires_grad_(True), c.repeat(DRAWS)
    (g,) = torch.autograd.grad(fn(qq, d, cc), qq)
    with torch.no_grad():  # vmap: the loss of each draw's block, as a loop over draws would give it
        v = torch.vmap(lambda *f: fn(q, TeacherDist(*f), c))(*(x.view(DRAWS, B, -1) for x in d))
    return v.double(), (g * DRAWS).view(DRAWS, B, -1).double()


@pytest.fixture(scope="module")
def draws():
    """DRAWS independent draws of the fixture's views, each read back as a store holds it: (z, q, labels,
    {T: TeacherDist of [DRAWS * B, C]}, uniform-tail logits [B, C])."""
    z, q, labels = _fixture()
    B, C = z.shape
    # every draw's views at once: a draw is a block of B rows with its own view seeds
    zz, ll = z.repeat(DRAWS, 1), labels.repeat(DRAWS, 1)
    # float32 values: the store keeps the teacher's log-probabilities to float32, so that only the estimator is
    # under test here (float16's rounding has its own bound: tests/test_summary.py)
    arrays = summarize(zz, ll[:, 0], ll[:, 1], K, np.arange(DRAWS * B), TailSpec(M, TEMPS, DRAW_T), "float32")
    tt = TeacherTargets.from_arrays(arrays, len(TEMPS))
    dists = {T: tt.distribution(ll[:, 0], ll[:, 1], C, T, TEMPS, DRAW_T) for T in (1.0, 4.0)}
    uniform = TeacherTargets.from_arrays(summarize(z, labels[:, 0], labels[:, 1], K)).logits(labels[:, 0],
                                                                                            labels[:, 1], C)
    return z, q, labels, dists, uniform


def test_the_fixture_is_a_real_non_degenerate_teacher():
    z, q, labels = _fixture()
    p = torch.softmax(z, 1)
    top5 = p.topk(K, 1).values.sum(1)
    assert z.shape == (32, 50) and 0.3 < float(top5.mean()) < 0.95, "the tail must hold real mass"
    assert float(p.max(1).values.mean()) > 2 / z.shape[1], "not a uniform (untrained) teacher"
    assert raw_bytes_per_view(K, 50, M, len(TEMPS)) == 91 <= 96


@pytest.mark.parametrize("name", list(LOSSES))
def test_estimated_loss_and_gradient_are_unbiased_and_the_uniform_tail_is_not(draws, name):
    """The mean over DRAWS draws equals the full-logit loss and gradient within 5 standard errors (of that mean);
    the uniform tail fails the same check: its gradient misses by more than the bound (its loss value may not: with
    this fixture's freshly initialised student, log q is nearly flat over the tail, so at T = 1 the uniform
    spread gets sum_tail p_j log q_j nearly right, though not which class the student should lower)."""
    z, q, labels, dists, uniform = draws
    T, fn = LOSSES[name]
    c = labels[:, 0]
    full_v, full_g = _value_and_grad(fn, q, z, c)
    v, g = _per_draw(fn, q, dists[T], c)  # [R], [R, B, C]
    se_v, se_g = v.std() / DRAWS ** 0.5, g.std(0) / DRAWS ** 0.5
    assert abs(float(v.mean()) - full_v) <= 5 * float(se_v) + 1e-6, (name, float(v.mean()), full_v, float(se_v))
    excess = (g.mean(0) - full_g).abs() - (5 * se_g + 1e-7)
    assert float(excess.max()) <= 0, (name, float(excess.max()))
    assert float(se_v) < 0.05 * abs(full_v), "the bound must be tight enough to mean something"
    uni_v, uni_g = _value_and_grad(fn, q, uniform, c)
    miss = (uni_g - full_g).abs() / (5 * se_g + 1e-7)
    assert float(miss.max()) > 3, (name, float(miss.max()))  # several times the bound, not at its edge
    if T > 1:  # at T = 4 the uniform tail's value misses too
        assert abs(uni_v - full_v) > 5 * float(se_v), (name, uni_v, full_v, float(se_v))


def test_a_one_class_tail_is_exact():
    """With one class outside top-k and labels, every draw is that class with r = 1, so scale = 1 everywhere and
    every loss equals the full-logit one (a check of the weights' normalisation, tail_lse included)."""
    z, q, labels = _fixture()
    z, q, C = z[:, :8], q[:, :8], 8
    labels = torch.stack([z.argsort(1)[:, 0], z.argsort(1)[:, 1]], 1)  # the two smallest logits are the labels
    arrays = summarize(z, labels[:, 0], labels[:, 1], C - 3, np.arange(len(z)), TailSpec(4, TEMPS, 1.0))
    tt = TeacherTargets.from_arrays(arrays, len(TEMPS))
    for name, (T, fn) in LOSSES.items():
        d = tt.distribution(labels[:, 0], labels[:, 1], C, T, TEMPS, 1.0)
        assert torch.allclose(d.scale, torch.ones_like(d.scale), atol=1e-5), name
        assert abs(float(fn(q, d, labels[:, 0])) - float(fn(q, z, labels[:, 0]))) < 1e-3, name


def _confident_teacher(eps: float, rows: int = 8, C: int = 50, seed: int = 0):
    """Logits [rows, C] whose label class 0 has 1 - p_0 = eps (to the rounding of z_0), near 16 like a trained
    teacher's; the others are multiples of 1/32, which fp16 holds exactly as logits or as log-probabilities (so that
    what is measured is the arithmetic, not the storage's rounding). Labels [rows]; student logits [rows, C]."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(rows, C - 1, generator=gen, dtype=torch.float64) * 1.5
    v = torch.round((g - torch.logsumexp(g, 1, keepdim=True) + np.log(eps)) * 32) / 32  # non-target log p
    z_c = 16 + torch.log1p(-torch.logsumexp(v, 1).exp())
    z = torch.cat([z_c[:, None], v + 16], 1).float()
    return z, torch.zeros(rows, dtype=torch.int64), torch.randn(rows, C, generator=gen) * 2


def _dkd64(s, log_p, scale, c, T, alpha=1.0, beta=8.0):
    """DKD in float64 with the teacher's exact log-probabilities at T, its 1 - p_c summed over the other classes,
    and the non-target terms weighted by `scale` (a store's draw): the estimate a store should give, exactly."""
    s, log_p, scale = s.double(), log_p.double(), scale.double()
    gt = torch.nn.functional.one_hot(c, s.shape[1]).bool()
    log_q = torch.log_softmax(s / T, 1)
    rest_q = torch.logsumexp(log_q.masked_fill(gt, -np.inf), 1)
    rest_p = torch.logsumexp(log_p.masked_fill(gt, -np.inf), 1)
    p_c, q_c = log_p.gather(1, c[:, None])[:, 0], log_q.gather(1, c[:, None])[:, 0]
    tckd = p_c.exp() * (p_c - q_c) + rest_p.exp() * (rest_p - rest_q)
    log_nt, log_ns = log_p - rest_p[:, None], log_q - rest_q[:, None]
    nckd = (scale * log_nt.exp() * (log_nt - log_ns)).masked_fill(gt, 0).sum(1)
    return float((alpha * tckd + beta * nckd).mean() * T * T)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("eps", [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8])
def test_dkd_from_the_store_is_exact_for_confident_teachers(eps, T):
    """1 - p_c from 1e-3 to 1e-8: DKD from a sampled-tail store (the default float16 values) is within 1e-5 of the
    same estimate (the same draw) computed in float64 from the full logits. A store that kept only the label's
    logit loses 1 - p_c to float32's rounding of z_c / T - log Z_T (bench/cache_numerics.py: up to -79% at 1e-8)."""
    z, c, s = _confident_teacher(eps)
    C = z.shape[1]
    tt = TeacherTargets.from_arrays(summarize(z, c, c, K, np.arange(len(z)), TailSpec(M, TEMPS, DRAW_T)), 1)
    d = tt.distribution(c, c, C, T, TEMPS, DRAW_T)
    assert (d.scale > 0).sum(1).min() > K + 1  # the estimate has sampled tail classes, not only known ones
    want = _dkd64(s, torch.log_softmax(z.double() / T, 1), d.scale, c, T)
    got = float(dkd_loss(s, d, c, 1.0, 8.0, T))
    assert abs(got / want - 1) < 1e-5, (got, want)


STD_TEMPS = [1.0, 2.0]  # the default --standard-temperatures
STD_LOSSES = {  # logit standardization: name -> (T, loss(student, teacher, target)), the student z-scored in the loss
    "kd T=2": (2.0, lambda s, t, c: kd_loss(s, t, 2.0, standardize=True)),
    "dkd T=2": (2.0, lambda s, t, c: dkd_loss(s, t, c, 1.0, 8.0, 2.0, standardize=True)),
    "ofa paper gamma=1.5": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.5, 1.0, "paper", standardize=True)),
    "ofa released gamma=1.5": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.5, 1.0, "released", standardize=True)),
}


@pytest.mark.parametrize("name", list(STD_LOSSES))
def test_standardized_losses_from_a_k_equal_c_store_are_the_full_logit_ones(name):
    """A k = C store made with --standardize (float32 values): the teacher at T (std + 1e-7), from the std the store
    kept, gives every standardized loss to 1e-5."""
    z, q, labels = _fixture()
    C = z.shape[1]
    arrays = summarize(z, labels[:, 0], labels[:, 1], C, value_dtype="float32", standardize=True)
    assert np.allclose(arrays["logit_std"], z.std(1).numpy(), rtol=1e-6)
    T, fn = STD_LOSSES[name]
    d = TeacherTargets.from_arrays(arrays).standardized(labels[:, 0], labels[:, 1], C, T)
    got, want = float(fn(q, d, labels[:, 0])), float(fn(q, z, labels[:, 0]))
    assert abs(got / want - 1) < 1e-5, (got, want)


@pytest.fixture(scope="module")
def standardized_draws():
    """As `draws`, from a store made with --standardize: {T: TeacherDist of the standardized teacher at T}."""
    z, q, labels = _fixture()
    B, C = z.shape
    zz, ll = z.repeat(DRAWS, 1), labels.repeat(DRAWS, 1)
    arrays = summarize(zz, ll[:, 0], ll[:, 1], K, np.arange(DRAWS * B), TailSpec(M, TEMPS, DRAW_T, STD_TEMPS),
                       "float32", standardize=True)
    tt = TeacherTargets.from_arrays(arrays, len(TEMPS) + len(STD_TEMPS))
    return {T: tt.distribution(ll[:, 0], ll[:, 1], C, T, TEMPS, DRAW_T, True, STD_TEMPS) for T in STD_TEMPS}


@pytest.mark.parametrize("name", list(STD_LOSSES))
def test_standardized_losses_from_a_sampled_tail_are_unbiased(standardized_draws, name):
    """The tail's standardized temperature slots: over DRAWS draws, each standardized loss and its gradient are the
    full-logit ones within 5 standard errors (of that mean), as for the raw logits."""
    z, q, labels = _fixture()
    T, fn = STD_LOSSES[name]
    c = labels[:, 0]
    full_v, full_g = _value_and_grad(fn, q, z, c)
    v, g = _per_draw(fn, q, standardized_draws[T], c)
    se_v, se_g = v.std() / DRAWS ** 0.5, g.std(0) / DRAWS ** 0.5
    assert abs(float(v.mean()) - full_v) <= 5 * float(se_v) + 1e-6, (name, float(v.mean()), full_v, float(se_v))
    assert float(((g.mean(0) - full_g).abs() - (5 * se_g + 1e-7)).max()) <= 0, name
    assert float(se_v) < 0.05 * abs(full_v), "the bound must be tight enough to mean something"


# ----------------------------------------------------------------------------------------- the store

@pytest.fixture(scope="module")
def tail_store(small_digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tail") / "t.zarr"
    run_cli("cache-teacher", "--data", small_digits, "--out", out, "--teacher", "test_resnet", "--recipe", "digits-mix",
            "--epochs", 1, "--topk", 3, "--tail-samples", 6, "--batch-size", 40, "--workers", 0, "--quiet", check=True)
    return out


def test_a_sampled_tail_store_replays_its_draws_and_says_what_it_holds(tail_store):
    info = inspect_cache(tail_store)
    assert info["tail_samples"] == 6 and info["tail_temperatures"] == [1.0, 4.0]
    assert info["tail_draw_temperature"] == 4.0 and "6 classes per view" in info["tail"]  # the flattest held
    assert info["raw_bytes_per_view"] == 4 * 3 + 23 + 4 * 6 + 4 + 12 == raw_bytes_per_view(3, 10, 6, 1)
    # a fresh teacher pass over re-built views draws the same classes from the recorded view seeds
    r = verify_cache(tail_store, samples=16)
    assert r["ok"], r["problems"]
    attrs = json.loads((tail_store / "zarr.json").read_text())["attributes"]
    assert attrs["format_version"] == 4 and attrs["tail_samples"] == 6 and attrs["tail_temperatures"] == [4.0]


def test_training_reads_the_draws_through_the_join(small_digits, tail_store):
    """A batch of `CachedTeacher.views` gives the teacher at T = 4 as the store holds it: exact log-probabilities
    on the top-k, scale 1 on known classes, and importance weights that sum, against r, to one per view."""
    from torch.utils.data import DataLoader
    cached = CachedTeacher(tail_store)
    batch = next(iter(DataLoader(cached.views(small_digits), batch_size=16)))
    t = batch[TEACHER_KEY]
    d = cached.source(4.0)(batch)
    assert isinstance(d, TeacherDist) and d.log_p.shape == (16, 10) and torch.isfinite(d.log_p).all()
    labels = torch.stack([batch["label"], batch["partner_label"]], 1)
    is_label = (t.indices[:, :, None] == labels[:, None, :]).any(2)
    top = d.log_p.gather(1, t.indices)  # log p at T = 4: the stored value / 4 - log Z_4, a label class's from its odds
    assert torch.allclose(top[~is_label], (t.values / 4 - t.log_z[:, :1])[~is_label], atol=1e-6)
    assert torch.allclose(d.log_p.gather(1, labels), -torch.nn.functional.softplus(t.tail_label_log_odds[:, 0]))
    assert (d.scale.gather(1, t.indices) == 1).all() and (d.scale.gather(1, batch["label"][:, None]) == 1).all()
    td = cached.description.tail_draw_temperature
    r = torch.zeros(16, 10).scatter_(1, t.tail_ids, torch.exp(t.tail_values / td - t.tail_lse[:, None]))  # the draw's
    assert torch.allclose((d.scale * r).sum(1), torch.ones(16), atol=1e-5)  # sum_m r_jm / (M r_jm) = 1
    with pytest.raises(UserError, match=r"at temperatures 1, 4, not at --temperature 2; .*--tail-temperatures"):
        cached.source(2.0)


def test_tail_options_without_samples_are_refused():
    with pytest.raises(UserError, match="--tail-samples M"):
        build(CacheConfig, data="d", out="o", teacher="test_resnet", tail_temperatures=[4.0])
    r = run_cli("cache-teacher", "--data", "d", "--out", "o", "--teacher", "test_resnet", "--tail-draw-temperature", 4)
    assert r.returncode == 2 and "--tail-samples M" in r.stderr + r.stdout


@pytest.mark.slow
def test_train_student_distils_from_the_sampled_tail_and_refuses_a_temperature_it_lacks(small_digits, tail_store,
                                                                                         tmp_path):
    common = ["--data", small_digits, "--student", "test_resnet", "--cache", tail_store, "--epochs", 1,
              "--batch-size", 16, "--max-steps-per-epoch", 2, "--workers", 0, "--quiet"]
    _dkd_is_the_loss_on_the_stored_draws(small_digits, tail_store, tmp_path)
    p = run_cli("train-student", *common, "--method", "kd", "--temperature", 2, "--out", tmp_path / "kd")
    assert p.returncode == 2 and "not at --temperature 2" in p.stderr, p.stderr
    assert not (tmp_path / "kd" / "metrics.json").exists()


def test_train_student_standardizes_from_a_store_that_keeps_the_std_and_refuses_one_that_does_not(
        small_digits, tail_store, tmp_path):
    out = tmp_path / "std.zarr"
    run_cli("cache-teacher", "--data", small_digits, "--out", out, "--teacher", "test_resnet", "--recipe", "digits-mix",
            "--epochs", 1, "--topk", 3, "--tail-samples", 4, "--standardize", "--batch-size", 40, "--workers", 0,
            "--quiet", check=True)
    info = inspect_cache(out)
    assert info["standardize"] and info["standard_temperatures"] == [1.0, 2.0]
    assert info["raw_bytes_per_view"] == raw_bytes_per_view(3, 10, 4, 3, standardize=True) == 4 * 3 + 27 + 16 + 4 + 36
    assert verify_cache(out, samples=8)["ok"]
    common = ["--data", small_digits, "--student", "test_resnet", "--epochs", 1, "--batch-size", 16,
              "--max-steps-per-epoch", 2, "--workers", 0, "--quiet", "--standardize", "--method", "kd"]
    run_cli("train-student", *common, "--cache", out, "--temperature", 2, "--out", tmp_path / "kd", check=True)
    last = json.loads((tmp_path / "kd" / "metrics.json").read_text())["history"][-1]
    assert np.isfinite(last["train/kd/final"]) and last["train/kd/final"] > 0, last
    p = run_cli("train-student", *common, "--cache", out, "--temperature", 3, "--out", tmp_path / "t3")
    assert p.returncode == 2 and "for standardized logits at temperatures 1, 2, not at --temperature 3" in p.stderr
    p = run_cli("train-student", *common, "--cache", tail_store, "--temperature", 2, "--out", tmp_path / "nostd")
    assert p.returncode == 2 and f"cache {tail_store} does not hold its teacher's logit standard deviations" in p.stderr
    assert not (tmp_path / "t3").exists() and not (tmp_path / "nostd").exists()
    r = run_cli("cache-teacher", "--data", "d", "--out", "o", "--teacher", "test_resnet", "--standard-temperatures", 2)
    assert r.returncode == 2 and "--tail-samples M (M > 0) and --standardize" in r.stderr + r.stdout


def _dkd_is_the_loss_on_the_stored_draws(data, store, tmp_path):
    """One DKD step (tests/support/probe_cli.py records its batch): the loss the run reports is dkd_loss on the
    student's initial logits against the store's sampled-tail distribution at T = 4 (its rows, read directly)."""
    from conftest import probe_batches, stored_targets
    from pipeline.models import create_model, model_input
    from students.losses import dkd_loss, target_class
    out = tmp_path / "dkd"
    (b,) = probe_batches(tmp_path / "probe", "train-student", "--data", data, "--student", "test_resnet", "--cache",
                         store, "--epochs", 1, "--batch-size", 16, "--max-steps-per-epoch", 1, "--workers", 0,
                         "--quiet", "--method", "dkd", "--out", out)
    cached = CachedTeacher(store)
    d = cached.description
    dist = stored_targets(store, 0, b["index"].numpy()).distribution(
        b["label"], b["partner_label"], 10, 4.0, [float(t) for t in d.tail_temperatures], d.tail_draw_temperature)
    student = create_model("test_resnet", 10, role="student", init_seed=0).train()
    with torch.no_grad():
        s = student(model_input(student, cached.recipe.input_size)(b["view"]))
    want = dkd_loss(s, dist, target_class(b["label"], b["partner_label"], b["lam"]), 1.0, 8.0, 4.0).item()
    last = json.loads((out / "metrics.json").read_text())["history"][-1]
    assert last["train/dkd/final"] == pytest.approx(want, rel=1e-5), (last, want)
