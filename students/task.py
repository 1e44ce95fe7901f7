"""The distillation task (timm-style): a module whose forward returns named loss terms plus 'loss'.

The loop backpropagates `out["loss"]` and logs the rest; it never knows how many heads exist, nor
whether the teacher is cached or online.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from pipeline.augment import ModelInput
from pipeline.errors import UserError
from students.heads import StudentWithHeads
from students.losses import (
    TeacherOutput,
    dkd_loss,
    kd_loss,
    ofa_loss,
    soft_ce,
    soft_target,
    target_class,
    teacher_nonlinearity,
)

if TYPE_CHECKING:
    from cache.teacher import Teacher

Method = Literal["ce", "kd", "dkd", "ofa"]


@dataclass
class LossConfig:
    """The loss of `train-student` (its fields are flags of that command and the `loss:` section of a config)."""

    method: Method = "ofa"
    """ce (no teacher), kd, dkd or ofa."""
    ofa_form: Literal["paper", "released"] = "paper"
    """paper: -(1+p_c)^gamma log q_c - sum p_j log q_j with the (mixed, smoothed) label inside; released: the
    authors' code, (1+p_c)^gamma - 1 and p_j^gamma plus a separate CE."""
    gamma: list[float] = field(default_factory=lambda: [1.0])
    """OFA exponent: one value, or one per head and then one for the final logits."""
    temperature: float | None = None
    """Softmax temperature [default: 1 for ofa, 4 for kd/dkd]."""
    w_ce: float | None = None
    """Weight of cross-entropy on the final logits [default: 1; 0 for the paper OFA form]."""
    w_kd: float = 1.0
    """Weight of the distillation term on the student's final logits."""
    w_ofa: float | None = None
    """Weight of the heads' OFA terms, summed [default: 1]."""
    stage_weights: list[float] | None = None
    """Per-head weights multiplying --w-ofa, one per head."""
    dkd_alpha: float = 1.0
    """DKD: weight of the target-class term."""
    dkd_beta: float = 8.0
    """DKD: weight of the non-target term."""
    dkd_warmup_epochs: float = 0.0
    """DKD: ramp the DKD term's weight linearly from 0 over this many epochs (the DKD paper uses 20)."""
    label_smoothing: float = 0.0
    """Label smoothing of the label term (CE, or the paper OFA form's label term)."""
    standardize: bool = False
    """Logit standardization (Sun et al., CVPR 2024): z-score the teacher's and the student's logits per view
    before the temperature, in KD, DKD and OFA; from a cache, one made with `cache-teacher --standardize`."""

    @property
    def teacher_nonlinearity(self) -> str | None:
        """Why this loss is not linear in the teacher's probabilities (None: it is); see `teacher_nonlinearity`."""
        return teacher_nonlinearity(self.method, self.ofa_form, self.gamma)

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
        if self.standardize and self.method == "ce":
            problems.append("--standardize z-scores the teacher's and the student's logits in a distillation loss; "
                            "method ce has none: drop it or pick kd, dkd or ofa")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def needs_teacher(self) -> bool:
        return self.method != "ce"


TeacherSource = Callable[[dict], TeacherOutput]
"""A collated batch -> the teacher for its views, as the losses take it: logits [B, C] from
`online(teacher)` (the stage-one `cache.teacher.Teacher` run in the loop) or a top-k cache, or a
`TeacherDist` at the loss's temperature from a cache with a sampled tail (`cache.targets.CachedTeacher.source`)."""


def online(teacher: Teacher) -> TeacherSource:
    """The teacher run in the loop over the batch's views, through the same code stage one caches with."""
    return lambda batch: teacher(batch["view"])


def per_output(values: list[float], heads: list[str], option: str) -> list[float]:
    """One value for every output, or one per head plus the final logits (last); anything else is refused."""
    if len(values) == 1:
        return values * (len(heads) + 1)
    if len(values) != len(heads) + 1:
        raise UserError(f"{option} has {len(values)} values; give 1, or {len(heads) + 1}: one per output "
                        f"({', '.join([*heads, 'final'])})")
    return list(values)


