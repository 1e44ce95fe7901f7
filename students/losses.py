"""Distillation losses: pure functions of tensors.

The teacher always arrives as full logits [B, C] (online, or rebuilt from the cache by
`cache.targets.TeacherTargets.logits`); every loss takes log_softmax(z / T) of them, so cached and
online teachers go through the same code.

Losses (student logits s, teacher log-probs at temperature T, c = target class):
- `ofa_loss(..., form="paper")`: -(1 + p_c)^gamma log q_c - sum_{j != c} p_j log q_j, where the label's
  share of the target weight (the 1) is the view's mixed/smoothed label when one is given
- `ofa_loss(..., form="released")`: the authors' code: weights (1 + p_c)^gamma - 1 on the target and
  p_j^gamma elsewhere (not renormalised); computed with log_softmax, so no NaNs
- `kd_loss`: KL(p || q) * T^2 (Hinton)
- `dkd_loss`: decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, both * T^2
- `soft_ce`: cross-entropy against a soft label (mixup/cutmix), with label smoothing
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2, batch mean."""
    log_q = F.log_softmax(logits.float() / T, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * T * T


def ofa_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, gamma: float = 1.0,
             T: float = 1.0, form: str = "paper", label: torch.Tensor | None = None) -> torch.Tensor:
    """OFA loss with the target class `target` [B]; see the module docstring for the two forms.

    paper form: the "1" in (1 + p_c)^gamma = 1 + ((1 + p_c)^gamma - 1) is the label's cross-entropy;
    `label` [B, C] (a mixed and/or smoothed label) takes its place, so mixing and label smoothing act
    in this form too. With label = onehot(target) (the default) this is exactly the paper's equation.
    """
    log_q = F.log_softmax(logits.float() / T, dim=1)
    p = F.softmax(teacher_logits.float() / T, dim=1)
    onehot = F.one_hot(target, p.shape[1]).bool()
    p_c = p.gather(1, target[:, None])  # [B, 1]
    if form == "paper":
        y = onehot.float() if label is None else label.float()
        w = torch.where(onehot, (1 + p_c) ** gamma - 1, p) + y
    elif form == "released":
        w = torch.where(onehot, (1 + p_c) ** gamma - 1, p ** gamma)
    else:
        raise ValueError(f"unknown OFA form {form!r}")
    return -(w * log_q).sum(1).mean()


def dkd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, T: float = 4.0) -> torch.Tensor:
    """Decoupled KD: target-class (binary) KL + non-target KL, in log space for stability."""
    s, t = logits.float() / T, teacher_logits.float() / T
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
