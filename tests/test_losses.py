import math

import pytest
import torch
import torch.nn.functional as F

from cache.distribution import label_log_odds
from cache.targets import reconstruct_logits
from students.losses import dkd_loss, kd_loss, ofa_loss, soft_ce, soft_target, target_class

B, C = 6, 12


def _naive_probs(logits, T=1.0):
    rows = []
    for r in logits.tolist():
        e = [math.exp(v / T) for v in r]
        s = sum(e)
        rows.append([v / s for v in e])
    return rows


def _naive_ofa(s, t, target, gamma, T, form):
    q, p = _naive_probs(s, T), _naive_probs(t, T)
    total = 0.0
    for b in range(len(q)):
        c = int(target[b])
        for j in range(len(q[b])):
            if form == "paper":
                w = (1 + p[b][c]) ** gamma if j == c else p[b][j]
            else:
                w = (1 + p[b][c]) ** gamma - 1 if j == c else p[b][j] ** gamma
            total += -w * math.log(q[b][j])
    return total / len(q)


def _naive_kd(s, t, T):
    q, p = _naive_probs(s, T), _naive_probs(t, T)
    return sum(p[b][j] * math.log(p[b][j] / q[b][j]) for b in range(len(q)) for j in range(len(q[b]))) / len(q) * T * T


def _naive_dkd(s, t, target, alpha, beta, T):
    q, p = _naive_probs(s, T), _naive_probs(t, T)
    total = 0.0
    for b in range(len(q)):
        c = int(target[b])
        bs, bt = [q[b][c], 1 - q[b][c]], [p[b][c], 1 - p[b][c]]
        tckd = sum(bt[i] * math.log(bt[i] / bs[i]) for i in range(2))
        qs = [q[b][j] / (1 - q[b][c]) for j in range(len(q[b])) if j != c]
        pt = [p[b][j] / (1 - p[b][c]) for j in range(len(p[b])) if j != c]
        nckd = sum(pt[i] * math.log(pt[i] / qs[i]) for i in range(len(qs)))
        total += alpha * tckd + beta * nckd
    return total / len(q) * T * T


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # per test: inputs do not depend on which tests ran before


@pytest.fixture
def logits():
    s, t = torch.randn(B, C, dtype=torch.float64) * 2, torch.randn(B, C, dtype=torch.float64) * 3
    return s, t, torch.randint(0, C, (B,))


@pytest.mark.parametrize("form", ["paper", "released"])
@pytest.mark.parametrize("gamma,T", [(1.0, 1.0), (1.5, 1.0), (2.0, 2.0)])
def test_ofa_matches_naive(logits, form, gamma, T):
    s, t, y = logits
    assert ofa_loss(s, t, y, gamma, T, form).item() == pytest.approx(_naive_ofa(s, t, y, gamma, T, form), rel=1e-5)


