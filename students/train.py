"""Stage two: train any timm student, with OFA stage heads, from the teacher cache or online.

    set-up: data and views (the cache's recipe and view seed), the distillation task (student +
            heads, a teacher source, the loss), optimizer and schedule, one accelerator.prepare
    loop:   for epoch: views -> task(batch) -> accelerator.backward -> step; evaluate the bare
            student; save_state, then the progress record that makes it trusted on resume
    end:    export the bare student as safetensors; metrics.json

One loop for every method (ce, kd, dkd, ofa), cached or online teacher, one or many processes.
Two things are hand-written on purpose: the loaders are not passed to `accelerator.prepare` (each
rank already reads its own shards, and a view must not depend on how batches are split: see
`pipeline.reader.assign_shards`), and the run directory keeps only the last epoch's state
(`_save_epoch`), which accelerate's own rotation cannot tie to our progress record.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader

from cache.format import CacheRequest
from cache.targets import CachedTeacher
from cache.teacher import ClassMap, Teacher
from pipeline.augment import ModelInput, Recipe, get_recipe
from pipeline.config import strip_optional
from pipeline.errors import UserError
from pipeline.manifest import write_atomic
from pipeline.models import Weights, create_model, model_input
from pipeline.progress import Bar
from pipeline.reader import ShardReader, assign_shards, shard_order
from pipeline.views import EvalViews, TrainViews
from students.heads import StudentWithHeads
from students.task import DistillationTask, LossConfig, online


@dataclass
class TrainConfig:
    """Every option of `train-student` (flags, --config files and help text come from here)."""

    data: str | Path
    """Dataset directory or fsspec URL made by `shards` (train and val splits)."""
    student: str
    """timm model name of the student."""
    out: Path
    """Run directory: config.json, metrics.csv/jsonl/json, state/, model.safetensors."""
    loss: LossConfig = field(default_factory=LossConfig)
    cache: str | Path | None = None
    """Teacher cache made by `cache-teacher` (path or URL); needed by kd/dkd/ofa
    unless --teacher-online."""
    teacher: str | None = None
    """With --cache: the teacher the cache must come from (checked)."""
    teacher_online: str | None = None
    """Run this timm teacher in the loop on the same views instead of reading a cache."""
    teacher_checkpoint: Path | None = None
    """Online teacher: a state dict of exactly this model."""
    teacher_pretrained: bool = False
    """Online teacher: timm's pretrained weights of its name, from the hub."""
    teacher_pretrained_file: Path | None = None
    """Online teacher: timm's pretrained loader from this local file."""
    teacher_classes: str | None = None
    """The teacher's label space (imagenet-1k or a file of class ids) the dataset's classes are mapped onto:
    used by the online teacher; with a cache, checked against the map the cache was made with."""
    teacher_model_kwargs: dict = field(default_factory=dict)
    """timm keyword arguments of the online teacher."""
    teacher_input_size: int | None = None
    """Online teacher input size [default: its fixed size, else the view size]."""
    pretrained: bool = False
    """Student: start from timm's pretrained weights of its name (fine-tuning; timm replaces the classifier
    when the class count differs)."""
    pretrained_file: Path | None = None
    """Student: timm's pretrained loader from this local file."""
    model_kwargs: dict = field(default_factory=dict)
    """timm keyword arguments of the student, e.g. img_size=32."""
    input_size: int | None = None
    """Student input size [default: its fixed size, else the view size]."""
    recipe: str | None = None
    """Augmentation preset [default: the cache's, else imagenet-cnn]."""
    view_size: int | None = None
    """Override the recipe's view size."""
    view_seed: int | None = None
    """Seed of the views [default: the cache's, else 0]."""
    view_epochs: int | None = None
    """Online/ce: cycle the views every N epochs (to match a cache) [default: the cache's epochs]."""
    seed: int = 0
    """Student seed: initialisation and data order."""
    epochs: int = 10
    """Training epochs."""
    batch_size: int = 128
    """Batch size per process."""
    optimizer: Literal["sgd", "adamw", "lamb"] = "sgd"
    """timm optimizer (sgd is SGD with Nesterov momentum, as in timm)."""
    lr: float = 0.05
    """Peak learning rate (not scaled by the batch size)."""
    weight_decay: float = 5e-4
    """Weight decay (not on norms and biases)."""
    momentum: float = 0.9
    """SGD momentum."""
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
    clip_grad: float | None = None
    """Clip the gradient norm to this value."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on CUDA, none on CPU."""
    ema_decay: float = 0.0
    """EMA of the student weights (0 = off); evaluated and exported as model_ema.safetensors."""
    stages: list[int] | None = None
    """OFA stages among 1-4, e.g. 1,2,3,4 [default: all]."""
    block_indices: list[int] | None = None
    """Explicit forward_intermediates indices for the heads, e.g. 1,3,9,11."""
    head_kind: Literal["auto", "conv", "token"] = "auto"
    """auto: token heads for transformers and MLPs, conv heads otherwise."""
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
    """Continue from the run directory's last saved epoch."""
    progress: bool = field(default=True, metadata={"flags": ("--progress/--quiet",)})
    """Progress bars."""
    max_steps_per_epoch: int | None = None
    """Cap optimizer steps per epoch (smoke runs, benchmarks)."""

    def check(self) -> None:
        problems = []
        if self.loss.needs_teacher and not (self.cache or self.teacher_online):
            problems.append(f"method '{self.loss.method}' needs a teacher: pass --cache STORE or --teacher-online NAME")
        if self.cache and self.teacher_online:
            problems.append("pass either --cache or --teacher-online, not both")
        if not self.teacher_online and (self.teacher_checkpoint or self.teacher_pretrained
                                        or self.teacher_pretrained_file):
            problems.append("--teacher-checkpoint, --teacher-pretrained and --teacher-pretrained-file are the weights "
                            "of --teacher-online; pass --teacher-online NAME or drop them")
        if self.teacher_classes and not (self.cache or self.teacher_online):
            problems.append("--teacher-classes maps the dataset onto a teacher's outputs; pass --cache or "
                            "--teacher-online, or drop it")
        for weights in ("weights", "teacher_weights"):
            try:
                getattr(self, weights)
            except UserError as e:
                problems.append(str(e))
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        for name in ("optimizer", "sched", "mixed_precision", "head_kind", "on_error", "log_with"):
            choices = typing.get_args(strip_optional(typing.get_type_hints(TrainConfig)[name]))
            if getattr(self, name) is not None and getattr(self, name) not in choices:
                problems.append(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                f"got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if problems:
            raise UserError("; ".join(problems))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @property
    def weights(self) -> Weights:
        return Weights(None, self.pretrained, self.pretrained_file)

    @property
    def teacher_weights(self) -> Weights:
        return Weights(self.teacher_checkpoint, self.teacher_pretrained, self.teacher_pretrained_file)



@dataclass
class Data:
    """What the run reads: both splits, the views (recipe, seed, cycle) and the cached teacher if any."""

    train: ShardReader
    val: ShardReader
    recipe: Recipe
    view_seed: int
    view_epochs: int | None
    cached: CachedTeacher | None

    @property
    def num_classes(self) -> int:
        return self.train.manifest.num_classes


def open_data(cfg: TrainConfig, say=print) -> Data:
    """Readers and views; with a cache, its recipe and view seed, after checking it fits the request."""
    cached = CachedTeacher(cfg.cache) if cfg.cache else None
    on_error = cfg.on_error or (cached.on_error if cached else "raise")  # skip what the teacher pass skipped
    train_reader = ShardReader(cfg.data, cfg.train_split, on_error=on_error)
    val_reader = ShardReader(cfg.data, cfg.val_split, manifest=train_reader.manifest)
    train_reader.check_files()
    val_reader.check_files()
    if cached is None:
        return Data(train_reader, val_reader, get_recipe(cfg.recipe or "imagenet-cnn", cfg.view_size),
                    cfg.view_seed if cfg.view_seed is not None else 0, cfg.view_epochs, None)
    class_map = ClassMap.resolve(cfg.teacher_classes, train_reader.manifest) if cfg.teacher_classes else None
    request = CacheRequest(manifest_hash=train_reader.manifest.split_hash(cfg.train_split), split=cfg.train_split,
                           recipe=get_recipe(cfg.recipe, cfg.view_size).to_dict() if cfg.recipe else None,
                           seed=cfg.view_seed, teacher=cfg.teacher,
                           classes=class_map.to_dict() if class_map else None)
    cached.store.check_request(request)
    if cfg.view_epochs and cfg.view_epochs != cached.epochs:
        raise UserError(f"--view-epochs {cfg.view_epochs} differs from the cache's {cached.epochs} epochs; omit it")
    if cfg.epochs > cached.epochs:
        say(f"note: training {cfg.epochs} epochs from a cache of {cached.epochs}: epoch e replays cached "
            f"epoch e mod {cached.epochs} (views and teacher outputs)")
    return Data(train_reader, val_reader, cached.recipe, cached.seed, cached.epochs, cached)


def build_task(cfg: TrainConfig, data: Data, device) -> DistillationTask:
    """Student + heads, the teacher source (cache or online) and the loss."""
    C, teacher, teacher_width, about_teacher = data.num_classes, None, 0, None
    if cfg.teacher_online:
        class_map = ClassMap.resolve(cfg.teacher_classes, data.train.manifest) if cfg.teacher_classes else None
        t = Teacher.build(cfg.teacher_online, C, data.recipe.input_size, weights=cfg.teacher_weights,
                          class_map=class_map, model_kwargs=cfg.teacher_model_kwargs,
                          input_size=cfg.teacher_input_size, device=device)
        teacher, teacher_width = online(t), t.num_features
        about_teacher = {"name": t.name, "weights": t.weights, "classes": class_map.to_dict() if class_map else None}
    elif data.cached is not None:
        teacher, teacher_width = data.cached.logits, int(data.cached.teacher.get("num_features", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        bare = create_model(cfg.student, C, weights=cfg.weights, model_kwargs=cfg.model_kwargs, role="student",
                            init_seed=cfg.seed)
        s_input = model_input(bare, data.recipe.input_size, cfg.input_size)
        student = StudentWithHeads(bare, C, s_input.size, teacher_width=teacher_width, stages=cfg.stages,
                                   block_indices=cfg.block_indices, head_kind=cfg.head_kind,
                                   with_heads=cfg.loss.method == "ofa")
    task = DistillationTask(student, s_input, cfg.loss, C, teacher)
    task.provenance = {"student_weights": bare.loaded_weights, "online_teacher": about_teacher}  # for config.json
    return task


def steps_per_epoch(reader: ShardReader, seed: int, epoch: int, world: int, workers: int, batch: int) -> int:
    """Full batches every rank can make this epoch (ranks must take the same number of steps)."""
    counts = [s.count for s in reader.split.shards]
    order = shard_order(reader.num_shards, seed, epoch)
    per_rank = []
    for r in range(world):
        w = max(1, min(workers, len(order[r::world])))
        per_rank.append(sum(sum(counts[s] for s in assign_shards(order, r, world, k, w)) // batch for k in range(w)))
    return min(per_rank)


def build_optimization(cfg: TrainConfig, task: DistillationTask, data: Data, world: int):
    """Optimizer (timm's factory: no weight decay on norms and biases), per-step schedule, steps per epoch."""
    import timm.optim
    per_epoch = [steps_per_epoch(data.train, cfg.seed, e, world, cfg.workers, cfg.batch_size) // cfg.grad_accum
                 for e in range(cfg.epochs)]
    if cfg.max_steps_per_epoch:
        per_epoch = [min(s, cfg.max_steps_per_epoch) for s in per_epoch]
    if min(per_epoch) < 1:
        raise UserError(f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} is larger than what each of "
                        f"{world} process(es) x {cfg.workers} worker(s) reads per epoch; lower the batch size or "
                        f"workers")
    optimizer = timm.optim.create_optimizer_v2(task.student, opt=cfg.optimizer, lr=cfg.lr,
                                               weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return optimizer, build_scheduler(cfg, optimizer, max(1, round(sum(per_epoch) / cfg.epochs))), per_epoch


def build_scheduler(cfg: TrainConfig, optimizer, updates_per_epoch: int):
    """timm's scheduler factory, stepped per optimizer update (`step_update(n)` after update n)."""
    import timm.scheduler
    scheduler = timm.scheduler.create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch)
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


def train_epoch(task, views: TrainViews, optimizer, scheduler, accelerator, cfg: TrainConfig, epoch: int,
                steps: int, step0: int, ema=None) -> dict:
    """One epoch of `steps` optimizer steps; returns the epoch's mean loss terms and throughput."""
    world, device = accelerator.num_processes, accelerator.device
    torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + accelerator.process_index)  # dropout: f(seed, epoch)
    views.set_epoch(epoch)
    shards = assign_shards(shard_order(views.reader.num_shards, cfg.seed, epoch), views.rank, views.world)
    loader = DataLoader(views, batch_size=cfg.batch_size, num_workers=max(0, min(cfg.workers, len(shards))),
                        drop_last=True, pin_memory=device.type == "cuda")
    task.train()
    micro = steps * cfg.grad_accum
    sums: dict[str, torch.Tensor] = {}  # kept on the device: no host sync in the step
    seen, update, t0 = 0, step0, time.perf_counter()
    with Bar(cfg.progress and accelerator.is_local_main_process, micro * cfg.batch_size * world,
             f"epoch {epoch + 1}/{cfg.epochs} {cfg.loss.method}") as bar:
        for i, batch in enumerate(loader):
            if i >= micro:
                break
            accelerator.unwrap_model(task).progress = epoch + i / micro  # for loss warm-ups (DKD)
            result = train_step(task, to_device(batch, device), optimizer, accelerator, cfg.clip_grad)
            if accelerator.sync_gradients:
                update += 1
                scheduler.step_update(num_updates=update)
                if ema is not None:
                    ema.update(accelerator.unwrap_model(task).student.model)
            for k, v in result.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double()
            seen += len(batch["label"])
            # reading the loss syncs with the device: only every 25 steps, for the progress bar
            bar.advance(len(batch["label"]) * world,
                        info=f"loss {float(result['loss'].detach()):.3f}" if bar.enabled and i % 25 == 0 else None)
    elapsed = time.perf_counter() - t0
    terms = accelerator.reduce(torch.stack([sums[k] for k in sorted(sums)]) / max(1, micro), reduction="mean")
    return {"epoch": epoch + 1, **{f"train/{k}": float(v) for k, v in zip(sorted(sums), terms.tolist(), strict=True)},
            "lr": optimizer.param_groups[0]["lr"], "train_seconds": elapsed,
            "images_per_second": seen * world / elapsed if elapsed > 0 else 0.0}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, minput: ModelInput, accelerator) -> dict:
    """Top-1/top-5 of the bare student (no heads) over this rank's val shards, summed over ranks."""
    model.eval()
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # top-1 hits, top-5 hits, count
    for batch in loader:
        x, y = batch["view"].to(accelerator.device), batch["label"].to(accelerator.device)
        logits = model(minput(x))
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += (top5[:, 0] == y).sum()  # accumulated on the device: no sync per batch
        sums[1] += (top5 == y[:, None]).any(1).sum()
        sums[2] += len(y)
    sums = accelerator.reduce(sums, reduction="sum")
    n = max(1.0, sums[2].item())
    return {"top1": 100.0 * sums[0].item() / n, "top5": 100.0 * sums[1].item() / n, "val_samples": int(sums[2].item())}


def export(student: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def open_run(cfg: TrainConfig, accelerator, resolved: dict) -> tuple[int, list[dict]]:
    """Start or resume the run directory -> (first epoch to run, metrics history so far)."""
    out = Path(cfg.out)
    progress = out / "progress.json"
    if cfg.resume and progress.is_file():
        prog = json.loads(progress.read_text())
        accelerator.load_state(str(out / "state" / f"epoch-{prog['epoch']:04d}"))
        accelerator.print(f"resuming {out} after epoch {prog['epoch'] + 1} of {cfg.epochs}")
        return prog["epoch"] + 1, prog["history"]
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
    return 0, []


def save_epoch(out: Path, epoch: int, history: list[dict], accelerator) -> None:
    """State first, then the progress record that makes it trusted on resume; older states go."""
    state_dir = out / "state"
    accelerator.save_state(str(state_dir / f"epoch-{epoch:04d}"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_metrics(out, history)
        write_atomic(out / "progress.json", json.dumps({"epoch": epoch, "history": history}).encode())
        for old in state_dir.glob("epoch-*"):
            if old.name != f"epoch-{epoch:04d}":
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg.check()
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp,
                              log_with=trackers(cfg.log_with), project_dir=str(cfg.out))
    rank, world = accelerator.process_index, accelerator.num_processes
    data = open_data(cfg, accelerator.print)
    set_seed(cfg.seed)
    task = build_task(cfg, data, accelerator.device)
    optimizer, scheduler, per_epoch = build_optimization(cfg, task, data, world)
    task, optimizer = accelerator.prepare(task, optimizer)
    student = accelerator.unwrap_model(task).student
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(student.model, decay=cfg.ema_decay).to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    views = TrainViews(data.train, data.recipe, data.view_seed, rank, world, view_epochs=data.view_epochs,
                       order_seed=cfg.seed, join=data.cached.join if data.cached else None)
    eval_loader = DataLoader(EvalViews(data.val, data.recipe, rank, world), batch_size=cfg.batch_size,
                             num_workers=min(cfg.workers, max(1, len(data.val.split.shards) // world)))
    s_input = accelerator.unwrap_model(task).student_input
    resolved = {"recipe": data.recipe.to_dict(), "view_seed": data.view_seed, "view_epochs": data.view_epochs,
                "num_classes": data.num_classes, "student_input": dataclasses.asdict(s_input), "heads": student.names,
                "loss": {**dataclasses.asdict(cfg.loss), "T": cfg.loss.T}, "processes": world,
                "mixed_precision": mp, "cache_teacher": data.cached.teacher if data.cached else None,
                **accelerator.unwrap_model(task).provenance}
    start, history = open_run(cfg, accelerator, resolved)
    if cfg.log_with:
        accelerator.init_trackers(Path(cfg.out).name, config=flat_hparams({**cfg.to_dict(), "processes": world}))

    for epoch in range(start, cfg.epochs):
        metrics = train_epoch(task, views, optimizer, scheduler, accelerator, cfg, epoch, per_epoch[epoch],
                              sum(per_epoch[:epoch]), ema)
        metrics |= evaluate(student.model, eval_loader, s_input, accelerator)
        if ema is not None:
            metrics |= {f"ema_{k}": v for k, v in evaluate(ema.module, eval_loader, s_input, accelerator).items()}
        history.append(metrics)
        accelerator.print(f"epoch {epoch + 1}: loss {metrics['train/loss']:.4f} top1 {metrics['top1']:.2f} top5 "
                          f"{metrics['top5']:.2f} ({metrics['images_per_second']:.0f} img/s)")
        accelerator.log(metrics, step=epoch + 1)  # no-op without --log-with
        save_epoch(Path(cfg.out), epoch, history, accelerator)
    summary = finish(cfg, history, student.model, ema, accelerator)
    accelerator.end_training()  # closes the trackers (and the process group): last
    return summary


def finish(cfg: TrainConfig, history: list[dict], model, ema, accelerator) -> dict:
    """Export the bare student (and its EMA) and the run's summary."""
    out, final = Path(cfg.out), history[-1] if history else {}
    summary = {"student": cfg.student, "method": cfg.loss.method, "epochs": cfg.epochs,
               "top1": final.get("top1"), "top5": final.get("top5"),
               "best_top1": max((h["top1"] for h in history), default=None),
               "train_seconds": sum(h["train_seconds"] for h in history), "history": history}
    if ema is not None:
        summary |= {"ema_top1": final.get("ema_top1"), "ema_top5": final.get("ema_top5")}
    if accelerator.is_main_process:
        export(model, out / "model.safetensors")
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
