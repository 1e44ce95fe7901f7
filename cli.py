"""Command line: each command is thin and calls a library function.

    python cli.py shards SRC OUT [--split NAME] [--shard-size N] [--class-names FILE] [--overwrite]
    python cli.py cache-teacher --data DIR --teacher NAME --epochs E --topk K --out STORE.zarr [--config FILE.yaml]
        [--checkpoint PATH | --pretrained | --pretrained-file PATH] [--teacher-classes imagenet-1k|FILE]
    python cli.py inspect-cache STORE.zarr
    python cli.py verify-cache STORE.zarr --samples N
    python cli.py train-student --data DIR --student NAME --method {ce,kd,dkd,ofa} --out RUN_DIR ... [--config FILE.yaml]

cache-teacher and train-student take their options from the config dataclasses (`CacheConfig`,
`TrainConfig` + `LossConfig`): flags, `--config` files and `--help` text all come from there.

Problems a user can fix exit with status 2 and one sentence naming the input and the fix.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cache.teacher_pass import CacheConfig, cache_teacher
from pipeline.augment import PRESETS
from pipeline.config import command_from
from pipeline.errors import UserError
from students.train import TrainConfig, train

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
    out: Annotated[str, typer.Argument(help="dataset directory or URL, e.g. s3://bucket/data (can hold several splits)")],
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


def _cache_teacher(cfg: CacheConfig) -> None:
    """Stage one: run the teacher once over the replayable views and store top-k logits (resumable)."""
    s = cache_teacher(cfg)
    if s["is_main"]:
        print(f"{s['store']}: {s['views_written']} views written ({s['units_skipped_as_done']} of {s['units_total']} "
              f"units were already done), {s['views_per_second']:.1f} views/s, {s['raw_bytes_per_view']} raw / "
              f"{s['disk_bytes_per_view']:.1f} on-disk bytes per view")


app.command("cache-teacher")(command_from(CacheConfig, _cache_teacher, "cache-teacher"))


@app.command("inspect-cache")
def inspect_cache_cmd(store: Annotated[str, typer.Argument(help="teacher cache store (path or URL)")],
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
    store: Annotated[str, typer.Argument(help="teacher cache store (path or URL)")],
    samples: Annotated[int, typer.Option(help="random views to rebuild and re-run")] = 32,
    data: Annotated[str | None, typer.Option(help="dataset directory or URL [default: the one recorded]")] = None,
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


def _train_student(cfg: TrainConfig) -> None:
    """Stage two: train a student (with OFA stage heads) from the cache, online, or with plain CE."""
    summary = train(cfg)
    print(f"{cfg.out}: top1 {summary['top1']:.2f} top5 {summary['top5']:.2f} after {summary['epochs']} epochs "
          f"({summary['train_seconds']:.1f} s of training); student exported to {cfg.out / 'model.safetensors'}")


app.command("train-student")(command_from(TrainConfig, _train_student, "train-student"))


@app.command()
def demo(out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
         epochs: Annotated[int, typer.Option(help="student epochs (= cached epochs)")] = 12,
         teacher_epochs: Annotated[int, typer.Option(help="epochs of the CE teacher")] = 10,
         seeds: Annotated[int, typer.Option(help="seeds per (student, method)")] = 2,
         processes: Annotated[int, typer.Option(help="student runs trained at once (one thread each)")] = 2,
         max_steps_per_epoch: Annotated[int | None, typer.Option(help="cap steps per epoch (smoke tests)")] = None,
         quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False):
    """The whole product on the embedded digits: CNN teacher, cache, ViT/MLP students with CE, KD, OFA over seeds."""
    from students.demo import run_demo
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if processes < 1:
        raise UserError(f"--processes must be at least 1, got {processes}")
    results = run_demo(out, epochs=epochs, teacher_epochs=teacher_epochs, seeds=tuple(range(seeds)), processes=processes,
                       max_steps_per_epoch=max_steps_per_epoch, progress=not quiet)
    print((out / "results.md").read_text())
    print(f"demo finished in {results['seconds']:.0f} s; table {out / 'results.md'}, plot {out / 'accuracy.png'}")


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
