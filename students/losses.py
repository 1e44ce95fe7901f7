"""Distillation losses: pure functions of tensors.

The teacher arrives either as full logits [B, C] (online, or rebuilt from a top-k cache by
`cache.targets.TeacherTargets.logits`), of which every loss takes log_softmax(z / T), so cached and online
teachers go through the same code; or, from a cache, as a `TeacherDist` (cache.distribution): the teacher's
log-probabilities at the loss's temperature, exact on the classes it knows, a per-class weight `scale`, and
log(1 - p) exact on the label classes. Every loss is a sum over classes of a term in (p_j, q_j), linear in p_j
except through the target class (always known) and elementwise powers p_j^gamma; with a `TeacherDist` each
class's term is multiplied by scale_j, whose expectation over the tail draw is 1 for every class, so the loss and
its gradient are unbiased (cache.targets says how scale is made and what its variance is).

Losses (student logits s, teacher log-probs at temperature T, c = target class):
- `ofa_loss(..., form="paper")`: -(1 + p_c)^gamma log q_c - sum_{j != c} p_j log q_j, where the label's
  share of the target weight (the 1) is the view's mixed/smoothed label when one is given
- `ofa_loss(..., form="released")`: the authors' code: weights (1 + p_c)^gamma - 1 on the target and
  p_j^gamma elsewhere (not renormalised); computed with log_softmax, so no NaNs
- `kd_loss`: KL(p || q) * T^2 (Hinton)
- `dkd_loss`: decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, both * T^2
- `soft_ce`: cross-entropy against a soft label (mixup/cutmix), with label smoothing

`standardize` (logit standardization, Sun et al. CVPR 2024): the student's logits, and the teacher's when they
arrive as logits, are z-scored per row before the temperature (cache.distribution.standardize); a `TeacherDist`
is already the standardized teacher's (its source made it so: `CachedTeacher.source(T, standardize=True)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cache.distribution import TeacherDist, standardize

TeacherOutput = torch.Tensor | TeacherDist  # logits [B, C], or a TeacherDist at the loss's temperature


def _scaled(z: torch.Tensor, T: float, standardized: bool) -> torch.Tensor:
    """z / T in float32, after logit standardization if asked."""
    return (standardize(z) if standardized else z.float()) / T


def teacher_nonlinearity(method: str, ofa_form: str, gammas: list[float]) -> str | None:
    """Why a loss is not linear in the teacher's non-target probabilities, or None where it is (then a mix of
    unbiased per-teacher estimates is an unbiased estimate: cache.distribution.mix)."""
    if method == "ofa" and ofa_form == "released" and any(g != 1 for g in gammas):
        return (f"released-form OFA with --gamma {','.join(f'{g:g}' for g in gammas)} weights each class by "
                f"p_j^gamma")
    return None


def soft_target(label: torch.Tensor, partner_label: torch.Tensor, lam: torch.Tensor, num_classes: int,
                smoothing: float = 0.0) -> torch.Tensor:
    """Mixed one-hot label [B, C]: lam * onehot(label) + (1 - lam) * onehot(partner), then smoothed."""
    y = lam[:, None] * F.one_hot(label, num_classes).float() + \
        (1 - lam[:, None]) * F.one_hot(partner_label, num_classes).float()
    return y * (1 - smoothing) + smoothing / num_classes


def target_class(label: torch.Tensor, partner_label: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The argmax of the mixed label (the sample's own label when lam >= 0.5)."""
    return torch.where(lam >= 0.5, label, partner_label)


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [B, C], target [B, C] (rows sum to 1) -> mean cross-entropy."""
    return F.cross_entropy(logits.float(), target)


def kd_loss(logits: torch.Tensor, teacher_logits: TeacherOutput, T: float = 4.0,
            standardize: bool = False) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2, batch mean."""
    log_q = F.log_softmax(_scaled(logits, T, standardize), dim=1)
    if isinstance(teacher_logits, TeacherDist):
        log_p, scale, _ = teacher_logits
        return (scale * log_p.exp() * (log_p - log_q)).sum(1).mean() * T * T
    log_p = F.log_softmax(_scaled(teacher_logits, T, standardize), dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * T * T


def ofa_loss(logits: torch.Tensor, teacher_logits: TeacherOutput, target: torch.Tensor, gamma: float = 1.0,
             T: float = 1.0, form: str = "paper", label: torch.Tensor | None = None,
             standardize: bool = False) -> torch.Tensor:
    """OFA loss with the target class `target` [B]; see the module docstring for the two forms.

    paper form: the "1" in (1 + p_c)^gamma = 1 + ((1 + p_c)^gamma - 1) is the label's cross-entropy;
    `label` [B, C] (a mixed and/or smoothed label) takes its place, so mixing and label smoothing act
    in this form too. With label = onehot(target) (the default) this is exactly the paper's equation.
    """
    log_q = F.log_softmax(_scaled(logits, T, standardize), dim=1)
    sampled = isinstance(teacher_logits, TeacherDist)
    p = teacher_logits.log_p.exp() if sampled else F.softmax(_scaled(teacher_logits, T, standardize), dim=1)
    onehot = F.one_hot(target, p.shape[1]).bool()
    p_c = p.gather(1, target[:, None])  # [B, 1]: the target is a label class, so exact either way
    if form == "paper":
        w = torch.where(onehot, (1 + p_c) ** gamma - 1, p)
    elif form == "released":
        w = torch.where(onehot, (1 + p_c) ** gamma - 1, p ** gamma)
    else:
        raise ValueError(f"unknown OFA form {form!r}")
    if sampled:
        w = w * teacher_logits.scale  # the label term below is the student's own, exact over every class
    if form == "paper":
        w = w + (onehot.float() if label is None else label.float())
    return -(w * log_q).sum(1).mean()


def dkd_loss(logits: torch.Tensor, teacher_logits: TeacherOutput, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, T: float = 4.0, standardize: bool = False) -> torch.Tensor:
    """Decoupled KD: target-class (binary) KL + non-target KL, in log space for stability."""
    if isinstance(teacher_logits, TeacherDist):
        return _dkd_sampled(_scaled(logits, T, standardize), teacher_logits, target, alpha, beta, T)
    s, t = _scaled(logits, T, standardize), _scaled(teacher_logits, T, standardize)
    gt = F.one_hot(target, s.shape[1]).bool()
    log_qs, log_pt = F.log_softmax(s, 1), F.log_softmax(t, 1)
    # binary (target, rest) distributions
    qs_gt = log_qs.gather(1, target[:, None])
    pt_gt = log_pt.gather(1, target[:, None])
    qs_rest = torch.logsumexp(log_qs.masked_fill(gt, float("-inf")), 1, keepdim=True)
    pt_rest = torch.logsumexp(log_pt.masked_fill(gt, float("-inf")), 1, keepdim=True)
    log_b_s, log_b_t = torch.cat([qs_gt, qs_rest], 1), torch.cat([pt_gt, pt_rest], 1)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1)
    # distributions over non-target classes only
    log_ns = F.log_softmax(s.masked_fill(gt, float("-inf")), 1)
    log_nt = F.log_softmax(t.masked_fill(gt, float("-inf")), 1)
    nt = log_nt.exp()
    nckd = (nt * (log_nt - log_ns)).masked_fill(gt, 0.0).sum(1)
    return (alpha * tckd + beta * nckd).mean() * T * T


