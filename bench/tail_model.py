"""Would a better model of the teacher's tail (the classes outside the cached top-k) cut the loss error?

    python bench/tail_model.py --data DIR --teacher NAME --checkpoint PATH --student NAME --student-checkpoint PATH
        [--student-kwargs k=v ...] [--recipe cifar] [--view-size 32] [--shards 2] [--topk 5 10 20] [--T 1 4]

The cache keeps the top-k logits, their classes and the log-sum-exp; which class holds which of the
remaining logits is lost. On real teacher and student logits this script compares the KD loss (at each
T) from full logits with three reconstructions of the tail:
- uniform: the tail's probability mass spread evenly (what the cache does);
- oracle shape, unknown classes: the exact tail logit values (an upper bound on any shape model fitted
  to what the cache stores), with the classes that hold them unknown, i.e. each tail class weighted by
  the mean;
- oracle shape, student's order: the exact tail values handed to the tail classes in the student's order.
For the OFA loss (T = 1) the tail enters only through sum_tail p_j log q_j, so with the classes unknown
the uniform spread is already the estimate a shape model would give; only KD has a shape term.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import save
from scaling import subset
from torch.utils.data import DataLoader

from cache.teacher_pass import teacher_logits
from pipeline.augment import get_recipe
from pipeline.reader import ShardReader
from pipeline.views import TrainViews
from students.models import create_model, model_input, parse_kwargs


def kd_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(1)


def estimates(z: torch.Tensor, q: torch.Tensor, k: int, T: float) -> dict:
    """Mean KD loss at temperature T from full teacher logits z and from each tail reconstruction."""
    C = z.shape[1]
    v, idx = z.topk(k, 1)
    tail = torch.ones_like(z, dtype=torch.bool).scatter_(1, idx, False)
    log_q = F.log_softmax(q / T, 1)
    log_p = F.log_softmax(z / T, 1)
    # uniform: tail logit c with (C - k) e^c = e^lse - sum(e^topk), as the cache rebuilds it
    mass = (z.logsumexp(1).exp() - v.exp().sum(1)).clamp_min(1e-30)
    zu = (mass / (C - k)).log()[:, None].expand_as(z).clone().scatter_(1, idx, v)
    # oracle shape, classes unknown: exact teacher terms; the cross term weights every tail class by the mean
    p = log_p.exp()
    top = (p * (log_p - log_q)).masked_fill(tail, 0).sum(1)
    shape = top + (p * log_p).masked_fill(~tail, 0).sum(1) - (p.masked_fill(~tail, 0).sum(1)
                                                                * log_q.masked_fill(~tail, 0).sum(1) / (C - k))
    # oracle shape, student's order: the sorted tail values assigned to tail classes by the student's ranking
    sorted_tail = z.masked_fill(~tail, float("-inf")).sort(1, descending=True).values[:, :C - k]
    student_order = q.masked_fill(~tail, float("-inf")).argsort(1, descending=True)[:, :C - k]
    zr = torch.empty_like(z).scatter_(1, idx, v).scatter_(1, student_order, sorted_tail)
    T2 = T * T
    return {"full": float(kd_terms(log_p, log_q).mean()) * T2,
            "uniform": float(kd_terms(F.log_softmax(zu / T, 1), log_q).mean()) * T2,
            "oracle_shape_unknown_classes": float(shape.mean()) * T2,
            "oracle_shape_student_order": float(kd_terms(F.log_softmax(zr / T, 1), log_q).mean()) * T2}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--student-checkpoint", type=Path, required=True)
    ap.add_argument("--student-kwargs", nargs="*", default=[])
    ap.add_argument("--recipe", default="cifar")
    ap.add_argument("--view-size", type=int, default=32)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--topk", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--T", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--name", default="tail_model")
    args = ap.parse_args(argv)
    recipe = get_recipe(args.recipe, args.view_size)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tail-"))
    try:
        reader = ShardReader(subset(args.data, args.shards, tmp / "data"))
        C = reader.manifest.num_classes
        teacher = create_model(args.teacher, C, checkpoint=args.checkpoint, role="teacher").eval()
        student = create_model(args.student, C, checkpoint=args.student_checkpoint,
                               model_kwargs=parse_kwargs(args.student_kwargs), role="student").eval()
        t_in, s_in = model_input(teacher, recipe.input_size), model_input(student, recipe.input_size)
        zs, qs = [], []
        for b in DataLoader(TrainViews(reader, recipe, 0, view_epochs=1), batch_size=250):
            with torch.no_grad():
                zs.append(teacher_logits(teacher, t_in, b["view"]))
                qs.append(student(s_in(b["view"])).float())
        z, q = torch.cat(zs), torch.cat(qs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for k in args.topk:
        for T in args.T:
            e = estimates(z, q, k, T)
            row = {"topk": k, "T": T, "views": len(z), **e}
            for name in ("uniform", "oracle_shape_unknown_classes", "oracle_shape_student_order"):
                row[f"{name}_rel_error"] = abs(e[name] - e["full"]) / abs(e["full"])
            rows.append(row)
            print(f"k={k:3d} T={T:g}: KD full {e['full']:.4f}; relative error: uniform "
                  f"{row['uniform_rel_error']:.2%}, oracle shape with unknown classes "
                  f"{row['oracle_shape_unknown_classes_rel_error']:.2%}, oracle shape in the student's order "
                  f"{row['oracle_shape_student_order_rel_error']:.2%}")
    res = {"teacher": args.teacher, "checkpoint": str(args.checkpoint), "student": args.student,
           "recipe": args.recipe, "num_classes": C, "rows": rows}
    save(args.name, res)
    return res


if __name__ == "__main__":
    main()
