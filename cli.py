"""Command line: each command is thin and calls a library function.

    python cli.py shards SRC OUT [--split NAME] [--shard-size N] [--class-names FILE] [--overwrite]
    python cli.py cache-teacher --data DIR --teacher NAME --epochs E --topk K --out STORE.zarr
        [--checkpoint PATH | --pretrained | --pretrained-file PATH] [--teacher-classes imagenet-1k|FILE]
    python cli.py inspect-cache STORE.zarr
    python cli.py verify-cache STORE.zarr --samples N
    python cli.py train-student --data DIR --student NAME --method {ce,kd,dkd,ofa} --out RUN_DIR ...

Problems a user can fix exit with status 2 and one sentence naming the input and the fix.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pipeline.augment import PRESETS
from pipeline.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cross-architecture distillation (OFA-KD) with an offline, replayable teacher cache.")

RecipeName = Enum("RecipeName", {k.replace("-", "_"): k for k in PRESETS}, type=str)


# weights and label-space options, written once; each command names whose weights they are
CHECKPOINT = "a state dict of exactly this architecture and class count (.safetensors or torch)"
PRETRAINED = ("timm's pretrained weights of the name (a tag such as convnext_tiny.fb_in1k, or hf-hub:ORG/REPO), "
              "from the Hugging Face hub")
PRETRAINED_FILE = "timm's pretrained loader from this local weights file instead of the hub (implies pretrained)"
TEACHER_CLASSES = ("the teacher's label space, to map the dataset's classes onto its outputs by class id: "
                   "imagenet-1k (timm's synsets) or a file with one class id per line in output order")


def _weights(checkpoint: Path | None, pretrained: bool, pretrained_file: Path | None):
    from pipeline.models import Weights
    return Weights(checkpoint, pretrained, pretrained_file)


class OnError(str, Enum):
    raise_ = "raise"
    skip = "skip"


def _print_table(title: str, rows: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title, show_header=False)
    for k, v in rows.items():
        t.add_row(str(k), json.dumps(v) if isinstance(v, dict | list) else str(v))
    Console().print(t)


@app.command()
def shards(
    src: Annotated[str, typer.Argument(help="ImageFolder tree SRC/<class>/<image>, or 'digits' for the embedded default")],
    out: Annotated[Path, typer.Argument(help="dataset directory (can hold several splits)")],
    split: Annotated[str, typer.Option(help="split name written by this call (digits writes train and val)")] = "train",
    shard_size: Annotated[int | None, typer.Option(help="samples per shard [default: 1000, digits 200]")] = None,
    class_names: Annotated[Path | None, typer.Option(help="'id<TAB>name' lines (e.g. Tiny-ImageNet words.txt) or one name per line")] = None,
    name: Annotated[str | None, typer.Option(help="dataset name recorded in dataset.json")] = None,
    order_seed: Annotated[int, typer.Option(help="seed of the fixed sample order (mixes classes within shards)")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the split if it exists")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
):
    """Convert images into webdataset tar shards plus dataset.json."""
    import time

    from pipeline.shards import make_shards
    t0 = time.perf_counter()
    m = make_shards(src, out, split=split, shard_size=shard_size, class_names=class_names, name=name,
                    order_seed=order_seed, overwrite=overwrite, progress=not quiet)
    for sp in (["train", "val"] if src == "digits" else [split]):
        info = m.splits[sp]
        size = sum(s.bytes for s in info.shards)
        print(f"{out}: split '{sp}' {info.count} samples, {m.num_classes} classes, {len(info.shards)} shards, "
              f"{size / 1e6:.1f} MB")
    print(f"done in {time.perf_counter() - t0:.1f} s")


@app.command("cache-teacher")
def cache_teacher_cmd(
    data: Annotated[Path, typer.Option(help="dataset directory made by `shards`")],
    teacher: Annotated[str, typer.Option(help="timm model name of the teacher")],
    out: Annotated[Path, typer.Option(help="output zarr store, e.g. runs/teacher.zarr")],
    epochs: Annotated[int, typer.Option(help="epochs of views to cache")] = 1,
    topk: Annotated[int, typer.Option(help="teacher logits kept per view")] = 10,
    checkpoint: Annotated[Path | None, typer.Option(help=f"teacher: {CHECKPOINT}")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help=f"teacher: {PRETRAINED}")] = False,
    pretrained_file: Annotated[Path | None, typer.Option(help=f"teacher: {PRETRAINED_FILE}")] = None,
    teacher_classes: Annotated[str | None, typer.Option(help=TEACHER_CLASSES)] = None,
    model_kwargs: Annotated[list[str] | None, typer.Option("--model-kwargs", help="teacher timm kwargs, name=value (repeatable)")] = None,
    recipe: Annotated[RecipeName, typer.Option(help="augmentation preset")] = RecipeName.imagenet_cnn,
    view_size: Annotated[int | None, typer.Option(help="override the recipe's view size")] = None,
    input_size: Annotated[int | None, typer.Option(help="teacher input size [default: its fixed size, else the view size]")] = None,
    split: Annotated[str, typer.Option(help="split to cache")] = "train",
    seed: Annotated[int, typer.Option(help="run seed of the views")] = 0,
    batch_size: Annotated[int, typer.Option(help="teacher batch size")] = 256,
    workers: Annotated[int, typer.Option(help="data-loader workers per process")] = 2,
    on_error: Annotated[OnError, typer.Option(help="corrupt samples: raise (stop) or skip (recorded in the store)")] = OnError.raise_,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing store made by another request")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
):
    """Stage one: run the teacher once over the replayable views and store top-k logits (resumable)."""
    from cache.teacher_pass import CacheConfig, cache_teacher
    from pipeline.augment import get_recipe
    from pipeline.models import parse_kwargs
    cfg = CacheConfig(data=data, teacher=teacher, out=out, recipe=get_recipe(recipe.value, view_size),
                      recipe_name=recipe.value, checkpoint=checkpoint, pretrained=pretrained,
                      pretrained_file=pretrained_file, teacher_classes=teacher_classes, model_kwargs=parse_kwargs(model_kwargs),
                      input_size=input_size, split=split, seed=seed, epochs=epochs, topk=topk,
                      batch_size=batch_size, workers=workers, overwrite=overwrite, on_error=on_error.value,
                      progress=not quiet)
    s = cache_teacher(cfg)
    if s["is_main"]:
        print(f"{s['store']}: {s['views_written']} views written ({s['units_skipped_as_done']} of {s['units_total']} "
              f"units were already done), {s['views_per_second']:.1f} views/s, {s['raw_bytes_per_view']} raw / "
              f"{s['disk_bytes_per_view']:.1f} on-disk bytes per view")


@app.command("inspect-cache")
def inspect_cache_cmd(store: Annotated[Path, typer.Argument(help="teacher cache store")],
                      json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
    """Describe a cache: teacher, data, recipe, completion, size, top-k probability mass."""
    from cache.inspect import inspect_cache
    info = inspect_cache(store)
    if json_out:
        print(json.dumps(info, indent=1))
    else:
        _print_table(f"teacher cache {store}", info)


@app.command("verify-cache")
def verify_cache_cmd(
    store: Annotated[Path, typer.Argument(help="teacher cache store")],
    samples: Annotated[int, typer.Option(help="random views to rebuild and re-run")] = 32,
    data: Annotated[Path | None, typer.Option(help="dataset directory [default: the one recorded]")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help=f"teacher: {CHECKPOINT} [default: the weights recorded]")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help=f"teacher: {PRETRAINED}")] = False,
    pretrained_file: Annotated[Path | None, typer.Option(help=f"teacher: {PRETRAINED_FILE}")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random pick")] = 0,
):
    """Rebuild random views, re-run the teacher, check the cache agrees (and is complete and in range)."""
    from cache.inspect import verify_cache
    weights = _weights(checkpoint, pretrained, pretrained_file)
    r = verify_cache(store, samples=samples, data=data, weights=weights, seed=seed)
    for p in r["problems"]:
        print(f"problem: {p}")
    print(f"{store}: {r['views_checked']} views re-run, max |difference| {r['max_abs_difference']:.4g}: "
          f"{'OK' if r['ok'] else 'FAILED'}")
    if not r["ok"]:
        raise typer.Exit(1)


class Method(str, Enum):
    ce = "ce"
    kd = "kd"
    dkd = "dkd"
    ofa = "ofa"


def _numbers(text: str | None, cast=float) -> list | None:
    """'1,2 3' -> [1, 2, 3] (comma or space separated), None when empty."""
    if not text:
        return None
    try:
        return [cast(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"'{text}' is not a comma-separated list of {cast.__name__}s, e.g. 1,2,3") from None


@app.command("train-student")
def train_student_cmd(
    data: Annotated[Path, typer.Option(help="dataset directory made by `shards` (train and val splits)")],
    student: Annotated[str, typer.Option(help="timm model name of the student")],
    out: Annotated[Path, typer.Option(help="run directory")],
    method: Annotated[Method, typer.Option(help="ce (no teacher), kd, dkd or ofa")] = Method.ofa,
    cache: Annotated[Path | None, typer.Option(help="teacher cache made by `cache-teacher`")] = None,
    teacher: Annotated[str | None, typer.Option(help="with --cache: the teacher the cache must come from (checked)")] = None,
    teacher_online: Annotated[str | None, typer.Option(help="run this timm teacher in the loop on the same views instead of a cache")] = None,
    teacher_checkpoint: Annotated[Path | None, typer.Option(help=f"online teacher: {CHECKPOINT}")] = None,
    teacher_pretrained: Annotated[bool, typer.Option("--teacher-pretrained", help=f"online teacher: {PRETRAINED}")] = False,
    teacher_pretrained_file: Annotated[Path | None, typer.Option(help=f"online teacher: {PRETRAINED_FILE}")] = None,
    teacher_classes: Annotated[str | None, typer.Option(help=f"{TEACHER_CLASSES} (online teacher; with --cache: checked)")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help=f"student, fine-tuned (timm replaces a classifier of another class count): {PRETRAINED}")] = False,
    pretrained_file: Annotated[Path | None, typer.Option(help=f"student: {PRETRAINED_FILE}")] = None,
    teacher_model_kwargs: Annotated[list[str] | None, typer.Option("--teacher-model-kwargs", help="online teacher timm kwargs, name=value")] = None,
    teacher_input_size: Annotated[int | None, typer.Option(help="online teacher input size")] = None,
    model_kwargs: Annotated[list[str] | None, typer.Option("--model-kwargs", help="student timm kwargs, name=value (repeatable), e.g. img_size=32")] = None,
    input_size: Annotated[int | None, typer.Option(help="student input size [default: its fixed size, else the view size]")] = None,
    recipe: Annotated[RecipeName | None, typer.Option(help="augmentation preset [default: the cache's, else imagenet-cnn]")] = None,
    view_size: Annotated[int | None, typer.Option(help="override the recipe's view size")] = None,
    view_seed: Annotated[int | None, typer.Option(help="seed of the views [default: the cache's, else 0]")] = None,
    view_epochs: Annotated[int | None, typer.Option(help="online/ce: cycle views every N epochs (match a cache)")] = None,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 10,
    batch_size: Annotated[int, typer.Option(help="batch size per process")] = 128,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw")] = "sgd",
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="weight decay (not on norms and biases)")] = 5e-4,
    momentum: Annotated[float, typer.Option(help="SGD momentum")] = 0.9,
    sched: Annotated[str, typer.Option(help="learning-rate schedule per step: cosine or step")] = "cosine",
    warmup_epochs: Annotated[float, typer.Option(help="linear warm-up from --warmup-lr, then the schedule")] = 0.0,
    warmup_lr: Annotated[float, typer.Option(help="learning rate at the start of the warm-up")] = 1e-5,
    min_lr: Annotated[float, typer.Option(help="learning rate at the end of the cosine")] = 0.0,
    decay_epochs: Annotated[float, typer.Option(help="step schedule: decay every N epochs")] = 30.0,
    decay_rate: Annotated[float, typer.Option(help="step schedule: multiply the learning rate by this")] = 0.1,
    label_smoothing: Annotated[float, typer.Option(help="label smoothing of the CE term")] = 0.0,
    clip_grad: Annotated[float | None, typer.Option(help="clip the gradient norm")] = None,
    grad_accum: Annotated[int, typer.Option(help="gradient accumulation steps")] = 1,
    mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA), no, bf16, fp16")] = "auto",
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the student weights, 0 = off")] = 0.0,
    stages: Annotated[str | None, typer.Option(help="OFA stages among 1-4, e.g. 1,2,3,4 [default: all]")] = None,
    block_indices: Annotated[str | None, typer.Option(help="explicit forward_intermediates indices, e.g. 1,3,9,11")] = None,
    head_kind: Annotated[str, typer.Option(help="auto (token for isotropic models, conv otherwise), conv, token")] = "auto",
    ofa_form: Annotated[str, typer.Option(help="paper (default) or released (the authors' code)")] = "paper",
    gamma: Annotated[str, typer.Option(help="OFA exponent: one value, or one per head and then the final logits")] = "1.0",
    temperature: Annotated[float | None, typer.Option(help="softmax temperature [default: 1 for ofa, 4 for kd/dkd]")] = None,
    w_ce: Annotated[float | None, typer.Option(help="CE weight [default: 1; 0 for paper-form OFA]")] = None,
    w_kd: Annotated[float, typer.Option(help="weight of the distillation term on the final logits")] = 1.0,
    w_ofa: Annotated[float | None, typer.Option(help="weight of the heads' OFA terms")] = None,
    stage_weights: Annotated[str | None, typer.Option(help="per-head weights, e.g. 1,1,1,1")] = None,
    dkd_alpha: Annotated[float, typer.Option(help="DKD: weight of the target-class term")] = 1.0,
    dkd_beta: Annotated[float, typer.Option(help="DKD: weight of the non-target term")] = 8.0,
    seed: Annotated[int, typer.Option(help="student seed (initialisation, data order)")] = 0,
    workers: Annotated[int, typer.Option(help="data-loader workers per process")] = 2,
    max_steps_per_epoch: Annotated[int | None, typer.Option(help="cap steps per epoch (smoke runs)")] = None,
    on_error: Annotated[OnError | None, typer.Option(help="corrupt samples: raise or skip [default: the cache's policy, else raise]")] = None,
    train_split: Annotated[str, typer.Option(help="training split")] = "train",
    val_split: Annotated[str, typer.Option(help="evaluation split")] = "val",
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run directory's last saved epoch")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
):
    """Stage two: train a student (with OFA stage heads) from the cache, online, or with plain CE."""
    from pipeline.models import parse_kwargs
    from students.task import LossConfig
    from students.train import TrainConfig, train
    loss = LossConfig(method=method.value, ofa_form=ofa_form, gamma=_numbers(gamma) or [1.0], temperature=temperature,
                      w_ce=w_ce, w_kd=w_kd, w_ofa=w_ofa, stage_weights=_numbers(stage_weights),
                      dkd_alpha=dkd_alpha, dkd_beta=dkd_beta, label_smoothing=label_smoothing)
    if ofa_form not in ("paper", "released"):
        raise UserError(f"--ofa-form must be paper or released, got {ofa_form}")
    cfg = TrainConfig(data=data, student=student, out=out, loss=loss, cache=cache, teacher=teacher,
                      teacher_online=teacher_online, teacher_checkpoint=teacher_checkpoint,
                      teacher_pretrained=teacher_pretrained, teacher_pretrained_file=teacher_pretrained_file,
                      teacher_classes=teacher_classes, pretrained=pretrained, pretrained_file=pretrained_file,
                      teacher_model_kwargs=parse_kwargs(teacher_model_kwargs), teacher_input_size=teacher_input_size,
                      model_kwargs=parse_kwargs(model_kwargs), input_size=input_size,
                      recipe=recipe.value if recipe else None, view_size=view_size, view_seed=view_seed,
                      view_epochs=view_epochs, seed=seed, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                      lr=lr, weight_decay=weight_decay, momentum=momentum, sched=sched, warmup_epochs=warmup_epochs,
                      warmup_lr=warmup_lr, min_lr=min_lr, decay_epochs=decay_epochs, decay_rate=decay_rate,
                      clip_grad=clip_grad, grad_accum=grad_accum, mixed_precision=mixed_precision,
                      ema_decay=ema_decay, stages=_numbers(stages, int), block_indices=_numbers(block_indices, int),
                      head_kind=head_kind, workers=workers, resume=resume, progress=not quiet,
                      max_steps_per_epoch=max_steps_per_epoch, on_error=on_error.value if on_error else None,
                      train_split=train_split, val_split=val_split)
    summary = train(cfg)
    print(f"{out}: top1 {summary['top1']:.2f} top5 {summary['top5']:.2f} after {summary['epochs']} epochs "
          f"({summary['train_seconds']:.1f} s of training); student exported to {out / 'model.safetensors'}")


@app.command()
def demo(out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
         epochs: Annotated[int, typer.Option(help="student epochs (= cached epochs)")] = 4,
         teacher_epochs: Annotated[int, typer.Option(help="epochs of the CE teacher")] = 8,
         quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False):
    """The whole product on the embedded digits: teacher, cache, ViT/MLP students with CE, KD, OFA."""
    import time

    from students.demo import run_demo
    t0 = time.perf_counter()
    run_demo(out, epochs=epochs, teacher_epochs=teacher_epochs, progress=not quiet)
    print((out / "results.md").read_text())
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; table {out / 'results.md'}, plot {out / 'accuracy.png'}")


class CkaMode(str, Enum):
    minibatch = "minibatch"
    full = "full"


@app.command()
def cka(
    model_a: Annotated[str, typer.Option(help="timm name of model A")],
    model_b: Annotated[str, typer.Option(help="timm name of model B")],
    data: Annotated[Path, typer.Option(help="dataset directory made by `shards`")],
    out: Annotated[Path, typer.Option(help="output directory for cka.png, cka.csv, cka.json")] = Path("runs/cka"),
    checkpoint_a: Annotated[Path | None, typer.Option(help=f"model A: {CHECKPOINT}")] = None,
    checkpoint_b: Annotated[Path | None, typer.Option(help=f"model B: {CHECKPOINT}")] = None,
    pretrained_a: Annotated[bool, typer.Option("--pretrained-a", help=f"model A: {PRETRAINED}")] = False,
    pretrained_b: Annotated[bool, typer.Option("--pretrained-b", help=f"model B: {PRETRAINED}")] = False,
    pretrained_file_a: Annotated[Path | None, typer.Option(help=f"model A: {PRETRAINED_FILE}")] = None,
    pretrained_file_b: Annotated[Path | None, typer.Option(help=f"model B: {PRETRAINED_FILE}")] = None,
    model_kwargs_a: Annotated[list[str] | None, typer.Option("--model-kwargs-a", help="timm kwargs of A, name=value")] = None,
    model_kwargs_b: Annotated[list[str] | None, typer.Option("--model-kwargs-b", help="timm kwargs of B, name=value")] = None,
    split: Annotated[str, typer.Option(help="split to read")] = "val",
    samples: Annotated[int, typer.Option(help="number of images")] = 512,
    batch_size: Annotated[int, typer.Option(help="minibatch size (minibatch CKA averages over these)")] = 64,
    mode: Annotated[CkaMode, typer.Option(help="minibatch (memory O(batch^2)) or full (exact, memory O(n^2))")] = CkaMode.minibatch,
    every_block: Annotated[bool, typer.Option("--every-block", help="isotropic models: every block, not 4 depth fractions")] = False,
    recipe: Annotated[RecipeName, typer.Option(help="evaluation view size/crop from this preset")] = RecipeName.imagenet_cnn,
    view_size: Annotated[int | None, typer.Option(help="override the view size")] = None,
):
    """Stage-by-stage linear CKA between two models on the same images (heatmap, CSV/JSON, table)."""
    from itertools import islice

    from torch.utils.data import DataLoader

    from pipeline.augment import get_recipe
    from pipeline.models import parse_kwargs
    from pipeline.reader import ShardReader
    from pipeline.views import EvalViews
    from students.cka import compute_cka, save_outputs, stage_model
    r = get_recipe(recipe.value, view_size)
    reader = ShardReader(data, split)
    if samples < 4:
        raise UserError(f"--samples must be at least 4, got {samples}")
    C = reader.manifest.num_classes
    a = stage_model(model_a, C, r.input_size, _weights(checkpoint_a, pretrained_a, pretrained_file_a),
                    parse_kwargs(model_kwargs_a), every_block)
    b = stage_model(model_b, C, r.input_size, _weights(checkpoint_b, pretrained_b, pretrained_file_b),
                    parse_kwargs(model_kwargs_b), every_block)
    n_batches = -(-samples // batch_size)
    loader = DataLoader(EvalViews(reader, r), batch_size=batch_size)
    views = (batch["view"][: samples - i * batch_size] for i, batch in enumerate(islice(loader, n_batches)))
    matrix = compute_cka(a, b, views, mode.value)
    n = min(samples, reader.split.count)
    files = save_outputs(matrix, a, b, out, {"model_a": model_a, "model_b": model_b, "mode": mode.value,
                                             "samples": n, "batch_size": batch_size, "split": split})
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"linear CKA ({mode.value}, n={n}): rows {model_a}, columns {model_b}")
    t.add_column("")
    for c in b.labels:
        t.add_column(c, justify="right")
    for label, row in zip(a.labels, matrix, strict=True):
        t.add_row(label, *[f"{v:.3f}" for v in row])
    Console().print(t)
    print(f"wrote {files['png']}, {files['csv']}, {files['json']}")


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
