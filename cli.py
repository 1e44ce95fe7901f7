"""Command line: each command is one configuration dataclass and one library call.

    python cli.py shards SRC OUT [--split NAME] [--shard-size N] [--class-names FILE] [--overwrite]
    python cli.py cache-teacher --data DIR --teacher NAME --epochs E --topk K --out STORE.zarr [--config FILE.yaml]
        [--checkpoint PATH | --pretrained | --pretrained-file PATH] [--teacher-classes imagenet-1k|FILE]
    python cli.py inspect-cache STORE.zarr
    python cli.py verify-cache STORE.zarr --samples N
    python cli.py train-student --data DIR --student NAME --method {ce,kd,dkd,ofa} --out RUN_DIR ... [--config FILE.yaml]
    python cli.py demo
    python cli.py cka --model-a NAME --model-b NAME --data DIR

Every command is built the same way (`commands.options.command_from`): its options are the fields of
one dataclass, grouped (a model's weights, a teacher, the views, the loss, ...), each flag declared
once with its help text; `--config FILE.yaml` and `--print-config` work for all of them.

Problems a user can fix exit with status 2 and one sentence naming the input and the fix. A command stopped by
SIGTERM/SIGINT (preemption) saves and exits with status 75 (pipeline.preempt).
"""

from __future__ import annotations

import json
import sys

import typer

from cache.inspect import InspectConfig, VerifyConfig
from cache.teacher_pass import CacheConfig
from commands.cka import CkaConfig
from commands.demo import DemoConfig
from commands.options import command_from
from pipeline.errors import UserError
from pipeline.shards import ShardsConfig
from students.config import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cross-architecture distillation (OFA-KD) with an offline, replayable teacher cache.")


def shards(cfg: ShardsConfig) -> None:
    """Convert images into webdataset tar shards plus dataset.json."""
    import time

    from pipeline.shards import make_shards
    t0 = time.perf_counter()
    m = make_shards(cfg.src, cfg.out, split=cfg.split, shard_size=cfg.shard_size, class_names=cfg.class_names,
                    name=cfg.name, order_seed=cfg.order_seed, overwrite=cfg.overwrite, progress=cfg.progress,
                    max_size=cfg.max_size, quality=cfg.quality)
    for sp in (["train", "val"] if cfg.src == "digits" else [cfg.split]):
        info = m.splits[sp]
        size = sum(s.bytes for s in info.shards)
        print(f"{cfg.out}: split '{sp}' {info.count} samples, {m.num_classes} classes, {len(info.shards)} shards, "
              f"{size / 1e6:.1f} MB")
    print(f"done in {time.perf_counter() - t0:.1f} s")


def cache_teacher(cfg: CacheConfig) -> None:
    """Stage one: run the teacher once over the replayable views and store top-k logits (resumable).

    On SIGTERM/SIGINT it finishes the units in flight and exits with status 75 (rerun to complete the store)."""
    from cache.teacher_pass import cache_teacher
    s = cache_teacher(cfg)
    if s["is_main"]:
        print(f"{', '.join(s['stores'])}: {s['views_written']} views written ({s['units_skipped_as_done']} of {s['units_total']} "
              f"units were already done), {s['views_per_second']:.1f} views/s, {s['raw_bytes_per_view']} raw / "
              f"{s['disk_bytes_per_view']:.1f} on-disk bytes per view" + (" (all stores)" if len(s["stores"]) > 1 else ""))


def inspect_cache(cfg: InspectConfig) -> None:
    """Describe a cache: teacher, data, recipe, completion, size, top-k probability mass."""
    from rich.console import Console
    from rich.table import Table

    from cache.inspect import inspect_cache
    info = inspect_cache(cfg.store)
    if cfg.json_out:
        print(json.dumps(info, indent=1))
        return
    t = Table(title=f"teacher cache {cfg.store}", show_header=False)
    for k, v in info.items():
        t.add_row(str(k), json.dumps(v) if isinstance(v, dict | list) else str(v))
    Console().print(t)


def verify_cache(cfg: VerifyConfig) -> None:
    """Rebuild random views, re-run the teacher, check the cache agrees (and is complete and in range)."""
    from cache.inspect import verify_cache
    r = verify_cache(cfg.store, samples=cfg.samples, data=cfg.data, weights=cfg.weights, seed=cfg.seed)
    for p in r["problems"]:
        print(f"problem: {p}")
    print(f"{cfg.store}: {r['views_checked']} views re-run, max |difference| {r['max_abs_difference']:.4g}: "
          f"{'OK' if r['ok'] else 'FAILED'}")
    if not r["ok"]:
        raise typer.Exit(1)


def train_student(cfg: TrainConfig) -> None:
    """Stage two: train a student (with OFA stage heads) from the cache, online, or with plain CE;
    with --runs, several students from one view stream.

    On SIGTERM/SIGINT it saves at the next optimizer step and exits with status 75 (continue with --resume)."""
    from commands.runs import expand_runs
    from students.train import train
    stream, runs = expand_runs(cfg)  # --runs: several students from one view stream; else this one
    for run, summary in zip(runs, train(stream, runs), strict=True):
        print(f"{run.out}: top1 {summary['top1']:.2f} top5 {summary['top5']:.2f} after {summary['epochs']} epochs "
              f"({summary['train_seconds']:.1f} s of training); student exported to {run.out / 'model.safetensors'}")


def demo(cfg: DemoConfig) -> None:
    """The whole product on the embedded digits: CNN teacher, cache, ViT/MLP students with CE, KD, OFA over seeds."""
    from commands.demo import run_demo
    results = run_demo(cfg.out, epochs=cfg.epochs, teacher_epochs=cfg.teacher_epochs, seeds=tuple(range(cfg.seeds)),
                       processes=cfg.processes, max_steps_per_epoch=cfg.max_steps_per_epoch, progress=cfg.progress)
    print((cfg.out / "results.md").read_text())
    print(f"demo finished in {results['seconds']:.0f} s; table {cfg.out / 'results.md'}, plot "
          f"{cfg.out / 'accuracy.png'}")


def cka(cfg: CkaConfig) -> None:
    """Stage-by-stage linear CKA between two models on the same images (heatmap, CSV/JSON, table)."""
    from commands.cka import run_cka
    run_cka(cfg)


COMMANDS = {"shards": (ShardsConfig, shards), "cache-teacher": (CacheConfig, cache_teacher),
            "inspect-cache": (InspectConfig, inspect_cache), "verify-cache": (VerifyConfig, verify_cache),
            "train-student": (TrainConfig, train_student), "demo": (DemoConfig, demo), "cka": (CkaConfig, cka)}
for _name, (_config, _run) in COMMANDS.items():
    app.command(_name)(command_from(_config, _run, _name, tuple(COMMANDS)))


def parse(command: str, argv: list) -> object:
    """The configuration a command line gives, built exactly as running it would, without running it: how a
    benchmark computes the configuration hash a run would record before deciding whether to reuse one."""
    import typer.main
    cls, _ = COMMANDS[command]
    got: list = []
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    one.command(command)(command_from(cls, got.append, command, tuple(COMMANDS)))
    typer.main.get_command(one).main(args=[str(a) for a in argv], standalone_mode=False)
    return got[0]


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