def test_kd_and_dkd_match_naive(logits):
    s, t, y = logits
    assert kd_loss(s, t, 4.0).item() == pytest.approx(_naive_kd(s, t, 4.0), rel=1e-5)
    assert dkd_loss(s, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(_naive_dkd(s, t, y, 1.0, 8.0, 4.0), rel=1e-4)


def test_paper_form_with_a_soft_label(logits):
    """Generalised label term: CE(label) + ((1 + p_c)^gamma - 1)(-log q_c) - sum_{j != c} p_j log q_j."""
    s, t, y = logits
    soft = F.softmax(torch.randn(B, C, dtype=torch.float64), 1)
    p = F.softmax(t, 1)
    log_q = F.log_softmax(s, 1)
    p_c, log_q_c = p.gather(1, y[:, None])[:, 0], log_q.gather(1, y[:, None])[:, 0]
    others = -(p * log_q).sum(1) + p_c * log_q_c
    want = (-(soft * log_q).sum(1) - ((1 + p_c) ** 1.5 - 1) * log_q_c + others).mean()
    assert ofa_loss(s, t, y, 1.5, label=soft).item() == pytest.approx(want.item(), rel=1e-6)
    assert ofa_loss(s, t, y, 1.5, label=F.one_hot(y, C)).item() == pytest.approx(ofa_loss(s, t, y, 1.5).item())


def test_gamma_one_is_ce_plus_soft_ce(logits):
    """The brief's identity: L_OFA(gamma=1) = -(1 + p_c) log q_c - sum_{j != c} p_j log q_j
    = CE(label) + soft CE(teacher)."""
    s, t, y = logits
    soft = -(F.softmax(t, 1) * F.log_softmax(s, 1)).sum(1).mean()
    assert ofa_loss(s, t, y, 1.0).item() == pytest.approx((F.cross_entropy(s, y) + soft).item(), rel=1e-6)
    # and gamma = 2 adds -(p_c + p_c^2) log q_c
    p_c = F.softmax(t, 1).gather(1, y[:, None])[:, 0]
    log_q_c = F.log_softmax(s, 1).gather(1, y[:, None])[:, 0]
    extra = (-(p_c + p_c**2) * log_q_c).mean()
    assert ofa_loss(s, t, y, 2.0).item() == pytest.approx((ofa_loss(s, t, y, 1.0) + extra).item(), rel=1e-6)


def _cache_of(t, labels, k):
    """What a store keeps: top-k log-probabilities (fp16) and indices, lse, the label classes' log-odds."""
    vals, idx = t.topk(k, 1)
    lse = torch.logsumexp(t, 1)
    return (vals - lse[:, None]).half(), idx, lse.float(), label_log_odds(t.float(), labels)


def test_reconstruction_with_k_equal_classes_is_the_online_teacher(logits):
    s, t, y = logits
    t = t.float()
    labels = torch.stack([y, y.roll(1)], 1)
    z = reconstruct_logits(*_cache_of(t, labels, C)[:3], labels, label_log_odds(t, labels), C)
    for loss in (lambda u: ofa_loss(s.float(), u, y, 1.5), lambda u: kd_loss(s.float(), u, 4.0),
                 lambda u: dkd_loss(s.float(), u, y)):
        assert loss(z).item() == pytest.approx(loss(t).item(), rel=2e-3)


def test_reconstruction_keeps_known_probabilities_and_tail_mass(logits):
    _, t, y = logits
    t = t.float()
    labels = torch.stack([y, y.roll(1)], 1)
    vals, idx, lse, lab = _cache_of(t, labels, 3)
    z = reconstruct_logits(vals, idx, lse, labels, lab, C)
    p_true, p_rec = F.softmax(t, 1), F.softmax(z, 1)
    assert torch.allclose(p_rec.gather(1, labels), p_true.gather(1, labels), atol=1e-5)  # labels exact
    assert torch.allclose(p_rec.gather(1, idx), p_true.gather(1, idx), atol=5e-3)  # top-k to fp16
    assert torch.allclose(p_rec.sum(1), torch.ones(B), atol=1e-5)
    known = torch.zeros(B, C, dtype=torch.bool).scatter_(1, idx, True).scatter_(1, labels, True)
    assert torch.allclose((p_rec * ~known).sum(1), (p_true * ~known).sum(1), atol=5e-3)  # tail mass


def test_gradients_finite_with_extreme_logits():
    s = torch.tensor([[1e4, -1e4, 0.0, 50.0], [-3e4, 3e4, 1.0, -1.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0, 0.0], [3e4, -3e4, 0.0, 0.0]])
    y = torch.tensor([2, 0])
    for fn in (lambda: ofa_loss(s, t, y, 1.5), lambda: ofa_loss(s, t, y, 1.5, form="released"),
               lambda: kd_loss(s, t), lambda: dkd_loss(s, t, y), lambda: soft_ce(s, F.one_hot(y, 4).float())):
        s.grad = None
        loss = fn()
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    vals, idx, lse, odds = _cache_of(t, y[:, None], 2)
    z = reconstruct_logits(vals, idx, lse, y[:, None], odds, 4)
    assert torch.isfinite(z).all()


def test_mixed_labels():
    y, yp, lam = torch.tensor([1, 2]), torch.tensor([3, 2]), torch.tensor([0.3, 0.8])
    tgt = soft_target(y, yp, lam, 4, smoothing=0.1)
    assert torch.allclose(tgt.sum(1), torch.ones(2))
    assert tgt[0, 3] > tgt[0, 1] > tgt[0, 0]
    assert target_class(y, yp, lam).tolist() == [3, 2]


def test_task_composes_named_terms_for_each_form():
    from students.task import LossConfig, distill_losses
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    heads = {"stage1": torch.randn(4, 5), "stage2": torch.randn(4, 5)}
    batch = {"label": torch.tensor([0, 1, 2, 3]), "partner_label": torch.tensor([1, 1, 0, 4]),
             "lam": torch.tensor([1.0, 0.7, 0.2, 1.0])}
    c = torch.tensor([0, 1, 0, 3])  # argmax of the mixed labels
    paper = distill_losses({"logits": s, "heads": heads}, t, batch,
                           LossConfig("ofa", gamma=[1.5], label_smoothing=0.1), 5)
    assert set(paper) == {"loss", "ofa/final", "ofa/stage1", "ofa/stage2"}  # label term is inside the paper form
    # ... and that label term is the mixed, smoothed label: neither is silently dropped
    ys = soft_target(batch["label"], batch["partner_label"], batch["lam"], 5, 0.1)
    expected = sum(ofa_loss(x, t, c, 1.5, label=ys) for x in (s, heads["stage1"], heads["stage2"]))
    assert paper["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    hard = sum(ofa_loss(x, t, c, 1.5) for x in (s, heads["stage1"], heads["stage2"]))
    assert abs(paper["loss"].item() - hard.item()) > 1e-3
    rel = distill_losses({"logits": s, "heads": heads}, t, batch,
                         LossConfig("ofa", ofa_form="released", gamma=[1.5], w_ofa=0.1), 5)
    y = soft_target(batch["label"], batch["partner_label"], batch["lam"], 5)
    expected = soft_ce(s, y) + ofa_loss(s, t, c, 1.5, form="released") + 0.1 * (
        ofa_loss(heads["stage1"], t, c, 1.5, form="released") + ofa_loss(heads["stage2"], t, c, 1.5, form="released"))
    assert rel["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    kd = distill_losses({"logits": s, "heads": {}}, t, batch, LossConfig("kd"), 5)
    assert kd["loss"].item() == pytest.approx((soft_ce(s, y) + kd_loss(s, t, 4.0)).item(), rel=1e-6)


def test_reconstruction_at_high_temperature_with_k_below_classes():
    """KD's default T = 4 with k < C: exact when the tail is flat (what the reconstruction assumes); otherwise
    the error shrinks as k grows and vanishes at k = C."""
    t = torch.randn(B, C) * 3
    y = torch.randint(0, C, (B,))
    labels = torch.stack([y, y.roll(1)], 1)
    s = torch.randn(B, C)
    flat = t.clone()
    order = t.argsort(1, descending=True)
    tail = order[:, 4:]
    flat.scatter_(1, tail, flat.gather(1, tail).mean(1, keepdim=True).expand_as(tail).contiguous())
    flat.scatter_(1, labels, t.gather(1, labels))  # label classes stay exact (stored in float32)
    vals, idx = flat.topk(4, 1)
    lse = torch.logsumexp(flat, 1)
    z = reconstruct_logits(vals - lse[:, None], idx, lse, labels, label_log_odds(flat, labels), C)
    assert kd_loss(s, z, 4.0).item() == pytest.approx(kd_loss(s, flat, 4.0).item(), rel=1e-4)
    errors = []
    for k in (2, 6, C):
        vals, idx = t.topk(k, 1)
        lse = torch.logsumexp(t, 1)
        z = reconstruct_logits(vals - lse[:, None], idx, lse, labels, label_log_odds(t, labels), C)
        errors.append(abs(kd_loss(s, z, 4.0).item() - kd_loss(s, t, 4.0).item()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def test_task_composes_dkd_label_smoothing_per_head_gamma_and_stage_weights():
    from students.task import LossConfig, distill_losses
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    heads = {"stage1": torch.randn(4, 5), "stage2": torch.randn(4, 5)}
    batch = {"label": torch.tensor([0, 1, 2, 3]), "partner_label": torch.tensor([1, 1, 0, 4]),
             "lam": torch.tensor([1.0, 0.7, 0.2, 1.0])}
    c = torch.tensor([0, 1, 0, 3])
    y_smooth = soft_target(batch["label"], batch["partner_label"], batch["lam"], 5, smoothing=0.2)
    dkd = distill_losses({"logits": s, "heads": {}}, t, batch, LossConfig("dkd", label_smoothing=0.2), 5)
    assert set(dkd) == {"loss", "ce", "dkd/final"}
    assert dkd["ce"].item() == pytest.approx(soft_ce(s, y_smooth).item(), rel=1e-6)
    assert dkd["dkd/final"].item() == pytest.approx(dkd_loss(s, t, c, 1.0, 8.0, 4.0).item(), rel=1e-6)
    assert dkd["loss"].item() == pytest.approx((soft_ce(s, y_smooth) + dkd_loss(s, t, c, 1.0, 8.0, 4.0)).item(),
                                               rel=1e-6)
    # one gamma per head plus the final logits' own, and per-head weights times w_ofa
    cfg = LossConfig("ofa", gamma=[1.2, 1.7, 2.5], stage_weights=[0.5, 3.0], w_ofa=0.4, w_kd=2.0, temperature=2.0)
    out = distill_losses({"logits": s, "heads": heads}, t, batch, cfg, 5)
    y = soft_target(batch["label"], batch["partner_label"], batch["lam"], 5)  # the paper form's label term
    assert out["ofa/stage1"].item() == pytest.approx(ofa_loss(heads["stage1"], t, c, 1.2, 2.0, label=y).item(),
                                                     rel=1e-6)
    assert out["ofa/stage2"].item() == pytest.approx(ofa_loss(heads["stage2"], t, c, 1.7, 2.0, label=y).item(),
                                                     rel=1e-6)
    assert out["ofa/final"].item() == pytest.approx(ofa_loss(s, t, c, 2.5, 2.0, label=y).item(), rel=1e-6)
    want = 2.0 * out["ofa/final"] + 0.4 * (0.5 * out["ofa/stage1"] + 3.0 * out["ofa/stage2"])
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_dkd_warm_up_ramps_the_dkd_term_linearly():
    from students.task import LossConfig, distill_losses
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    batch = {"label": torch.tensor([0, 1, 2, 3]), "partner_label": torch.tensor([0, 1, 2, 3]),
             "lam": torch.ones(4)}
    cfg = LossConfig("dkd", dkd_warmup_epochs=2.0)
    for progress, ramp in ((0.0, 0.0), (0.5, 0.25), (1.0, 0.5), (3.0, 1.0)):
        out = distill_losses({"logits": s, "heads": {}}, t, batch, cfg, 5, progress=progress)
        assert out["loss"].item() == pytest.approx((out["ce"] + ramp * out["dkd/final"]).item(), rel=1e-6)
    no_ramp = distill_losses({"logits": s, "heads": {}}, t, batch, LossConfig("dkd"), 5, progress=0.0)
    assert no_ramp["loss"].item() == pytest.approx((no_ramp["ce"] + no_ramp["dkd/final"]).item(), rel=1e-6)


def _z_score(z):
    """Sun et al. (CVPR 2024)'s logit standardization, written out: (z - mean) / (1e-7 + std), std unbiased."""
    z = z.double()
    mean, std = z.mean(1, keepdim=True), z.std(1, keepdim=True)
    return (z - mean) / (1e-7 + std)


@pytest.mark.parametrize("loss", ["kd", "dkd", "ofa paper", "ofa released"])
def test_standardize_z_scores_teacher_and_student_before_the_temperature(logits, loss):
    """standardize=True is the loss of the z-scored logits, teacher's and student's (T^2 unchanged, as theirs)."""
    s, t, y = logits
    fn = {"kd": lambda a, b, **kw: kd_loss(a, b, 2.0, **kw),
          "dkd": lambda a, b, **kw: dkd_loss(a, b, y, 1, 8, 2.0, **kw),
          "ofa paper": lambda a, b, **kw: ofa_loss(a, b, y, 1.5, 1.0, "paper", **kw),
          "ofa released": lambda a, b, **kw: ofa_loss(a, b, y, 1.5, 1.0, "released", **kw)}[loss]
    want = fn(_z_score(s), _z_score(t)).item()
    assert fn(s, t, standardize=True).item() == pytest.approx(want, rel=1e-6)
    assert fn(s, t).item() != pytest.approx(want, rel=1e-2)  # it changes the loss: these logits are not z-scores


def test_the_loss_option_standardizes_every_distillation_term():
    from students.task import LossConfig, distill_losses
    s, t = torch.randn(4, 5) * 3, torch.randn(4, 5) * 5
    heads = {"stage1": torch.randn(4, 5)}
    batch = {"label": torch.tensor([0, 1, 2, 3]), "partner_label": torch.tensor([0, 1, 2, 3]), "lam": torch.ones(4)}
    c = batch["label"]
    for cfg, want in ((LossConfig("kd", standardize=True), {"kd/final": kd_loss(_z_score(s), _z_score(t), 4.0)}),
                      (LossConfig("dkd", standardize=True), {"dkd/final": dkd_loss(_z_score(s), _z_score(t), c)}),
                      (LossConfig("ofa", standardize=True, gamma=[1.5]),
                       {"ofa/final": ofa_loss(_z_score(s), _z_score(t), c, 1.5),
                        "ofa/stage1": ofa_loss(_z_score(heads["stage1"]), _z_score(t), c, 1.5)})):
        out = distill_losses({"logits": s, "heads": heads}, t, batch, cfg, 5)
        for k, v in want.items():
            assert out[k].item() == pytest.approx(v.item(), rel=1e-5), (cfg.method, k)
    from pipeline.errors import UserError
    with pytest.raises(UserError, match="--standardize z-scores .* method ce has none"):
        LossConfig("ce", standardize=True)
