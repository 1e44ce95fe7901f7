"""`make demo`: the whole product on the embedded digits, in one process, in a few minutes on 2 CPU cores.

    shards (digits) -> CE-trained CNN teacher -> teacher cache (as many epochs as the students train)
    -> ViT- and MLP-style students with CE, KD and OFA from the cache, 2 seeds each
    -> table and verdict (results.md, results.json) and accuracy plot (accuracy.png)

The setting is sized so that every student converges in the budget: 16x16 views (`digits-demo`),
students of about 0.1-0.2M parameters, 12 epochs. It was chosen so that the CE students converge
(>= 85% top-1), not by looking at which setting makes KD or OFA win; the verdict reports whatever
the runs give. OFA's settings follow a rule fixed before any result was seen (bench/plans/tiny50.yaml,
`declared`): the authors' recipe for the closest published setting, here their CIFAR-100 runs (small images).

Finished work is reused only when this code and configuration made it (the runs' provenance, the store's
recorded commit); anything else is redone, and the demo says so.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
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
from pipeline.provenance import code_label, code_version
from pipeline.shards import make_shards
from students.checkpoint import run_config_hash
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
# the demo's arms: name -> loss options (flag names). OFA: the authors' CIFAR-100 recipe (released form, heads'
# weight 0.1, label smoothing 0.1, gamma 1, T 1, their heads), by the rule in the module docstring
ARMS = {"ce": {"method": "ce"}, "kd": {"method": "kd"},
        "ofa": {"method": "ofa", "ofa_form": "released", "w_ofa": 0.1, "label_smoothing": 0.1}}
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
    teacher_cfg = build(TrainConfig, student=TEACHER, out=out / "teacher", method="ce", epochs=teacher_epochs,
                        lr=0.1, **common)
    reused = int(_reusable(teacher_cfg))
    if not reused:
        train_student(teacher_cfg)
    teacher = json.loads((out / "teacher" / "metrics.json").read_text())
    store, per_view_s = _cache(out, data, epochs, topk, progress)

    grid = [(student, method, seed) for student in STUDENTS for method in METHODS for seed in seeds]
    cfgs = [_student_config(out, store, student, method, seed, epochs, common) for student, method, seed in grid]
    todo = [c for c in cfgs if not _reusable(c)]
    reused += len(cfgs) - len(todo)
    _train_all(todo, processes)

    runs = []
    for (student, method, seed), cfg in zip(grid, cfgs, strict=True):
        m = json.loads((cfg.run.out / "metrics.json").read_text())
        views = sum(h["images_per_second"] * h["train_seconds"] for h in m["history"])
        saved = 0.0 if method == "ce" else views * per_view_s
        runs.append({"student": student, "family": STUDENTS[student][0], "method": method, "seed": seed,
                     "top1": m["top1"], "top5": m["top5"], "ece": m["ece"], "train_seconds": m["train_seconds"],
                     "teacher_seconds_saved": saved, "history": [h["top1"] for h in m["history"]]})
    results = {"teacher": TEACHER, "teacher_top1": teacher["top1"], "teacher_epochs": teacher_epochs,
               "teacher_train_seconds": teacher["train_seconds"], "recipe": RECIPE,
               "view_size": get_recipe(RECIPE).input_size, "epochs": epochs, "cached_epochs": CacheStore(store).epochs,
               "topk": topk, "seeds": list(seeds), "arms": ARMS, "code": code_version(),
               "teacher_seconds_per_view": per_view_s, "runs": runs, "groups": _groups(runs)}
    results["verdict"] = _verdict(results)
    results["seconds"] = time.perf_counter() - t_start
    results["cpu_seconds"] = _cpu_seconds() - cpu_start  # this process and its finished workers
    results["load_average"] = [load_start, os.getloadavg()[0]]  # 1-minute load at the start and the end
    results["runs_reused"] = reused  # finished runs of an earlier invocation: `seconds` does not include them
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(_table(results))
    _plot(results, out / "accuracy.png")
    return results


def _reusable(cfg: TrainConfig) -> bool:
    """A finished run that this code and configuration made. Work that another commit or configuration made (or
    began) is removed, with a note, so that it is made again."""
    out = cfg.run.out
    if (out / "metrics.json").exists():
        p = json.loads((out / "metrics.json").read_text()).get("provenance") or {}
        if p.get("code") == code_version() and p.get("config_hash") == run_config_hash(cfg):
            return True
        print(f"redoing {out}: it was made by another version of the code or another configuration", flush=True)
        shutil.rmtree(out)
    elif (out / "config.json").exists():
        began = json.loads((out / "config.json").read_text()).get("made_by", {}).get("code")
        if began != code_version():  # resuming it would mix two versions of the code
            print(f"redoing {out}: another version of the code began it", flush=True)
            shutil.rmtree(out)
    return False


def _cache(out: Path, data: Path, epochs: int, topk: int, progress: bool) -> tuple[Path, float]:
    """The teacher's cache of exactly the epochs the students train (every epoch's views are new ones), and the
    teacher pass's seconds per view (measured when the store was made)."""
    store, timing_file = out / "teacher.zarr", out / "teacher_pass.json"
    if store.exists() and CacheStore(store).description.versions.get("code") != code_label():
        print(f"redoing {store}: another version of the code made it", flush=True)
        shutil.rmtree(store)
    cache = cache_teacher(build(CacheConfig, data=data, teacher=TEACHER, out=store, recipe=RECIPE,
                                checkpoint=out / "teacher" / "model.safetensors", epochs=epochs, topk=topk,
                                batch_size=256, workers=1, progress=progress))
    if cache["views_written"]:
        timing_file.write_text(json.dumps({"seconds": cache["seconds"], "views": cache["views_written"]}))
    timing = json.loads(timing_file.read_text())
    return store, timing["seconds"] / timing["views"]


