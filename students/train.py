"""Stage two: train any timm student, with OFA stage heads, from the teacher cache or online.

    set-up: data and views (the cache's recipe and view seed), the distillation task (student +
            heads, a teacher source, the loss), optimizer and schedule, one accelerator.prepare
    loop:   for epoch: views -> task(batch) -> accelerator.backward -> step; evaluate the bare
            student; save_state, then the progress record that makes it trusted on resume
            (SIGTERM/SIGINT or --save-every-steps: the same inside an epoch, see `save_step`)
    end:    export the bare student as safetensors; metrics.json

One loop for every method (ce, kd, dkd, ofa), cached or online teacher, one or many processes.
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
    eval_crop_pct: float | None = None
    """Evaluation crop: resize the short side to view size / this, centre crop [default: the recipe's]. timm's
    train.py takes it from the student's pretrained_cfg `crop_pct` (e.g. 0.9 for DeiT): give that value here;
    the training views (and so the cache) do not depend on it."""
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=group())
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata=group())
    heads: HeadsConfig = field(default_factory=HeadsConfig, metadata=group())
    seed: int = 0
    """Student seed: initialisation and data order."""
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
        teacher, teacher_width = data.cached.source(cfg.loss.T), data.cached.width
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


def train_epoch(run: Run, epoch: int, at: Position | None = None) -> dict:
    """One epoch of `run.steps[epoch]` optimizer steps (from `at`, a step checkpoint, if given); returns the
    epoch's mean loss terms and throughput. Raises Preempted after saving if a stop signal came."""
    cfg, accelerator = run.cfg, run.accelerator
    world, device = accelerator.num_processes, accelerator.device
    if at is None:
        at = Position(epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + accelerator.process_index)  # dropout: f(seed, epoch)
    # else: mid-epoch, the RNG state restored with the step checkpoint is the one to go on with
    loader = run.views.loader(epoch, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda", start=at.micro)
    run.task.train()
    micro, ga = run.steps[epoch] * cfg.optim.grad_accum, cfg.optim.grad_accum
    update, t0, saved = sum(run.steps[:epoch]) + at.micro // ga, time.perf_counter() - at.seconds, at.micro
    batches = Waited(loader, at.waited)
    with Bar(cfg.progress and accelerator.is_local_main_process, micro * cfg.batch_size * world,
             f"epoch {epoch + 1}/{cfg.epochs} {cfg.loss.method}") as bar:
        bar.advance(at.micro * cfg.batch_size * world)
        for i, batch in enumerate(batches, start=at.micro):
            if i >= micro:
                break
            run.model.set_progress(epoch + i / micro)  # for loss warm-ups (DKD)
            result = train_step(run.task, to_device(batch, device), run.optimizer, accelerator, cfg.optim.clip_grad)
            if accelerator.sync_gradients:
                update += 1
                run.scheduler.step_update(num_updates=update)
                if run.ema is not None:
                    run.ema.update(run.model.eval_model)
            for k, v in result.items():
                at.sums[k] = at.sums.get(k, 0.0) + v.detach().double()
            at.seen += len(batch["label"])
            # reading the loss syncs with the device: only every 25 steps, for the progress bar
            bar.advance(len(batch["label"]) * world,
                        info=f"loss {float(result['loss'].detach()):.3f}" if bar.enabled and i % 25 == 0 else None)
            if (i + 1) % ga:
                continue  # mid-accumulation: not a position a checkpoint can hold
            at.micro, at.seconds, at.waited = i + 1, time.perf_counter() - t0, batches.waited
            if cfg.save_every_steps and update % cfg.save_every_steps == 0 and at.micro < micro:
                save_step(run, at)  # the epoch's last step is saved by the epoch's save
                saved = at.micro
            if update % cfg.check_signal_every == 0 and stop_agreed(run):
                if saved != at.micro:
                    save_step(run, at)
                raise Preempted(f"epoch {epoch + 1}, step {at.micro // ga} of {micro // ga}")
    elapsed = time.perf_counter() - t0
    sums = at.sums
    terms = accelerator.reduce(torch.stack([sums[k] for k in sorted(sums)]) / max(1, micro), reduction="mean")
    return {"epoch": epoch + 1, **{f"train/{k}": float(v) for k, v in zip(sorted(sums), terms.tolist(), strict=True)},
            "lr": run.optimizer.param_groups[0]["lr"], "train_seconds": elapsed,
            "images_per_second": at.seen * world / elapsed if elapsed > 0 else 0.0,
            "loader_wait_seconds": batches.waited}


def stop_agreed(run: Run) -> bool:
    """Whether any rank got a stop signal. Every rank calls this at the same step and all get the same answer
    (one all-reduce of one number), so they save the same position and none is left waiting in a collective.
    Measured on 2 CPU ranks (gloo): see README, "Preemption"."""
    asked = run.stop is not None and run.stop.requested
    if run.accelerator.num_processes == 1:
        return asked
    flag = run.accelerator.reduce(torch.tensor([float(asked)], device=run.accelerator.device), reduction="max")
    return bool(flag.item())


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module | None = None) -> dict:
    """Top-1/top-5 of the evaluated model (the bare student, or `model`: its EMA) over this rank's val
    shards, summed over ranks."""
    accelerator, task = run.accelerator, run.model
    model = model if model is not None else task.eval_model
    model.eval()
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # top-1 hits, top-5 hits, count
    for batch in run.eval_loader:
        x, y = batch["view"].to(accelerator.device), batch["label"].to(accelerator.device)
        logits = task.predict(x, model)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += (top5[:, 0] == y).sum()  # accumulated on the device: no sync per batch
        sums[1] += (top5 == y[:, None]).any(1).sum()
        sums[2] += len(y)
    sums = accelerator.reduce(sums, reduction="sum")
    n = max(1.0, sums[2].item())
    return {"top1": 100.0 * sums[0].item() / n, "top5": 100.0 * sums[1].item() / n, "val_samples": int(sums[2].item())}


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
            "grad_accum": cfg.optim.grad_accum, "max_steps_per_epoch": cfg.max_steps_per_epoch, "seed": cfg.seed}


