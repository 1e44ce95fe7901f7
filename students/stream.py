"""One process's view stream, shared by every run on it: the data, the teacher's cached targets joined to the
views, the evaluation loader, and the optimizer steps of each epoch (the same on every rank)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch.utils.data import DataLoader

from cache.format import CacheRequest
from cache.targets import CachedTeacher, TeacherEnsemble
from cache.teacher import ClassMap
from pipeline import preempt
from pipeline.augment import Recipe, get_recipe
from pipeline.errors import UserError
from pipeline.reader import ShardReader
from pipeline.views import EvalViews, TrainViews
from students.config import StreamConfig


@dataclass
class Stream:
    """What the runs of one process read, set up once by `open_stream`."""

    cfg: StreamConfig
    train: ShardReader
    val: ShardReader
    recipe: Recipe  # the views' recipe: the cache's, else --recipe
    view_seed: int  # the seed of the views: the cache's, else --view-seed
    view_epochs: int | None  # the views cycle every this many training epochs (the cached epochs)
    cached: CachedTeacher | TeacherEnsemble | None  # the teacher's targets, joined to each view
    views: TrainViews
    eval_recipe: Recipe  # the training recipe at --eval-crop-pct
    eval_loader: DataLoader
    steps: list[int]  # optimizer steps of each training epoch, equal on every rank

    @property
    def num_classes(self) -> int:
        return self.train.manifest.num_classes

    def describe(self) -> dict:
        """What a run records about its stream (config.json's `resolved`)."""
        return {"recipe": self.recipe.to_dict(), "view_seed": self.view_seed, "view_epochs": self.view_epochs,
                "order_seed": self.cfg.order_seed, "eval_crop_pct": self.eval_recipe.eval_crop_pct,
                "num_classes": self.num_classes,
                "data": {"train": self.train.manifest.split_hash(self.cfg.train_split),
                         "val": self.val.manifest.split_hash(self.cfg.val_split)},
                "caches": [i["id"] for i in self.cached.identity()] if self.cached else [],
                "cache_teacher": self.cached.teacher_attrs() if self.cached else None}


def open_cache(cfg: StreamConfig) -> CachedTeacher | TeacherEnsemble | None:
    if not cfg.cache:
        return None
    if len(cfg.cache) == 1:
        return CachedTeacher(cfg.cache[0])
    return TeacherEnsemble(cfg.cache, cfg.teacher_weights, cfg.ensemble or "prob")  # refuses caches of other views


def open_stream(cfg: StreamConfig, rank: int, world: int, say=print) -> Stream:
    """Readers, views (with a cache: its recipe and view seed, after checking it fits the request), the
    evaluation loader and the steps of each epoch."""
    cached = open_cache(cfg)
    on_error = cfg.on_error or (cached.on_error if cached else "raise")  # skip what the teacher pass skipped
    train = ShardReader(cfg.data, cfg.train_split, on_error=on_error)
    val = ShardReader(cfg.data, cfg.val_split, manifest=train.manifest)
    train.check_files()
    val.check_files()
    if cached is None:
        recipe = cfg.views.get() or get_recipe("imagenet-cnn", cfg.views.view_size)
        view_seed = cfg.views.seed if cfg.views.seed is not None else 0
        view_epochs = cfg.view_epochs
    else:
        check_cache(cfg, cached, train, say)
        recipe, view_seed, view_epochs = cached.recipe, cached.seed, cached.epochs
    views = TrainViews(train, recipe, view_seed, rank, world, view_epochs=view_epochs, order_seed=cfg.order_seed,
                       join=cached.join if cached else None, epochs_per_decode=cfg.epochs_per_decode,
                       epochs=cfg.epochs)
    eval_recipe = dataclasses.replace(recipe, eval_crop_pct=cfg.eval_crop_pct or recipe.eval_crop_pct)
    eval_loader = DataLoader(EvalViews(val, eval_recipe, rank, world), batch_size=cfg.batch_size,
                             num_workers=min(cfg.workers, max(1, len(val.split.shards) // world)),
                             worker_init_fn=preempt.ignore_stop_signals)
    return Stream(cfg, train, val, recipe, view_seed, view_epochs, cached, views, eval_recipe, eval_loader,
                  steps_per_epoch(cfg, views))


def check_cache(cfg: StreamConfig, cached, train: ShardReader, say) -> None:
    """The cache holds what this stream asks for (data, recipe, view seed, teacher, class map, epochs)."""
    classes = cfg.teacher.classes
    class_map = ClassMap.resolve(classes, train.manifest) if classes else None
    recipe = cfg.views.get()
    request = CacheRequest(manifest_hash=train.manifest.split_hash(cfg.train_split), split=cfg.train_split,
                           recipe=recipe.to_dict() if recipe else None, seed=cfg.views.seed, teacher=cfg.cache_teacher,
                           classes=class_map.to_dict() if class_map else None)
    for member in getattr(cached, "members", [cached]):
        member.store.check_request(request)
    if cfg.view_epochs and cfg.view_epochs != cached.epochs:
        raise UserError(f"--view-epochs {cfg.view_epochs} differs from the cache's {cached.epochs} epochs; omit it")
    if cfg.epochs > cached.epochs:
        say(f"note: training {cfg.epochs} epochs from a cache of {cached.epochs}: epoch e replays cached "
            f"epoch e mod {cached.epochs} (views and teacher outputs)")


def steps_per_epoch(cfg: StreamConfig, views: TrainViews) -> list[int]:
    """Optimizer steps of each epoch: the full batches every rank can make (`TrainViews.steps`) over the
    accumulation, capped by --max-steps-per-epoch."""
    steps = [views.steps(e, cfg.batch_size, cfg.workers) // cfg.grad_accum for e in range(cfg.epochs)]
    if cfg.max_steps_per_epoch:
        steps = [min(s, cfg.max_steps_per_epoch) for s in steps]
    if min(steps) < 1:
        raise UserError(f"--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} is larger than what each of "
                        f"{views.world} process(es) x {cfg.workers} worker(s) reads per epoch; lower the batch size "
                        f"or workers")
    return steps
