"""Stage two: the cost of distilling from the cache against plain CE and against the online teacher,
and the data loader with and without the cache.

    python bench/stage_two.py [--data DIR] [--student NAME] [--teacher NAME] [--steps N] [--batch-size B]

Targets (BRIEF §4): cached OFA step / CE step (same student + heads) <= 1.05; measured saving of the
cache over the online teacher within 10% of the saving predicted by the teacher's forward time;
loader with cache / without >= 0.95 (views/s).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import ROOT, save
from stage_one import ensure_digits
from torch.utils.data import DataLoader

from cache.store import CacheStore
from cache.teacher_pass import CacheConfig, cache_teacher
from pipeline.augment import get_recipe
from pipeline.reader import ShardReader
from pipeline.views import TrainViews
from students.heads import StudentWithHeads
from students.models import create_model, model_input
from students.task import LossConfig, distill_losses, teacher_from_batch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
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
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-s2-"))
    try:
        store_path = tmp / "t.zarr"
        cache_teacher(CacheConfig(data=data, teacher=args.teacher, out=store_path, recipe=recipe,
                                  recipe_name=args.recipe, epochs=1, topk=args.topk, batch_size=128, workers=1,
                                  progress=False))
        store = CacheStore(store_path)

        # ---- data loader with and without the cache (in-process, so its own cost is what is measured)
        def loader_rate(cache) -> float:
            stream = TrainViews(reader, recipe, 0, cache=cache, view_epochs=1)
            t0, n = time.perf_counter(), 0
            for b in DataLoader(stream, batch_size=args.batch_size, num_workers=0):
                n += len(b["label"])
            return n / (time.perf_counter() - t0)

        with_c, without_c = 0.0, 0.0
        for _ in range(args.rounds):
            without_c = max(without_c, loader_rate(None))
            with_c = max(with_c, loader_rate(store))

        if args.loader_only:
            res = {"recipe": args.recipe, "view_size": recipe.input_size, "samples": reader.split.count,
                   "samples_per_shard": reader.split.samples_per_shard,
                   "loader_with_cache_views_per_s": with_c, "loader_without_cache_views_per_s": without_c,
                   "loader_with_over_without": with_c / without_c, "target_loader_ratio": 0.95}
            save(args.name, res)
            return res

        # ---- steps: the same batches, the same student + heads, three losses
        stream = TrainViews(reader, recipe, 0, cache=store, view_epochs=1)
        batches = []
        for b in DataLoader(stream, batch_size=args.batch_size, drop_last=True):
            batches.append({k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()})
            if len(batches) == args.steps:
                break
        teacher = create_model(args.teacher, C, role="teacher").eval().to(dev)
        t_in = model_input(teacher, recipe.input_size)
        bare = create_model(args.student, C, role="student")
        s_in = model_input(bare, recipe.input_size)
        model = StudentWithHeads(bare, C, s_in.size, teacher_width=teacher.num_features).to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        ofa = LossConfig("ofa")

        def step(target_fn, loss_fn):
            """One training step as the loop does it: teacher targets, student forward, loss, backward, step."""
            for b in batches:
                t = target_fn(b)
                out = model(s_in(b["view"]))
                loss = loss_fn(out, t, b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        def ce(out, t, b):  # plain CE on the final logits and on every head
            return F.cross_entropy(out["logits"], b["label"]) + sum(F.cross_entropy(h, b["label"])
                                                                    for h in out["heads"].values())

        def ofa_loss(out, t, b):
            return distill_losses(out, t, b, ofa, C)["loss"]

        def no_teacher(b):
            return None

        def from_cache(b):
            return teacher_from_batch(b, C)

        @torch.no_grad()
        def online_teacher(b):
            return teacher(t_in(b["view"])).float()

        def teacher_only():
            with torch.no_grad():
                for b in batches:
                    teacher(t_in(b["view"]))

        def clock(fn) -> float:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        step(online_teacher, ofa_loss)  # warm-up
        variants = {"ce": lambda: step(no_teacher, ce), "cached": lambda: step(from_cache, ofa_loss),
                    "online": lambda: step(online_teacher, ofa_loss), "teacher": teacher_only}
        times = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds):  # interleaved, rotated rounds: drift on a shared machine hits all alike
            for k in names[r % 4:] + names[: r % 4]:
                times[k].append(clock(variants[k]))
        # ratios are taken within each round (same machine state), then the median over rounds
        per_round = {"cached_over_ce": [c / e for c, e in zip(times["cached"], times["ce"], strict=True)],
                     "measured": [(o - c) / o for o, c in zip(times["online"], times["cached"], strict=True)],
                     "predicted": [t / o for t, o in zip(times["teacher"], times["online"], strict=True)]}
        med = {k: float(np.median(v)) for k, v in per_round.items()}
        t = {k: float(np.median(v)) for k, v in times.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.steps
    predicted, measured = med["predicted"], med["measured"]
    res = {"student": args.student, "teacher": args.teacher, "batch_size": args.batch_size, "steps": n,
           "device": str(dev), "heads": model.names,
           "ce_step_s": t["ce"] / n, "cached_ofa_step_s": t["cached"] / n, "online_ofa_step_s": t["online"] / n,
           "teacher_forward_s": t["teacher"] / n,
           "cached_over_ce": med["cached_over_ce"], "target_cached_over_ce": 1.05, "rounds": args.rounds,
           "per_round": per_round,
           "saving_measured": measured, "saving_predicted": predicted,
           "saving_relative_error": abs(measured - predicted) / predicted, "target_saving_relative_error": 0.10,
           "loader_with_cache_views_per_s": with_c, "loader_without_cache_views_per_s": without_c,
           "loader_with_over_without": with_c / without_c, "target_loader_ratio": 0.95}
    save(args.name, res)
    return res


if __name__ == "__main__":
    main()
