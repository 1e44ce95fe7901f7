"""`make demo`: the whole product on the embedded digits, in one process, in a few minutes on 2 CPU cores.

    shards (digits) -> CE-trained CNN teacher -> teacher cache -> ViT- and MLP-style students with
    CE, KD and OFA from the cache -> table (results.md, results.json) and accuracy plot (accuracy.png)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cache.teacher_pass import CacheConfig, cache_teacher
from pipeline.augment import get_recipe
from pipeline.shards import make_shards
from students.task import LossConfig
from students.train import TrainConfig, train

TEACHER = "test_resnet"
STUDENTS = {  # name -> (kind, timm kwargs, optimizer, lr)
    "test_vit": ("ViT", {"img_size": 32, "patch_size": 4}, "adamw", 2e-3),
    "resmlp_tiny_p4": ("MLP", {}, "adamw", 2e-3),
}
METHODS = ("ce", "kd", "ofa")


def run_demo(out: Path, epochs: int = 4, teacher_epochs: int = 8, topk: int = 5, batch_size: int = 64,
             progress: bool = True) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "dataset.json").exists():
        make_shards("digits", data, progress=progress)
    recipe = "digits"

    t0 = time.perf_counter()
    teacher_dir = out / "teacher"
    if not (teacher_dir / "metrics.json").exists():
        train(TrainConfig(data=data, student=TEACHER, out=teacher_dir, loss=LossConfig("ce"), recipe=recipe,
                          epochs=teacher_epochs, batch_size=batch_size, lr=0.1, progress=progress, resume=True))
    teacher_metrics = json.loads((teacher_dir / "metrics.json").read_text())
    teacher_train_s = time.perf_counter() - t0

    store = out / "teacher.zarr"
    cache = cache_teacher(CacheConfig(data=data, teacher=TEACHER, out=store, recipe=get_recipe(recipe),
                                      recipe_name=recipe, checkpoint=teacher_dir / "model.safetensors",
                                      epochs=epochs, topk=topk, batch_size=256, workers=1, progress=progress))
    cache_s = cache["seconds"]
    per_view_s = cache_s / max(1, cache["views_written"]) if cache["views_written"] else None
    if per_view_s is None:  # cache already existed: time the teacher on a fresh pass of one unit's worth
        per_view_s = float(json.loads((out / "results.json").read_text())["teacher_seconds_per_view"]) \
            if (out / "results.json").exists() else 0.0

    rows = []
    for student, (kind, kwargs, opt, lr) in STUDENTS.items():
        for method in METHODS:
            run_dir = out / "students" / f"{student}-{method}"
            if not (run_dir / "metrics.json").exists():
                train(TrainConfig(data=data, student=student, out=run_dir, model_kwargs=kwargs,
                                  loss=LossConfig(method), cache=None if method == "ce" else store,
                                  recipe=recipe, epochs=epochs, batch_size=batch_size, optimizer=opt, lr=lr,
                                  weight_decay=0.05, warmup_epochs=0.5, progress=progress, resume=True))
            m = json.loads((run_dir / "metrics.json").read_text())
            views = sum(h["images_per_second"] * h["train_seconds"] for h in m["history"])
            rows.append({"method": method, "student": student, "family": kind, "top1": m["top1"], "top5": m["top5"],
                         "train_seconds": m["train_seconds"],
                         "teacher_seconds_saved": 0.0 if method == "ce" else views * per_view_s,
                         "history": [h["top1"] for h in m["history"]]})
    summary = {"teacher": TEACHER, "teacher_top1": teacher_metrics["top1"], "teacher_train_seconds": teacher_train_s,
               "cache_seconds": cache_s, "teacher_seconds_per_view": per_view_s, "topk": topk, "epochs": epochs,
               "runs": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(_table(summary))
    _plot(rows, out / "accuracy.png", teacher_metrics["top1"])
    return rows


def _table(s: dict) -> str:
    lines = [f"Teacher {s['teacher']} (CE): top-1 {s['teacher_top1']:.2f}; cached {s['epochs']} epochs at "
             f"top-{s['topk']} in {s['cache_seconds']:.1f} s.", "",
             "| method | student | top-1 | training time (s) | teacher time saved (s) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in s["runs"]:
        lines.append(f"| {r['method']} | {r['student']} ({r['family']}) | {r['top1']:.2f} | {r['train_seconds']:.1f} | "
                     f"{r['teacher_seconds_saved']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, teacher_top1: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"ce": ":", "kd": "--", "dkd": "-.", "ofa": "-"}
    for r in rows:
        ax.plot(range(1, len(r["history"]) + 1), r["history"], styles.get(r["method"], "-"), marker="o",
                label=f"{r['student']} {r['method']}")
    ax.axhline(teacher_top1, color="gray", lw=0.8, label="teacher")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("digits: heterogeneous students from one cached CNN teacher")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
