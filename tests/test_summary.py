"""cache/summary.py: what a store keeps of a view's logits, and how exactly: float16 log-probabilities whose rounding
is small where the probability is, float32 values that give the full-logit losses, label log-odds that keep
1 - p_c for confident teachers, and the byte budget."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cache.distribution import label_log_odds, log_p_of_odds, log_rest_of_odds
from cache.format import raw_bytes_per_view
from cache.summary import summarize
from cache.targets import TeacherTargets
from students.losses import dkd_loss, kd_loss, ofa_loss

FIXTURE = Path(__file__).parent / "fixtures" / "tail_logits_tiny50.npz"


def _clip_like() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's real teacher logits (fp16 values plus noise within half an fp16 step, as float32 logits are),
    scaled to a largest |z| of 100, as CLIP's logit scale makes them; labels [B, 2]."""
    f = np.load(FIXTURE)
    z = torch.from_numpy(f["teacher_logits"]).float()
    step = torch.from_numpy(np.spacing(np.abs(f["teacher_logits"])).astype(np.float32))
    z = z + (torch.rand(z.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * step
    return z * (100 / z.abs().max()), torch.from_numpy(f["labels"]).long()


def test_float16_values_keep_each_probability_to_its_log_times_2_to_the_minus_11():
    """A stored value's rounding costs its probability at most |log p| x 2^-11 (relative), so the classes that hold
    the probability are nearly exact however large the logits; a logit's rounding would cost |z| x 2^-11 (5% at
    |z| = 100), whatever its probability."""
    z, labels = _clip_like()
    C = z.shape[1]
    arrays = summarize(z, labels[:, 0], labels[:, 1], C)
    assert arrays["topk_values"].dtype == np.float16
    log_p = torch.log_softmax(z.double(), 1).gather(1, torch.from_numpy(arrays["topk_indices"]).long())
    rel = (torch.from_numpy(arrays["topk_values"]).double() - log_p).exp() - 1  # p_stored / p - 1 per class
    assert (rel.abs() <= log_p.abs() * 2 ** -11 + 1e-6).all()
    # over the whole distribution: the probability-weighted mean relative error (the L1 distance) at T = 1 and 4
    rebuilt = TeacherTargets.from_arrays(arrays).logits(labels[:, 0], labels[:, 1], C).double()
    for T, bound in ((1.0, 1e-4), (4.0, 3e-4)):
        l1 = (F.softmax(rebuilt / T, 1) - F.softmax(z.double() / T, 1)).abs().sum(1).mean()
        assert l1 < bound, (T, float(l1))  # logits in fp16 give 1.3e-3 and 7.9e-4 (bench/cache_numerics.py)


@pytest.mark.parametrize("loss", ["kd", "dkd", "ofa paper", "ofa released"])
def test_float32_values_give_the_full_logit_losses(loss):
    """--value-dtype float32 at k = C: every loss from the store equals the full-logit one to 1e-5, on any logits."""
    gen = torch.Generator().manual_seed(1)
    z, s = torch.randn(16, 12, generator=gen) * 6, torch.randn(16, 12, generator=gen) * 2
    labels = torch.randint(0, 12, (16, 2), generator=gen)
    c = labels[:, 0]
    fn = {"kd": lambda t: kd_loss(s, t, 4.0), "dkd": lambda t: dkd_loss(s, t, c, 1.0, 8.0, 4.0),
          "ofa paper": lambda t: ofa_loss(s, t, c, 1.5, 1.0, "paper"),
          "ofa released": lambda t: ofa_loss(s, t, c, 1.5, 1.0, "released")}[loss]
    tt = TeacherTargets.from_arrays(summarize(z, labels[:, 0], labels[:, 1], 12, value_dtype="float32"))
    assert tt.values.dtype == torch.float32
    got, want = float(fn(tt.logits(labels[:, 0], labels[:, 1], 12))), float(fn(z.double()))
    assert abs(got / want - 1) < 1e-5, (got, want)


@pytest.mark.parametrize("eps", [1e-4, 1e-6, 1e-8, 1e-12])
def test_label_log_odds_keep_p_and_one_minus_p_of_a_confident_teacher(eps):
    """1 - p_c = eps with logits near 20: from the log-odds, log p_c and log(1 - p_c) are exact to float32 (a
    float32 z_c - log Z loses 1 - p_c below about 2e-6); and a store keeps them per label class."""
    gen = torch.Generator().manual_seed(2)
    others = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    others = others - torch.logsumexp(others, 1, keepdim=True) + np.log(eps) + 20  # sum of exp(z_j - 20) = eps
    z = torch.cat([20 + torch.log1p(-torch.full((4, 1), eps, dtype=torch.float64)), others], 1)
    z32 = z.float()
    exact = torch.log_softmax(z32.double(), 1)  # of the float32 logits a teacher outputs
    rest = torch.logsumexp(exact[:, 1:], 1)  # log(1 - p_0), summed over the others
    a = label_log_odds(z32, torch.zeros(4, 1, dtype=torch.int64))[:, 0]
    assert torch.allclose(log_rest_of_odds(a).double(), rest, rtol=1e-6, atol=0)
    assert torch.allclose(log_p_of_odds(a).double(), torch.log1p(-rest.exp()), rtol=1e-6, atol=0)
    naive = torch.log(-torch.expm1(z32[:, 0] - torch.logsumexp(z32, 1)))  # what a stored label logit gives
    assert not torch.allclose(naive.double(), rest, rtol=1e-3) or eps > 1e-5
    arrays = summarize(z32, torch.zeros(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), 3)
    assert np.allclose(arrays["label_log_odds"][:, 0], a.numpy(), rtol=1e-7, atol=0)


def test_each_store_layout_fits_its_byte_count():
    """The default is within the brief's 4k + 24 bytes per (epoch, sample); each option adds what it says."""
    for k in (1, 10, 20, 100):
        assert raw_bytes_per_view(k, 1000) == 4 * k + 23 <= 4 * k + 24
        assert raw_bytes_per_view(k, 1000, value_dtype="float32") == 6 * k + 23
        assert raw_bytes_per_view(k, 1000, standardize=True) == 4 * k + 27
        assert raw_bytes_per_view(k, 1000, 8, 2) == 4 * k + 23 + 4 * 8 + 4 + 12 * 2