def open_run(cfg: TrainConfig, accelerator, resolved: dict) -> tuple[int, list[dict], Position | None]:
    """Start or resume the run directory -> (first epoch to run, metrics history so far, where that epoch
    stands if a step checkpoint stopped inside it)."""
    out = cfg.out
    progress = out / "progress.json"
    if cfg.resume and progress.is_file():
        prog = json.loads(progress.read_text())
        step = prog.get("step")
        if step and step["layout"] != layout(cfg, accelerator):
            now = layout(cfg, accelerator)
            diff = ", ".join(f"{k} {step['layout'][k]} (now {now[k]})" for k in now if now[k] != step["layout"][k])
            raise UserError(f"{out} stopped inside epoch {step['epoch'] + 1} with {diff}; resume with the same "
                            f"settings (a position inside an epoch depends on them)")
        state = out / "state" / prog.get("state", f"epoch-{prog['epoch']:04d}")
        accelerator.load_state(str(state))  # weights, optimizer, EMA, and every RNG of this process
        if not step:
            accelerator.print(f"resuming {out} after epoch {prog['epoch'] + 1} of {cfg.epochs}")
            return prog["epoch"] + 1, prog["history"], None
        mine = torch.load(state / f"position-{accelerator.process_index}.pt")
        at = Position(step["epoch"], step["micro"], {k: v.to(accelerator.device) for k, v in mine["sums"].items()},
                      mine["seen"], mine["seconds"], mine.get("waited", 0.0))
        accelerator.print(f"resuming {out} in epoch {at.epoch + 1} of {cfg.epochs}, after optimizer step "
                          f"{at.micro // cfg.optim.grad_accum}")
        return at.epoch, prog["history"], at
    if progress.exists() or (out / "metrics.json").exists():
        raise UserError(f"run directory {out} already holds a run; pass --resume to continue it or "
                        f"choose another --out")
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run directory {out} ({e.strerror or e}); "
                            f"choose a writable --out") from e
        write_atomic(out / "config.json", json.dumps({**cfg.to_dict(), "resolved": resolved}, indent=1,
                                                     default=str).encode())
    accelerator.wait_for_everyone()
    return 0, [], None


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


def save_epoch(out: Path, epoch: int, history: list[dict], accelerator) -> None:
    """State first, then the progress record that makes it trusted on resume; older states go."""
    name = f"epoch-{epoch:04d}"
    accelerator.save_state(str(out / "state" / name))
    if accelerator.is_main_process:
        write_metrics(out, history)
    trust_state(out, name, {"epoch": epoch, "history": history}, accelerator)


def save_step(run: Run, at: Position) -> None:
    """A state inside an epoch: accelerate's (weights, optimizer, EMA, the RNGs of every process) and each
    rank's running sums, then the progress record that makes it trusted. The learning-rate schedule needs no
    state of its own: it is a function of the update count, which the position gives."""
    cfg, accelerator = run.cfg, run.accelerator
    name = f"step-{at.epoch:04d}-{at.micro:07d}"
    accelerator.save_state(str(cfg.out / "state" / name))
    torch.save({"sums": {k: v.cpu() for k, v in at.sums.items()}, "seen": at.seen, "seconds": at.seconds,
                "waited": at.waited},
               cfg.out / "state" / name / f"position-{accelerator.process_index}.pt")
    step = {"epoch": at.epoch, "micro": at.micro, "layout": layout(cfg, accelerator)}
    trust_state(cfg.out, name, {"epoch": at.epoch - 1, "history": run.history, "step": step}, accelerator)


