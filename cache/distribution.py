"""The teacher's distribution at a temperature, as a cache gives it to the losses, and the numerics that keep it
exact: label log-odds (1 - p for confident teachers), logit standardization's temperature, and the mix of several
teachers' estimates.

Stage one (cache.summary) stores what makes it; the read side (cache.targets) builds it; the losses
(students.losses) take it beside plain logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

STD_EPS = 1e-7  # logit standardization: z-score = (z - mean) / (std + STD_EPS), as Sun et al. (CVPR 2024) write it
FILLER_LOG_P = -80.0  # log p of classes a TeacherDist does not hold: finite (their scale is 0, and 0 * inf is NaN)


class TeacherDist(NamedTuple):
    """The teacher at the loss's temperature as a cache gives it.

    log_p [B, C]: log p_j at T, exact on known and sampled classes, finite filler elsewhere;
    scale [B, C]: each class's weight in every per-class sum: 1 on known classes (top-k, labels), count_j / (M r_j)
        on sampled tail classes, 0 on the rest (all 1 when every class is known);
    log_rest [B, C]: log(1 - p_j), exact on the view's label classes (DKD's target is one of them) however
        confident the teacher; elsewhere computed from log_p."""

    log_p: torch.Tensor
    scale: torch.Tensor
    log_rest: torch.Tensor


def standardize(z: torch.Tensor) -> torch.Tensor:
    """Logit standardization: z [B, C] -> (z - mean) / (std + STD_EPS) per row, std unbiased (torch.std), float32."""
    z = z.float()
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + STD_EPS)


def effective_temperature(T: float, std: torch.Tensor) -> torch.Tensor:
    """[B] logit standard deviations -> the temperature on the raw logits that standardized logits have at T:
    softmax(standardize(z) / T) = softmax(z / (T (std + STD_EPS))) (the mean is a shift, which softmax drops).
    Stage one and training compute it with this one function, so both get the same float32 value."""
    return T * (std.float() + STD_EPS)


def label_log_odds(z: torch.Tensor, classes: torch.Tensor, T: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Log-odds against each label class at temperature T: z [B, C] float32 logits, classes [B, m], T a number or
    [B] -> a [B, m] with a_c = log((1 - p_c) / p_c) = logsumexp_{j != c}((z_j - z_c) / T). From differences of
    logits, never from 1 - p_c, so it keeps its precision when p_c is within float32's epsilon of 1."""
    T = T[:, None, None] if isinstance(T, torch.Tensor) else T
    d = (z[:, None, :] - z.gather(1, classes)[:, :, None]) / T  # [B, m, C]
    own = F.one_hot(classes, z.shape[1]).bool()
    return torch.logsumexp(d.masked_fill(own, float("-inf")), dim=2)


def log_p_of_odds(a: torch.Tensor) -> torch.Tensor:
    """log p_c from the log-odds a_c (`label_log_odds`)."""
    return -F.softplus(a)


def log_rest_of_odds(a: torch.Tensor) -> torch.Tensor:
    """log(1 - p_c) from the log-odds a_c (`label_log_odds`)."""
    return -F.softplus(-a)


