"""`make demo`: the whole product on the embedded digits, in one process, in a few minutes on 2 CPU cores.

    shards (digits) -> CE-trained CNN teacher -> teacher cache (as many epochs as the students train)
    -> ViT- and MLP-style students with CE, KD and OFA (the authors' heads and the lite ones) from the cache,
       2 seeds each
    -> table and verdict (results.md, results.json) and accuracy plot (accuracy.png)

The setting is sized so that every student converges in the budget: 16x16 views (`digits-demo`),
students of about 0.1-0.2M parameters, 12 epochs. It was chosen so that the CE students converge
(>= 85% top-1), not by looking at which setting makes KD or OFA win; the verdict reports whatever
the runs give.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cache.store import CacheStore
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from pipeline.augment import get_recipe
from pipeline.errors import UserError
from pipeline.shards import make_shards
from students.config import TrainConfig
from students.train import train_student

RECIPE = "digits-demo"
TEACHER = "test_resnet"
# name -> (family, timm kwargs, lr). The ViT pools the token mean (no class token): on 1,437 images it
# converges in far fewer epochs that way.
STUDENTS = {
    "test_vit": ("ViT", {"img_size": 16, "patch_size": 4, "depth": 4, "class_token": False, "global_pool": "avg"},
                 2e-3),
    "resmlp_demo": ("MLP", {}, 3e-3),
}
# the demo's arms: name -> (loss method, OFA head kind). "ofa" uses the authors' heads (the default);
# "ofa-lite" the project's earlier, smaller token heads (`--head-kind token-lite`), which the README
# compares on these 0.1-0.2M-parameter students
ARMS = {"ce": ("ce", "auto"), "kd": ("kd", "auto"), "ofa": ("ofa", "auto"), "ofa-lite": ("ofa", "token-lite")}
METHODS = tuple(ARMS)
SEEDS = (0, 1)


@dataclass
class DemoConfig:
    """The options of `demo`."""

    out: Path = Path("runs/demo")
    """Run directory."""
    epochs: int = 12
    """Student epochs (= cached epochs)."""
    teacher_epochs: int = 10
    """Epochs of the CE teacher."""
    seeds: int = 2
    """Seeds per (student, method)."""
    processes: int = 2
    """Student runs trained at once (one thread each)."""
    max_steps_per_epoch: int | None = None
    """Cap steps per epoch (smoke tests)."""
    progress: bool = field(default=True, metadata={"flags": ("--progress/--quiet",)})
    """Progress bars."""

    def __post_init__(self):
        problems = [f"--{name} must be at least 1, got {getattr(self, name)}" for name in ("seeds", "processes")
                    if getattr(self, name) < 1]
        if problems:
            raise UserError("; ".join(problems))


def run_demo(out: Path, epochs: int = 12, teacher_epochs: int = 10, topk: int = 5, batch_size: int = 32,
             seeds: tuple[int, ...] = SEEDS, processes: int = 2, max_steps_per_epoch: int | None = None,
             progress: bool = True) -> dict:
    """Run (or resume: finished runs are skipped) the demo under `out`; returns results.json's content."""
    # The models are tiny: a second intra-op thread costs more in synchronisation than it gains (5x slower
    # per step on a loaded 2-core machine), and so does a data-loader worker (forked every epoch, and each
    # batch pickled across): views are made in the main process, between steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, epochs, teacher_epochs, topk, batch_size, tuple(seeds), processes, max_steps_per_epoch,
                    progress)
    finally:
        torch.set_num_threads(threads)