def _student_config(out, store, student, method, seed, epochs, common) -> TrainConfig:
    _, kwargs, lr = STUDENTS[student]
    return build(TrainConfig, student=student, out=out / "students" / f"{student}-{method}-s{seed}",
                 model_kwargs=kwargs, cache=None if method == "ce" else store, seed=seed, epochs=epochs,
                 optimizer="adamw", lr=lr, weight_decay=0.05, warmup_epochs=1.0, **ARMS[method],
                 **(common | {"progress": False}))


def _train_all(todo: list[TrainConfig], processes: int) -> None:
    """The student runs are independent: two processes (one thread each) keep both cores busy."""
    todo = sorted(todo, key=lambda c: c.run.loss.method != "ofa")  # the longest (OFA heads) first: both end together
    if not todo:
        return
    with ProcessPoolExecutor(min(processes, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_student, cfg): cfg for cfg in todo}
        for done, future in enumerate(as_completed(futures), 1):
            m, cfg = future.result(), futures[future]
            print(f"[{done}/{len(todo)}] {cfg.run.out.name}: top-1 {m['top1']:.2f} ({m['train_seconds']:.0f} s of "
                  f"training)", flush=True)


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
        groups.append({"student": key[0], "family": rs[0]["family"], "method": key[1],
                       "seeds": [r["seed"] for r in rs], "top1": top1, "top1_mean": statistics.fmean(top1),
                       "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                       "ece_mean": statistics.fmean(r["ece"] for r in rs),
                       "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rs),
                       "teacher_seconds_saved_mean": statistics.fmean(r["teacher_seconds_saved"] for r in rs),
                       "history_mean": [statistics.fmean(h) for h in zip(*(r["history"] for r in rs), strict=True)],
                       "history_min": [min(h) for h in zip(*(r["history"] for r in rs), strict=True)],
                       "history_max": [max(h) for h in zip(*(r["history"] for r in rs), strict=True)]})
    return groups


