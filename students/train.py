"""Stage two: train any timm student, with OFA stage heads, from the teacher cache or online.

    set-up: dataset, views (the cache's recipe and view seed), cache checks, student + heads
    loop:   for epoch: TrainViews(epoch) -> student(+heads) -> losses vs cached (or online) teacher
            -> accelerator.backward -> step; evaluate the bare student; save_state; metrics
    end:    export the bare student as safetensors; metrics.json

One loop for every method (ce, kd, dkd, ofa) and for one or many processes (`accelerate launch`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.augment import Recipe, get_recipe
from pipeline.errors import UserError
from pipeline.manifest import write_atomic
from pipeline.progress import Bar
from pipeline.reader import ShardReader, assign_shards, shard_order
from pipeline.views import EvalViews, TrainViews
from students.heads import StudentWithHeads
from students.models import create_model, file_sha256, model_input
from students.task import LossConfig, distill_losses, teacher_from_batch


@dataclass
class TrainConfig:
    data: Path
    """Dataset directory made by `cli.py shards` (train and val splits)."""
    student: str
    """timm model name of the student."""
    out: Path
    """Run directory: config.json, metrics.csv/jsonl/json, state/, model.safetensors."""
    loss: LossConfig = field(default_factory=LossConfig)
    cache: Path | None = None
    """Teacher cache (stage one); needed by kd/dkd/ofa unless --teacher-online."""
    teacher: str | None = None
    """With --cache: the teacher the cache must come from (checked). Otherwise unused."""
    teacher_online: str | None = None
    """Run this timm teacher in the loop over the same views instead of reading a cache."""
    teacher_checkpoint: Path | None = None
    teacher_model_kwargs: dict = field(default_factory=dict)
    teacher_input_size: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    input_size: int | None = None
    """Student input size; default: the size a fixed-grid student was built for, else the view size."""
    recipe: str | None = None
    """Augmentation preset; default: the cache's recipe, else imagenet-cnn."""
    view_size: int | None = None
    view_seed: int | None = None
    """Seed of the views; default: the cache's seed, else 0."""
    view_epochs: int | None = None
    """Cycle the views every N epochs (default: the cache's epochs; online: no cycling)."""
    seed: int = 0
    """Student seed: initialisation and data order."""
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    clip_grad: float | None = None
    grad_accum: int = 1
    mixed_precision: str = "auto"
    """auto: bf16 on CUDA, none on CPU; or no, bf16, fp16."""
    ema_decay: float = 0.0
    """EMA of the student weights (0 = off); exported as model_ema.safetensors."""
    stages: list[int] | None = None
    block_indices: list[int] | None = None
    head_kind: str = "auto"
    workers: int = 2
    train_split: str = "train"
    val_split: str = "val"
    on_error: str | None = None
    """Corrupt samples: raise (default) or skip; with a cache, default: the policy the cache was made with."""
    resume: bool = False
    progress: bool = True
    max_steps_per_epoch: int | None = None
    """Cap optimizer steps per epoch (smoke tests, benchmarks)."""

    def check(self) -> None:
        problems = []
        if self.loss.needs_teacher and not (self.cache or self.teacher_online):
            problems.append(f"method '{self.loss.method}' needs a teacher: pass --cache STORE or --teacher-online NAME")
        if self.cache and self.teacher_online:
            problems.append("pass either --cache or --teacher-online, not both")
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            problems.append(f"--optimizer must be sgd or adamw, got {self.optimizer}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            problems.append(f"--mixed-precision must be auto, no, bf16 or fp16, got {self.mixed_precision}")
        if self.head_kind not in ("auto", "conv", "token"):
            problems.append(f"--head-kind must be auto, conv or token, got {self.head_kind}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if problems:
            raise UserError("; ".join(problems))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _steps(reader: ShardReader, seed: int, epoch: int, world: int, workers: int, batch: int) -> int:
    """Full batches every rank can make this epoch (ranks must take the same number of steps)."""
    counts = [s.count for s in reader.split.shards]
    order = shard_order(reader.num_shards, seed, epoch)
    per_rank = []
    for r in range(world):
        w = max(1, min(workers, len(order[r::world])))
        per_rank.append(sum(sum(counts[s] for s in assign_shards(order, r, world, k, w)) // batch for k in range(w)))
    return min(per_rank)


def _lr_lambda(total: int, warmup: int, base_lr: float, min_lr: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return (min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))) / base_lr
    return f


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, minput, accelerator) -> dict:
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


def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg.check()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    say = accelerator.print

    # ---------------------------------------------------------------- data, views, cache
    store = None
    if cfg.cache:
        from cache.store import CacheStore
        store = CacheStore(cfg.cache)
    on_error = cfg.on_error
    if store is not None and on_error is None:
        on_error = store.attrs.get("on_error", "raise")  # skip what the teacher pass skipped
    train_reader = ShardReader(cfg.data, cfg.train_split, on_error=on_error or "raise")
    val_reader = ShardReader(cfg.data, cfg.val_split, manifest=train_reader.manifest)
    train_reader.check_files()
    val_reader.check_files()
    manifest = train_reader.manifest
    C = manifest.num_classes
    if store is not None:
        want = {"dataset": {"manifest_hash": manifest.split_hash(cfg.train_split), "split": cfg.train_split}}
        keys = {("dataset", "manifest_hash"): "dataset", ("dataset", "split"): "dataset split"}
        if cfg.recipe:
            want["recipe"] = get_recipe(cfg.recipe, cfg.view_size).to_dict()
            keys[("recipe",)] = "augmentation recipe"
        if cfg.view_seed is not None:
            want["seed"], keys[("seed",)] = cfg.view_seed, "view seed"
        if cfg.teacher:
            want["teacher"] = {"name": cfg.teacher}
            keys[("teacher", "name")] = "teacher"
        from cache.store import mismatches
        problems = mismatches(store.attrs, want, keys)
        if problems:
            raise UserError(f"cache {cfg.cache} does not match this run: " + "; ".join(problems)
                            + "; make a matching cache with `cli.py cache-teacher` or fix the options")
        store.check_complete()
        recipe = Recipe.from_dict(store.attrs["recipe"])
        view_seed, view_epochs = int(store.attrs["seed"]), store.epochs
        if cfg.epochs > store.epochs:
            say(f"note: training {cfg.epochs} epochs from a cache of {store.epochs}: epoch e replays cached "
                f"epoch e mod {store.epochs} (views and teacher outputs)")
    else:
        recipe = get_recipe(cfg.recipe or "imagenet-cnn", cfg.view_size)
        view_seed = cfg.view_seed if cfg.view_seed is not None else 0
        view_epochs = cfg.view_epochs
    if cfg.view_epochs and store is not None and cfg.view_epochs != store.epochs:
        raise UserError(f"--view-epochs {cfg.view_epochs} differs from the cache's {store.epochs} epochs; omit it")

    # ---------------------------------------------------------------- models
    set_seed(cfg.seed)
    teacher, t_input, teacher_width = None, None, 0
    if cfg.teacher_online:
        teacher = create_model(cfg.teacher_online, C, checkpoint=cfg.teacher_checkpoint,
                               model_kwargs=cfg.teacher_model_kwargs, role="teacher").eval().to(device)
        t_input = model_input(teacher, recipe.input_size, cfg.teacher_input_size)
        teacher_width = teacher.num_features
    elif store is not None:
        teacher_width = int(store.attrs["teacher"].get("num_features", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        bare = create_model(cfg.student, C, model_kwargs=cfg.model_kwargs, role="student", init_seed=cfg.seed)
        s_input = model_input(bare, recipe.input_size, cfg.input_size)
        model = StudentWithHeads(bare, C, s_input.size, teacher_width=teacher_width, stages=cfg.stages,
                                 block_indices=cfg.block_indices, head_kind=cfg.head_kind,
                                 with_heads=cfg.loss.method == "ofa")
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model.model, decay=cfg.ema_decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    # ---------------------------------------------------------------- optimisation
    workers = cfg.workers
    per_epoch = [_steps(train_reader, cfg.seed, e, world, workers, cfg.batch_size) // cfg.grad_accum
                 for e in range(cfg.epochs)]
    if cfg.max_steps_per_epoch:
        per_epoch = [min(s, cfg.max_steps_per_epoch) for s in per_epoch]
    if min(per_epoch) < 1:
        raise UserError(f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} is larger than what each of "
                        f"{world} process(es) x {workers} worker(s) reads per epoch; lower the batch size or workers")
    import timm.optim
    optimizer = timm.optim.create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               momentum=cfg.momentum)
    warmup = int(cfg.warmup_epochs * per_epoch[0])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(sum(per_epoch), warmup, cfg.lr, cfg.min_lr))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    train_views = TrainViews(train_reader, recipe, view_seed, rank, world, cache=store, view_epochs=view_epochs,
                             order_seed=cfg.seed)
    eval_loader = DataLoader(EvalViews(val_reader, recipe, rank, world), batch_size=cfg.batch_size,
                             num_workers=min(workers, max(1, len(val_reader.split.shards) // world)))

    # ---------------------------------------------------------------- resume
    out = Path(cfg.out)
    state_dir = out / "state"
    progress_file = out / "progress.json"
    start, history = 0, []
    if cfg.resume and progress_file.is_file():
        prog = json.loads(progress_file.read_text())
        accelerator.load_state(str(state_dir / f"epoch-{prog['epoch']:04d}"))
        start, history = prog["epoch"] + 1, prog["history"]
        say(f"resuming {out} after epoch {prog['epoch'] + 1} of {cfg.epochs}")
    elif progress_file.exists() or (out / "metrics.json").exists():
        raise UserError(f"run directory {out} already holds a run; pass --resume to continue it or "
                        f"choose another --out")
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run directory {out} ({e.strerror or e}); "
                            f"choose a writable --out") from e
        resolved = {**cfg.to_dict(), "resolved": {
            "recipe": recipe.to_dict(), "view_seed": view_seed, "view_epochs": view_epochs, "num_classes": C,
            "student_input": dataclasses.asdict(s_input), "heads": list(model_unwrap(accelerator, model).names),
            "loss": {**dataclasses.asdict(cfg.loss), "T": cfg.loss.T}, "processes": world,
            "mixed_precision": mp, "cache_teacher": store.attrs["teacher"] if store else None,
            "teacher_checkpoint_sha256": file_sha256(cfg.teacher_checkpoint)}}
        write_atomic(out / "config.json", json.dumps(resolved, indent=1, default=str).encode())
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- loop
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)  # dropout etc.: a function of (seed, epoch)
        train_views.set_epoch(epoch)
        n_workers = max(0, min(workers, len(assign_shards(shard_order(train_reader.num_shards, cfg.seed, epoch),
                                                          rank, world))))
        loader = DataLoader(train_views, batch_size=cfg.batch_size, num_workers=n_workers, drop_last=True,
                            pin_memory=device.type == "cuda")
        model.train()
        steps = per_epoch[epoch] * cfg.grad_accum
        sums: dict[str, torch.Tensor] = {}  # kept on the device: no host sync in the step
        seen, t0 = 0, time.perf_counter()
        with Bar(cfg.progress and accelerator.is_local_main_process, steps * cfg.batch_size * world,
                 f"epoch {epoch + 1}/{cfg.epochs} {cfg.loss.method}") as bar:
            for i, batch in enumerate(loader):
                if i >= steps:
                    break
                batch = _to(batch, device)
                with accelerator.accumulate(model):
                    t_logits = None
                    if teacher is not None:
                        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                             enabled=device.type == "cuda"):
                            t_logits = teacher(t_input(batch["view"])).float()
                    elif store is not None and cfg.loss.needs_teacher:
                        t_logits = teacher_from_batch(batch, C)
                    result = distill_losses(model(s_input(batch["view"])), t_logits, batch, cfg.loss, C)
                    accelerator.backward(result["loss"])
                    if accelerator.sync_gradients and cfg.clip_grad:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.sync_gradients:
                        scheduler.step()
                        if ema is not None:
                            ema.update(model_unwrap(accelerator, model).model)
                for k, v in result.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().double()
                seen += len(batch["label"])
                # reading the loss syncs with the device: only every 25 steps, for the progress bar
                info = f"loss {float(result['loss']):.3f}" if bar.enabled and i % 25 == 0 else None
                bar.advance(len(batch["label"]) * world, info=info)
        elapsed = time.perf_counter() - t0
        terms = torch.stack([sums[k] for k in sorted(sums)]) / max(1, steps)
        terms = accelerator.reduce(terms, reduction="mean")
        metrics = {"epoch": epoch + 1, **{f"train/{k}": float(v) for k, v in zip(sorted(sums), terms.tolist(),
                                                                                    strict=True)},
                   "lr": scheduler.get_last_lr()[0], "train_seconds": elapsed,
                   "images_per_second": seen * world / elapsed if elapsed > 0 else 0.0}
        bare_model = model_unwrap(accelerator, model).model
        metrics |= evaluate(bare_model, eval_loader, s_input, accelerator)
        if ema is not None:
            metrics |= {f"ema_{k}": v for k, v in evaluate(ema.module, eval_loader, s_input, accelerator).items()}
        history.append(metrics)
        say(f"epoch {epoch + 1}: loss {metrics['train/loss']:.4f} top1 {metrics['top1']:.2f} top5 "
            f"{metrics['top5']:.2f} ({metrics['images_per_second']:.0f} img/s)")
        # state first, then the progress record that makes it trusted on resume
        accelerator.save_state(str(state_dir / f"epoch-{epoch:04d}"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_metrics(out, history)
            write_atomic(progress_file, json.dumps({"epoch": epoch, "history": history}).encode())
            for old in state_dir.glob("epoch-*"):
                if old.name != f"epoch-{epoch:04d}":
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- export
    final = history[-1] if history else {}
    summary = {"student": cfg.student, "method": cfg.loss.method, "epochs": cfg.epochs,
               "top1": final.get("top1"), "top5": final.get("top5"),
               "best_top1": max((h["top1"] for h in history), default=None),
               "train_seconds": sum(h["train_seconds"] for h in history), "history": history}
    if accelerator.is_main_process:
        export(model_unwrap(accelerator, model).model, out / "model.safetensors")
        if ema is not None:
            export(ema.module, out / "model_ema.safetensors")
            summary |= {"ema_top1": final.get("ema_top1"), "ema_top5": final.get("ema_top5")}
        write_atomic(out / "metrics.json", json.dumps(summary, indent=1).encode())
    accelerator.wait_for_everyone()
    return summary


def model_unwrap(accelerator, model) -> StudentWithHeads:
    return accelerator.unwrap_model(model)


def _write_metrics(out: Path, history: list[dict]) -> None:
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    with open(out / "metrics.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    (out / "metrics.csv.tmp").replace(out / "metrics.csv")
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
