"""Fidelity of the cache on real teacher outputs: losses and distributions from top-k against full logits.

    python bench/fidelity.py --data DIR --teacher NAME --checkpoint PATH --student NAME --student-checkpoint PATH
        [--student-kwargs k=v ...] [--recipe tiny-vit] [--view-size 32] [--shards 4] [--topk 1 5 10 20 200]

For each k, a real teacher pass writes a real store over the same views; the teacher's full logits
come from a direct forward on the rebuilt views. For a trained student's logits on those views we
report the relative error of the OFA loss (gamma 1 and 1.5, T = 1) and of KD (T = 4) computed from the
cache against the same losses from full logits, the total-variation distance of the rebuilt teacher
distribution (T = 1 and T = 4), and bytes per view.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import inputs, md_table, save
from scaling import subset
from torch.utils.data import DataLoader

from cache.targets import CachedTeacher
from cache.teacher import Teacher
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from pipeline.augment import get_recipe
from pipeline.models import Weights, create_model, model_input, parse_kwargs
from pipeline.reader import ShardReader
from pipeline.views import TrainViews
from students.losses import kd_loss, ofa_loss, target_class


def add_pair_args(ap: argparse.ArgumentParser, recipe: str, shards: int) -> None:
    """Arguments naming the data slice, the trained teacher and the trained student (shared with tail_model.py)."""
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--student-checkpoint", type=Path, required=True)
    ap.add_argument("--student-kwargs", nargs="*", default=[], help="timm keyword arguments, e.g. img_size=32")
    ap.add_argument("--recipe", default=recipe)
    ap.add_argument("--view-size", type=int, default=32)
    ap.add_argument("--shards", type=int, default=shards)


def load_pair(args, num_classes: int, view_size: int):
    """(the stage-one Teacher, student, its ModelInput), both in eval mode."""
    teacher = Teacher.build(args.teacher, num_classes, view_size, weights=Weights(checkpoint=args.checkpoint))
    student = create_model(args.student, num_classes, weights=Weights(checkpoint=args.student_checkpoint),
                           model_kwargs=parse_kwargs(args.student_kwargs), role="student").eval()
    return teacher, student, model_input(student, view_size)


def pair_logits(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, int]:
    """The `add_pair_args` slice's views of cached epoch 0 -> (teacher logits [N, C], student logits [N, C],
    labels [N, 2] (label, partner label), view seeds [N], C), from one forward of each model per view (shared
    with tail_model.py and tail_sampling.py)."""
    recipe = get_recipe(args.recipe, args.view_size)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pair-"))
    try:
        reader = ShardReader(subset(args.data, args.shards, tmp / "data"))
        C = reader.manifest.num_classes
        teacher, student, s_in = load_pair(args, C, recipe.input_size)
        zs, qs, ls, ss = [], [], [], []
        for b in DataLoader(TrainViews(reader, recipe, 0, view_epochs=1), batch_size=250):
            with torch.no_grad():
                zs.append(teacher(b["view"]).float())
                qs.append(student(s_in(b["view"])).float())
            ls.append(torch.stack([b["label"], b["partner_label"]], 1))
            ss.append(b["view_seed"].numpy().astype(np.int64))
        return torch.cat(zs), torch.cat(qs), torch.cat(ls), np.concatenate(ss), C
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def row_of(k: int, acc: dict, store, mass: torch.Tensor, n: int, C: int) -> dict:
    """One k's row: each loss from the cache against the same loss from full logits, over the n views."""
    row = {"topk": k, "views": n}
    for name in ("ofa_g1", "ofa_g1.5", "kd_T4"):
        full_v, cache_v = acc[f"{name}_full"] / n, acc[f"{name}_cache"] / n
        row[f"{name}_full"], row[f"{name}_cache"] = full_v, cache_v
        row[f"{name}_rel_error"] = abs(cache_v - full_v) / abs(full_v)
    row["tv_T1"], row["tv_T4"] = acc["tv_T1"] / n, acc["tv_T4"] / n
    row["topk_mass_mean"] = float(mass[:, min(k, C) - 1].mean())
    row["raw_bytes_per_view"] = store.description.raw_bytes_per_view
    row["disk_bytes_per_view"] = store.disk_bytes() / n
    return row


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    add_pair_args(ap, recipe="tiny-vit", shards=4)
    ap.add_argument("--topk", type=int, nargs="+", default=[1, 5, 10, 20, 200])
    ap.add_argument("--name", default="fidelity")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    recipe = get_recipe(args.recipe, args.view_size)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fid-"))
    try:
        data = subset(args.data, args.shards, tmp / "data")
        reader = ShardReader(data)
        C = reader.manifest.num_classes
        teacher, student, s_in = load_pair(args, C, recipe.input_size)
        stores = {}
        for k in args.topk:
            stores[k] = tmp / f"k{k}.zarr"
            cache_teacher(build(CacheConfig, data=data, teacher=args.teacher, checkpoint=args.checkpoint, out=stores[k],
                                      recipe=args.recipe, view_size=args.view_size, epochs=1, topk=k, batch_size=250,
                                      workers=1, progress=False))
        sums = {k: {} for k in args.topk}
        n = 0
        mass = []
        cached = {k: CachedTeacher(path) for k, path in stores.items()}
        loaders = [DataLoader(cached[k].views(reader, 0), batch_size=250) for k in args.topk]
        for batches in zip(*loaders, strict=True):  # the same views in the same order, with each store's targets
            b = batches[0]
            assert all(torch.equal(o["index"], b["index"]) for o in batches)
            with torch.no_grad():
                full = teacher(b["view"])
                s = student(s_in(b["view"])).float()
            c = target_class(b["label"], b["partner_label"], b["lam"])
            ref = {"ofa_g1": ofa_loss(s, full, c, 1.0), "ofa_g1.5": ofa_loss(s, full, c, 1.5),
                   "kd_T4": kd_loss(s, full, 4.0)}
            for k, bk in zip(args.topk, batches, strict=True):
                z = cached[k].logits(bk)
                got = {"ofa_g1": ofa_loss(s, z, c, 1.0), "ofa_g1.5": ofa_loss(s, z, c, 1.5),
                       "kd_T4": kd_loss(s, z, 4.0)}
                acc = sums[k]
                for name in ref:
                    acc[f"{name}_full"] = acc.get(f"{name}_full", 0.0) + float(ref[name]) * len(s)
                    acc[f"{name}_cache"] = acc.get(f"{name}_cache", 0.0) + float(got[name]) * len(s)
                for T in (1.0, 4.0):
                    tv = 0.5 * (F.softmax(z / T, 1) - F.softmax(full / T, 1)).abs().sum(1)
                    acc[f"tv_T{T:g}"] = acc.get(f"tv_T{T:g}", 0.0) + float(tv.sum())
            p = F.softmax(full, 1).sort(1, descending=True).values.cumsum(1)
            mass.append(p)
            n += len(s)
        rows = [row_of(k, sums[k], cached[k].store, torch.cat(mass), n, C) for k in args.topk]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"teacher": args.teacher, "checkpoint": str(args.checkpoint), "student": args.student,
           "student_kwargs": args.student_kwargs,
           "recipe": args.recipe, "view_size": recipe.input_size, "num_classes": C, "rows": rows,
           "inputs": inputs(teacher=args.checkpoint, student=args.student_checkpoint, data=args.data)}
    save(args.name, res)
    return res


