"""The configuration of stage two: one stream per process, one or more runs on it.

    StreamConfig  what every run of a process shares: the data, the teacher (caches or an online teacher), the
                  views and their order, epochs, batches, gradient accumulation, precision, checkpoint cadence
    RunConfig     one student: its output directory, model, loss, heads, optimizer, schedule, seed, EMA, step
                  options
    TrainConfig   the options of `train-student`: a stream's and one run's, as one flat set of flags and keys
                  (both groups are transparent), plus --runs, a file of further runs over the same stream

Which configuration an option belongs to is the rule of several students per stream: a runs file may set any
run option and no stream option. Every field's help text is the attribute docstring under it; each option is
listed in one --help panel (`PANELS`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cache.teacher import TeacherSpec
from pipeline.augment import ViewSpec
from pipeline.errors import UserError
from pipeline.models import ModelSpec, Weights
from pipeline.spec import choice_problems, flag_name, group, in_panel
from pipeline.views import worker_tempdir_problem
from students.heads import HeadsConfig
from students.task import LossConfig

DATA, STUDENT, TEACHER, LOSS, HEADS = "Data", "Student", "Teacher and cache", "Loss", "Heads"
OPTIMIZER, SCHEDULE, RUN, DEVICES = "Optimizer", "Schedule", "Run and checkpoints", "Devices and processes"
PANELS = (DATA, STUDENT, TEACHER, LOSS, HEADS, OPTIMIZER, SCHEDULE, RUN, DEVICES)


@dataclass
class OptimConfig:
    """The optimizer (an option group of train-student)."""

    optimizer: Literal["sgd", "adamw", "lamb"] = "sgd"
    """timm optimizer (sgd is SGD with Nesterov momentum, as in timm)."""
    lr: float = 0.05
    """Peak learning rate (not scaled by the batch size)."""
    weight_decay: float = 5e-4
    """Weight decay (not on norms and biases)."""
    momentum: float = 0.9
    """SGD momentum."""
    clip_grad: float | None = None
    """Clip the gradient norm to this value."""


@dataclass
class ScheduleConfig:
    """The learning-rate schedule (timm's scheduler factory), stepped per optimizer update or per epoch."""

    sched: Literal["cosine", "step"] = "cosine"
    """Learning-rate schedule (timm's scheduler factory)."""
    sched_step: Literal["update", "epoch"] = "update"
    """Step the schedule after every optimizer update, or once per epoch as the authors' timm 0.6.5 did.

    Per epoch (timm's t_in_epochs): each epoch runs at one learning rate, the first at --warmup-lr when there
    is a warm-up, which is then a staircase; the shipped configs use it, as the authors' runs did."""
    warmup_epochs: float = 0.0
    """Linear warm-up from --warmup-lr to --lr over this many epochs, then the schedule."""
    warmup_lr: float = 1e-5
    """Learning rate at the start of the warm-up."""
    min_lr: float = 0.0
    """Cosine: the learning rate at the end."""
    decay_epochs: float = 30.0
    """Step: multiply the learning rate by --decay-rate every this many epochs."""
    decay_rate: float = 0.1
    """Step: the decay factor."""


@dataclass
class StreamConfig:
    """What every run of one process shares (one view stream, one teacher source, one step cadence)."""

    data: str | Path = field(metadata=in_panel(DATA))
    """Dataset directory or fsspec URL made by `shards` (train and val splits)."""
    train_split: str = field(default="train", metadata=in_panel(DATA))
    """Training split."""
    val_split: str = field(default="val", metadata=in_panel(DATA))
    """Evaluation split."""
    views: ViewSpec = field(default_factory=ViewSpec, metadata=group(
        names={"seed": "view-seed"}, panel=DATA, help={"recipe": "Augmentation preset [default: the cache's, else "
                                                                  "imagenet-cnn].",
                                                       "seed": "Seed of the views [default: the cache's, else 0]."}))
    view_epochs: int | None = field(default=None, metadata=in_panel(DATA))
    """Online/ce: cycle the views every N epochs (to match a cache) [default: the cache's epochs]."""
    epochs_per_decode: int = field(default=1, metadata=in_panel(DATA))
    """Decode each image once for the views of G consecutive (cached) epochs (docs/design.md, "Several epochs
    per decode").

    One stream per group of G epochs, mixed through a shuffle buffer of one shard's views (per loader worker: up
    to 2 shards' views in memory, 1 at G = 1), each view still the teacher's with its own target. Steps per epoch
    and the schedule are G = 1's; an epoch is then a count of steps of the group's stream."""
    eval_crop_pct: float | None = field(default=None, metadata=in_panel(DATA))
    """Evaluation crop: resize the short side to view size / this, centre crop [default: the recipe's].

    timm's train.py takes it from the student's pretrained_cfg `crop_pct` (e.g. 0.9 for DeiT): give that value
    here; the training views (and so the cache) do not depend on it."""
    workers: int = field(default=2, metadata=in_panel(DATA))
    """Data-loader workers per process."""
    on_error: Literal["raise", "skip"] | None = field(default=None, metadata=in_panel(DATA))
    """Corrupt samples: raise or skip [default: the cache's policy, else raise]."""
    order_seed: int | None = field(default=None, metadata=in_panel(DATA))
    """Seed of the data order (shards, then samples within a shard) [default: --seed].

    Runs that share one view stream (--runs) share it while their --seed differs."""
    cache: list[str] | None = field(default=None, metadata=in_panel(TEACHER))
    """Teacher cache made by `cache-teacher` (path or URL); repeat it to distil from an ensemble.

    Needed by kd/dkd/ofa unless --teacher-online. Several caches must hold the same views."""
    ensemble: Literal["prob", "logit"] | None = field(default=None, metadata=in_panel(TEACHER))
    """With several --cache: the teachers' mean of probabilities at the loss temperature (prob), or mean of
    logits (logit) [default: prob]."""
    teacher_weights: list[float] | None = field(default=None, metadata=in_panel(TEACHER))
    """With several --cache: one weight per cache, in order, normalised to sum 1 [default: equal]."""
    cache_teacher: str | None = field(default=None, metadata={**flag_name("teacher"), **in_panel(TEACHER)})
    """With --cache: the teacher the cache must come from (checked)."""
    teacher: TeacherSpec = field(default_factory=TeacherSpec, metadata=group(
        prefix="teacher-", names={"name": "teacher-online"}, about="online teacher", panel=TEACHER,
        help={"name": "Run this timm teacher in the loop on the same views instead of reading a cache.",
              "classes": "The teacher's label space (imagenet-1k or a file of class ids); with a cache, checked "
                         "against the cache's."}))
    epochs: int = field(default=10, metadata=in_panel(SCHEDULE))
    """Training epochs."""
    max_steps_per_epoch: int | None = field(default=None, metadata=in_panel(SCHEDULE))
    """Cap optimizer steps per epoch (smoke runs, benchmarks)."""
    batch_size: int = field(default=128, metadata=in_panel(OPTIMIZER))
    """Batch size per process."""
    grad_accum: int = field(default=1, metadata=in_panel(OPTIMIZER))
    """Gradient accumulation steps."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata=in_panel(DEVICES))
    """auto: bf16 on CUDA, none on CPU."""
    check_signal_every: int = field(default=1, metadata=in_panel(DEVICES))
    """Ranks agree on a stop signal every N optimizer steps (then save and exit with status 75).

    On SIGTERM/SIGINT the run saves at the next optimizer step and exits with status 75; ranks agree on the
    signal with one all-reduce of one number every N optimizer steps, so the exit comes within N steps + the
    save (or, during evaluation, the rest of the evaluation + the epoch's save)."""
    resume: bool = field(default=False, metadata=in_panel(RUN))
    """Continue from the run directory's last saved state, exactly as if never stopped.

    The state is an epoch's end, or the optimizer step a stop signal or --save-every-steps saved: weights and
    metrics come out as an uninterrupted run's."""
    save_every_steps: int | None = field(default=None, metadata=in_panel(RUN))
    """Also save the state every N optimizer steps (a kill without notice then loses at most N steps).

    Only the newest state is kept; the epoch-end save stays."""
    progress: bool = field(default=True, metadata={"flags": ("--progress/--quiet",), **in_panel(RUN)})
    """Progress bars."""

    def __post_init__(self):
        if isinstance(self.cache, str | Path):  # one value where a list is expected is a list of one
            self.cache = [self.cache]
        self.cache = [str(c) for c in self.cache] if self.cache else None
        problems = self._teacher_problems()
        for name in ("epochs", "batch_size", "epochs_per_decode", "grad_accum", "save_every_steps",
                     "check_signal_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.eval_crop_pct is not None and not 0 < self.eval_crop_pct <= 1:
            problems.append(f"--eval-crop-pct must be in (0, 1], got {self.eval_crop_pct}")
        if sockets := worker_tempdir_problem(self.workers):
            problems.append(sockets)
        problems += choice_problems(self)
        if problems:
            raise UserError("; ".join(problems))

    def _teacher_problems(self) -> list[str]:
        problems, t = [], self.teacher
        if self.cache and t.name:
            problems.append("pass either --cache or --teacher-online, not both")
        if not t.name and (t.weights != Weights() or t.model_kwargs or t.input_size):
            problems.append("--teacher-checkpoint, --teacher-pretrained, --teacher-pretrained-file, "
                            "--teacher-model-kwargs and --teacher-input-size describe --teacher-online; pass "
                            "--teacher-online NAME or drop them")
        if t.classes and not (self.cache or t.name):
            problems.append("--teacher-classes maps the dataset onto a teacher's outputs; pass --cache or "
                            "--teacher-online, or drop it")
        if self.cache_teacher and not self.cache:
            problems.append("--teacher names the teacher a cache must come from; pass --cache or drop it")
        several = len(self.cache or ()) > 1
        if (self.ensemble or self.teacher_weights) and not several:
            problems.append("--ensemble and --teacher-weights mix the teachers of several caches; pass --cache "
                            "more than once or drop them")
        if several and (self.cache_teacher or t.classes):
            problems.append("--teacher and --teacher-classes check the one teacher of a single --cache; with several "
                            "caches drop them (each store records its teacher and class map)")
        return problems

    @property
    def has_teacher(self) -> bool:
        return bool(self.cache or self.teacher.name)


@dataclass
class RunConfig:
    """One student trained on a stream: where it goes, what it is, how it learns."""

    out: Path = field(metadata=in_panel(RUN))
    """Run directory: config.json, metrics.csv/jsonl/json, state/, model.safetensors."""
    student: ModelSpec = field(default_factory=ModelSpec, metadata=group(
        names={"name": "student"}, required=("name",), about="student", panel=STUDENT,
        help={"name": "timm model name of the student (timm's pretrained weights fine-tune it: timm replaces the "
                      "classifier when the class count differs)."}))
    seed: int = field(default=0, metadata=in_panel(STUDENT))
    """The student's seed: its initialisation and dropout (and the data order unless --order-seed is given)."""
    ema_decay: float = field(default=0.0, metadata=in_panel(STUDENT))
    """EMA of the student weights (0 = off); evaluated and exported as model_ema.safetensors."""
    loss: LossConfig = field(default_factory=LossConfig, metadata=group(panel=LOSS))
    heads: HeadsConfig = field(default_factory=HeadsConfig, metadata=group(panel=HEADS))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=group(panel=OPTIMIZER))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata=group(panel=SCHEDULE))
    channels_last: bool = field(default=False, metadata=in_panel(DEVICES))
    """Student weights and inputs in channels-last memory format (faster convolutions on recent GPUs; the
    online teacher too)."""
    compile: bool = field(default=False, metadata=in_panel(DEVICES))
    """torch.compile the student with its heads (in place: checkpoints and exports keep their keys)."""
    compile_backend: str = field(default="inductor", metadata=in_panel(DEVICES))
    """torch.compile backend for --compile (inductor; aot_eager or eager to debug a compile problem)."""
    log_with: Literal["tensorboard", "wandb", "all"] | None = field(default=None, metadata=in_panel(RUN))
    """Also hand the metrics to these accelerate trackers (metrics.csv/jsonl are written either way).

    Their files go under the run directory; wandb logs offline unless configured."""

    def __post_init__(self):
        self.out = Path(self.out)
        problems = []
        if self.optim.lr <= 0:
            problems.append(f"--lr must be > 0, got {self.optim.lr}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.compile_backend != "inductor" and not self.compile:
            problems.append(f"--compile-backend {self.compile_backend} applies to --compile; pass --compile or drop it")
        problems += choice_problems(self)
        if problems:
            raise UserError("; ".join(problems))


def teacher_problem(stream: StreamConfig, run: RunConfig) -> str | None:
    """The one rule that ties a run to its stream: a method that distils needs the stream to have a teacher."""
    if run.loss.needs_teacher and not stream.has_teacher:
        return f"method '{run.loss.method}' needs a teacher: pass --cache STORE or --teacher-online NAME"
    return None


@dataclass
class TrainConfig:
    """Every option of `train-student`: the stream's and one run's (one flat set of flags and keys), and --runs."""

    stream: StreamConfig = field(metadata=group(transparent=True))
    run: RunConfig = field(metadata=group(transparent=True))
    runs: Path | None = field(default=None, metadata=in_panel(RUN))
    """A YAML/JSON list of runs, each a mapping of run options over these, trained on one view stream.

    Students, methods, optimizers, seeds, ...: each view is decoded and augmented once for all (README, "Many
    students from one stream"); stream options are set once, for all."""

    panels = PANELS  # the order of the --help panels (class attributes, not options)
    config_panel = RUN

    def __post_init__(self):
        problem = teacher_problem(self.stream, self.run)
        if problem:
            raise UserError(problem)

    def split(self) -> tuple[StreamConfig, RunConfig]:
        """The stream (its order seed resolved: --order-seed, else this run's --seed) and the run."""
        order = self.stream.order_seed if self.stream.order_seed is not None else self.run.seed
        return dataclasses.replace(self.stream, order_seed=order), self.run

    def to_dict(self) -> dict:
        """As files write it: the stream's and the run's options side by side (JSON values)."""
        plain = {**dataclasses.asdict(self.stream), **dataclasses.asdict(self.run), "runs": self.runs}
        return json.loads(json.dumps(plain, default=str))