def _verdict(s: dict) -> list[str]:
    """Per student and distillation method: the gain over CE, paired by seed, with its 95% t-interval; a gain
    whose interval holds 0 is reported as unresolved (within the seeds' spread)."""
    from scipy import stats
    lines = []
    by = {(r["student"], r["method"], r["seed"]): r["top1"] for r in s["runs"]}
    for student, family in dict.fromkeys((g["student"], g["family"]) for g in s["groups"]):
        for method in (m for m in METHODS if m != "ce"):
            d = [by[(student, method, seed)] - by[(student, "ce", seed)] for seed in s["seeds"]]
            mean, n = statistics.fmean(d), len(d)
            name = f"{student} ({family}): {method.upper()} vs CE {mean:+.2f} pt"
            if n < 2:
                lines.append(f"{name} (one seed: no interval)")
                continue
            half = stats.t.ppf(0.975, n - 1) * statistics.stdev(d) / n ** 0.5
            word = ("above CE" if mean - half > 0 else "below CE" if mean + half < 0
                    else "unresolved: the interval holds 0")
            lines.append(f"{name}, 95% interval [{mean - half:+.2f}, {mean + half:+.2f}] over {n} seeds: {word}")
    return lines


def _table(s: dict) -> str:
    seeds = len(s["seeds"])
    ofa = ", ".join(f"{k} {v}" for k, v in s["arms"]["ofa"].items() if k != "method")
    lines = [f"Digits at {s['view_size']}x{s['view_size']} (`{s['recipe']}`), {s['epochs']} student epochs from a "
             f"cache of {s['cached_epochs']} epochs at top-{s['topk']} (teacher pass "
             f"{1e3 * s['teacher_seconds_per_view']:.2f} ms per view); OFA with the authors' CIFAR-100 recipe "
             f"({ofa}); top-1 and calibration error on the 360 validation images, mean ± standard deviation over "
             f"{seeds} seeds.", "",
             "| student | method | top-1 (mean ± sd) | per seed | ECE (%) | training time per run (s) | "
             "teacher time saved per run (s) |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |",
             f"| {s['teacher']} (CNN teacher) | ce | {s['teacher_top1']:.2f} | - | - | "
             f"{s['teacher_train_seconds']:.1f} | - |"]
    for g in s["groups"]:
        saved = "-" if g["method"] == "ce" else f"{g['teacher_seconds_saved_mean']:.1f}"
        lines.append(f"| {g['student']} ({g['family']}) | {g['method']} | {g['top1_mean']:.2f} ± {g['top1_std']:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in g['top1'])} | {g['ece_mean']:.2f} | "
                     f"{g['train_seconds_mean']:.1f} | {saved} |")
    lines += ["", "Verdict (computed from the runs above):", *[f"- {v}" for v in s["verdict"]], "",
              f"This invocation took {s['seconds']:.0f} s of wall time and {s['cpu_seconds']:.0f} s of CPU time "
              f"(1-minute load average {s['load_average'][0]:.1f} at the start, {s['load_average'][1]:.1f} at the end"
              + (f"; {s['runs_reused']} finished runs reused" if s["runs_reused"] else "") + ")."]
    return "\n".join(lines) + "\n"


def _plot(s: dict, path: Path) -> None:
    """One panel per student, one colour per method: mean validation top-1 per epoch, band min-max over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    students = list(dict.fromkeys(g["student"] for g in s["groups"]))
    fig, axes = plt.subplots(1, len(students), figsize=(5.2 * len(students), 4.2), squeeze=False, sharey=True)
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    for ax, student in zip(axes[0], students, strict=True):
        for g in (g for g in s["groups"] if g["student"] == student):
            x = range(1, len(g["history_mean"]) + 1)
            c = colours[g["method"]]
            ax.plot(x, g["history_mean"], "-o", color=c, ms=3, label=g["method"])
            ax.fill_between(x, g["history_min"], g["history_max"], color=c, alpha=0.12)
        ax.axhline(s["teacher_top1"], color="gray", lw=1.0, ls="--", label=f"teacher ({s['teacher_top1']:.1f})")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(f"{student} ({STUDENTS[student][0]} student)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("validation top-1 (%)")
    fig.suptitle(f"digits: students of a cached CNN teacher (mean of {len(s['seeds'])} seeds, band: min-max)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