def log_rest_of(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from log p, elementwise; exact only where p is not within float32's epsilon of 1 (the label
    classes' values come from their log-odds instead)."""
    x = log_p.clamp(max=-1e-30)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def with_exact_labels(log_p: torch.Tensor, scale: torch.Tensor, label_classes: torch.Tensor,
                      odds: torch.Tensor) -> TeacherDist:
    """A TeacherDist whose label classes [B, m] take their log p and log(1 - p) from their log-odds [B, m]."""
    log_p = log_p.scatter(1, label_classes, log_p_of_odds(odds))
    log_rest = log_rest_of(log_p).scatter(1, label_classes, log_rest_of_odds(odds))
    return TeacherDist(log_p, scale, log_rest)


def mix(dists: list[TeacherDist], weights: list[float]) -> TeacherDist:
    """The mixture sum_i w_i p_i of several teachers' distributions (weights summing to 1), each an estimate with its
    own per-class weights: every class gets p_j = sum_i w_i scale_ij p_ij, whose expectation is the mixture's p_j.

    The result has scale 1 where some teacher holds the class (0 elsewhere), so a loss linear in the teacher's p_j
    (the cross-entropy of KD and DKD, paper-form OFA, released-form OFA with gamma 1) has an unbiased value, up
    to its teacher-only terms (p log p, constant for the student), and an unbiased gradient. The label classes
    are known to every teacher: there p_c and 1 - p_c = sum_i w_i (1 - p_ic) are exact."""
    log_w = torch.log(torch.tensor(weights, dtype=torch.float32, device=dists[0].log_p.device))[:, None, None]
    log_p = torch.stack([d.log_p + torch.log(d.scale) for d in dists])  # [n, B, C], -inf where a teacher lacks j
    log_p = torch.logsumexp(log_w + log_p, dim=0)
    held = torch.isfinite(log_p)
    log_rest = torch.logsumexp(log_w + torch.stack([d.log_rest for d in dists]), dim=0)
    return TeacherDist(torch.where(held, log_p, FILLER_LOG_P), held.float(), log_rest)


def dist_of_logits(z: torch.Tensor, T: float | torch.Tensor, label_classes: torch.Tensor) -> TeacherDist:
    """Full logits z [B, C] (every class known) at temperature T (a number or [B]) -> TeacherDist with scale 1; the
    label classes' [B, m] 1 - p from the other classes' mass, which has no cancellation."""
    T = T[:, None] if isinstance(T, torch.Tensor) else T
    log_p = F.log_softmax(z.float() / T, dim=1)
    own = F.one_hot(label_classes, z.shape[1]).bool()  # [B, m, C]
    rest = torch.logsumexp(log_p[:, None, :].masked_fill(own, float("-inf")), dim=2)
    return TeacherDist(log_p, torch.ones_like(log_p), log_rest_of(log_p).scatter(1, label_classes, rest))


def reconstruct_log_p(values: torch.Tensor, indices: torch.Tensor, label_classes: torch.Tensor,
                      label_odds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The teacher's log-probabilities at T = 1 with the uniform tail (cache.targets): values/indices [B, k] (stored
    log-probabilities), label_classes/label_odds [B, m] (their log-odds) -> [B, C] float32. Known classes keep their
    values (the label classes their exact ones); the others share the leftover mass equally. That mass is the first
    label class's 1 - p (exact) less the other known classes' mass, so its precision is relative to that 1 - p."""
    B, C = values.shape[0], num_classes
    known = torch.zeros(B, C, dtype=torch.bool, device=values.device)
    v = torch.zeros(B, C, dtype=torch.float32, device=values.device)
    v.scatter_(1, indices, values.float())
    known.scatter_(1, indices, True)
    v.scatter_(1, label_classes, log_p_of_odds(label_odds.float()))  # exact label values win over stored copies
    known.scatter_(1, label_classes, True)
    n_tail = C - known.sum(1)  # [B]
    first = F.one_hot(label_classes[:, 0], C).bool()
    rest = log_rest_of_odds(label_odds[:, 0].float())  # [B] log(1 - p) of the first label class
    others = torch.logsumexp(v.masked_fill(~known | first, float("-inf")), dim=1)  # the other known classes' mass
    frac = torch.exp(others - rest).clamp(max=1.0 - 1e-6)
    v_tail = rest + torch.log1p(-frac) - torch.log(n_tail.clamp(min=1).float())
    return torch.where(known, v, v_tail[:, None])


def reconstruct_logits(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, label_classes: torch.Tensor,
                       label_odds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`reconstruct_log_p` + lse [B]: the teacher's logits [B, C] (float32)."""
    return reconstruct_log_p(values, indices, label_classes, label_odds, num_classes) + lse.float()[:, None]


def sampled_distribution(values: torch.Tensor, indices: torch.Tensor, label_classes: torch.Tensor,
                         label_odds: torch.Tensor, tail_ids: torch.Tensor, tail_values: torch.Tensor,
                         tail_lse: torch.Tensor, log_z: torch.Tensor, T: float | torch.Tensor, draw_T: float,
                         num_classes: int) -> TeacherDist:
    """The teacher at temperature T from a sampled-tail cache (cache.targets): values/indices [B, k], label_classes
    and their log-odds at T [B, m], tail_ids/tail_values [B, M] (ids -1: no tail), tail_lse [B], log_z [B] (log Z
    at T of the values; 0 at T = 1); T a number or [B] (a standardized slot's T (std + eps)) -> TeacherDist."""
    B, M, C = values.shape[0], tail_ids.shape[1], num_classes
    dev = values.device
    valid = (tail_ids >= 0) & torch.isfinite(tail_lse)[:, None]
    ids = torch.where(valid, tail_ids, C)  # invalid draws land in a spare column C, dropped below
    v = torch.zeros(B, C + 1, dtype=torch.float32, device=dev)
    scale = torch.zeros(B, C + 1, dtype=torch.float32, device=dev)
    v.scatter_(1, ids, tail_values.float())
    w = torch.exp(tail_lse[:, None].float() - tail_values.float() / draw_T) / M  # 1 / (M r_j) per draw
    scale.scatter_add_(1, ids, torch.where(valid, w, 0.0))
    v, scale = v[:, :C], scale[:, :C]
    v.scatter_(1, indices, values.float())
    scale.scatter_(1, indices, 1.0).scatter_(1, label_classes, 1.0)  # known classes are never drawn
    T = T[:, None] if isinstance(T, torch.Tensor) else T
    log_p = torch.where(scale > 0, v / T - log_z[:, None].float(), FILLER_LOG_P)
    return with_exact_labels(log_p, scale, label_classes, label_odds.float())