def _dkd_sampled(s: torch.Tensor, teacher: TeacherDist, target: torch.Tensor, alpha: float, beta: float,
                 T: float) -> torch.Tensor:
    """`dkd_loss` for a TeacherDist (s: the student's logits at T): the teacher's non-target mass 1 - p_gt is the
    TeacherDist's exact log_rest of the target, a label class (a logsumexp over the filled matrix would not be
    exact, nor 1 - p_gt for a confident teacher); the non-target KL is a per-class sum, weighted by scale."""
    log_p, scale, log_rest = teacher
    gt = F.one_hot(target, s.shape[1]).bool()
    log_qs = F.log_softmax(s, 1)
    qs_gt, pt_gt = log_qs.gather(1, target[:, None]), log_p.gather(1, target[:, None])
    qs_rest = torch.logsumexp(log_qs.masked_fill(gt, float("-inf")), 1, keepdim=True)
    pt_rest = log_rest.gather(1, target[:, None])
    log_b_s, log_b_t = torch.cat([qs_gt, qs_rest], 1), torch.cat([pt_gt, pt_rest], 1)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1)
    log_nt, log_ns = log_p - pt_rest, log_qs - qs_rest  # [B, C]: within the non-target classes
    nckd = (scale * log_nt.exp() * (log_nt - log_ns)).masked_fill(gt, 0.0).sum(1)
    return (alpha * tckd + beta * nckd).mean() * T * T