def distill_losses(out: dict, teacher_logits: TeacherOutput | None, batch: dict, cfg: LossConfig,
                   num_classes: int, progress: float = float("inf")) -> dict:
    """out: {"logits": [B, C], "heads": {name: [B, C]}} -> {"loss": total, "ce": ..., "kd/final": ...}.

    `progress`: epochs of training done (fractional), for the DKD warm-up."""
    logits = out["logits"]
    y = soft_target(batch["label"], batch["partner_label"], batch["lam"], num_classes, cfg.label_smoothing)
    c = target_class(batch["label"], batch["partner_label"], batch["lam"])
    terms: dict[str, torch.Tensor] = {}
    total = logits.new_zeros((), dtype=torch.float32)
    if cfg.w_ce:
        terms["ce"] = soft_ce(logits, y)
        total = total + cfg.w_ce * terms["ce"]
    if cfg.method == "kd":
        terms["kd/final"] = kd_loss(logits, teacher_logits, cfg.T, cfg.standardize)
        total = total + cfg.w_kd * terms["kd/final"]
    elif cfg.method == "dkd":
        terms["dkd/final"] = dkd_loss(logits, teacher_logits, c, cfg.dkd_alpha, cfg.dkd_beta, cfg.T, cfg.standardize)
        ramp = min(1.0, progress / cfg.dkd_warmup_epochs) if cfg.dkd_warmup_epochs > 0 else 1.0
        total = total + cfg.w_kd * ramp * terms["dkd/final"]
    elif cfg.method == "ofa":
        heads = out["heads"]
        gammas = per_output(cfg.gamma, list(heads), "--gamma")
        label = y if cfg.ofa_form == "paper" else None  # the released form has its label in the separate CE
        terms["ofa/final"] = ofa_loss(logits, teacher_logits, c, gammas[-1], cfg.T, cfg.ofa_form, label,
                                      cfg.standardize)
        total = total + cfg.w_kd * terms["ofa/final"]
        weights = cfg.stage_weights or [1.0] * len(heads)
        for (name, h), g, w in zip(heads.items(), gammas[:-1], weights, strict=True):
            terms[f"ofa/{name}"] = ofa_loss(h, teacher_logits, c, g, cfg.T, cfg.ofa_form, label, cfg.standardize)
            total = total + cfg.w_ofa * w * terms[f"ofa/{name}"]
    return {"loss": total, **terms}


class DistillationTask(nn.Module):
    """The training step's model: student + heads, a teacher source and the loss (timm-style).

    `forward(batch) -> {"loss": total, "ce": ..., "ofa/stage1": ..., "ofa/final": ...}`: the loop
    backpropagates "loss" and logs the rest. The teacher source is kept out of the module tree: it is
    frozen, so it belongs to neither DDP's gradient sync nor the training checkpoints (the task's state
    is the student's and its heads').

    What the loop needs besides the step is asked of the task, never read from inside it: the model to
    evaluate, EMA and export (`eval_model`, `predict`), the parameters to optimise (`trainable`), the
    training progress for loss warm-ups (`set_progress`) and what to record about the run (`describe`).
    """

    def __init__(self, student: StudentWithHeads, student_input: ModelInput, loss: LossConfig, num_classes: int,
                 teacher: TeacherSource | None = None, provenance: dict | None = None):
        super().__init__()
        if loss.needs_teacher and teacher is None:
            raise UserError(f"method '{loss.method}' needs a teacher: pass --cache STORE or --teacher-online NAME")
        self.student, self.student_input, self.loss, self.num_classes = student, student_input, loss, num_classes
        self.teacher_source = teacher if loss.needs_teacher else None
        self.provenance = dict(provenance or {})  # where the weights came from, for the run's config.json
        self.progress = float("inf")  # epochs done (fractional); `set_progress` keeps it current
        if loss.method == "ofa":  # refuse per-head lists of the wrong length now, not at the first step
            per_output(loss.gamma, student.names, "--gamma")
            if loss.stage_weights is not None and len(loss.stage_weights) != len(student.names):
                raise UserError(f"--stage-weights has {len(loss.stage_weights)} values for the "
                                f"{len(student.names)} heads ({', '.join(student.names)}); give one per head")

    @property
    def eval_model(self) -> nn.Module:
        """The bare student (no heads): what is evaluated, averaged by EMA and exported."""
        return self.student.model

    def trainable(self) -> nn.Module:
        """The module whose parameters the optimizer updates: the student with its heads."""
        return self.student

    def predict(self, views: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Class logits of `eval_model` (or of `model`, e.g. its EMA) for a batch of views."""
        return (model if model is not None else self.eval_model)(self.student_input(views))

    def set_progress(self, epochs_done: float) -> None:
        """Training progress in epochs (fractional), for loss warm-ups (DKD)."""
        self.progress = epochs_done

    def describe(self) -> dict:
        """What a run records about its task: the student's input, heads and weights, the online teacher."""
        return {"student_input": dataclasses.asdict(self.student_input), "heads": self.student.names,
                **self.provenance}

    def teacher_logits(self, batch: dict) -> TeacherOutput | None:
        return self.teacher_source(batch) if self.teacher_source is not None else None

    def forward(self, batch: dict) -> dict:
        out = self.student(self.student_input(batch["view"]))
        return distill_losses(out, self.teacher_logits(batch), batch, self.loss, self.num_classes,
                              progress=self.progress)