def _run(out, epochs, teacher_epochs, topk, batch_size, seeds, processes, max_steps, progress) -> dict:
    t_start, cpu_start, load_start = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "dataset.json").exists():
        make_shards("digits", data, progress=progress)
    common = dict(data=data, recipe=RECIPE, batch_size=batch_size, workers=0, progress=progress, resume=True,
                  max_steps_per_epoch=max_steps)  # flag names (commands.options.build)
    reused = 0

    teacher_dir = out / "teacher"
    if (teacher_dir / "metrics.json").exists():
        reused += 1
    else:
        train_student(build(TrainConfig, student=TEACHER, out=teacher_dir, method="ce", epochs=teacher_epochs, lr=0.1,
                    **common))
    teacher = json.loads((teacher_dir / "metrics.json").read_text())

    # the cache holds exactly the epochs the students train: every epoch's views are new ones
    store, timing_file = out / "teacher.zarr", out / "teacher_pass.json"
    cache = cache_teacher(build(CacheConfig, data=data, teacher=TEACHER, out=store, recipe=RECIPE,
                                checkpoint=teacher_dir / "model.safetensors", epochs=epochs, topk=topk,
                                batch_size=256, workers=1, progress=progress))
    if cache["views_written"]:
        timing_file.write_text(json.dumps({"seconds": cache["seconds"], "views": cache["views_written"]}))
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else None
    per_view_s = timing["seconds"] / timing["views"] if timing else None  # None: store made by an older demo

    # the 12 student runs are independent: two processes (one thread each) keep both cores busy
    grid = [(student, method, seed) for student in STUDENTS for method in METHODS for seed in seeds]
    todo = []
    for student, method, seed in grid:
        run_dir = out / "students" / f"{student}-{method}-s{seed}"
        if (run_dir / "metrics.json").exists():
            reused += 1
            continue
        _, kwargs, lr = STUDENTS[student]
        loss, heads = ARMS[method]
        todo.append(build(TrainConfig, student=student, out=run_dir, model_kwargs=kwargs, method=loss,
                          head_kind=heads, cache=None if method == "ce" else store, seed=seed, epochs=epochs,
                          optimizer="adamw", lr=lr, weight_decay=0.05, warmup_epochs=1.0,
                          **(common | {"progress": False})))
    todo.sort(key=lambda c: c.loss.method != "ofa")  # the longest (OFA heads) first: the two processes end together
    if todo:
        with ProcessPoolExecutor(min(processes, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_student, cfg): cfg for cfg in todo}
            for done, future in enumerate(as_completed(futures), 1):
                m, cfg = future.result(), futures[future]
                print(f"[{done}/{len(todo)}] {cfg.out.name}: top-1 {m['top1']:.2f} ({m['train_seconds']:.0f} s of "
                      f"training)", flush=True)

    runs = []
    for student, method, seed in grid:
        m = json.loads((out / "students" / f"{student}-{method}-s{seed}" / "metrics.json").read_text())
        views = sum(h["images_per_second"] * h["train_seconds"] for h in m["history"])
        saved = 0.0 if method == "ce" else (views * per_view_s if per_view_s is not None else None)
        runs.append({"student": student, "family": STUDENTS[student][0], "method": method, "seed": seed,
                     "top1": m["top1"], "top5": m["top5"], "train_seconds": m["train_seconds"],
                     "teacher_seconds_saved": saved, "history": [h["top1"] for h in m["history"]]})

    results = {"teacher": TEACHER, "teacher_top1": teacher["top1"], "teacher_epochs": teacher_epochs,
               "teacher_train_seconds": teacher["train_seconds"], "recipe": RECIPE,
               "view_size": get_recipe(RECIPE).input_size, "epochs": epochs, "cached_epochs": CacheStore(store).epochs,
               "topk": topk, "seeds": list(seeds),
               "cache_seconds": timing["seconds"] if timing else None, "teacher_seconds_per_view": per_view_s,
               "runs": runs, "groups": _groups(runs)}
    results["verdict"] = _verdict(results)
    results["seconds"] = time.perf_counter() - t_start
    results["cpu_seconds"] = _cpu_seconds() - cpu_start  # this process and its finished workers
    results["load_average"] = [load_start, os.getloadavg()[0]]  # 1-minute load at the start and the end
    results["runs_reused"] = reused  # finished runs of an earlier invocation: `seconds` does not include them
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(_table(results))
    _plot(results, out / "accuracy.png")
    return results


def _cpu_seconds() -> float:
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def _train_student(cfg: TrainConfig) -> dict:
    """One student run in a worker process (spawned: a fresh interpreter that builds models through
    pipeline.models, which registers resmlp_demo with timm)."""
    torch.set_num_threads(1)
    return train_student(cfg)


def _groups(runs: list[dict]) -> list[dict]:
    """One entry per (student, method): top-1 mean and spread (sample standard deviation) over seeds."""
    groups = []
    for key in dict.fromkeys((r["student"], r["method"]) for r in runs):
        rs = [r for r in runs if (r["student"], r["method"]) == key]
        top1 = [r["top1"] for r in rs]
        saved = [r["teacher_seconds_saved"] for r in rs]
        groups.append({"student": key[0], "family": rs[0]["family"], "method": key[1],
                       "seeds": [r["seed"] for r in rs], "top1": top1, "top1_mean": statistics.fmean(top1),
                       "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                       "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rs),
                       "teacher_seconds_saved_mean": None if None in saved else statistics.fmean(saved),
                       "history_mean": [statistics.fmean(h) for h in zip(*(r["history"] for r in rs), strict=True)],
                       "history_min": [min(h) for h in zip(*(r["history"] for r in rs), strict=True)],
                       "history_max": [max(h) for h in zip(*(r["history"] for r in rs), strict=True)]})
    return groups


