"""Stage two: what a training step costs with the cache, against a free teacher and the online teacher;
the data loader with and without the cache; the cost of the views' pixel fingerprint.

    python bench/stage_two.py [--data DIR] [--student NAME] [--teacher NAME] [--steps N] [--batch-size B]

Every step timed here is `students.train.train_step` on a `DistillationTask`, the code the training
loop runs; only the task's teacher source changes between variants:
- free:    OFA loss against teacher logits already in memory (a teacher that costs nothing: the limit)
- cached:  OFA loss against the teacher rebuilt from the cache's top-k (`CachedTeacher.logits`)
- online:  OFA loss against the stage-one `Teacher` run in the step
- ce:      the CE method's task (no heads, no teacher), for reference
Targets (BRIEF §4): cached / free <= 1.05; the cache's saving over the online teacher within 10% of
the saving the teacher's forward time predicts; loader with cache / without >= 0.95 (views/s); the
pixel fingerprint at most 2% of loader time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from common import ROOT, inputs, md_table, save
from stage_one import ensure_digits

import pipeline.views
from cache.targets import CachedTeacher
from cache.teacher import Teacher
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from pipeline.augment import get_recipe
from pipeline.models import create_model, model_input
from pipeline.reader import ShardReader
from pipeline.views import TrainViews
from students.heads import StudentWithHeads
from students.task import DistillationTask, LossConfig, online
from students.train import to_device, train_step


def loader_rates(reader, recipe, cached: CachedTeacher, rounds: int, batch_size: int) -> dict:
    """Views/s of the stage-two loader (`TrainViews.loader`, as train-student builds it) without and with the
    cache join (0 workers: in-process, so its own cost is what is measured; the views of the full batches it
    hands out), and the share of loader time spent in the pixel fingerprint."""
    real_digest, spent = pipeline.views.view_digest, [0.0]

    def timed_digest(*args, **kwargs):
        t0 = time.perf_counter()
        d = real_digest(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return d

    def rate(stream: TrainViews) -> tuple[float, float]:
        spent[0] = 0.0
        t0, n = time.perf_counter(), 0
        for b in stream.loader(0, batch_size, 0):
            n += len(b["label"])
        total = time.perf_counter() - t0
        return n / total, spent[0] / total

    pipeline.views.view_digest = timed_digest
    try:
        without, with_c, digest_share = 0.0, 0.0, []
        for _ in range(rounds):
            r, share = rate(TrainViews(reader, recipe, cached.seed, view_epochs=1))
            without = max(without, r)
            digest_share.append(share)
            with_c = max(with_c, rate(cached.views(reader, 0))[0])
    finally:
        pipeline.views.view_digest = real_digest
    return {"loader_with_cache_views_per_s": with_c, "loader_without_cache_views_per_s": without,
            "loader_with_over_without": with_c / without, "target_loader_ratio": 0.95,
            "digest_share_of_loader_time": float(np.median(digest_share)), "target_digest_share": 0.02}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "bench" / "digits")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--recipe", default="digits-mix")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--loader-only", action="store_true", help="only the loader comparison")
    ap.add_argument("--name", default="stage_two")
    args = ap.parse_args(argv)
    data = ensure_digits(args.data) if args.data.name == "digits" else args.data
    recipe = get_recipe(args.recipe)
    reader = ShardReader(data)
    C = reader.manifest.num_classes
    tmp = Path(tempfile.mkdtemp(prefix="bench-s2-"))
    try:
        store_path = tmp / "t.zarr"
        cache_teacher(build(CacheConfig, data=data, teacher=args.teacher, out=store_path, recipe=args.recipe,
                            epochs=1, topk=args.topk, batch_size=128, workers=1, progress=False))
        cached = CachedTeacher(store_path)
        res = {"recipe": args.recipe, "view_size": recipe.input_size, "samples": reader.split.count,
               "inputs": inputs(data=data),
               **loader_rates(reader, recipe, cached, args.rounds, args.batch_size)}
        if args.loader_only:
            save(args.name, res)
            return res
        res |= steps(args, cached, reader, recipe, C)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save(args.name, res)
    return res


def rotated_rounds(names: list[str], run, clock, rounds: int) -> dict[str, list[float]]:
    """Each variant once to warm up, then timed in interleaved, rotated rounds: drift on a shared machine hits all
    alike."""
    for n in names:
        run(n)
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(clock(k))
    return times


def steps(args, cached: CachedTeacher, reader, recipe, C: int) -> dict:
    accelerator = Accelerator()
    dev = accelerator.device
    batches = []  # the same batches for every variant, already on the device: loader cost is measured apart
    for b in cached.views(reader, 0).loader(0, args.batch_size, 0):
        batches.append(to_device(b, dev))
        if len(batches) == args.steps:
            break
    teacher = Teacher.build(args.teacher, C, recipe.input_size, device=dev)
    for b in batches:
        b["free_teacher"] = teacher(b["view"])
    bare = create_model(args.student, C, role="student")
    s_in = model_input(bare, recipe.input_size)
    student = StudentWithHeads(bare, C, s_in.size, teacher_width=teacher.num_features)
    task = DistillationTask(student, s_in, LossConfig("ofa"), C, cached.logits)
    ce_task = DistillationTask(StudentWithHeads(create_model(args.student, C, role="student"), C, s_in.size,
                                                with_heads=False), s_in, LossConfig("ce"), C)
    opt = torch.optim.SGD(task.parameters(), lr=1e-3, momentum=0.9)
    ce_opt = torch.optim.SGD(ce_task.parameters(), lr=1e-3, momentum=0.9)
    task, opt, ce_task, ce_opt = accelerator.prepare(task, opt, ce_task, ce_opt)
    sources = {"free": lambda b: b["free_teacher"], "cached": cached.logits, "online": online(teacher)}

    def run(name):
        if name == "teacher":
            for b in batches:
                teacher(b["view"])
            return
        t, o = (ce_task, ce_opt) if name == "ce" else (task, opt)
        if name != "ce":
            accelerator.unwrap_model(task).teacher_source = sources[name]
        for b in batches:
            train_step(t, b, o, accelerator)

    def clock(name) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(name)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = rotated_rounds(["free", "cached", "online", "teacher", "ce"], run, clock, args.rounds)
    # ratios are taken within each round (same machine state), then the median over rounds
    per_round = {"cached_over_free": [c / f for c, f in zip(times["cached"], times["free"], strict=True)],
                 "measured": [(o - c) / o for o, c in zip(times["online"], times["cached"], strict=True)],
                 "predicted": [t / o for t, o in zip(times["teacher"], times["online"], strict=True)]}
    med = {k: float(np.median(v)) for k, v in per_round.items()}
    t = {k: float(np.median(v)) / args.steps for k, v in times.items()}
    return {"student": args.student, "teacher": args.teacher, "batch_size": args.batch_size, "steps": args.steps,
            "device": str(dev), "heads": student.names, "rounds": args.rounds,
            "free_ofa_step_s": t["free"], "cached_ofa_step_s": t["cached"], "online_ofa_step_s": t["online"],
            "teacher_forward_s": t["teacher"], "ce_task_step_s": t["ce"],
            "cached_over_free": med["cached_over_free"], "target_cached_over_free": 1.05, "per_round": per_round,
            "saving_measured": med["measured"], "saving_predicted": med["predicted"],
            "saving_relative_error": abs(med["measured"] - med["predicted"]) / med["predicted"],
            "target_saving_relative_error": 0.10}


def table(record: dict) -> str:
    r = record["results"]
    rows = [["loader views/s without the cache, with it", f"{r['loader_without_cache_views_per_s']:,.0f}, "
             f"{r['loader_with_cache_views_per_s']:,.0f}", ""],
            ["loader with cache / without", r["loader_with_over_without"], f">= {r['target_loader_ratio']}"],
            ["pixel fingerprint / loader time", r["digest_share_of_loader_time"], f"<= {r['target_digest_share']}"]]
    head = f"Loader: {r['samples']} samples, recipe `{r['recipe']}` at {r['view_size']} px."
    if "cached_over_free" in r:  # not a --loader-only record
        head += (f" Steps: student {r['student']} + heads ({len(r['heads'])}), teacher {r['teacher']}, batch "
                 f"{r['batch_size']}, {r['steps']} steps x {r['rounds']} rounds on {r['device']}.")
        rows += [["OFA step s: free teacher, cached, online; teacher forward; CE step",
                  ", ".join(f"{r[k]:.3g}" for k in ("free_ofa_step_s", "cached_ofa_step_s", "online_ofa_step_s",
                                                   "teacher_forward_s", "ce_task_step_s")), ""],
                 ["cached OFA step / free-teacher OFA step", r["cached_over_free"],
                  f"<= {r['target_cached_over_free']}"],
                 ["online-teacher saving: measured, predicted from the teacher's forward",
                  f"{r['saving_measured']:.3f}, {r['saving_predicted']:.3f}", ""],
                 ["saving: relative error of the prediction", r["saving_relative_error"],
                  f"<= {r['target_saving_relative_error']}"]]
    note = (" Step-time ratios are medians of per-round ratios over interleaved, rotated rounds on the same "
            "batches." if "cached_over_free" in r else "")
    return head + note + " The loader's ratio counts the cache's fixed cost per shard (one unit read and its checks) "\
        "against the views' own cost, so it is lowest where views are cheapest.\n\n" + \
        md_table(["what", "measured", "target"], rows)


if __name__ == "__main__":
    main()