def pair_line(r: dict) -> str:
    """The teacher, student and data of a record of this script, tail_model.py or tail_sampling.py."""
    kw = f" ({' '.join(r['student_kwargs'])})" if r.get("student_kwargs") else ""
    return (f"Teacher {r['teacher']} (`{r['checkpoint']}`), student {r['student']}{kw}, {r['num_classes']} classes, "
            f"recipe `{r['recipe']}`")


def table(record: dict) -> str:
    r = record["results"]
    rows = [[x["topk"], x["views"], x["ofa_g1_rel_error"], x["ofa_g1.5_rel_error"], x["kd_T4_rel_error"], x["tv_T1"],
             x["tv_T4"], x["topk_mass_mean"], x["raw_bytes_per_view"], x["disk_bytes_per_view"]] for x in r["rows"]]
    return (pair_line(r) + f" at {r['view_size']} px. Relative error of each loss from the cache against the same "
            "loss from full logits; total-variation distance of the rebuilt teacher distribution; the teacher's "
            "probability mass in its top k. No target: the evidence for the default k.\n\n"
            + md_table(["k", "views", "OFA γ=1 rel. error", "OFA γ=1.5", "KD T=4", "TV T=1", "TV T=4", "top-k mass",
                        "raw B/view", "disk B/view"], rows))


if __name__ == "__main__":
    main()