def _verdict(s: dict) -> list[str]:
    """Per student and distillation method: the gain over CE against the seed spread.

    The spread of a difference of two means over n seeds each is sqrt(std_a^2/n + std_b^2/n); a gain
    larger than twice that is called a win, one within it is within seed noise."""
    lines = []
    by = {(g["student"], g["method"]): g for g in s["groups"]}
    for student, family in dict.fromkeys((g["student"], g["family"]) for g in s["groups"]):
        ce = by.get((student, "ce"))
        for method in (m for m in METHODS if m != "ce" and (student, m) in by):
            g = by[(student, method)]
            n = len(g["top1"])
            diff = g["top1_mean"] - ce["top1_mean"]
            se = ((g["top1_std"] ** 2 + ce["top1_std"] ** 2) / n) ** 0.5
            if se == 0:
                word = "beats" if diff > 0 else "does not beat"
                rel = "no seed spread to compare with"
            else:
                word = "beats" if diff > 2 * se else ("is below" if diff < -2 * se else "is within seed noise of")
                rel = f"{abs(diff) / se:.1f}x the spread of the difference, {se:.2f} pt"
            name = method.upper().replace("-LITE", " (lite heads)")
            lines.append(f"{student} ({family}): {name} {word} CE: {g['top1_mean']:.2f} vs "
                         f"{ce['top1_mean']:.2f} ({diff:+.2f} pt, {rel}; {n} seeds)")
    return lines


def _fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _table(s: dict) -> str:
    seeds = len(s["seeds"])
    lines = [f"Digits at {s['view_size']}x{s['view_size']} (`{s['recipe']}`), {s['epochs']} student epochs from a "
             f"cache of {s['cached_epochs']} epochs at top-{s['topk']} (teacher pass {_fmt_s(s['cache_seconds'])} s); "
             f"top-1 on the 360 validation images, mean ± standard deviation over {seeds} seeds.", "",
             "| student | method | top-1 (mean ± sd) | per seed | training time per run (s) | "
             "teacher time saved per run (s) |",
             "| --- | --- | ---: | --- | ---: | ---: |",
             f"| {s['teacher']} (CNN teacher) | ce | {s['teacher_top1']:.2f} | - | "
             f"{s['teacher_train_seconds']:.1f} | - |"]
    for g in s["groups"]:
        saved = "-" if g["method"] == "ce" else _fmt_s(g["teacher_seconds_saved_mean"])
        lines.append(f"| {g['student']} ({g['family']}) | {g['method']} | {g['top1_mean']:.2f} ± {g['top1_std']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in g['top1'])} | {g['train_seconds_mean']:.1f} | {saved} |")
    lines += ["", "Verdict (computed from the runs above):", *[f"- {v}" for v in s["verdict"]], "",
              f"This invocation took {s['seconds']:.0f} s of wall time and {s['cpu_seconds']:.0f} s of CPU time "
              f"(1-minute load average {s['load_average'][0]:.1f} at the start, {s['load_average'][1]:.1f} at the end"
              + (f"; {s['runs_reused']} finished runs reused" if s["runs_reused"] else "") + ")."]
    return "\n".join(lines) + "\n"


def _plot(s: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"ce": ":", "kd": "--", "dkd": "-.", "ofa": "-"}
    colors = dict(zip(dict.fromkeys(g["student"] for g in s["groups"]), ("tab:blue", "tab:orange", "tab:green"),
                      strict=False))
    for g in s["groups"]:
        x = range(1, len(g["history_mean"]) + 1)
        c = colors.get(g["student"], "black")
        ax.plot(x, g["history_mean"], styles.get(g["method"], "-"), color=c, ms=3,
                marker="s" if g["method"] == "ofa-lite" else "o",
                label=f"{g['student']} {g['method']}")
        ax.fill_between(x, g["history_min"], g["history_max"], color=c, alpha=0.08)
    ax.axhline(s["teacher_top1"], color="gray", lw=1.0, label=f"teacher {s['teacher']} ({s['teacher_top1']:.1f})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"digits: ViT and MLP students from one cached CNN teacher (mean of {len(s['seeds'])} seeds, "
                 f"band: min-max)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
