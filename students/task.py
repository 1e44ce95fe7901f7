"""The distillation step as a module: forward returns a dict of named loss terms plus 'loss'.

The loop backpropagates `out["loss"]` and logs the rest; it never knows how many heads exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from students.losses import dkd_loss, kd_loss, ofa_loss, soft_ce, soft_target, target_class, teacher_logits_from_topk

Method = Literal["ce", "kd", "dkd", "ofa"]


@dataclass
class LossConfig:
    method: Method = "ofa"
    ofa_form: Literal["paper", "released"] = "paper"
    """paper: -(1+p_c)^g log q_c - sum p_j log q_j (label term inside); released: the authors' code."""
    gamma: list[float] = field(default_factory=lambda: [1.0])
    """OFA exponent: one value for every output, or one per head (the final logits use the last)."""
    temperature: float | None = None
    """Softmax temperature; default 4 for kd/dkd, 1 for ofa."""
    w_ce: float | None = None
    """Weight of cross-entropy on the final logits; default 1, except 0 for the paper OFA form."""
    w_kd: float = 1.0
    """Weight of the distillation term on the student's final logits."""
    w_ofa: float | None = None
    """Weight of the heads' OFA terms (summed); default 1."""
    stage_weights: list[float] | None = None
    """Optional per-head weights multiplying w_ofa."""
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        self.T = self.temperature if self.temperature is not None else (1.0 if self.method == "ofa" else 4.0)
        if self.w_ce is None:
            self.w_ce = 0.0 if (self.method == "ofa" and self.ofa_form == "paper") else 1.0
        if self.w_ofa is None:
            self.w_ofa = 1.0
        problems = []
        if self.T <= 0:
            problems.append(f"temperature must be > 0, got {self.T}")
        if any(g < 1 for g in self.gamma):
            problems.append(f"gamma must be >= 1, got {self.gamma}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if problems:
            from pipeline.errors import UserError
            raise UserError("; ".join(problems))

    @property
    def needs_teacher(self) -> bool:
        return self.method != "ce"


def teacher_from_batch(batch: dict, num_classes: int) -> torch.Tensor:
    """Full teacher logits [B, C] rebuilt from the cached top-k joined into the batch."""
    labels = torch.stack([batch["label"], batch["partner_label"]], 1)
    return teacher_logits_from_topk(batch["t_values"], batch["t_indices"], batch["t_lse"], labels,
                                    batch["t_label_logits"], num_classes)


def distill_losses(out: dict, teacher_logits: torch.Tensor | None, batch: dict, cfg: LossConfig,
                   num_classes: int) -> dict:
    """out: {"logits": [B, C], "heads": {name: [B, C]}} -> {"loss": total, "ce": ..., "kd/final": ...}."""
    logits = out["logits"]
    y = soft_target(batch["label"], batch["partner_label"], batch["lam"], num_classes, cfg.label_smoothing)
    c = target_class(batch["label"], batch["partner_label"], batch["lam"])
    terms: dict[str, torch.Tensor] = {}
    total = logits.new_zeros((), dtype=torch.float32)
    if cfg.w_ce:
        terms["ce"] = soft_ce(logits, y)
        total = total + cfg.w_ce * terms["ce"]
    if cfg.method == "kd":
        terms["kd/final"] = kd_loss(logits, teacher_logits, cfg.T)
        total = total + cfg.w_kd * terms["kd/final"]
    elif cfg.method == "dkd":
        terms["dkd/final"] = dkd_loss(logits, teacher_logits, c, cfg.dkd_alpha, cfg.dkd_beta, cfg.T)
        total = total + cfg.w_kd * terms["dkd/final"]
    elif cfg.method == "ofa":
        heads = out["heads"]
        gammas = cfg.gamma if len(cfg.gamma) == len(heads) + 1 else (
            cfg.gamma + [cfg.gamma[-1]] if len(cfg.gamma) == len(heads) else [cfg.gamma[0]] * (len(heads) + 1))
        terms["ofa/final"] = ofa_loss(logits, teacher_logits, c, gammas[-1], cfg.T, cfg.ofa_form)
        total = total + cfg.w_kd * terms["ofa/final"]
        weights = cfg.stage_weights or [1.0] * len(heads)
        for (name, h), g, w in zip(heads.items(), gammas, weights, strict=False):
            terms[f"ofa/{name}"] = ofa_loss(h, teacher_logits, c, g, cfg.T, cfg.ofa_form)
            total = total + cfg.w_ofa * w * terms[f"ofa/{name}"]
    return {"loss": total, **terms}
