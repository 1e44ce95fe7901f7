"""Stage two: train any timm student, with OFA stage heads, from the teacher cache or online.

    set-up: data and views (the cache's recipe and view seed), the distillation task (student +
            heads, a teacher source, the loss), optimizer and schedule, one accelerator.prepare
    loop:   for epoch: views -> task(batch) -> accelerator.backward -> step; evaluate the bare
            student; save_state, then the progress record that makes it trusted on resume
            (SIGTERM/SIGINT or --save-every-steps: the same inside an epoch, see `save_step`)
    end:    export the bare student as safetensors; metrics.json

One loop for every method (ce, kd, dkd, ofa), cached or online teacher, one or many processes, one run or
several from one view stream (--runs, students/runs.py): the loop takes a list of runs, and each batch is made
once and stepped on by every run, each on its own RNG stream (`own_rng`) with its own accelerator, so that each
ends exactly as it would alone; one run is the list of one.
Two things are hand-written on purpose: the loaders are not passed to `accelerator.prepare` (each
rank already reads its own shards, and a view must not depend on how batches are split: see
`pipeline.reader.assign_shards`), and the run directory keeps only the newest trusted state (an epoch's
end or a step inside one: `trust_state`), which accelerate's own rotation cannot tie to our progress record.
A position inside an epoch is (epoch, micro-steps taken): the view stream replays from any batch
(`TrainViews.loader(start=...)`), so a step checkpoint holds no data-loader buffer.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from cache.format import CacheRequest
from cache.targets import CachedTeacher, TeacherEnsemble
from cache.teacher import ClassMap, Teacher, TeacherSpec
from pipeline import preempt
from pipeline.augment import Recipe, ViewSpec, get_recipe
from pipeline.errors import UserError
from pipeline.manifest import write_atomic
from pipeline.models import ModelSpec, Weights, create_model, model_input
from pipeline.preempt import EXIT_PREEMPTED, Preempted, StopSignals
from pipeline.progress import Bar
from pipeline.provenance import code_version, config_hash, machine, stamp
from pipeline.reader import ShardReader
from pipeline.spec import choice_problems, flag_name, group
from pipeline.views import EvalViews, TrainViews
from students.heads import HeadsConfig, StudentWithHeads
from students.task import DistillationTask, LossConfig, online


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
    grad_accum: int = 1
    """Gradient accumulation steps."""


@dataclass
class ScheduleConfig:
    """The learning-rate schedule, stepped per optimizer update (timm's scheduler factory)."""

    sched: Literal["cosine", "step"] = "cosine"
    """Learning-rate schedule, stepped per optimizer update (timm's scheduler factory)."""
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
class TrainConfig:
    """Every option of `train-student`, in groups (flags, --config files and help text come from here)."""

    data: str | Path
    """Dataset directory or fsspec URL made by `shards` (train and val splits)."""
    out: Path
    """Run directory: config.json, metrics.csv/jsonl/json, state/, model.safetensors."""
    student: ModelSpec = field(default_factory=ModelSpec, metadata=group(
        names={"name": "student"}, required=("name",), about="student",
        help={"name": "timm model name of the student (timm's pretrained weights fine-tune it: timm replaces the "
                      "classifier when the class count differs)."}))
    loss: LossConfig = field(default_factory=LossConfig, metadata=group())
    cache: list[str] | None = None
    """Teacher cache made by `cache-teacher` (path or URL); needed by kd/dkd/ofa unless --teacher-online. Repeat
    it (or list several) to distil from the ensemble of their teachers (they must hold the same views)."""
    ensemble: Literal["prob", "logit"] | None = None
    """With several --cache: the teachers' mean of probabilities at the loss temperature (prob), or mean of
    logits (logit) [default: prob]."""
    teacher_weights: list[float] | None = None
    """With several --cache: one weight per cache, in order, normalised to sum 1 [default: equal]."""
    cache_teacher: str | None = field(default=None, metadata=flag_name("teacher"))
    """With --cache: the teacher the cache must come from (checked)."""
    teacher: TeacherSpec = field(default_factory=TeacherSpec, metadata=group(
        prefix="teacher-", names={"name": "teacher-online"}, about="online teacher",
        help={"name": "Run this timm teacher in the loop on the same views instead of reading a cache.",
              "classes": "The teacher's label space (imagenet-1k or a file of class ids) the dataset's classes are "
                         "mapped onto: used by the online teacher; with a cache, checked against the map the cache "
                         "was made with."}))
    views: ViewSpec = field(default_factory=ViewSpec, metadata=group(
        names={"seed": "view-seed"}, help={"recipe": "Augmentation preset [default: the cache's, else imagenet-cnn].",
                                           "seed": "Seed of the views [default: the cache's, else 0]."}))
    view_epochs: int | None = None
    """Online/ce: cycle the views every N epochs (to match a cache) [default: the cache's epochs]."""
    epochs_per_decode: int = 1
    """Decode each image once for the views of G consecutive epochs (their cached epochs): one stream per group
    of G epochs, mixed through a shuffle buffer of one shard's views (per loader worker: up to 2 shards' views in
    memory, 1 at G = 1), each view still the teacher's with its own target. Steps per epoch and the schedule are
    G = 1's; an epoch is then a count of steps of the group's stream (README, "Several epochs per decode")."""
    eval_crop_pct: float | None = None
    """Evaluation crop: resize the short side to view size / this, centre crop [default: the recipe's]. timm's
    train.py takes it from the student's pretrained_cfg `crop_pct` (e.g. 0.9 for DeiT): give that value here;
    the training views (and so the cache) do not depend on it."""
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=group())
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata=group())
    heads: HeadsConfig = field(default_factory=HeadsConfig, metadata=group())
    seed: int = 0
    """Student seed: initialisation, dropout, and the data order unless --order-seed is given."""
    order_seed: int | None = None
    """Seed of the data order (shards, then samples within a shard) [default: --seed]. Runs that share one view
    stream (--runs) share it while their --seed differs."""
    epochs: int = 10
    """Training epochs."""
    batch_size: int = 128
    """Batch size per process."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on CUDA, none on CPU."""
    channels_last: bool = False
    """Student weights and inputs in channels-last memory format (faster convolutions on recent GPUs; the
    online teacher too)."""
    compile: bool = False
    """torch.compile the student with its heads (in place: checkpoints and exports keep their keys)."""
    compile_backend: str = "inductor"
    """torch.compile backend for --compile (inductor; aot_eager or eager to debug a compile problem)."""
    ema_decay: float = 0.0
    """EMA of the student weights (0 = off); evaluated and exported as model_ema.safetensors."""
    workers: int = 2
    """Data-loader workers per process."""
    train_split: str = "train"
    """Training split."""
    val_split: str = "val"
    """Evaluation split."""
    on_error: Literal["raise", "skip"] | None = None
    """Corrupt samples: raise or skip [default: the cache's policy, else raise]."""
    log_with: Literal["tensorboard", "wandb", "all"] | None = None
    """Also hand the metrics to these accelerate trackers (files under the run directory; wandb offline
    unless configured); metrics.csv/jsonl are written either way."""
    runs: Path | None = None
    """A YAML/JSON list of runs (students, methods, optimizers, seeds, ...), each a mapping of options over these,
    trained together from one view stream: each view is decoded and augmented once for all (README, "Many
    students from one stream")."""
    resume: bool = False
    """Continue from the run directory's last saved state (an epoch's end, or the optimizer step a stop signal
    or --save-every-steps saved): weights and metrics come out as an uninterrupted run's."""
    save_every_steps: int | None = None
    """Also save the state every N optimizer steps (only the newest state is kept; the epoch-end save stays), so
    that a run killed without notice (SIGKILL, lost node) loses at most N steps."""
    check_signal_every: int = 1
    """On SIGTERM/SIGINT the run saves at the next optimizer step and exits with status 75; ranks agree on the
    signal with one all-reduce of one number every N optimizer steps, so the exit comes within N steps + the
    save (or, during evaluation, the rest of the evaluation + the epoch's save)."""
    progress: bool = field(default=True, metadata={"flags": ("--progress/--quiet",)})
    """Progress bars."""
    max_steps_per_epoch: int | None = None
    """Cap optimizer steps per epoch (smoke runs, benchmarks)."""

    def __post_init__(self):
        self.out = Path(self.out)
        if isinstance(self.cache, str | Path):  # a Python caller's single store
            self.cache = [str(self.cache)]
        self.cache = [str(c) for c in self.cache] if self.cache else None
        problems = []
        if self.loss.needs_teacher and not (self.cache or self.teacher.name):
            problems.append(f"method '{self.loss.method}' needs a teacher: pass --cache STORE or --teacher-online NAME")
        if self.cache and self.teacher.name:
            problems.append("pass either --cache or --teacher-online, not both")
        t = self.teacher
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
        for name, value in (("epochs", self.epochs), ("batch_size", self.batch_size),
                            ("epochs_per_decode", self.epochs_per_decode),
                            ("grad_accum", self.optim.grad_accum), ("save_every_steps", self.save_every_steps or 1),
                            ("check_signal_every", self.check_signal_every)):
            if value < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.optim.lr <= 0:
            problems.append(f"--lr must be > 0, got {self.optim.lr}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.compile_backend != "inductor" and not self.compile:
            problems.append(f"--compile-backend {self.compile_backend} applies to --compile; pass --compile or drop it")
        if self.eval_crop_pct is not None and not 0 < self.eval_crop_pct <= 1:
            problems.append(f"--eval-crop-pct must be in (0, 1], got {self.eval_crop_pct}")
        problems += choice_problems(self)
        if problems:
            raise UserError("; ".join(problems))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


@dataclass
class Data:
    """What the run reads: both splits, the views (recipe, seed, cycle) and the cached teacher if any."""

    train: ShardReader
    val: ShardReader
    recipe: Recipe
    view_seed: int
    view_epochs: int | None
    cached: CachedTeacher | TeacherEnsemble | None

    @property
    def num_classes(self) -> int:
        return self.train.manifest.num_classes


def open_data(cfg: TrainConfig, say=print) -> Data:
    """Readers and views; with a cache, its recipe and view seed, after checking it fits the request."""
    if not cfg.cache:
        cached = None
    elif len(cfg.cache) == 1:
        cached = CachedTeacher(cfg.cache[0])
    else:  # refuses caches of different views, naming the first difference
        cached = TeacherEnsemble(cfg.cache, cfg.teacher_weights, cfg.ensemble or "prob")
    on_error = cfg.on_error or (cached.on_error if cached else "raise")  # skip what the teacher pass skipped
    train_reader = ShardReader(cfg.data, cfg.train_split, on_error=on_error)
    val_reader = ShardReader(cfg.data, cfg.val_split, manifest=train_reader.manifest)
    train_reader.check_files()
    val_reader.check_files()
    if cached is None:
        recipe = cfg.views.get() or get_recipe("imagenet-cnn", cfg.views.view_size)
        seed = cfg.views.seed if cfg.views.seed is not None else 0
        return Data(train_reader, val_reader, recipe, seed, cfg.view_epochs, None)
    classes = cfg.teacher.classes
    class_map = ClassMap.resolve(classes, train_reader.manifest) if classes else None
    recipe = cfg.views.get()
    request = CacheRequest(manifest_hash=train_reader.manifest.split_hash(cfg.train_split), split=cfg.train_split,
                           recipe=recipe.to_dict() if recipe else None, seed=cfg.views.seed, teacher=cfg.cache_teacher,
                           classes=class_map.to_dict() if class_map else None)
    for member in getattr(cached, "members", [cached]):
        member.store.check_request(request)
    if cfg.view_epochs and cfg.view_epochs != cached.epochs:
        raise UserError(f"--view-epochs {cfg.view_epochs} differs from the cache's {cached.epochs} epochs; omit it")
    if cfg.epochs > cached.epochs:
        say(f"note: training {cfg.epochs} epochs from a cache of {cached.epochs}: epoch e replays cached "
            f"epoch e mod {cached.epochs} (views and teacher outputs)")
    return Data(train_reader, val_reader, cached.recipe, cached.seed, cached.epochs, cached)


def build_task(cfg: TrainConfig, data: Data, device) -> DistillationTask:
    """Student + heads, the teacher source (cache or online) and the loss."""
    C, teacher, teacher_width, about_teacher = data.num_classes, None, 0, None
    if cfg.teacher.name:
        t = Teacher.from_spec(cfg.teacher, data.train.manifest, data.recipe.input_size, device=device)
        if cfg.channels_last:
            t.to_channels_last()
        teacher, teacher_width = online(t), t.num_features
        about_teacher = {"name": t.name, "weights": t.weights,
                         "classes": t.class_map.to_dict() if t.class_map else None}
    elif data.cached is not None:
        teacher = data.cached.source(cfg.loss.T, cfg.loss.standardize, cfg.loss.teacher_nonlinearity)
        teacher_width = data.cached.width
    spec = cfg.student
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        bare = create_model(spec.name, C, weights=spec.weights, model_kwargs=spec.model_kwargs, role="student",
                            init_seed=cfg.seed)
        s_input = model_input(bare, data.recipe.input_size, spec.input_size)
        student = StudentWithHeads(bare, C, s_input.size, teacher_width=teacher_width, stages=cfg.heads.stages,
                                   block_indices=cfg.heads.block_indices, head_kind=cfg.heads.head_kind,
                                   with_heads=cfg.loss.method == "ofa")
    if cfg.channels_last:
        student.to(memory_format=torch.channels_last)
        s_input = dataclasses.replace(s_input, channels_last=True)
    if cfg.compile:
        # in place (nn.Module.compile): the module tree, its state_dict keys and so checkpoints stay as they are
        student.compile(backend=cfg.compile_backend)
    return DistillationTask(student, s_input, cfg.loss, C, teacher,
                            provenance={"student_weights": bare.loaded_weights, "online_teacher": about_teacher})


def build_optimization(cfg: TrainConfig, task: DistillationTask, views: TrainViews):
    """Optimizer (timm's factory: no weight decay on norms and biases), per-update schedule, and the
    optimizer steps of each epoch (every rank takes the same number: see `TrainViews.steps`)."""
    import timm.optim
    o = cfg.optim
    per_epoch = [views.steps(e, cfg.batch_size, cfg.workers) // o.grad_accum for e in range(cfg.epochs)]
    if cfg.max_steps_per_epoch:
        per_epoch = [min(s, cfg.max_steps_per_epoch) for s in per_epoch]
    if min(per_epoch) < 1:
        raise UserError(f"--batch-size {cfg.batch_size} x --grad-accum {o.grad_accum} is larger than what each of "
                        f"{views.world} process(es) x {cfg.workers} worker(s) reads per epoch; lower the batch size "
                        f"or workers")
    optimizer = timm.optim.create_optimizer_v2(task.trainable(), opt=o.optimizer, lr=o.lr,
                                               weight_decay=o.weight_decay, momentum=o.momentum)
    updates_per_epoch = max(1, round(sum(per_epoch) / cfg.epochs))
    return optimizer, build_scheduler(cfg.schedule, cfg.epochs, optimizer, updates_per_epoch), per_epoch


def build_scheduler(sched: ScheduleConfig, epochs: int, optimizer, updates_per_epoch: int):
    """timm's scheduler factory, stepped per optimizer update (`step_update(n)` after update n)."""
    import timm.scheduler
    scheduler = timm.scheduler.create_scheduler_v2(
        optimizer, sched=sched.sched, num_epochs=epochs, warmup_epochs=sched.warmup_epochs,
        warmup_lr=sched.warmup_lr, min_lr=sched.min_lr, decay_epochs=sched.decay_epochs, decay_rate=sched.decay_rate,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return scheduler[0] if isinstance(scheduler, tuple) else scheduler  # some timm versions add the epoch count


def trackers(log_with: str | None) -> list[str] | None:
    """accelerate tracker names for --log-with; a tracker that is not installed is refused, never dropped."""
    if log_with is None:
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available
    names = ["tensorboard", "wandb"] if log_with == "all" else [log_with]
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    missing = [n for n in names if not available[n]()]
    if missing:
        raise UserError(f"--log-with {log_with} needs {' and '.join(missing)}, which is not installed; "
                        f"pip install '.[{missing[0]}]' (or {missing[0]}) or drop --log-with")
    if "wandb" in names and "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")  # no account configured: log to files, sync later
    return names


def flat_hparams(d: dict, prefix: str = "") -> dict:
    """Nested configuration -> {"loss/gamma": "[1.5]", ...}: the scalar types trackers accept."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flat_hparams(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


@dataclass
class Run:
    """What the loop works with, set up once by `train`."""

    cfg: TrainConfig
    accelerator: Any
    task: DistillationTask  # prepared (DDP-wrapped on several processes)
    optimizer: Any
    scheduler: Any
    views: TrainViews
    eval_loader: DataLoader
    steps: list[int]  # optimizer steps of each epoch, equal on every rank
    data: Data
    eval_recipe: Recipe  # the training recipe at --eval-crop-pct
    mixed_precision: str
    ema: Any = None  # timm ModelEmaV3 of the evaluated model, or None
    stop: StopSignals | None = None  # set while `train` runs: SIGTERM/SIGINT ask for a save and exit 75
    history: list[dict] = field(default_factory=list)  # metrics of the finished epochs
    rng: tuple | None = None  # the run's torch (CPU, CUDA) RNG states: its dropout stream (see `own_rng`)

    @property
    def model(self) -> DistillationTask:
        """The task itself, without DDP's wrapper."""
        return self.accelerator.unwrap_model(self.task)


class Waited:
    """Iterates a loader and adds up the seconds the loop waited for its batches (`waited`): the part of an
    epoch the views, not the step, took. On a GPU the step runs asynchronously, so this is the time the host
    had nothing to queue."""

    def __init__(self, loader, waited: float = 0.0):
        self.loader, self.waited = loader, waited

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            self.waited += time.perf_counter() - t0
            if batch is None:
                return
            yield batch


def train_step(task, batch: dict, optimizer, accelerator, clip_grad: float | None = None) -> dict:
    """One (micro-)step exactly as the loop runs it; returns the task's loss terms (on the device)."""
    with accelerator.accumulate(task):
        result = task(batch)
        accelerator.backward(result["loss"])
        if accelerator.sync_gradients and clip_grad:
            accelerator.clip_grad_norm_(task.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return result


@dataclass
class Position:
    """How far an epoch has got: micro-steps taken (a whole number of optimizer steps) and this rank's running
    sums of the loss terms, which a step checkpoint keeps so the epoch's metrics come out as if never stopped."""

    epoch: int
    micro: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # on the device: no host sync in the step
    seen: int = 0
    seconds: float = 0.0
    waited: float = 0.0  # of those seconds, waiting for the loader


def own_rng(run: Run):
    """Run the block on `run`'s torch RNG stream (dropout, drop-path: CPU and CUDA), then put the process's back.
    Runs that share a view stream each keep their own stream, so each draws what it would draw alone; the
    loader's draws (its workers' base seed) stay on the process's stream, out of every run's."""
    import contextlib
    device = run.accelerator.device
    devices = [device] if device.type == "cuda" else []

    @contextlib.contextmanager
    def swapped():
        with torch.random.fork_rng(devices=devices):
            set_rng(run.rng, device)
            yield
            run.rng = get_rng(device)
    return swapped()


def get_rng(device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def seeded_rng(seed: int, device) -> tuple:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return get_rng(device)


def train_epoch(runs: list[Run], epoch: int, ats: list[Position] | None = None) -> list[dict]:
    """One epoch of `steps[epoch]` optimizer steps for every run on one view stream (from `ats`, their step
    checkpoint, if given): each batch is made once and every run takes its step on it, on its own RNG stream.
    Returns each run's mean loss terms and throughput. Raises Preempted after saving if a stop signal came.
    The runs agree on every option of the stream (students.runs.STREAM), so the lead run's are the stream's."""
    lead = runs[0]
    cfg, accelerator = lead.cfg, lead.accelerator
    world, device = accelerator.num_processes, accelerator.device
    if ats is None:
        ats = [Position(epoch) for _ in runs]
        for run in runs:  # dropout: a function of (the run's seed, epoch, rank)
            run.rng = seeded_rng(run.cfg.seed * 100_003 + epoch * 101 + accelerator.process_index, device)
    # else: mid-epoch, each run goes on with the RNG state restored with its step checkpoint
    at = ats[0]  # the stream's position (every run's micro, seconds and waited are the same)
    micro, ga = lead.steps[epoch] * cfg.optim.grad_accum, cfg.optim.grad_accum
    # --epochs-per-decode: the group's epochs share one stream, positions counted from the group's first epoch
    before = sum(lead.steps[lead.views.group(epoch).start:epoch]) * ga
    loader = lead.views.loader(epoch, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda",
                               start=before + at.micro)
    for run in runs:
        run.task.train()
    update, t0, saved = sum(lead.steps[:epoch]) + at.micro // ga, time.perf_counter() - at.seconds, at.micro
    batches = Waited(loader, at.waited)
    what = cfg.loss.method if len(runs) == 1 else f"{len(runs)} runs"
    with Bar(cfg.progress and accelerator.is_local_main_process, micro * cfg.batch_size * world,
             f"epoch {epoch + 1}/{cfg.epochs} {what}") as bar:
        bar.advance(at.micro * cfg.batch_size * world)
        # exactly the epoch's batches, not one more: with --epochs-per-decode the next belongs to the next epoch
        for i, batch in enumerate(islice(batches, micro - at.micro), start=at.micro):
            batch = to_device(batch, device)
            shown = None
            for run, pos in zip(runs, ats, strict=True):
                with own_rng(run):
                    run.model.set_progress(epoch + i / micro)  # for loss warm-ups (DKD)
                    result = train_step(run.task, batch, run.optimizer, run.accelerator, run.cfg.optim.clip_grad)
                    synced = run.accelerator.sync_gradients  # accelerate's GradientState: the flag this step set
                    if synced:
                        run.scheduler.step_update(num_updates=update + 1)
                        if run.ema is not None:
                            run.ema.update(run.model.eval_model)
                for k, v in result.items():
                    pos.sums[k] = pos.sums.get(k, 0.0) + v.detach().double()
                pos.seen += len(batch["label"])
                shown = shown or result  # the lead run's loss, for the progress bar
            update += synced  # the same for every run: they share --grad-accum and the batches
            # reading the loss syncs with the device: only every 25 steps, for the progress bar
            bar.advance(len(batch["label"]) * world,
                        info=f"loss {float(shown['loss'].detach()):.3f}" if bar.enabled and i % 25 == 0 else None)
            if (i + 1) % ga:
                continue  # mid-accumulation: not a position a checkpoint can hold
            for pos in ats:
                pos.micro, pos.seconds, pos.waited = i + 1, time.perf_counter() - t0, batches.waited
            if cfg.save_every_steps and update % cfg.save_every_steps == 0 and at.micro < micro:
                save_step(runs, ats)  # the epoch's last step is saved by the epoch's save
                saved = at.micro
            if update % cfg.check_signal_every == 0 and stop_agreed(lead):
                if saved != at.micro:
                    save_step(runs, ats)
                raise Preempted(f"epoch {epoch + 1}, step {at.micro // ga} of {micro // ga}")
    elapsed = time.perf_counter() - t0
    out = []
    for run, pos in zip(runs, ats, strict=True):
        sums = pos.sums
        terms = accelerator.reduce(torch.stack([sums[k] for k in sorted(sums)]) / max(1, micro), reduction="mean")
        out.append({"epoch": epoch + 1,
                    **{f"train/{k}": float(v) for k, v in zip(sorted(sums), terms.tolist(), strict=True)},
                    "lr": run.optimizer.param_groups[0]["lr"], "train_seconds": elapsed,
                    "images_per_second": pos.seen * world / elapsed if elapsed > 0 else 0.0,
                    "loader_wait_seconds": batches.waited})
    return out


def stop_agreed(run: Run) -> bool:
    """Whether any rank got a stop signal. Every rank calls this at the same step and all get the same answer
    (one all-reduce of one number), so they save the same position and none is left waiting in a collective.
    Measured on 2 CPU ranks (gloo): see README, "Preemption"."""
    asked = run.stop is not None and run.stop.requested
    if run.accelerator.num_processes == 1:
        return asked
    flag = run.accelerator.reduce(torch.tensor([float(asked)], device=run.accelerator.device), reduction="max")
    return bool(flag.item())


ECE_BINS = 15  # expected calibration error over 15 equal-width confidence bins (Guo et al. 2017)


@torch.no_grad()
def evaluate(runs: list[Run], ema: bool = False) -> list[dict]:
    """Top-1/top-5 and expected calibration error (in %, 15 bins) of each run's evaluated model (the bare student,
    or with `ema` its EMA) over this rank's val shards, summed over ranks. The val views are made once for all the
    runs."""
    accelerator = runs[0].accelerator
    models = [run.ema.module if ema else run.model.eval_model for run in runs]
    for model in models:
        model.eval()
    sums = torch.zeros(len(runs), 3, device=accelerator.device, dtype=torch.float64)  # top-1, top-5 hits, count
    bins = torch.zeros(len(runs), 3, ECE_BINS, device=accelerator.device, dtype=torch.float64)
    for batch in runs[0].eval_loader:
        x, y = batch["view"].to(accelerator.device), batch["label"].to(accelerator.device)
        for r, (run, model) in enumerate(zip(runs, models, strict=True)):
            logits = run.model.predict(x, model)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5[:, 0] == y
            sums[r, 0] += hit.sum()  # accumulated on the device: no sync per batch
            sums[r, 1] += (top5 == y[:, None]).any(1).sum()
            sums[r, 2] += len(y)
            bins[r] += calibration_bins(logits, top5[:, 0], hit)
    sums = accelerator.reduce(sums, reduction="sum").tolist()
    eces = calibration_error(accelerator.reduce(bins, reduction="sum")).tolist()
    return [{"top1": 100.0 * t1 / max(1.0, n), "top5": 100.0 * t5 / max(1.0, n), "ece": 100.0 * ece,
             "val_samples": int(n)} for (t1, t5, n), ece in zip(sums, eces, strict=True)]


def calibration_bins(logits: torch.Tensor, predicted: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """logits [B, C], the predicted class [B] and whether it is right [B] -> [3, ECE_BINS] (float64): per
    confidence bin (i/15, (i+1)/15], the sum of the predicted class's probability, the hits and the count."""
    conf = logits.float().softmax(1).gather(1, predicted[:, None])[:, 0].double()
    b = (conf * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1
    out = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=logits.device)
    for row, values in enumerate((conf, hit.double(), torch.ones_like(conf))):
        out[row].index_add_(0, b, values)
    return out


def calibration_error(bins: torch.Tensor) -> torch.Tensor:
    """[..., 3, ECE_BINS] (`calibration_bins`, summed over batches and ranks) -> the expected calibration error
    [...] as a fraction: sum over bins of (n_b / N) |accuracy_b - confidence_b| = sum_b |hits_b - confidence
    sum_b| / N."""
    return (bins[..., 1, :] - bins[..., 0, :]).abs().sum(-1) / bins[..., 2, :].sum(-1).clamp(min=1)


def export(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def layout(cfg: TrainConfig, accelerator) -> dict:
    """What a mid-epoch position means: the same step number is another point of the epoch under another
    batch size, worker count, process count or accumulation."""
    return {"batch_size": cfg.batch_size, "workers": cfg.workers, "processes": accelerator.num_processes,
            "grad_accum": cfg.optim.grad_accum, "max_steps_per_epoch": cfg.max_steps_per_epoch, "seed": cfg.seed,
            "order_seed": data_order_seed(cfg), "epochs_per_decode": cfg.epochs_per_decode}


def data_order_seed(cfg: TrainConfig) -> int:
    return cfg.order_seed if cfg.order_seed is not None else cfg.seed


def open_run(run: Run, resolved: dict) -> tuple[int, list[dict], Position | None]:
    """Start or resume the run directory -> (first epoch to run, metrics history so far, where that epoch
    stands if a step checkpoint stopped inside it)."""
    cfg, accelerator = run.cfg, run.accelerator
    out = cfg.out
    progress = out / "progress.json"
    if cfg.resume and progress.is_file():
        prog = json.loads(progress.read_text())
        step = prog.get("step")
        if step:
            step["layout"] = {"epochs_per_decode": 1, **step["layout"]}  # saved before --epochs-per-decode existed
        if step and {**layout(cfg, accelerator), **step["layout"]} != layout(cfg, accelerator):
            now = layout(cfg, accelerator)
            was = {**now, **step["layout"]}  # a key an older run did not record is taken as unchanged
            diff = ", ".join(f"{k} {was[k]} (now {now[k]})" for k in now if now[k] != was[k])
            raise UserError(f"{out} stopped inside epoch {step['epoch'] + 1} with {diff}; resume with the same "
                            f"settings (a position inside an epoch depends on them)")
        state = out / "state" / prog.get("state", f"epoch-{prog['epoch']:04d}")
        accelerator.load_state(str(state))  # weights, optimizer, EMA, and every RNG of this process
        if not step:
            accelerator.print(f"resuming {out} after epoch {prog['epoch'] + 1} of {cfg.epochs}")
            return prog["epoch"] + 1, prog["history"], None
        run.rng = get_rng(accelerator.device)  # the run's dropout stream at the step (see own_rng)
        mine = torch.load(state / f"position-{accelerator.process_index}.pt")
        at = Position(step["epoch"], step["micro"], {k: v.to(accelerator.device) for k, v in mine["sums"].items()},
                      mine["seen"], mine["seconds"], mine.get("waited", 0.0))
        accelerator.print(f"resuming {out} in epoch {at.epoch + 1} of {cfg.epochs}, after optimizer step "
                          f"{at.micro // cfg.optim.grad_accum}")
        return at.epoch, prog["history"], at
    check_new(cfg)
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run directory {out} ({e.strerror or e}); "
                            f"choose a writable --out") from e
        write_atomic(out / "config.json", json.dumps({**cfg.to_dict(), "resolved": resolved, "made_by": stamp()},
                                                     indent=1, default=str).encode())
    accelerator.wait_for_everyone()
    return 0, [], None


def check_new(cfg: TrainConfig) -> None:
    """A run directory a new (not resumed) run may use: one that holds no run."""
    if (cfg.out / "progress.json").exists() or (cfg.out / "metrics.json").exists():
        raise UserError(f"run directory {cfg.out} already holds a run; pass --resume to continue it or "
                        f"choose another --out")


def trust_state(out: Path, name: str, record: dict, accelerator) -> None:
    """After every rank has written state/`name`: the progress record that makes it trusted on resume (written
    atomically), then every other state goes. Killed before the record, the previous state stays trusted."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_atomic(out / "progress.json", json.dumps({**record, "state": name}).encode())
        for old in (out / "state").iterdir():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_epoch(runs: list[Run], epoch: int) -> None:
    """Each run's state first, then the progress records that make them trusted on resume; older states go.
    All states are written before any record, so a kill leaves the runs at one position but for the moment
    between their records (then --resume refuses, naming them: see `train_loop`)."""
    name = f"epoch-{epoch:04d}"
    for run in runs:
        with own_rng(run):
            run.accelerator.save_state(str(run.cfg.out / "state" / name))
        if run.accelerator.is_main_process:
            write_metrics(run.cfg.out, run.history)
    for run in runs:
        trust_state(run.cfg.out, name, {"epoch": epoch, "history": run.history}, run.accelerator)


def save_step(runs: list[Run], ats: list[Position]) -> None:
    """A state inside an epoch, per run: accelerate's (weights, optimizer, EMA, the run's RNG stream and the
    process's other RNGs) and each rank's running sums, then the progress records that make them trusted. The
    learning-rate schedule needs no state of its own: it is a function of the update count, which the position
    gives."""
    name = f"step-{ats[0].epoch:04d}-{ats[0].micro:07d}"
    for run, at in zip(runs, ats, strict=True):
        cfg, accelerator = run.cfg, run.accelerator
        with own_rng(run):  # save_state saves the process's RNGs: let them be the run's
            accelerator.save_state(str(cfg.out / "state" / name))
        torch.save({"sums": {k: v.cpu() for k, v in at.sums.items()}, "seen": at.seen, "seconds": at.seconds,
                    "waited": at.waited},
                   cfg.out / "state" / name / f"position-{accelerator.process_index}.pt")
    for run, at in zip(runs, ats, strict=True):
        step = {"epoch": at.epoch, "micro": at.micro, "layout": layout(run.cfg, run.accelerator)}
        trust_state(run.cfg.out, name, {"epoch": at.epoch - 1, "history": run.history, "step": step},
                    run.accelerator)


def set_up(cfg: TrainConfig) -> Run:
    """One run: `set_up_runs([cfg])`."""
    return set_up_runs([cfg])[0]


def set_up_runs(cfgs: list[TrainConfig]) -> list[Run]:
    """Data and views once (the stream is the first configuration's: students.runs checks they agree); per run
    an accelerator, task, optimizer and schedule, one `accelerator.prepare`, an EMA.

    One Accelerator per run, not one for all: `save_state`/`load_state` save and load everything registered
    with an accelerator, so one per run keeps each run's checkpoint in its own directory, whole, in
    accelerate's own format. They share accelerate's process-wide state (device, process group, precision;
    GradientState, whose sync flag each run's `accumulate` sets before its own step: equal --grad-accum)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = cfgs[0]
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    accelerators = [Accelerator(gradient_accumulation_steps=c.optim.grad_accum, mixed_precision=mp,
                                log_with=trackers(c.log_with), project_dir=str(c.out)) for c in cfgs]
    lead = accelerators[0]
    rank, world = lead.process_index, lead.num_processes
    data = open_data(cfg, lead.print)
    views = TrainViews(data.train, data.recipe, data.view_seed, rank, world, view_epochs=data.view_epochs,
                       order_seed=data_order_seed(cfg), join=data.cached.join if data.cached else None,
                       epochs_per_decode=cfg.epochs_per_decode, epochs=cfg.epochs)
    eval_recipe = dataclasses.replace(data.recipe, eval_crop_pct=cfg.eval_crop_pct or data.recipe.eval_crop_pct)
    eval_loader = DataLoader(EvalViews(data.val, eval_recipe, rank, world), batch_size=cfg.batch_size,
                             num_workers=min(cfg.workers, max(1, len(data.val.split.shards) // world)),
                             worker_init_fn=preempt.ignore_stop_signals)
    runs = []
    for c, accelerator in zip(cfgs, accelerators, strict=True):
        set_seed(c.seed)
        task = build_task(c, data, accelerator.device)
        optimizer, scheduler, steps = build_optimization(c, task, views)
        prepared, optimizer = accelerator.prepare(task, optimizer)
        ema = None
        if c.ema_decay:
            from timm.utils import ModelEmaV3
            ema = ModelEmaV3(task.eval_model, decay=c.ema_decay).to(accelerator.device)
            accelerator.register_for_checkpointing(ema)
        runs.append(Run(c, accelerator, prepared, optimizer, scheduler, views, eval_loader, steps, data,
                        eval_recipe, mp, ema))
    return runs


def train(cfg: TrainConfig) -> dict:
    """One run (the summary of its export); `train_runs` for several from one stream."""
    return train_runs([cfg])[0]


def train_runs(cfgs: list[TrainConfig]) -> list[dict]:
    """Set up, then the canonical loop: an epoch of steps, evaluation, a saved state; then the export.
    On SIGTERM/SIGINT: save at the next optimizer step and exit with status 75 (`pipeline.preempt`)."""
    if not cfgs[0].resume:  # refused before anything is written, for every run
        for c in cfgs:
            check_new(c)
    with preempt.active() as stop:  # before any loader starts: its workers inherit the handler
        runs = set_up_runs(cfgs)
        for run in runs:
            run.stop = stop
        try:
            return train_loop(runs)
        except Preempted as e:
            where = ", ".join(str(c.out) for c in cfgs)
            runs[0].accelerator.print(f"stopped by {stop.name} in {e.what}: state saved in {where}; run the same "
                                      f"command with --resume to continue (exit status {EXIT_PREEMPTED})")
            for run in runs:
                run.accelerator.end_training()
            raise


def train_loop(runs: list[Run]) -> list[dict]:
    lead = runs[0]
    starts = []
    for run in runs:
        cfg, accelerator, data = run.cfg, run.accelerator, run.data
        resolved = {"recipe": data.recipe.to_dict(), "view_seed": data.view_seed, "view_epochs": data.view_epochs,
                    "order_seed": data_order_seed(cfg), "eval_crop_pct": run.eval_recipe.eval_crop_pct,
                    "num_classes": data.num_classes, "loss": {**dataclasses.asdict(cfg.loss), "T": cfg.loss.T},
                    "processes": accelerator.num_processes, "mixed_precision": run.mixed_precision,
                    "cache_teacher": data.cached.teacher_attrs() if data.cached else None,
                    **run.model.describe()}
        if len(runs) > 1:  # the runs trained from the same view stream (--runs)
            resolved["stream_runs"] = [str(r.cfg.out) for r in runs]
        start, run.history, at = open_run(run, resolved)
        starts.append((start, at))
        if cfg.log_with:
            accelerator.init_trackers(cfg.out.name, config=flat_hparams({**cfg.to_dict(),
                                                                         "processes": accelerator.num_processes}))
    where = {(s, at.micro if at else 0) for s, at in starts}
    if len(where) > 1:  # a stop between the runs' progress records: no common position to go on from
        raise UserError("the runs stopped at different positions (" + ", ".join(
            f"{r.cfg.out}: epoch {s + 1} step {(at.micro if at else 0) // r.cfg.optim.grad_accum}"
            for r, (s, at) in zip(runs, starts, strict=True)) + "); resume them apart, each with its own --resume")
    start = starts[0][0]
    ats = [at for _, at in starts] if starts[0][1] is not None else None
    for epoch in range(start, lead.cfg.epochs):
        metrics = train_epoch(runs, epoch, ats)
        ats = None
        for m, e in zip(metrics, evaluate(runs), strict=True):
            m |= e
        emas = [run for run in runs if run.ema is not None]
        for run, e in zip(emas, evaluate(emas, ema=True) if emas else [], strict=True):
            metrics[runs.index(run)] |= {f"ema_{k}": v for k, v in e.items()}
        for run, m in zip(runs, metrics, strict=True):
            run.history.append(m)
            name = f"{run.cfg.out.name}: " if len(runs) > 1 else ""
            lead.accelerator.print(f"{name}epoch {epoch + 1}: loss {m['train/loss']:.4f} top1 {m['top1']:.2f} top5 "
                                   f"{m['top5']:.2f} ece {m['ece']:.2f} ({m['images_per_second']:.0f} img/s, "
                                   f"{m['loader_wait_seconds']:.1f} of {m['train_seconds']:.1f} s waiting for "
                                   f"views)")
            run.accelerator.log(m, step=epoch + 1)  # no-op without --log-with
        save_epoch(runs, epoch)
        if epoch + 1 < lead.cfg.epochs and stop_agreed(lead):  # the signal came during evaluation or the save
            raise Preempted(f"the end of epoch {epoch + 1}")
    summaries = [export_run(run, run.history) for run in runs]
    for run in runs:
        run.accelerator.end_training()  # closes the trackers (and the process group): last
    return summaries


def export_run(run: Run, history: list[dict]) -> dict:
    """Export the evaluated model (and its EMA) and the run's summary."""
    cfg, accelerator, ema = run.cfg, run.accelerator, run.ema
    out, final = cfg.out, history[-1] if history else {}
    summary = {"student": cfg.student.name, "method": cfg.loss.method, "epochs": cfg.epochs,
               "top1": final.get("top1"), "top5": final.get("top5"), "ece": final.get("ece"),
               "best_top1": max((h["top1"] for h in history), default=None),
               "val_samples": final.get("val_samples"),
               "train_seconds": sum(h["train_seconds"] for h in history), "provenance": provenance(run, final),
               "history": history}
    if ema is not None:
        summary |= {k: final.get(k) for k in ("ema_top1", "ema_top5", "ema_ece")}
    if accelerator.is_main_process:
        export(run.model.eval_model, out / "model.safetensors")
        if ema is not None:
            export(ema.module, out / "model_ema.safetensors")
        write_atomic(out / "metrics.json", json.dumps(summary, indent=1).encode())
    accelerator.wait_for_everyone()
    return summary


RUN_LOCAL = ("out", "resume", "progress", "log_with", "runs")  # where a run writes and how it is watched


def run_config_hash(cfg: TrainConfig) -> str:
    """The hash of what a run computes: every option but where it writes and how it is watched (RUN_LOCAL)."""
    return config_hash({k: v for k, v in cfg.to_dict().items() if k not in RUN_LOCAL})


def provenance(run: Run, final: dict) -> dict:
    """What made the run's numbers, for a reader (or a benchmark deciding whether to reuse it) to check: the code's
    commit (also the one that started it, when it was resumed under another), the configuration's hash, the data
    (split hashes, validation samples evaluated), the teacher's weights and the caches, the machine."""
    cfg, data = run.cfg, run.data
    try:
        started = json.loads((cfg.out / "config.json").read_text()).get("made_by", {}).get("code")
    except (OSError, ValueError):
        started = None
    online = run.model.provenance.get("online_teacher")
    teachers = ([online["weights"].get("sha256")] if online else
                [i["teacher_sha256"] for i in data.cached.identity()] if data.cached else [])
    return {"code": code_version(), "code_at_start": started, "config_hash": run_config_hash(cfg),
            "data": {"train": data.train.manifest.split_hash(cfg.train_split),
                     "val": data.val.manifest.split_hash(cfg.val_split)},
            "val_samples": final.get("val_samples"), "teacher_sha256": teachers,
            "caches": data.cached.identity() if data.cached else [], "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_metrics(out: Path, history: list[dict]) -> None:
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    with open(out / "metrics.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    (out / "metrics.csv.tmp").replace(out / "metrics.csv")
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
