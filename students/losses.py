"""Distillation losses: pure functions of tensors.

Teacher distribution from the cache (`teacher_logits_from_topk`): the cache holds, per view, the
top-k logits z_1..z_k, the log-sum-exp L of all C logits, and the exact logits of the view's label
classes. We rebuild a full logit vector: known classes (top-k and label classes) keep their logits;
the remaining C - n_known classes share the leftover mass equally, each getting
    z_tail = L + log(1 - sum_known exp(z_i - L)) - log(C - n_known).
At T = 1 this reproduces the known probabilities exactly and the tail's total mass exactly; at other
temperatures the tail's shape is an approximation (its total is what top-k cannot tell). With
k = C nothing is approximated. Every loss then takes log_softmax(z / T) of that vector, so cached and
online teachers go through the same code.

Losses (student logits s, teacher log-probs at temperature T, c = target class):
- `ofa_loss(..., form="paper")`: -(1 + p_c)^gamma log q_c - sum_{j != c} p_j log q_j
- `ofa_loss(..., form="released")`: the authors' code: weights (1 + p_c)^gamma - 1 on the target and
  p_j^gamma elsewhere (not renormalised); computed with log_softmax, so no NaNs
- `kd_loss`: KL(p || q) * T^2 (Hinton)
- `dkd_loss`: decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, both * T^2
- `soft_ce`: cross-entropy against a soft label (mixup/cutmix), with label smoothing
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_logits_from_topk(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
                             label_classes: torch.Tensor, label_logits: torch.Tensor,
                             num_classes: int) -> torch.Tensor:
    """values/indices [B, k], lse [B], label_classes/label_logits [B, m] -> full logits [B, C] (float32)."""
    B = values.shape[0]
    known = torch.zeros(B, num_classes, dtype=torch.bool, device=values.device)
    z = torch.zeros(B, num_classes, dtype=torch.float32, device=values.device)
    z.scatter_(1, indices, values.float())
    known.scatter_(1, indices, True)
    z.scatter_(1, label_classes, label_logits.float())  # exact label logits win over fp16 top-k copies
    known.scatter_(1, label_classes, True)
    n_tail = num_classes - known.sum(1)  # [B]
    lse_known = torch.logsumexp(z.masked_fill(~known, float("-inf")), dim=1)
    frac = torch.exp(lse_known - lse.float()).clamp(max=1.0 - 1e-6)
    z_tail = lse.float() + torch.log1p(-frac) - torch.log(n_tail.clamp(min=1).float())
    return torch.where(known, z, z_tail[:, None])


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
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2, batch mean."""
    log_q = F.log_softmax(logits.float() / T, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / T, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean() * T * T


def ofa_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, gamma: float = 1.0,
             T: float = 1.0, form: str = "paper") -> torch.Tensor:
    """OFA loss with the target class `target` [B]; see the module docstring for the two forms."""
    log_q = F.log_softmax(logits.float() / T, dim=1)
    p = F.softmax(teacher_logits.float() / T, dim=1)
    onehot = F.one_hot(target, p.shape[1]).bool()
    p_c = p.gather(1, target[:, None])  # [B, 1]
    if form == "paper":
        w = torch.where(onehot, (1 + p_c) ** gamma, p)
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
