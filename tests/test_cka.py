import json

import numpy as np
import pytest
import torch

from commands.cka import MinibatchCKA, linear_cka, unbiased_hsic
from conftest import run_cli


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # per test: a statistical test's inputs must not depend on test order


def naive_cka(x, y):
    """The brief's formula, written plainly: Grams, centring matrix, traces."""
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T  # noqa: E741
    h = torch.eye(n, dtype=x.dtype) - torch.ones(n, n, dtype=x.dtype) / n

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


@pytest.fixture
def xy():
    x = torch.randn(60, 20, dtype=torch.float64)
    y = x @ torch.randn(20, 30, dtype=torch.float64) + 0.5 * torch.randn(60, 30, dtype=torch.float64)
    return x, y


def test_identity_symmetry_and_naive_formula(xy):
    x, y = xy
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(naive_cka(x, y), abs=1e-10)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_invariances(xy):
    x, y = xy
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    assert linear_cka(x @ q, y) == pytest.approx(linear_cka(x, y), abs=1e-10)  # orthogonal rotation
    assert linear_cka(3.7 * x, y) == pytest.approx(linear_cka(x, y), abs=1e-10)  # isotropic scaling
    a = torch.randn(20, 20, dtype=torch.float64) @ torch.diag(torch.logspace(-2, 2, 20, dtype=torch.float64))
    assert abs(linear_cka(x @ a, y) - linear_cka(x, y)) > 1e-3  # a general invertible map changes it


def test_minibatch_estimate_converges_to_full_batch():
    n, d = 4096, 16
    z = torch.randn(n, d, dtype=torch.float64)
    x = z @ torch.randn(d, 24, dtype=torch.float64)
    y = torch.tanh(z @ torch.randn(d, 12, dtype=torch.float64)) + 0.3 * torch.randn(n, 12, dtype=torch.float64)
    full = linear_cka(x, y)
    errors = []
    for batches in (4, 16, 64):
        acc = MinibatchCKA(1, 1)
        for xb, yb in zip(x[: batches * 64].split(64), y[: batches * 64].split(64), strict=True):
            acc.update([xb], [yb])
        errors.append(abs(acc.value()[0, 0] - full))
    assert errors[-1] < 0.02 and errors[-1] <= errors[0] + 1e-9


def test_unbiased_hsic_is_unbiased_for_independent_features():
    vals = []
    for _ in range(200):
        x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)
        vals.append(float(unbiased_hsic(x @ x.T, y @ y.T)))
    assert abs(np.mean(vals)) < 3 * np.std(vals) / np.sqrt(len(vals))


@pytest.mark.slow
def test_cka_command_for_two_families(small_digits, tmp_path):
    """Both modes of the command on the same 64 views (2 batches of 32) against the estimators applied by hand to
    the two models' stage features: full is linear CKA over all 64, minibatch the ratio of the batches' summed
    unbiased HSICs; and the two estimates of each entry agree to within 0.15 (measured: 0.06 at most)."""
    from torch.utils.data import DataLoader

    from commands.cka import stage_model
    from pipeline.augment import get_recipe
    from pipeline.reader import ShardReader
    from pipeline.views import EvalViews
    mats = {}
    for mode in ("minibatch", "full"):
        out = tmp_path / mode
        proc = run_cli("cka", "--model-a", "test_resnet", "--model-b", "test_vit", "--model-kwargs-b", "img_size=32",
                       "--model-kwargs-b", "patch_size=4", "--data", small_digits, "--recipe", "digits", "--samples",
                       64, "--batch-size", 32, "--mode", mode, "--out", out, check=True)
        assert "linear CKA" in proc.stdout
        assert (out / "cka.png").stat().st_size > 1000
        m = json.loads((out / "cka.json").read_text())
        mats[mode] = np.array(m["matrix"])
        assert mats[mode].shape == (4, 4) and m["mode"] == mode and m["samples"] == 64
        assert (out / "cka.csv").read_text().count("\n") == 5
    recipe = get_recipe("digits")
    a = stage_model("test_resnet", 10, recipe.input_size)
    b = stage_model("test_vit", 10, recipe.input_size, model_kwargs={"img_size": 32, "patch_size": 4})
    batches = [v["view"] for v in DataLoader(EvalViews(ShardReader(small_digits, "val"), recipe), batch_size=32)][:2]
    fa = [a.features(v) for v in batches]  # per batch, per stage [32, d]
    fb = [b.features(v) for v in batches]
    full = [[linear_cka(torch.cat([f[i] for f in fa]), torch.cat([f[j] for f in fb])) for j in range(4)]
            for i in range(4)]
    np.testing.assert_allclose(mats["full"], full, rtol=1e-6, atol=1e-9)
    acc = MinibatchCKA(4, 4)
    for xa, xb in zip(fa, fb, strict=True):
        acc.update(xa, xb)
    np.testing.assert_allclose(mats["minibatch"], acc.value(), rtol=1e-6, atol=1e-9)
    assert np.abs(mats["minibatch"] - mats["full"]).max() < 0.15, (mats["minibatch"], mats["full"])
    assert not np.allclose(mats["minibatch"], mats["full"], atol=1e-4)  # two estimators, not one twice
