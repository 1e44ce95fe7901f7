"""Command line: each command is thin and calls a library function.

    python cli.py shards SRC OUT [--split NAME] [--shard-size N] [--class-names FILE] [--overwrite]
    python cli.py cache-teacher --data DIR --teacher NAME --epochs E --topk K --out STORE.zarr
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
    checkpoint: Annotated[Path | None, typer.Option(help="local teacher weights (.safetensors or torch)")] = None,
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
    from students.models import parse_kwargs
    cfg = CacheConfig(data=data, teacher=teacher, out=out, recipe=get_recipe(recipe.value, view_size),
                      recipe_name=recipe.value, checkpoint=checkpoint, model_kwargs=parse_kwargs(model_kwargs),
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
    checkpoint: Annotated[Path | None, typer.Option(help="teacher weights [default: the ones recorded]")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random pick")] = 0,
):
    """Rebuild random views, re-run the teacher, check the cache agrees (and is complete and in range)."""
    from cache.inspect import verify_cache
    r = verify_cache(store, samples=samples, data=data, checkpoint=checkpoint, seed=seed)
    for p in r["problems"]:
        print(f"problem: {p}")
    print(f"{store}: {r['views_checked']} views re-run, max |difference| {r['max_abs_difference']:.4g}: "
          f"{'OK' if r['ok'] else 'FAILED'}")
    if not r["ok"]:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