def set_up(cfg: TrainConfig) -> Run:
    """Accelerator, data, task, optimizer and schedule, one `accelerator.prepare`, loaders."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.optim.grad_accum, mixed_precision=mp,
                              log_with=trackers(cfg.log_with), project_dir=str(cfg.out))
    rank, world = accelerator.process_index, accelerator.num_processes
    data = open_data(cfg, accelerator.print)
    set_seed(cfg.seed)
    task = build_task(cfg, data, accelerator.device)
    views = TrainViews(data.train, data.recipe, data.view_seed, rank, world, view_epochs=data.view_epochs,
                       order_seed=cfg.seed, join=data.cached.join if data.cached else None)
    optimizer, scheduler, steps = build_optimization(cfg, task, views)
    prepared, optimizer = accelerator.prepare(task, optimizer)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(task.eval_model, decay=cfg.ema_decay).to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    eval_recipe = dataclasses.replace(data.recipe, eval_crop_pct=cfg.eval_crop_pct or data.recipe.eval_crop_pct)
    eval_loader = DataLoader(EvalViews(data.val, eval_recipe, rank, world), batch_size=cfg.batch_size,
                             num_workers=min(cfg.workers, max(1, len(data.val.split.shards) // world)),
                             worker_init_fn=preempt.ignore_stop_signals)
    return Run(cfg, accelerator, prepared, optimizer, scheduler, views, eval_loader, steps, data, eval_recipe, mp,
               ema)


def train(cfg: TrainConfig) -> dict:
    """Set up, then the canonical loop: an epoch of steps, evaluation, a saved state; then the export.
    On SIGTERM/SIGINT: save at the next optimizer step and exit with status 75 (`pipeline.preempt`)."""
    with preempt.active() as stop:  # before any loader starts: its workers inherit the handler
        run = set_up(cfg)
        run.stop = stop
        try:
            return train_loop(run)
        except Preempted as e:
            run.accelerator.print(f"stopped by {stop.name} in {e.what}: state saved in {cfg.out}; run the same "
                                  f"command with --resume to continue (exit status {EXIT_PREEMPTED})")
            run.accelerator.end_training()
            raise


def train_loop(run: Run) -> dict:
    cfg, accelerator, data = run.cfg, run.accelerator, run.data
    resolved = {"recipe": data.recipe.to_dict(), "view_seed": data.view_seed, "view_epochs": data.view_epochs,
                "eval_crop_pct": run.eval_recipe.eval_crop_pct,
                "num_classes": data.num_classes, "loss": {**dataclasses.asdict(cfg.loss), "T": cfg.loss.T},
                "processes": accelerator.num_processes, "mixed_precision": run.mixed_precision,
                "cache_teacher": data.cached.teacher_attrs() if data.cached else None,
                **run.model.describe()}
    start, run.history, at = open_run(cfg, accelerator, resolved)
    history = run.history
    if cfg.log_with:
        accelerator.init_trackers(cfg.out.name, config=flat_hparams({**cfg.to_dict(),
                                                                     "processes": accelerator.num_processes}))
    for epoch in range(start, cfg.epochs):
        metrics = train_epoch(run, epoch, at)
        at = None
        metrics |= evaluate(run)
        if run.ema is not None:
            metrics |= {f"ema_{k}": v for k, v in evaluate(run, run.ema.module).items()}
        history.append(metrics)
        accelerator.print(f"epoch {epoch + 1}: loss {metrics['train/loss']:.4f} top1 {metrics['top1']:.2f} top5 "
                          f"{metrics['top5']:.2f} ({metrics['images_per_second']:.0f} img/s, "
                          f"{metrics['loader_wait_seconds']:.1f} of {metrics['train_seconds']:.1f} s waiting for "
                          f"views)")
        accelerator.log(metrics, step=epoch + 1)  # no-op without --log-with
        save_epoch(cfg.out, epoch, history, accelerator)
        if epoch + 1 < cfg.epochs and stop_agreed(run):  # the signal came during evaluation or the save
            raise Preempted(f"the end of epoch {epoch + 1}")
    summary = export_run(run, history)
    accelerator.end_training()  # closes the trackers (and the process group): last
    return summary


def export_run(run: Run, history: list[dict]) -> dict:
    """Export the evaluated model (and its EMA) and the run's summary."""
    cfg, accelerator, ema = run.cfg, run.accelerator, run.ema
    out, final = cfg.out, history[-1] if history else {}
    summary = {"student": cfg.student.name, "method": cfg.loss.method, "epochs": cfg.epochs,
               "top1": final.get("top1"), "top5": final.get("top5"),
               "best_top1": max((h["top1"] for h in history), default=None),
               "train_seconds": sum(h["train_seconds"] for h in history), "history": history}
    if ema is not None:
        summary |= {"ema_top1": final.get("ema_top1"), "ema_top5": final.get("ema_top5")}
    if accelerator.is_main_process:
        export(run.model.eval_model, out / "model.safetensors")
        if ema is not None:
            export(ema.module, out / "model_ema.safetensors")
        write_atomic(out / "metrics.json", json.dumps(summary, indent=1).encode())
    accelerator.wait_for_everyone()
    return summary


def write_metrics(out: Path, history: list[dict]) -> None:
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    with open(out / "metrics.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    (out / "metrics.csv.tmp").replace(out / "metrics.csv")
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
