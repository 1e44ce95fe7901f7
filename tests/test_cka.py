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


@pytest.mark.parametrize("mode", ["minibatch", "full"])
def test_cka_command_for_two_families(small_digits, tmp_path, mode):
    out = tmp_path / mode
    proc = run_cli("cka", "--model-a", "test_resnet", "--model-b", "test_vit", "--model-kwargs-b", "img_size=32",
                   "--model-kwargs-b", "patch_size=4", "--data", small_digits, "--recipe", "digits", "--samples", 64,
                   "--batch-size", 32, "--mode", mode, "--out", out, check=True)
    assert "linear CKA" in proc.stdout
    assert (out / "cka.png").stat().st_size > 1000
    m = json.loads((out / "cka.json").read_text())
    mat = np.array(m["matrix"])
    assert mat.shape == (4, 4) and m["mode"] == mode and m["samples"] == 64
    assert np.isfinite(mat).all() and (mat <= 1.0 + 1e-6).all()
    assert (out / "cka.csv").read_text().count("\n") == 5
